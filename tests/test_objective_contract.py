"""The objective contract with a toy family that uses every capability the trainer offers.

The toy declares its own batch (no image, no text), owns non-gradient state (an EMA copy of the
weights, a feature queue, its own step counter, a frozen projection with no optimizer state) and
is trained by the one train step: state sharded like the params, updated once per step after the
optimizer, checkpointed and resumed bit-exactly, and equal on 8 devices and on 1.
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import checkpoint as ckpt_lib
from vljax import configlib, sharding, train
from vljax.models import layers
from vljax.objectives import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN, OUT, QUEUE, BATCH = 4, 8, 12, 8
EMA = 0.75


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT, kernel_init=layers.partitioned(nn.initializers.normal(0.5),
                                                        ("embed", "mlp")),
                    bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)))(x)


class ToyObjective(base.Objective):
  """Regresses a target through a frozen projection and a trained Dense layer."""

  def __init__(self):
    self.model = _Net()

  def batch_fields(self):
    return {"x": base.BatchField((IN,), np.float32, ("act_embed",)),
            "target": base.BatchField((OUT,), np.float32, (None,))}

  def init(self, rng, batch):
    return self.model.init(rng, batch["x"])["params"]

  def init_extra(self, rng, params, batch):
    del batch
    frozen = layers.partitioned(nn.initializers.normal(1.0), ("embed", None))(rng, (IN, IN))
    return {"ema": jax.tree.map(lambda p: p, params),  # keeps the params' logical names
            "queue": jnp.zeros((QUEUE, OUT), jnp.float32),
            "count": jnp.zeros((), jnp.int32),
            "frozen_net": frozen}

  def loss_with_extra(self, params, extra, batch, rng):
    del rng
    out = self.model.apply({"params": params}, batch["x"] @ extra["frozen_net"])
    # The queue enters as a constant; the gradient must not flow into it.
    loss = jnp.mean((out - batch["target"]) ** 2) + 0.1 * jnp.mean(out * extra["queue"].mean(0))
    return loss, ({"out_mean": jnp.mean(out)}, out)

  def update_extra(self, extra, params, outputs, step):
    ema = jax.tree.map(lambda e, p: EMA * e + (1 - EMA) * p, extra["ema"], params)
    queue = jnp.concatenate([outputs, extra["queue"]])[:QUEUE]
    return {"ema": ema, "queue": queue, "count": extra["count"] + 1 + 0 * step,
            "frozen_net": extra["frozen_net"]}


def _config():
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "siglip.py:scale=tiny"))
  return configlib.apply_overrides(config, [f"batch_size={BATCH}", "total_steps=10",
                                            "optim.warmup_steps=0", "optim.lr=0.05"])


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"x": rng.normal(size=(BATCH, IN)).astype(np.float32),
           "target": rng.normal(size=(BATCH, OUT)).astype(np.float32)} for _ in range(n)]


def _run(mesh, batches, state=None, setup=None):
  config = _config()
  if setup is None:
    setup = train.build(config, None, mesh, epoch_size=None, objective=ToyObjective())
  if state is None:
    state = train.init_state(setup, config.seed)
  step = train.make_train_step(setup)
  history = []  # host copies of the params before each step (the state is donated)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for batch in batches:
      history.append(jax.tree.map(np.asarray, state.params))
      state, _ = step(state, sharding.global_batch_from_host(batch, mesh, setup.batch_shardings),
                      jax.random.key(1))
  return setup, state, history


@pytest.fixture(scope="module")
def mesh8():
  return sharding.make_mesh({"data": 4, "fsdp": 2})


@pytest.fixture(scope="module")
def three_steps(mesh8):
  return _run(mesh8, _batches(3))


def test_declared_batch_drives_shardings_and_shapes(three_steps):
  setup, _, _ = three_steps
  assert set(setup.batch_shardings) == {"x", "target"}
  assert setup.batch_shardings["x"].spec[0] == sharding.BATCH_AXES
  shapes = train.batch_on_host_shapes(setup.batch_fields, BATCH)
  assert shapes["x"].shape == (BATCH, IN) and shapes["target"].dtype == np.float32


def test_extra_state_is_sharded_like_the_params(three_steps):
  setup, state, _ = three_steps
  kernel = setup.state_shardings.params["Dense_0"]["kernel"]
  assert kernel.spec[0] == "fsdp"  # 'embed' -> fsdp under the default rules
  assert setup.state_shardings.extra["ema"]["Dense_0"]["kernel"] == kernel
  assert setup.state_shardings.extra["frozen_net"].spec[0] == "fsdp"
  assert state.extra["ema"]["Dense_0"]["kernel"].sharding.spec == kernel.spec


def test_extra_state_updates_once_per_step_after_the_optimizer(three_steps):
  setup, state, history = three_steps
  batches = _batches(3)
  assert int(state.extra["count"]) == 3
  # The frozen projection never changes and is not an optimizer or gradient leaf.
  fresh = train.init_state(setup, 0)
  np.testing.assert_array_equal(state.extra["frozen_net"], fresh.extra["frozen_net"])
  assert all(leaf.shape != (IN, IN) for leaf in jax.tree.leaves(state.opt_state))
  # EMA over the params *after* each update: p_1, p_2 are history[1:], p_3 is the final state.
  after = history[1:] + [jax.tree.map(np.asarray, state.params)]
  ema = jax.tree.map(np.asarray, history[0])  # the copy made at init
  for params in after:
    ema = jax.tree.map(lambda e, p: EMA * e + (1 - EMA) * p, ema, params)
  for got, want in zip(jax.tree.leaves(state.extra["ema"]), jax.tree.leaves(ema)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  # Queue: the newest outputs first, computed with the params *before* each update.
  frozen = np.asarray(fresh.extra["frozen_net"])
  outs = [(b["x"] @ frozen) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
          for b, p in zip(batches, history)]
  want_queue = np.concatenate(outs[::-1])[:QUEUE]
  np.testing.assert_allclose(np.asarray(state.extra["queue"]), want_queue, rtol=1e-5, atol=1e-6)


def test_sharded_equals_single_device(three_steps):
  _, state8, _ = three_steps
  mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  _, state1, _ = _run(mesh1, _batches(3))
  for a, b in zip(jax.tree.leaves((state8.params, state8.extra)),
                  jax.tree.leaves((state1.params, state1.extra))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_resume_is_bit_exact(mesh8, tmp_path):
  batches = _batches(4, seed=3)
  _, straight, _ = _run(mesh8, batches)
  setup, half, _ = _run(mesh8, batches[:2])
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), 0, 2, async_save=False)
  checkpointer.save(2, half, {})
  restored = checkpointer.restore(setup.abstract_state)
  checkpointer.close()
  assert restored is not None and restored[0] == 2
  _, resumed, _ = _run(mesh8, batches[2:], state=restored[1], setup=setup)
  assert int(resumed.extra["count"]) == 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_extra_state_is_rederived_from_loaded_weights(three_steps):
  setup, state, _ = three_steps
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    extra = jax.jit(setup.init_extra_fn, out_shardings=setup.state_shardings.extra)(state.params)
  for a, b in zip(jax.tree.leaves(extra["ema"]), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(extra["count"]) == 0
