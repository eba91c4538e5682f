"""Optimizer semantics: schedule values, decoupled decay and its mask, freezing, lr multipliers,
clipping, on toy trees and on the real parameter trees of every family."""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vljax import configlib, optim, sharding, train
from vljax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
  c = configlib.base_train_config().optim
  c.update(kw)
  return c


PARAMS = {
    "img": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
            "LayerNorm_0": {"scale": jnp.ones((4,))}},
    "txt": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))}},
    "t": jnp.asarray(2.3),
}


def test_warmup_then_cosine_matches_formula():
  sched = optim.make_schedule(_cfg(lr=1.0, schedule="cosine"), total_steps=110, warmup_steps=10)
  for step in (0, 5, 10, 60, 110):
    if step < 10:
      expected = step / 10
    else:
      expected = 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
    assert float(sched(step)) == pytest.approx(expected, abs=1e-6)


def test_rsqrt_and_constant_schedules():
  rsqrt = optim.make_schedule(_cfg(lr=2.0, schedule="rsqrt", rsqrt_timescale=100), 1000, 0)
  assert float(rsqrt(300)) == pytest.approx(2.0 / math.sqrt(1 + 300 / 100), rel=1e-6)
  const = optim.make_schedule(_cfg(lr=0.3, schedule="constant"), 1000, 4)
  assert float(const(2)) == pytest.approx(0.15) and float(const(500)) == pytest.approx(0.3)
  with pytest.raises(configlib.ConfigError, match="config.optim.schedule='step'"):
    optim.make_schedule(_cfg(schedule="step"), 10, 0)
  with pytest.raises(configlib.ConfigError, match="Warmup"):
    optim.make_schedule(_cfg(), 10, 20)


def _one_step(cfg, grads, params=PARAMS, step=0, total_steps=10, warmup_steps=0):
  tx, _ = optim.make_optimizer(cfg, params, total_steps=total_steps, warmup_steps=warmup_steps)
  state = _at_step(tx.init(params), step)
  updates, _ = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _at_step(opt_state, step):
  """The optimizer state as if `step` steps had been taken: every step counter set to `step`.

  The counters (Adam's and the schedule's) are the only integer scalars in the state; with zero
  gradients Adam's moments stay zero, so this is the state after `step` zero-gradient steps.
  """
  return jax.tree.map(
      lambda x: jnp.full_like(x, step) if (jnp.issubdtype(x.dtype, jnp.integer) and
                                           x.ndim == 0) else x, opt_state)


def test_decay_at_peak_is_wd_not_lr_times_wd():
  # The regression test for decay added before the learning rate (a per-step lr * wd, 1000x
  # weaker at lr 1e-3): at peak, a decayed parameter shrinks by exactly wd per step.
  lr, wd = 1e-3, 1e-4
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  new, _ = _one_step(_cfg(lr=lr, wd=wd, schedule="constant", clip_norm=0.0), zero)
  for side in ("img", "txt"):
    shrink = 1.0 - np.asarray(new[side]["Dense_0"]["kernel"], np.float64)  # params were 1.0
    np.testing.assert_allclose(shrink, wd, rtol=1e-3)
    assert not np.allclose(shrink, lr * wd, rtol=0.5)
  # Only kernels are decayed by default.
  np.testing.assert_array_equal(new["img"]["Dense_0"]["bias"], 1.0)
  np.testing.assert_array_equal(new["img"]["LayerNorm_0"]["scale"], 1.0)
  np.testing.assert_array_equal(new["t"], PARAMS["t"])


def test_decay_follows_normalised_schedule_in_warmup():
  # Warmup of 10 steps at lr 0.5: at step 3 the schedule is 0.15 = 0.3 of peak, so the decay
  # is wd * 0.3 (not 0.15 * wd, and not wd).
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  new, _ = _one_step(_cfg(lr=0.5, wd=0.1, schedule="constant", clip_norm=0.0), zero, step=3,
                     total_steps=100, warmup_steps=10)
  np.testing.assert_allclose(new["txt"]["Dense_0"]["kernel"], 1 - 0.1 * 3 / 10, rtol=1e-6)


def test_wd_mults_rules_first_match_wins():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  cfg = _cfg(lr=1e-3, wd=0.1, schedule="constant", clip_norm=0.0,
             wd_mults=[["^txt/.*kernel$", 2.0], ["kernel$", 0.5], ["LayerNorm", 1.0]])
  new, _ = _one_step(cfg, zero)
  np.testing.assert_allclose(new["txt"]["Dense_0"]["kernel"], 1 - 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(new["img"]["Dense_0"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(new["img"]["LayerNorm_0"]["scale"], 1 - 0.1, rtol=1e-6)
  np.testing.assert_array_equal(new["txt"]["Dense_0"]["bias"], 1.0)
  mults = optim.decay_multipliers(cfg, PARAMS)
  assert mults == {"img": {"Dense_0": {"kernel": 0.5, "bias": 0.0},
                           "LayerNorm_0": {"scale": 1.0}},
                   "txt": {"Dense_0": {"kernel": 2.0, "bias": 0.0}}, "t": 0.0}


def test_bad_wd_mults_are_config_errors():
  with pytest.raises(configlib.ConfigError,
                     match=r"wd_mults pattern '\^image/' matches no parameter.*img/Dense_0"):
    optim.make_optimizer(_cfg(wd_mults=[["^image/", 1.0]]), PARAMS, 10, 0)
  with pytest.raises(configlib.ConfigError, match="wd_mults.*not a \\[regex, multiplier\\]"):
    optim.make_optimizer(_cfg(wd_mults=["kernel$"]), PARAMS, 10, 0)
  with pytest.raises(configlib.ConfigError, match="not a valid regex"):
    optim.decay_multipliers(_cfg(wd_mults=[["kernel[", 1.0]]), PARAMS)
  with pytest.raises(configlib.ConfigError, match="lr_mults pattern '\\^text/'"):
    optim.make_optimizer(_cfg(lr_mults=[["^text/", 0.1]]), PARAMS, 10, 0)


def test_freeze_and_lr_multipliers():
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  cfg = _cfg(lr=0.1, wd=0.0, schedule="constant", clip_norm=0.0, freeze=["^img/"],
             lr_mults=[["^txt/", 0.5]])
  new, state = _one_step(cfg, grads)
  for leaf_new, leaf_old in zip(jax.tree.leaves(new["img"]), jax.tree.leaves(PARAMS["img"])):
    np.testing.assert_array_equal(leaf_new, leaf_old)
  # Adam's first step moves by lr * sign(g) (up to eps); the multiplier halves it.
  np.testing.assert_allclose(new["txt"]["Dense_0"]["kernel"], 1 - 0.05, rtol=1e-5)
  np.testing.assert_allclose(new["t"], 2.3 - 0.1, rtol=1e-5)
  # Frozen parameters carry no Adam moments.
  n_state = sum(x.size for x in jax.tree.leaves(state))
  n_trainable = sum(x.size for x in jax.tree.leaves(PARAMS["txt"])) + 1
  assert n_state == 2 * n_trainable + 2  # mu, nu; step counters of Adam and the schedule
  assert optim.frozen_mask(cfg, PARAMS) == {
      "img": {"Dense_0": {"kernel": True, "bias": True}, "LayerNorm_0": {"scale": True}},
      "txt": {"Dense_0": {"kernel": False, "bias": False}}, "t": False}
  with pytest.raises(configlib.ConfigError, match="matches no parameter"):
    optim.make_optimizer(_cfg(freeze=["^image/"]), PARAMS, 10, 0)


def test_frozen_kernel_is_not_decayed():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  cfg = _cfg(lr=1e-3, wd=0.1, schedule="constant", clip_norm=0.0, freeze=["^img/"])
  new, _ = _one_step(cfg, zero)
  np.testing.assert_array_equal(new["img"]["Dense_0"]["kernel"], 1.0)
  np.testing.assert_allclose(new["txt"]["Dense_0"]["kernel"], 0.9, rtol=1e-6)
  assert optim.decay_multipliers(cfg, PARAMS)["img"]["Dense_0"]["kernel"] == 0.0


def test_clipping_uses_trainable_global_norm():
  # The frozen tower's huge gradient must not enter the clipping norm. Adam's normalisation
  # hides the clipping in the update, so read the clipped gradient from Adam's first moment.
  grads = {"img": jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), PARAMS["img"]),
           "txt": jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), PARAMS["txt"]),
           "t": jnp.asarray(4.0)}
  cfg = _cfg(lr=1.0, wd=0.0, schedule="constant", clip_norm=1.0, freeze=["^img/"])
  tx, _ = optim.make_optimizer(cfg, PARAMS, 10, 0)
  _, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  trainable = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads["txt"])] + [4.0]
  norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in trainable))
  adam_state = state.inner_states["train"].inner_state[1]
  # After one step mu = (1 - b1) * g_clipped, with g_clipped = g / norm.
  np.testing.assert_allclose(adam_state.mu["txt"]["Dense_0"]["kernel"],
                             (1 - cfg.b1) * 3.0 / norm, rtol=1e-5)
  np.testing.assert_allclose(adam_state.mu["t"], (1 - cfg.b1) * 4.0 / norm, rtol=1e-5)


# ---- The real parameter trees of every family. ----

# Parameters that must never be decayed by default, per family: a q/k/v bias, the ViT position
# embedding, the token embedding, the MAP probe / pooler queries, class tokens, the temperature
# 't' and bias 'b' scalars, a LayerNorm scale.
NOT_DECAYED = {
    "siglip": ["img/encoder/Transformer/encoderblock_0/MultiHeadAttention_0/query/bias",
               "img/encoder/Transformer/encoderblock_0/MultiHeadAttention_0/key/bias",
               "img/encoder/pos_embedding", "txt/encoder/pos_embedding",
               "txt/encoder/embedding/embedding", "img/encoder/MAPHead_0/probe", "t", "b",
               "img/encoder/Transformer/encoder_norm/scale",
               "txt/encoder/Encoder_0/encoderblock_0/LayerNorm_0/scale"],
    "clip": ["img/encoder/Transformer/encoderblock_0/MultiHeadAttention_0/value/bias",
             "img/encoder/pos_embedding", "img/encoder/cls", "txt/encoder/embedding/embedding",
             "t", "img/encoder/Transformer/encoderblock_0/LayerNorm_1/scale"],
    "coca": ["txt/multimodal_0/CrossAttention/query/bias", "img/encoder/pos_embedding",
             "txt/pos_embedding", "txt/embedding/embedding", "img/contrastive_pooler/queries",
             "img/caption_pooler/queries", "txt/cls", "t", "txt/decoder_norm/scale"],
}
MUST_DECAY = {
    "siglip": ["img/encoder/MAPHead_0/MultiHeadAttention_0/query/kernel",
               "img/encoder/embedding/kernel", "txt/head/kernel"],
    "clip": ["img/encoder/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"],
    "coca": ["txt/logits_head/kernel", "txt/multimodal_0/CrossAttention/out/kernel"],
}


@functools.lru_cache(maxsize=None)
def _family_params(name):
  """Random params (numpy, float32) with the exact tree of the tiny config of `name`."""
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:scale=tiny"))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  setup = train.build(config, tokenizer_lib.get_tokenizer(None), mesh, epoch_size=None)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype),
                        setup.abstract_state.params)
  return config, params


def _named_leaves(tree):
  return {optim.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _schedule_reference(step, lr, total, warmup):
  """Warmup then cosine, written out independently of optim.make_schedule."""
  if step < warmup:
    return lr * step / warmup
  return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("family", ["siglip", "clip", "coca"])
def test_real_trees_decay_exactly_the_kernels(family):
  config, params = _family_params(family)
  lr, wd, total, warmup = 2e-3, 0.05, 100, 10
  cfg = config.optim.copy_and_resolve_references()
  cfg.update(dict(lr=lr, wd=wd, schedule="cosine", end_lr_frac=0.0))
  leaves = _named_leaves(params)
  for name in NOT_DECAYED[family] + MUST_DECAY[family]:
    assert name in leaves, name  # the lists name real parameters
  mults = _named_leaves(optim.decay_multipliers(cfg, params))
  assert {n for n, m in mults.items() if m} == {n for n in leaves if n.endswith("kernel")}
  assert all(mults[n] == 0.0 for n in NOT_DECAYED[family])

  zero = jax.tree.map(np.zeros_like, params)
  for step in (4, 60):  # inside warmup, and on the cosine
    new, _ = _one_step(cfg, zero, params, step=step, total_steps=total, warmup_steps=warmup)
    normalised = _schedule_reference(step, lr, total, warmup) / lr
    for name, old in leaves.items():
      got = np.asarray(_named_leaves(new)[name], np.float64)
      if name.endswith("kernel"):
        expected = np.asarray(old, np.float64) * (1 - wd * normalised)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=name)
        assert not np.array_equal(got, old), name  # really decayed
      else:
        np.testing.assert_array_equal(got, old, err_msg=name)


@pytest.mark.parametrize("family", ["siglip", "clip", "coca"])
def test_real_trees_freeze_and_lr_mults_leave_decay_alone(family):
  config, params = _family_params(family)
  lr, wd = 1e-3, 0.05
  cfg = config.optim.copy_and_resolve_references()
  cfg.update(dict(lr=lr, wd=wd, schedule="constant", freeze=["^img/"],
                  lr_mults=[["^txt/", 0.1], ["^t$", 10.0]]))
  tx, _ = optim.make_optimizer(cfg, params, total_steps=100, warmup_steps=0)
  state = tx.init(params)
  # Frozen parameters have no optimizer state: no state leaf is named after an img/ parameter.
  state_names = _named_leaves(state)
  assert not [n for n in state_names if "/img/" in n or n.startswith("img/")]
  trainable = {n: x for n, x in _named_leaves(params).items() if not n.startswith("img/")}
  moments = sum(x.size for n, x in state_names.items() if "/mu/" in n or "/nu/" in n)
  assert moments == 2 * sum(x.size for x in trainable.values())

  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero, _at_step(state, 5), params)
  new = _named_leaves(optax.apply_updates(params, updates))
  for name, old in _named_leaves(params).items():
    if name.startswith("img/"):
      np.testing.assert_array_equal(new[name], old, err_msg=name)  # bit-identical
    elif name.endswith("kernel"):
      # Decay at peak is wd whatever the lr multiplier (0.1 on txt/).
      np.testing.assert_allclose(np.asarray(new[name], np.float64),
                                 np.asarray(old, np.float64) * (1 - wd), rtol=1e-6,
                                 atol=1e-7, err_msg=name)
    else:
      np.testing.assert_array_equal(new[name], old, err_msg=name)

  # With a gradient, the lr multiplier scales the Adam step and nothing else. Adam's first
  # step with a constant gradient is lr * mult * sign(g) (up to eps), and decay adds wd * p.
  ones = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(ones, state, params)
  new = _named_leaves(optax.apply_updates(params, updates))
  old = _named_leaves(params)
  for name in trainable:
    mult = 0.1 if name.startswith("txt/") else 10.0 if name == "t" else 1.0
    expected = -lr * mult - (wd * np.asarray(old[name], np.float64)
                             if name.endswith("kernel") else 0.0)
    np.testing.assert_allclose(np.asarray(new[name], np.float64) - old[name], expected,
                               rtol=1e-3, atol=1e-7, err_msg=name)


def test_paper_configs_use_decoupled_values():
  # The papers' lr-coupled decays converted to decoupled ones (docs/optim.md): wd = wd_paper * lr.
  expected = {"siglip": 1e-4, "clip": 0.2 * 5e-4, "coca": 0.01 * 8e-4}
  for name, wd in expected.items():
    config = configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:scale=paper"))
    assert config.optim.wd == pytest.approx(wd, rel=1e-9), name
    assert list(map(list, config.optim.wd_mults)) == [["(^|/)kernel$", 1.0]]
