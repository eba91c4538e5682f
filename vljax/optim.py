"""Optax optimizer from the config: schedule, Adam or Adafactor, decoupled weight decay,
clipping, freezing, lr multipliers.

One step of a trainable parameter p, with g its gradient clipped to a global norm over the
trainable parameters and s(t) = schedule(t) / cfg.lr the schedule normalised to peak 1 (warmup
included):

  p <- p - schedule(t) * lr_mult(p) * precondition(g) - cfg.wd * wd_mult(p) * s(t) * p

precondition is chosen by config.optim.name: 'adamw' (optax.scale_by_adam with b1, b2, eps) or
'adafactor' (`scale_by_adafactor`, settings in config.optim.adafactor). Everything else
(schedule, decay, clipping, freezing, multipliers) is the same for both.

config.optim.mu_dtype stores the first moment (Adam's mu, Adafactor's momentum EMA) in a
narrower dtype: "" keeps the parameter dtype (float32), "bfloat16" halves that buffer. Only the
stored state is rounded: each step widens it to float32, updates it and steps with the unrounded
value, then stores it rounded (`_store_first_moment`). The second moment always stays in the
parameter dtype (its square-root denominator is what bf16's 8-bit mantissa would hurt most).

This is big_vision's decoupled weight decay: the decay follows the shape of the schedule but is
NOT multiplied by the learning rate (at peak a decayed parameter shrinks by exactly cfg.wd per
step) nor by lr_mult. PyTorch's AdamW and optax.adamw multiply it by the learning rate instead;
docs/optim.md converts the papers' values.

Parameters are addressed by their '/'-joined path in the param tree (param_path, e.g.
'img/encoder/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'), matched with `re.search`:
  config.optim.freeze    regexes; a frozen parameter gets no update, no decay and no optimizer
                         state (LiT locks the image tower with ['^img/']).
  config.optim.lr_mults  [regex, multiplier] pairs, first match wins, unmatched = 1.
  config.optim.wd_mults  [regex, multiplier] pairs, first match wins, unmatched = not decayed;
                         the default [['(^|/)kernel$', 1.0]] decays weight matrices only (no
                         biases, norms, embeddings, position embeddings, MAP probe or the
                         temperature/bias scalars).
A pattern that matches no parameter is a ConfigError: a typo must not silently do nothing.

The rules always see the unrolled names of layer stacks ('.../encoderblock_3/...', 'mw/block_5/'),
whichever layout config.layers.scan gives the model: a scanned parameter (one array for all the
layers of a stack, vljax.models.stacks) takes each layer's multiplier along its leading axis, so
layer-wise lr decay and per-block rules mean the same in both layouts. Freezing is per array: a
freeze rule must match every layer of a scanned parameter or none (a ConfigError otherwise).
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vljax.configlib import ConfigError
from vljax.models import stacks

SCHEDULES = ("cosine", "rsqrt", "constant", "linear")
OPTIMIZERS = ("adamw", "adafactor")
# config.optim.mu_dtype -> the dtype optax stores the first moment in (None: like the params).
MU_DTYPES = {"": None, "bfloat16": jnp.bfloat16}
# config.optim.adafactor when a config leaves a key out (base_train_config sets all of them).
ADAFACTOR_DEFAULTS = dict(decay_rate=0.8, min_dim_size_to_factor=128, clip_threshold=1.0,
                          momentum=None, epsilon=1e-30)


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


def _example_names(names: list[str]) -> str:
  """A few parameter names from across the tree, for error messages."""
  picks = sorted({names[0], names[len(names) // 2], names[-1]}) if names else []
  return ", ".join(repr(n) for n in picks)


def _compile(pattern: Any, key: str) -> re.Pattern:
  if not isinstance(pattern, str):
    raise ConfigError(f"config.optim.{key}: {pattern!r} is not a regex string.")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"config.optim.{key}: {pattern!r} is not a valid regex ({e}).") from None


def _check_matches(patterns: list[re.Pattern], names: list[str], key: str) -> None:
  for pattern in patterns:
    if not any(pattern.search(n) for n in names):
      raise ConfigError(f"config.optim.{key} pattern {pattern.pattern!r} matches no "
                        f"parameter. Parameter names look like {_example_names(names)}.")


def _rules(rules: Any, key: str, names: list[str]) -> list[tuple[re.Pattern, float]]:
  """Validated [regex, multiplier] pairs of config.optim.<key>."""
  out = []
  for rule in rules or ():
    if (not isinstance(rule, (list, tuple)) or len(rule) != 2 or
        isinstance(rule[1], bool) or not isinstance(rule[1], (int, float))):
      raise ConfigError(f"config.optim.{key}: {rule!r} is not a [regex, multiplier] pair, "
                        f"e.g. [['^txt/', 0.1]].")
    if rule[1] < 0:
      raise ConfigError(f"config.optim.{key}: multiplier {rule[1]} of {rule[0]!r} is "
                        f"negative.")
    out.append((_compile(rule[0], key), float(rule[1])))
  _check_matches([p for p, _ in out], names, key)
  return out


def _first_match(rules: list[tuple[re.Pattern, float]], name: str, default: float) -> float:
  return next((m for p, m in rules if p.search(name)), default)


def _names(params: Any) -> tuple[Any, list[str]]:
  names = tree_map_with_names(lambda n, _: n, params)
  return names, jax.tree.leaves(names)


def _layer_names(params: Any) -> dict[str, list[str]]:
  """{parameter name: the names the rules see}: [name], or for a parameter of a scanned stack
  the unrolled name of each of its layers, in order (stacks.unstack_layers numbers them)."""
  flat = [(param_path(p), np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
  if stacks.layout_of_paths([n for n, _ in flat]) != "scanned":
    return {n: [n] for n, _ in flat}
  nested = {}  # name -> an object array [depth] of (name, layer) that unstacking slices
  for name, shape in flat:
    *parents, leaf = name.split("/")
    node = nested
    for part in parents:
      node = node.setdefault(part, {})
    tags = np.empty(shape[:1], object)
    for i in range(shape[0] if shape else 0):
      tags[i] = (name, i)
    node[leaf] = tags
  out = {name: [name] for name, _ in flat}
  shapes = dict(flat)

  def walk(node, prefix):
    for key, value in node.items():
      path = f"{prefix}{key}"
      if isinstance(value, dict):
        walk(value, path + "/")
      elif isinstance(value, tuple):  # one layer of a scanned parameter
        name, layer = value
        if out[name] == [name]:
          out[name] = [None] * shapes[name][0]
        out[name][layer] = path
  walk(stacks.unstack_layers(nested), "")
  return out


def _per_layer(values: list[Any]) -> Any:
  """One value for a parameter, or a numpy array [depth] where its layers differ."""
  if all(v == values[0] for v in values):
    return values[0]
  return np.asarray(values, np.float32)


def frozen_mask(cfg: ml_collections.ConfigDict, params: Any) -> Any:
  """A pytree of bools like `params`: True where config.optim.freeze matches the path."""
  names, _ = _names(params)
  layer_names = _layer_names(params)
  patterns = [_compile(r, "freeze") for r in cfg.freeze]
  _check_matches(patterns, [n for ns in layer_names.values() for n in ns], "freeze")

  def frozen(name):
    flags = {any(p.search(n) for p in patterns) for n in layer_names[name]}
    if len(flags) > 1:
      raise ConfigError(f"config.optim.freeze matches some layers of the scanned parameter "
                        f"{name!r} and not others; its layers are one array (freeze all of "
                        f"them or none, or set config.layers.scan=false).")
    return flags.pop()
  return jax.tree.map(frozen, names)


def decay_multipliers(cfg: ml_collections.ConfigDict, params: Any) -> Any:
  """A pytree like `params`: each parameter's weight-decay multiplier (a float, or for a
  scanned parameter whose layers differ a numpy array [depth]).

  0.0 = never decayed (no config.optim.wd_mults rule matches it, or it is frozen). Each step a
  decayed parameter shrinks by cfg.wd * multiplier * schedule(t) / cfg.lr.
  """
  names, _ = _names(params)
  layer_names = _layer_names(params)
  rules = _rules(cfg.wd_mults, "wd_mults", [n for ns in layer_names.values() for n in ns])
  frozen = frozen_mask(cfg, params)
  return jax.tree.map(lambda n, f: 0.0 if f else _per_layer(
      [_first_match(rules, u, 0.0) for u in layer_names[n]]), names, frozen)


def _lr_multipliers(cfg: ml_collections.ConfigDict, params: Any) -> dict[str, Any]:
  """{parameter name: its lr multiplier} (a float, or an array [depth] as decay_multipliers)."""
  layer_names = _layer_names(params)
  rules = _rules(cfg.lr_mults, "lr_mults", [n for ns in layer_names.values() for n in ns])
  return {name: _per_layer([_first_match(rules, u, 1.0) for u in names])
          for name, names in layer_names.items()}


def _along_layers(multiplier: Any, ndim: int) -> Any:
  """A multiplier shaped to broadcast against its parameter: an array [depth] (per layer of a
  scanned parameter) as [depth, 1, ...]; a float as it is."""
  if np.ndim(multiplier) == 0:
    return multiplier
  return jnp.asarray(multiplier).reshape((-1,) + (1,) * (ndim - 1))


class ScaleAndDecayState(NamedTuple):
  count: jax.Array  # steps taken, the argument of the schedule


def _scale_and_decay(schedule: optax.Schedule, peak_lr: float, wd: float,
                     lr_mult: dict[str, Any],
                     wd_mult: dict[str, Any]) -> optax.GradientTransformation:
  """-schedule(t) * lr_mult * update - wd * wd_mult * s(t) * param, by parameter path.

  Multipliers are looked up by path rather than zipped with a tree because multi_transform
  hands this transform a tree where frozen parameters are empty MaskedNodes.
  """

  def init(params):
    del params
    return ScaleAndDecayState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    lr = jnp.asarray(schedule(state.count), jnp.float32)
    # The decay follows the schedule's shape but not its scale (big_vision's decoupled decay).
    normalised = lr / peak_lr if peak_lr else jnp.zeros_like(lr)

    def one(path, u, p):
      name = param_path(path)
      out = -lr * _along_layers(lr_mult[name], u.ndim) * u
      if wd and np.any(wd_mult[name]):
        out = out - wd * _along_layers(wd_mult[name], u.ndim) * normalised * p
      return out.astype(u.dtype)

    if params is None:
      if wd and any(np.any(m) for m in wd_mult.values()):
        raise ValueError("Weight decay needs the params: call tx.update(grads, state, params).")
      params = updates  # stands in for the tree structure; nothing reads it without decay
    new = jax.tree_util.tree_map_with_path(one, updates, params)
    return new, ScaleAndDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def adafactor_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.optim.adafactor, validated and completed with ADAFACTOR_DEFAULTS.

  Raises ConfigError naming the key for an unknown key or a value out of range.
  """
  given = cfg.get("adafactor") or {}
  unknown = sorted(set(given.keys()) - set(ADAFACTOR_DEFAULTS))
  if unknown:
    raise ConfigError(f"config.optim.adafactor.{unknown[0]} is not an Adafactor setting; valid "
                      f"keys: {', '.join(sorted(ADAFACTOR_DEFAULTS))}.")
  settings = {**ADAFACTOR_DEFAULTS, **dict(given.items())}
  key = "config.optim.adafactor."
  decay_rate = settings["decay_rate"]
  if not (_is_number(decay_rate) and 0 < decay_rate <= 1):
    raise ConfigError(f"{key}decay_rate={decay_rate!r}; must be in (0, 1] (beta2 at step t is "
                      f"1 - (t+1)^-decay_rate; Adafactor's default is 0.8).")
  min_dim = settings["min_dim_size_to_factor"]
  if isinstance(min_dim, bool) or not isinstance(min_dim, int) or min_dim < 1:
    raise ConfigError(f"{key}min_dim_size_to_factor={min_dim!r}; must be a positive int "
                      f"(default 128).")
  clip = settings["clip_threshold"]
  if clip is not None and not (_is_number(clip) and clip > 0):
    raise ConfigError(f"{key}clip_threshold={clip!r}; must be > 0, or None to turn update "
                      f"clipping off.")
  momentum = settings["momentum"]
  if momentum is not None and not (_is_number(momentum) and 0 <= momentum < 1):
    raise ConfigError(f"{key}momentum={momentum!r}; must be in [0, 1), or None for no first "
                      f"moment.")
  epsilon = settings["epsilon"]
  if not (_is_number(epsilon) and epsilon > 0):
    raise ConfigError(f"{key}epsilon={epsilon!r}; must be > 0 (default 1e-30).")
  return settings


def mu_dtype(cfg: ml_collections.ConfigDict) -> Any:
  """The dtype config.optim.mu_dtype asks for (None = the parameter dtype), validated.

  Raises ConfigError for an unknown name, and for "bfloat16" with Adafactor without momentum:
  there is no first moment to narrow, and a setting that silently does nothing hides a mistake.
  """
  name = cfg.get("mu_dtype", "")
  if name not in MU_DTYPES:
    raise ConfigError(f"config.optim.mu_dtype={name!r}; choose one of "
                      f"{', '.join(repr(k) for k in MU_DTYPES)} (\"\" = the parameter dtype).")
  if (MU_DTYPES[name] is not None and cfg.name == "adafactor"
      and not adafactor_settings(cfg)["momentum"]):
    raise ConfigError(f"config.optim.mu_dtype={name!r} does nothing: Adafactor without "
                      f"config.optim.adafactor.momentum keeps no first moment. Set "
                      f"config.optim.mu_dtype=\"\" or a momentum.")
  return MU_DTYPES[name]


def _store_first_moment(inner: optax.GradientTransformation, field: str,
                        dtype: Any) -> optax.GradientTransformation:
  """`inner` with the moment tree `field` of its state stored in `dtype` (None: unchanged).

  The moment is widened to the updates' dtype before `inner` reads it, and rounded once when
  stored. optax's own mu_dtype / accumulator_dtype instead decay the stored moment as
  `b1 * mu` in bf16, which rounds b1 itself (0.9 -> 0.8984375): the moment of a constant
  gradient then settles 1.6% low, a bias rather than rounding noise.
  """
  if dtype is None:
    return inner

  def narrow(state):
    return state._replace(**{field: optax.tree.cast(getattr(state, field), dtype)})

  def init(params):
    return narrow(inner.init(params))

  def update(updates, state, params=None):
    wide = jax.tree.map(lambda m, u: m.astype(u.dtype), getattr(state, field), updates)
    updates, state = inner.update(updates, state._replace(**{field: wide}), params)
    return updates, narrow(state)

  return optax.GradientTransformation(init, update)


def scale_by_adafactor(decay_rate: float = 0.8, min_dim_size_to_factor: int = 128,
                       clip_threshold: float | None = 1.0, momentum: float | None = None,
                       epsilon: float = 1e-30,
                       momentum_dtype: Any = None) -> optax.GradientTransformation:
  """Adafactor's preconditioner, without its learning rate or parameter scaling.

  g -> g / sqrt(v), with v a running mean of g^2 + epsilon decayed by
  beta2_t = 1 - (t+1)^-decay_rate. A parameter whose two largest dims are both
  >= min_dim_size_to_factor keeps only the row and column means of v and uses their rank-1
  estimate (per slice along the other dims of a >2-D parameter); others keep v in full. Then
  each parameter's update is scaled down to an RMS of at most clip_threshold (None: off) and,
  if `momentum` is set, replaced by an EMA (no debiasing) of the clipped updates, stored in
  momentum_dtype (None: the update's dtype).
  The step size comes from the caller's schedule: no relative step, no parameter-scale factor.
  """
  parts = [optax.scale_by_factored_rms(factored=True, decay_rate=decay_rate,
                                       min_dim_size_to_factor=min_dim_size_to_factor,
                                       epsilon=epsilon)]
  if clip_threshold is not None:
    parts.append(optax.clip_by_block_rms(clip_threshold))
  if momentum:
    # momentum=0 is the identity; skipping it saves a full-size buffer per parameter.
    parts.append(_store_first_moment(optax.ema(momentum, debias=False), "ema", momentum_dtype))
  return optax.chain(*parts)


def _preconditioner(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  first_moment = mu_dtype(cfg)
  if cfg.name == "adafactor":
    return scale_by_adafactor(**adafactor_settings(cfg), momentum_dtype=first_moment)
  return _store_first_moment(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), "mu",
                             first_moment)


def layer_decay_lr_mults(rate: float, depth: int, block: str,
                         embeddings: str) -> list[list[Any]]:
  """config.optim.lr_mults rules of layer-wise learning-rate decay (BEiT's fine-tuning recipe):
  the parameters of block k (0-based, of `depth`) get rate ** (depth - k), the embeddings
  rate ** (depth + 1), everything the rules do not match (heads, final norms) 1.

  `block` is a regex with '{}' where the block index goes (e.g. r'^mw/block_{}/': the trailing
  '/' keeps block_1 from matching block_10); `embeddings` a regex of the embedding parameters.
  Prepend the rules to other lr_mults (the first match wins). The rules name unrolled blocks and
  hold under config.layers.scan too: a scanned parameter takes each layer's rate along its
  depth axis (module docstring).
  """
  if not 0.0 < rate <= 1.0:
    raise ConfigError(f"layer-wise lr decay rate {rate} must be in (0, 1].")
  if "{}" not in block:
    raise ConfigError(f"layer-wise lr decay: the block pattern {block!r} needs a '{{}}' for "
                      "the block index.")
  return ([[embeddings, rate ** (depth + 1)]] +
          [[block.format(k), rate ** (depth - k)] for k in range(depth)])


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, total_steps: int,
                   warmup_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer for a (possibly abstract) param tree. Returns (tx, lr schedule)."""
  if cfg.name not in OPTIMIZERS:
    raise ConfigError(f"config.optim.name={cfg.name!r}; choose one of {OPTIMIZERS}.")
  if cfg.wd < 0:
    raise ConfigError(f"config.optim.wd={cfg.wd} is negative.")
  preconditioner = _preconditioner(cfg)  # validates the optimizer's own settings first
  schedule = make_schedule(cfg, total_steps, warmup_steps)
  _, all_names = _names(params)
  frozen = frozen_mask(cfg, params)
  lr_mult = _lr_multipliers(cfg, params)
  wd_mult = dict(zip(all_names, jax.tree.leaves(decay_multipliers(cfg, params))))

  chain = []
  if cfg.clip_norm:
    # Inside the "train" branch, so the norm is that of the trainable parameters' gradient.
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(preconditioner)
  chain.append(_scale_and_decay(schedule, cfg.lr, cfg.wd, lr_mult, wd_mult))
  trainable = optax.chain(*chain)
  labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
  # Frozen parameters get a zero update and no optimizer state (set_to_zero keeps none).
  tx = optax.multi_transform({"train": trainable, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
