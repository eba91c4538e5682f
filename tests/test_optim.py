"""Optimizer semantics: schedule values, decay mask, freezing, lr multipliers, clipping."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vljax import configlib, optim


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


def _one_step(cfg, grads):
  tx, _ = optim.make_optimizer(cfg, PARAMS, total_steps=10, warmup_steps=0)
  state = tx.init(PARAMS)
  updates, _ = tx.update(grads, state, PARAMS)
  return optax.apply_updates(PARAMS, updates), state


def test_weight_decay_only_on_matrices():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  new, _ = _one_step(_cfg(lr=0.1, wd=0.5, schedule="constant", clip_norm=0.0), zero)
  # Zero gradient: Adam's update is 0, so only decoupled decay (lr * wd * p) moves params.
  np.testing.assert_allclose(new["img"]["Dense_0"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(new["img"]["Dense_0"]["bias"], 1.0)
  np.testing.assert_array_equal(new["img"]["LayerNorm_0"]["scale"], 1.0)
  np.testing.assert_array_equal(new["t"], PARAMS["t"])


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
  with pytest.raises(configlib.ConfigError, match="matches no parameter"):
    optim.make_optimizer(_cfg(freeze=["^image/"]), PARAMS, 10, 0)


def test_clipping_uses_trainable_global_norm():
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), PARAMS)
  cfg = _cfg(lr=1.0, wd=0.0, schedule="constant", clip_norm=1.0, b1=0.0, b2=0.0, eps=0.0)
  tx, _ = optim.make_optimizer(cfg, PARAMS, 10, 0)
  # With b1=b2=0 Adam normalises away the clipping; check the clipped gradient directly.
  clip = optax.clip_by_global_norm(1.0)
  clipped, _ = clip.update(grads, clip.init(PARAMS))
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-6)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
