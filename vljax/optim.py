"""Optax optimizer from the config: schedule, AdamW with masked decay, clipping, freezing, lr mults.

Parameters are addressed by their '/'-joined path in the param tree (e.g. 'img/Transformer/...'),
matched with `re.search`: config.optim.freeze is a list of regexes (LiT locks the image tower
with ['^img/']), config.optim.lr_mults a list of [regex, multiplier] pairs (first match wins).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import ml_collections
import optax

from vljax.configlib import ConfigError

SCHEDULES = ("cosine", "rsqrt", "constant", "linear")


def param_path(path) -> str:
  """'/'-joined names of a jax tree path (DictKey/GetAttrKey/SequenceKey)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def tree_map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(param_path(p), x), tree)


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int,
                  warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to cfg.lr, then cosine / rsqrt / linear decay, or constant."""
  kind = cfg.schedule
  if kind not in SCHEDULES:
    raise ConfigError(f"config.optim.schedule={kind!r}; choose one of {SCHEDULES}.")
  if warmup_steps > total_steps:
    raise ConfigError(f"Warmup ({warmup_steps} steps) is longer than training "
                      f"({total_steps} steps); shorten config.optim.warmup_*.")
  peak = cfg.lr
  decay_steps = max(total_steps - warmup_steps, 1)
  if kind == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.get("end_lr_frac", 0.0))
  elif kind == "linear":
    after = optax.linear_schedule(peak, peak * cfg.get("end_lr_frac", 0.0), decay_steps)
  elif kind == "rsqrt":
    timescale = cfg.get("rsqrt_timescale", 10_000)
    after = lambda s: peak * jax.lax.rsqrt(1.0 + s / timescale)
  else:
    after = optax.constant_schedule(peak)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def _scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-parameter factor (lr multipliers)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, total_steps: int,
                   warmup_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer for a (possibly abstract) param tree. Returns (tx, lr schedule)."""
  if cfg.name != "adamw":
    raise ConfigError(f"config.optim.name={cfg.name!r}; only 'adamw' is implemented.")
  schedule = make_schedule(cfg, total_steps, warmup_steps)
  names = tree_map_with_names(lambda n, _: n, params)
  all_names = jax.tree.leaves(names)

  frozen = [re.compile(r) for r in cfg.freeze]
  for pattern in frozen:
    if not any(pattern.search(n) for n in all_names):
      raise ConfigError(f"config.optim.freeze pattern {pattern.pattern!r} matches no "
                        f"parameter. Parameter names look like {all_names[0]!r}.")
  labels = jax.tree.map(lambda n: "frozen" if any(p.search(n) for p in frozen) else "train",
                        names)

  mults = []
  for rule in cfg.lr_mults:
    pattern, mult = rule
    mults.append((re.compile(pattern), float(mult)))
  multipliers = jax.tree.map(
      lambda n: next((m for p, m in mults if p.search(n)), 1.0), names)

  # Decay matrices only: biases, norm scales and the temperature/bias scalars are not decayed.
  decay_mask = jax.tree.map(lambda p: len(p.shape) >= 2, params)

  chain = []
  if cfg.clip_norm:
    # Inside the "train" branch, so the norm is that of the trainable parameters' gradient.
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  if cfg.wd:
    chain.append(optax.add_decayed_weights(cfg.wd, mask=decay_mask))
  chain.append(optax.scale_by_learning_rate(schedule))
  trainable = optax.chain(*chain)
  # Frozen parameters get no optimizer state at all (set_to_zero keeps none).
  tx = optax.multi_transform({"train": trainable, "frozen": optax.set_to_zero()}, labels)
  if mults:
    # Outside multi_transform, whose inner updates have holes where parameters are frozen.
    tx = optax.chain(tx, _scale_by_tree(multipliers))
  return tx, schedule
