"""Helpers the train-step tests share: tiny configs, random batches of an objective's declared
fields, and a few steps of the one train step on a mesh."""
import os

import flax.linen as nn
import jax
import numpy as np

from vljax import configlib, sharding, train
from vljax.objectives import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(name: str, *overrides: str):
  """configs/NAME.py:scale=tiny with `key=value` overrides."""
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:scale=tiny"))
  return configlib.apply_overrides(config, list(overrides))


def random_batch(config, objective, seed=0):
  """One random batch of the fields `objective` declares (pixels uint8, ids in [3, 40))."""
  rng = np.random.default_rng(seed)
  fields = objective.batch_fields()
  brightness = {f.pixels_with for f in fields.values() if f.pixels_with}

  def draw(name, field):
    shape = (config.batch_size,) + tuple(field.shape)
    if field.dtype == np.uint8:
      return rng.integers(0, 256, shape, np.uint8)
    if name in brightness:
      return np.zeros(shape, np.float32)
    return rng.integers(3, 40, shape).astype(field.dtype)

  return {name: draw(name, f) for name, f in fields.items()}


def random_batches(config, tokenizer, n, seed=0):
  """n random batches of the fields config's objective declares."""
  objective = make_objective(config, tokenizer)
  return [random_batch(config, objective, seed=seed * 1000 + i) for i in range(n)]


def train_steps(config, tokenizer, mesh, batches):
  """(losses, final state, setup) of the train step run over `batches` on `mesh`."""
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  state = train.init_state(setup, config.seed)
  step = train.make_train_step(setup, config.nan_policy)
  rng = jax.random.key(1)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for batch in batches:
      placed = sharding.global_batch_from_host(batch, mesh, setup.batch_shardings)
      state, m = step(state, placed, rng)
      losses.append(float(m["train/loss"]))
  return losses, state, setup


def assert_trees_close(got, want, rtol, atol):
  """Leaf by leaf (matched by path) equality of two pytrees to rtol / atol; returns how many
  leaves were compared. The attention key biases are skipped: softmax is invariant to a bias
  shared by all keys, so their gradient is identically zero and Adam turns rounding noise
  into +-lr steps there in any two layouts."""
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  compared = 0
  for path, a in jax.tree_util.tree_flatten_with_path(got)[0]:
    name = jax.tree_util.keystr(path)
    if "key" in name and "bias" in name:
      continue
    np.testing.assert_allclose(np.asarray(a), np.asarray(flat_want[path]), rtol=rtol,
                               atol=atol, err_msg=name)
    compared += 1
  return compared
