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


def test_layer_wise_lr_decay():
  rules = optim.layer_decay_lr_mults(0.5, 3, r"^mw/block_{}/", r"^mw/embed")
  assert rules == [[r"^mw/embed", 0.0625], [r"^mw/block_0/", 0.125], [r"^mw/block_1/", 0.25],
                   [r"^mw/block_2/", 0.5]]
  params = {"mw": {"embed": jnp.ones(2), **{f"block_{k}": {"w": jnp.ones(2)} for k in range(3)}},
            "head": jnp.ones(2)}
  cfg = _cfg(lr=0.1, wd=0.0, schedule="constant", clip_norm=0.0, lr_mults=rules, wd_mults=[])
  new, _ = _one_step(cfg, jax.tree.map(jnp.ones_like, params), params=params)
  # Adam's first step moves by lr * mult (up to eps).
  np.testing.assert_allclose(new["mw"]["embed"], 1 - 0.1 * 0.0625, rtol=1e-5)
  for k in range(3):
    np.testing.assert_allclose(new["mw"][f"block_{k}"]["w"], 1 - 0.1 * 0.5 ** (3 - k), rtol=1e-5)
  np.testing.assert_allclose(new["head"], 1 - 0.1, rtol=1e-5)
  with pytest.raises(configlib.ConfigError, match="must be in"):
    optim.layer_decay_lr_mults(0.0, 3, r"^b_{}/", r"^e")
  # The VLMo fine-tuning configs: every rule names parameters of the real tree.
  config = configlib.load_config_file(os.path.join(
      ROOT, "configs", "nlvr2.py:init=/w,family=vlmo,scale=tiny,layer_decay=0.5"))
  assert config.optim.lr_mults[:3] == [[r"^mw/(patch|img_cls|img_pos|img_mask_token|embedding|"
                                        r"txt_cls|txt_pos)", 0.125], [r"^mw/block_0/", 0.25],
                                       [r"^mw/block_1/", 0.5]]
  setup = train.build(config, tokenizer_lib.get_tokenizer(None),
                      sharding.make_mesh({"data": 8}), epoch_size=None)
  assert setup.tx is not None
  with pytest.raises(configlib.ConfigError, match="family=vlmo"):
    configlib.load_config_file(os.path.join(ROOT, "configs", "nlvr2.py:init=/w,layer_decay=0.5"))


def test_rules_see_unrolled_names_in_a_scanned_stack():
  # The Multiway layout (vlblock continues block's numbering): one step of the scanned tree is
  # the stacked step of the unrolled tree, with per-layer lr decay, per-layer decay and freezing.
  from vljax.models import stacks  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  block = lambda vl: {"ffn_v": {"kernel": rng.normal(size=(2, 3))},
                      **({"ffn_vl": {"kernel": rng.normal(size=(2, 3))}} if vl else {})}
  unrolled = {"mw": {"embed": rng.normal(size=(2,)),
                     **{f"block_{k}": block(k >= 2) for k in range(3)}}, "head": np.ones(2)}
  unrolled = jax.tree.map(lambda x: np.asarray(x, np.float32), unrolled)
  scanned = stacks.stack_layers(unrolled)
  assert scanned["mw"]["vlblock"]["ffn_v"]["kernel"].shape == (1, 2, 3)
  rules = optim.layer_decay_lr_mults(0.5, 3, r"^mw/block_{}/", r"^mw/embed")
  cfg = _cfg(lr=0.1, wd=0.3, schedule="constant", clip_norm=0.0, lr_mults=rules,
             wd_mults=[[r"^mw/block_1/", 2.0], [r"kernel$", 1.0]], freeze=[r"^mw/block_\d+/ffn_vl/"])
  g = jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), unrolled)
  new_unrolled, _ = _one_step(cfg, g, params=jax.tree.map(jnp.asarray, unrolled))
  new_scanned, _ = _one_step(cfg, stacks.stack_layers(g),
                             params=jax.tree.map(jnp.asarray, scanned))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               new_scanned, stacks.stack_layers(new_unrolled))
  assert not np.allclose(new_scanned["mw"]["block"]["ffn_v"]["kernel"][0] -
                         scanned["mw"]["block"]["ffn_v"]["kernel"][0],
                         new_scanned["mw"]["block"]["ffn_v"]["kernel"][1] -
                         scanned["mw"]["block"]["ffn_v"]["kernel"][1])  # per-layer lr
  np.testing.assert_array_equal(new_scanned["mw"]["vlblock"]["ffn_vl"]["kernel"],
                                scanned["mw"]["vlblock"]["ffn_vl"]["kernel"])  # frozen
  # A freeze rule that splits a scanned parameter's layers is refused, naming it.
  with pytest.raises(configlib.ConfigError, match="'mw/block/ffn_v/kernel'"):
    optim.frozen_mask(_cfg(freeze=[r"^mw/block_0/"]), scanned)


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


# ---- Adafactor (config.optim.name = "adafactor"). ----

def _adafactor_cfg(**adafactor):
  c = _cfg(name="adafactor")
  c.adafactor.update(adafactor)
  return c


def _adafactor_reference(params, grad_steps, *, schedule, peak_lr, lr_mult, wd, wd_mult,
                         clip_norm, decay_rate, min_dim, clip_threshold, momentum, eps=1e-30):
  """Adafactor steps with decoupled decay, in float64 numpy, from the formulas.

  `params` and each entry of `grad_steps` are {name: array}. A leaf is factored when it has
  >= 2 dims and its two largest dims are >= min_dim (ties go to the later axis); its second
  moment is kept as running *sums* of g^2 + eps along each of those two axes (a row-sum and a
  column-sum statistic) and rebuilt as row_sum * col_sum / total per slice over the other dims
  (Shazeer & Stern's rank-1 estimate). Returns (final params, {name: (row_sum, col_sum)} of the
  factored leaves, how many leaf-steps the RMS clipping scaled down).
  """
  p = {n: np.asarray(x, np.float64) for n, x in params.items()}
  second, first, n_clipped = {}, {n: np.zeros_like(x) for n, x in p.items()}, 0
  for t, grads in enumerate(grad_steps):
    g = {n: np.asarray(x, np.float64) for n, x in grads.items()}
    if clip_norm:
      norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
      g = {n: x * min(1.0, clip_norm / norm) for n, x in g.items()}
    beta2 = 1.0 - (t + 1.0) ** (-decay_rate)
    lr_t = schedule(t)
    for n, x in g.items():
      sq = x * x + eps
      axes = np.argsort(x.shape, kind="stable")[-2:] if x.ndim >= 2 else ()
      if x.ndim >= 2 and x.shape[axes[0]] >= min_dim:
        row = sq.sum(axis=axes[1], keepdims=True)  # varies along axes[0]
        col = sq.sum(axis=axes[0], keepdims=True)  # varies along axes[1]
        old_row, old_col = second.get(n, (0.0, 0.0))
        row, col = beta2 * old_row + (1 - beta2) * row, beta2 * old_col + (1 - beta2) * col
        second[n] = (row, col)
        v = row * col / row.sum(axis=axes[0], keepdims=True)
      else:
        v = beta2 * second.get(n, 0.0) + (1 - beta2) * sq
        second[n] = v
      u = x / np.sqrt(v)
      rms = math.sqrt(float(np.mean(u * u)))
      if clip_threshold is not None and rms > clip_threshold * (1 + 1e-6):
        u = u * clip_threshold / rms
        n_clipped += 1
      if momentum is not None:
        first[n] = momentum * first[n] + (1 - momentum) * u
        u = first[n]
      p[n] = p[n] - lr_t * lr_mult[n] * u - wd * wd_mult[n] * (lr_t / peak_lr) * p[n]
  factored = {n: s for n, s in second.items() if isinstance(s, tuple)}
  return p, factored, n_clipped


def _factored_state(opt_state):
  """The optax FactoredState inside the optimizer state (Adafactor's second moments)."""
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
           if isinstance(x, optax.FactoredState)]
  assert len(found) == 1
  return found[0]


# A factored 4x6 matrix, a factored 3-D leaf (factored over its 5 and 3 dims, one estimate per
# index of its leading dim), a 2x6 matrix too narrow to factor, a vector and a scalar.
TOY = {"enc": {"kernel": np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32),
               "bias": np.random.default_rng(2).normal(size=(6,)).astype(np.float32),
               "attn": {"kernel": np.random.default_rng(3).normal(size=(2, 5, 3))
                        .astype(np.float32)}},
       "pos": np.random.default_rng(4).normal(size=(2, 6)).astype(np.float32),
       "t": np.float32(0.7)}


@pytest.mark.parametrize("momentum,clip_threshold",
                         [(None, 1.0), (0.9, 0.5), (None, None), (0.9, None)])
def test_adafactor_steps_match_numpy_reference(momentum, clip_threshold):
  lr, warmup, wd, clip_norm, decay_rate = 0.05, 2, 0.01, 2.0, 0.8
  cfg = _adafactor_cfg(min_dim_size_to_factor=3, momentum=momentum,
                       clip_threshold=clip_threshold, decay_rate=decay_rate)
  cfg.update(dict(lr=lr, wd=wd, schedule="constant", clip_norm=clip_norm,
                  lr_mults=[["^enc/bias$", 0.5], ["^t$", 2.0]],
                  wd_mults=[["kernel$", 1.0], ["^pos$", 0.5]]))
  params = jax.tree.map(jnp.asarray, TOY)
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10, warmup_steps=warmup)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  grad_steps = []
  for scale in (1.0, 4.0, 0.25, 2.0):  # changing scales make the RMS clipping bite
    grads = jax.tree.map(lambda x: (scale * rng.normal(size=np.shape(x))).astype(np.float32),
                         TOY)
    grad_steps.append(_named_leaves(grads))
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
    params = optax.apply_updates(params, updates)

  names = list(_named_leaves(TOY))
  expected, stats, n_clipped = _adafactor_reference(
      _named_leaves(TOY), grad_steps, schedule=lambda t: lr * min(1.0, t / warmup),
      peak_lr=lr, wd=wd, clip_norm=clip_norm, decay_rate=decay_rate, min_dim=3,
      clip_threshold=clip_threshold, momentum=momentum,
      lr_mult={n: {"enc/bias": 0.5, "t": 2.0}.get(n, 1.0) for n in names},
      wd_mult={n: 1.0 if n.endswith("kernel") else 0.5 if n == "pos" else 0.0 for n in names})
  assert set(stats) == {"enc/kernel", "enc/attn/kernel"}  # what the reference factored
  if clip_threshold is not None:
    assert n_clipped > 0  # the clipping is exercised, not just configured
  got, start = _named_leaves(params), _named_leaves(TOY)
  for name in names:
    np.testing.assert_allclose(np.asarray(got[name], np.float64), expected[name], rtol=2e-5,
                               atol=1e-6, err_msg=name)
    assert not np.allclose(got[name], start[name]), name  # every leaf really moved

  # The stored statistics are the reference's row and column sums as means.
  factored = _factored_state(state)
  row, col = stats["enc/kernel"]
  np.testing.assert_allclose(factored.v_row["enc"]["kernel"], row[:, 0] / 6, rtol=2e-5)
  np.testing.assert_allclose(factored.v_col["enc"]["kernel"], col[0, :] / 4, rtol=2e-5)


def test_adafactor_factored_state_shapes():
  cfg = _adafactor_cfg(min_dim_size_to_factor=3, momentum=0.9)
  tx, _ = optim.make_optimizer(cfg, TOY, total_steps=10, warmup_steps=0)
  state = _factored_state(tx.init(TOY))
  # A factored leaf keeps one statistic without its largest dim and one without its second
  # largest; its full-size slot `v` is an unused (1,) placeholder.
  assert state.v_row["enc"]["kernel"].shape == (4,)
  assert state.v_col["enc"]["kernel"].shape == (6,)
  assert state.v["enc"]["kernel"].shape == (1,)
  assert state.v_row["enc"]["attn"]["kernel"].shape == (2, 3)
  assert state.v_col["enc"]["attn"]["kernel"].shape == (2, 5)
  # Too narrow (2 < 3) and 1-D leaves keep the full second moment.
  for name in ("pos", "t"):
    assert state.v[name].shape == np.shape(TOY[name]) and state.v_row[name].shape == (1,)
  assert state.v["enc"]["bias"].shape == (6,)
  # With the default min_dim_size_to_factor=128 nothing this small is factored.
  tx, _ = optim.make_optimizer(_adafactor_cfg(), TOY, total_steps=10, warmup_steps=0)
  state = _factored_state(tx.init(TOY))
  assert state.v["enc"]["kernel"].shape == (4, 6)


def test_adafactor_freeze_wd_mults_and_first_step():
  cfg = _adafactor_cfg(min_dim_size_to_factor=3)
  cfg.update(dict(lr=1e-3, wd=0.1, schedule="constant", clip_norm=0.0, freeze=["^img/"],
                  lr_mults=[["^txt/", 0.5]], wd_mults=[["^txt/.*kernel$", 2.0], ["^t$", 1.0]]))
  tx, _ = optim.make_optimizer(cfg, PARAMS, total_steps=10, warmup_steps=0)
  state = tx.init(PARAMS)
  # Frozen parameters have no optimizer state at all.
  assert not [n for n in _named_leaves(state) if "/img/" in n or n.startswith("img/")]
  assert _factored_state(state).v_row["txt"]["Dense_0"]["kernel"].shape == (3,)

  # Zero gradient: Adafactor's update is 0 / sqrt(eps) = 0, so only the decay moves parameters;
  # at peak it is wd * wd_mult, whatever the lr multiplier.
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zero, _at_step(state, 5), PARAMS)
  new = optax.apply_updates(PARAMS, updates)
  np.testing.assert_allclose(new["txt"]["Dense_0"]["kernel"], 1 - 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(new["t"], 2.3 * (1 - 0.1), rtol=1e-6)
  np.testing.assert_array_equal(new["txt"]["Dense_0"]["bias"], 1.0)

  # A gradient of ones: every second-moment estimate is 1 + eps (factored: row sums 4, column
  # sums 3, total 12 -> 4 * 3 / 12), so the step is exactly lr * lr_mult (RMS 1, not clipped).
  # The frozen tower's huge gradient changes nothing, bit for bit.
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  grads["img"] = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), PARAMS["img"])
  updates, _ = tx.update(grads, state, PARAMS)
  new = optax.apply_updates(PARAMS, updates)
  for leaf_new, leaf_old in zip(jax.tree.leaves(new["img"]), jax.tree.leaves(PARAMS["img"])):
    np.testing.assert_array_equal(leaf_new, leaf_old)
  # No warmup, so s(0) = 1 and step 0 already decays by wd * wd_mult.
  np.testing.assert_allclose(new["txt"]["Dense_0"]["kernel"], 1 - 1e-3 * 0.5 - 0.1 * 2.0,
                             rtol=1e-6)
  np.testing.assert_allclose(new["txt"]["Dense_0"]["bias"], 1 - 1e-3 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(new["t"], 2.3 - 1e-3 - 0.1 * 2.3, rtol=1e-6)


@pytest.mark.parametrize("key,value", [
    ("decay_rate", 0.0), ("decay_rate", 1.5), ("clip_threshold", 0.0),
    ("clip_threshold", -1.0), ("momentum", 1.0), ("momentum", -0.1), ("epsilon", 0.0),
    ("min_dim_size_to_factor", 0)])
def test_adafactor_bad_values_are_config_errors(key, value):
  cfg = _adafactor_cfg(**{key: value})
  with pytest.raises(configlib.ConfigError, match=rf"config\.optim\.adafactor\.{key}="):
    optim.make_optimizer(cfg, PARAMS, 10, 0)
  # The same settings are not read by AdamW.
  cfg.name = "adamw"
  optim.make_optimizer(cfg, PARAMS, 10, 0)


def test_adafactor_config_names_and_edges():
  with pytest.raises(configlib.ConfigError,
                     match=r"config\.optim\.name='sgd'.*\('adamw', 'adafactor'\)"):
    optim.make_optimizer(_cfg(name="sgd"), PARAMS, 10, 0)
  cfg = _adafactor_cfg()
  cfg.adafactor.beta1 = 0.9
  with pytest.raises(configlib.ConfigError, match=r"config\.optim\.adafactor\.beta1 is not"):
    optim.make_optimizer(cfg, PARAMS, 10, 0)
  # The ends of the ranges are allowed.
  for edges in (dict(decay_rate=1.0, momentum=0.0, clip_threshold=None),
                dict(min_dim_size_to_factor=1, clip_threshold=1e-3)):
    optim.make_optimizer(_adafactor_cfg(**edges), PARAMS, 10, 0)
  assert dict(configlib.base_train_config().optim.adafactor) == optim.ADAFACTOR_DEFAULTS


def test_adafactor_on_the_coca_tree_matches_reference():
  # CoCa's real tree: 3-D attention kernels, a 4-D patch-embedding kernel, the token embedding
  # and every 1-D/scalar kind, factored where two dims are >= 16.
  config, params = _family_params("coca")
  cfg = config.optim.copy_and_resolve_references()
  cfg.update(dict(name="adafactor", lr=1e-3, wd=0.01, schedule="constant", clip_norm=1.0,
                  lr_mults=[], wd_mults=[["(^|/)kernel$", 1.0]], freeze=[]))
  cfg.adafactor.update(dict(min_dim_size_to_factor=16, momentum=0.9, clip_threshold=1.0))
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10, warmup_steps=0)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  grad_steps = []
  new = params
  for scale in (1.0, 3.0):
    grads = jax.tree.map(lambda x: (scale * rng.normal(size=x.shape)).astype(x.dtype), params)
    grad_steps.append(_named_leaves(grads))
    updates, state = jax.jit(tx.update)(grads, state, new)
    new = optax.apply_updates(new, updates)
  names = list(_named_leaves(params))
  expected, stats, _ = _adafactor_reference(
      _named_leaves(params), grad_steps, schedule=lambda t: 1e-3, peak_lr=1e-3, wd=0.01,
      clip_norm=1.0, decay_rate=0.8, min_dim=16, clip_threshold=1.0, momentum=0.9,
      lr_mult={n: 1.0 for n in names},
      wd_mult={n: 1.0 if n.endswith("kernel") else 0.0 for n in names})
  assert any(np.ndim(_named_leaves(params)[n]) > 2 for n in stats)  # >2-D leaves factored
  got = _named_leaves(new)
  for name in names:
    np.testing.assert_allclose(np.asarray(got[name], np.float64), expected[name], rtol=1e-4,
                               atol=1e-6, err_msg=name)
