"""VQ-KD: the quantiser (nearest codes, straight-through gradient, commitment, norm-EMA update,
dead-code restarts, usage metrics) against numpy references, and the tokenizer's training: the
teacher loaded and frozen (no backward FLOPs), the codebook set by its rule, not by the
optimizer, sharded equal to one device."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import checkpoint, configlib, evals, init_weights, sharding, train
from vljax.data import tokenizer as tokenizer_lib
from vljax.models import quantizer
from vljax.models import vqkd as vqkd_model

import train_helpers  # pylint: disable=g-bad-import-order

ROOT = train_helpers.ROOT


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ the quantiser


def test_nearest_codes_and_straight_through_gradient():
  rng = np.random.default_rng(0)
  z, codebook = _unit(rng, 50, 6), _unit(rng, 9, 6)
  distances = ((z[:, None] - codebook[None]) ** 2).sum(-1)
  want = distances.argmin(1)
  np.testing.assert_array_equal(quantizer.nearest_codes(jnp.asarray(z), jnp.asarray(codebook)),
                                want)
  weights = jnp.asarray(rng.normal(size=(50, 6)))

  def loss(z, codebook):
    z_q, _, commitment = quantizer.quantize(z, codebook, beta=0.5)
    return jnp.sum(weights * z_q) + commitment, z_q

  (value, z_q), (grad_z, grad_codebook) = jax.value_and_grad(loss, argnums=(0, 1),
                                                             has_aux=True)(jnp.asarray(z),
                                                                           jnp.asarray(codebook))
  np.testing.assert_allclose(z_q, codebook[want], atol=1e-6)  # forward: the codes
  commitment = 0.5 * np.mean((codebook[want] - z) ** 2)
  assert float(value) == pytest.approx(float(np.sum(weights * codebook[want]) + commitment),
                                       rel=1e-5)
  # Backward: the identity to z for z_q, plus the commitment's pull towards the code.
  np.testing.assert_allclose(grad_z, weights + 0.5 * 2 * (z - codebook[want]) / z.size,
                             atol=1e-6)
  np.testing.assert_array_equal(grad_codebook, 0.0)


def _norm_ema_reference(codebook, z, codes, decay):
  new = codebook.copy()
  for k in range(len(codebook)):
    chosen = z[codes == k]
    if len(chosen):
      mean = chosen.mean(0) / np.linalg.norm(chosen.mean(0))
      moved = decay * codebook[k] + (1 - decay) * mean
      new[k] = moved / np.linalg.norm(moved)
  return new


def test_norm_ema_update_restarts_and_usage_against_numpy():
  rng = np.random.default_rng(1)
  # Fewer vectors than codes, so some codes are not chosen; float32 as the model's.
  z, codebook = _unit(rng, 10, 4).astype(np.float32), _unit(rng, 12, 4).astype(np.float32)
  codes = np.asarray(quantizer.nearest_codes(jnp.asarray(z), jnp.asarray(codebook)))
  assert len(set(codes.tolist())) < 12  # some codes unchosen: they must not move
  got = quantizer.norm_ema_update(jnp.asarray(codebook), jnp.asarray(z), jnp.asarray(codes), 0.9)
  np.testing.assert_allclose(got, _norm_ema_reference(codebook, z, codes, 0.9), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)

  dead = np.zeros(12, bool)
  dead[[2, 7]] = True
  restarted = np.asarray(quantizer.restart_dead_codes(jnp.asarray(codebook), jnp.asarray(dead),
                                                      jnp.asarray(z), jax.random.key(0)))
  np.testing.assert_array_equal(restarted[~dead], codebook[~dead])
  for k in (2, 7):  # each restarted code is one of the batch's vectors
    assert np.min(np.abs(z - restarted[k]).max(-1)) < 1e-6

  metrics = quantizer.usage_metrics(jnp.asarray([0, 0, 1, 3]), 5)
  assert float(metrics["codebook_usage"]) == pytest.approx(3 / 5)
  p = np.asarray([0.5, 0.25, 0.25])
  assert float(metrics["codebook_perplexity"]) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


# ------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.get_tokenizer(None)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tok):
  """A tiny SigLIP run's params exported to a workdir, and the params by name."""
  config = train_helpers.tiny_config("siglip")
  setup = train.build(config, tok, sharding.make_mesh({"data": 8}), epoch_size=None)
  params = train.init_state(setup, seed=3).params
  workdir = str(tmp_path_factory.mktemp("siglip"))
  checkpoint.export_params(workdir, params, config.to_json())
  return workdir, train_helpers.named_arrays(params)


def _config(teacher, *overrides):
  return train_helpers.tiny_config("vqkd", *overrides, args=f"teacher={teacher}")


_named = train_helpers.named_arrays


def test_teacher_loaded_frozen_and_codebook_set_by_its_rule(teacher_run, tok):
  workdir, source = teacher_run
  config = _config(workdir)
  mesh = sharding.make_mesh({"data": 8})
  setup = train.build(config, tok, mesh, epoch_size=None)
  state = train.init_state(setup, seed=0)
  params, names = init_weights.load_initial_params(config.init, state.params,
                                                   log=lambda _: None)
  loaded = _named(params)
  assert names == sorted(n for n in loaded if n.startswith("teacher/"))
  for name in names:
    np.testing.assert_array_equal(loaded[name], source["img/encoder/" + name[len("teacher/"):]])
  # Neither the teacher nor the codebook has optimizer state.
  frozen = _named(setup.frozen)
  assert {n for n, f in frozen.items() if f} == set(names) | {"codebook"}

  objective = setup.objective
  batch = train_helpers.first_batch(config, objective, tok)
  state = state.replace(params=jax.tree.map(jnp.copy, params))
  before = jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.extra)
  losses, metrics, _ = train_helpers.repeat_step(config, setup, state, batch, mesh, 1)
  # One step by hand: the loss's outputs, then the rule (restart of every code at step 0).
  placed = jax.tree.map(jnp.asarray, train.model_inputs(batch, setup.batch_fields,
                                                        setup.image_options))
  _, (_, outputs) = objective.loss_with_extra(before[0], before[1], placed, jax.random.key(0))
  rule = objective.update_rule_params(before[0], before[1], outputs, jnp.int32(0))
  z = np.asarray(outputs["z"])
  codebook = np.asarray(rule["codebook"])
  assert all(np.min(np.abs(z - row).max(-1)) < 1e-6 for row in codebook)
  assert float(metrics["train/dead_codes"]) == 0 and np.isfinite(losses[0])


def test_training_lowers_the_loss_and_keeps_unit_codes(teacher_run, tok):
  workdir, _ = teacher_run
  config = _config(workdir, "optim.warmup_steps=0", "optim.lr=3e-3", "optim.schedule=constant")
  mesh = sharding.make_mesh({"data": 8})
  setup = train.build(config, tok, mesh, epoch_size=None)
  state = train.init_state(setup, seed=0)
  params, _ = init_weights.load_initial_params(config.init, state.params, log=lambda _: None)
  teacher = {n: v for n, v in _named(params).items() if n.startswith("teacher/")}
  batch = train_helpers.first_batch(config, setup.objective, tok)
  losses, _, state = train_helpers.repeat_step(config, setup, state.replace(params=params),
                                               batch, mesh, 7)
  before = np.asarray(state.params["codebook"])
  more, metrics, state = train_helpers.repeat_step(config, setup, state, batch, mesh, 1)
  losses += more
  codebooks = [before, np.asarray(state.params["codebook"])]
  assert losses[-1] < 0.8 * losses[0], losses
  np.testing.assert_allclose(np.linalg.norm(codebooks[-1], axis=-1), 1.0, atol=1e-5)
  assert not np.array_equal(codebooks[-2], codebooks[-1])  # the EMA keeps moving the codes
  for name, value in _named(state.params).items():
    if name in teacher:
      np.testing.assert_array_equal(value, teacher[name], err_msg=name)
  assert 0 < float(metrics["train/codebook_usage"]) <= 1
  tokens = setup.objective.tokenize(state.params, jnp.zeros((2, 16, 16, 3)))
  assert tokens.shape == (2, 4) and tokens.dtype == jnp.int32


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_the_frozen_teacher_runs_forward_only(teacher_run, tok):
  config = _config(teacher_run[0])
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])  # whole-step FLOPs
  step = train.compiled_step_flops(config, tok, mesh)
  setup = train.build(config, tok, mesh, epoch_size=None)
  objective = setup.objective
  params, extra = setup.abstract_state.params, setup.abstract_state.extra
  images = jax.ShapeDtypeStruct((config.batch_size, 16, 16, 3), jnp.float32)
  forward = _flops(lambda p, e, x: objective.loss_with_extra(p, e, {"image": x},
                                                             jax.random.key(0))[0],
                   params, extra, images)
  teacher = _flops(lambda p, x: objective.model.apply({"params": p}, x,
                                                      method=vqkd_model.VqKd.teacher_features),
                   params, images)
  trained = forward - teacher  # the encoder, quantiser and decoder
  assert teacher > 0.2 * forward  # big enough for its backward pass to show
  # A backward pass costs about twice its forward: the step has one for the trained part and
  # none for the teacher (which would add about 2 x teacher more). Measured at this size: step
  # 13.19M, forward 5.72M, teacher 1.99M, so forward + 2 x trained = 13.17M.
  assert forward + 1.5 * trained < step < forward + 2.5 * trained, (step, forward, teacher)


def test_sharded_step_equals_single_device(teacher_run, tok):
  config = _config(teacher_run[0])
  batches = train_helpers.random_batches(config, tok, 3)
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 2, "fsdp": 4})
  losses_1, state_1, _ = train_helpers.train_steps(config, tok, one, batches)
  losses_8, state_8, _ = train_helpers.train_steps(config, tok, eight, batches)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  assert losses_1[0] != losses_1[-1]
  assert train_helpers.assert_trees_close(state_8.params, state_1.params, rtol=1e-4,
                                          atol=1e-6) > 20
  np.testing.assert_allclose(state_8.extra["usage"], state_1.extra["usage"], atol=1e-6)


def test_config_needs_a_teacher():
  with pytest.raises(configlib.ConfigError, match="teacher=DIR"):
    configlib.load_config_file(os.path.join(ROOT, "configs", "vqkd.py:scale=tiny"))
  config = _config("/t")
  assert config.init.path == "/t" and config.optim.freeze == ["^teacher/"]
  assert "pool_type" not in config.model.teacher


def test_tokenizer_evaluator_scores_every_held_out_image_as_numpy(teacher_run, tok):
  config = _config(teacher_run[0])
  mesh = sharding.make_mesh({"data": 8})
  setup = train.build(config, tok, mesh, epoch_size=None)
  params = train.init_state(setup, seed=0).params
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (13, 16, 16, 3)).astype(np.float32)  # a batch of 8, then 5
  evaluator = evals.build_evaluator(config, setup.objective, {"retrieval": {
      "image": images, "captions": ["x"] * 13, "caption_image": np.arange(13)}}, tok, mesh,
                                    setup.rules)
  metrics = {k: v for k, v in evaluator(params).items() if "recall" not in k}
  out = np.asarray(setup.objective.tokenizer_outputs(params, jnp.asarray(images)))
  codes = out[:, :4].astype(int).reshape(-1)  # 4 patches an image
  counts = np.bincount(codes, minlength=16)
  p = counts[counts > 0] / counts.sum()
  assert metrics["eval/tokenizer_images"] == 13
  assert metrics["eval/codebook_usage"] == pytest.approx(np.mean(counts > 0))
  assert metrics["eval/codebook_perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()),
                                                              rel=1e-5)
  assert metrics["eval/teacher_cosine"] == pytest.approx(out[:, 4].mean(), rel=1e-5)
  assert out.shape == (13, 4 + 1 + 32) and set(codes) <= set(range(16))
  np.testing.assert_array_equal(out[:, :4], setup.objective.tokenize(params, jnp.asarray(images)))
  # The baseline: every patch reconstructed as the mean held-out teacher feature's direction.
  teacher = np.asarray(setup.objective.model.apply(
      {"params": params}, jnp.asarray(images), method=vqkd_model.VqKd.teacher_features))
  unit = teacher / np.linalg.norm(teacher, axis=-1, keepdims=True)
  direction = unit.reshape(-1, 32).mean(0)
  direction /= np.linalg.norm(direction)
  assert metrics["eval/teacher_cosine_mean_feature"] == pytest.approx(
      float((unit @ direction).mean()), rel=1e-4)


def test_resume_is_bit_exact(teacher_run, tmp_path):
  """The codebook (moved by its EMA rule, restarted from the batch's features) and the frozen
  teacher resume from a checkpoint to the same bits as an uninterrupted run."""
  # The teacher's export has no tokenizer file; VQ-KD reads images only.
  config = _config(teacher_run[0], "tokenizer.path=")
  train_helpers.check_resume_is_bit_exact(config, str(tmp_path))
