"""Layer stacks: scan over layers, named remat policies, and the two parameter layouts.

Every transformer stack in vljax (layers.Encoder, CoCa's decoder halves, the T5 encoder,
decoder and prefix-LM, ALBEF's fusion layers, the Multiway transformer; not BLIP's text blocks,
which run in three modes and stay unrolled) runs its blocks either

  unrolled  a Python loop over `depth` block modules, parameters `{prefix}_0 .. {prefix}_{n-1}`
            (prefix: 'encoderblock', 'layers', 'unimodal', 'multimodal', 'fusionblock',
            'block'), or
  scanned   one `nn.scan` over a single block module, parameters under `{prefix}` with a
            leading depth axis (logical name 'layers', see vljax.sharding), compiled once
            whatever the depth.

and optionally rematerialises each block in the backward pass under a named policy
(REMAT_POLICIES). config.layers.scan / config.layers.remat choose them (docs/scale.md, "Scan
and remat"); the two layouts hold the same numbers and `stack_layers` / `unstack_layers`
convert a parameter tree between them.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax.configlib import ConfigError

# What each name saves for the backward pass of a block (the rest is recomputed there):
#   none          everything (no remat): fastest, most memory.
#   full          nothing but the block's inputs: jax.checkpoint's default policy (None), the
#                 whole block is recomputed in the backward pass.
#   dots          the outputs of matmuls without batch dimensions (the Dense / projection
#                 kernels); the attention einsums, norms and nonlinearities are recomputed.
#   block_inputs  nothing but the block's inputs, spelt as jax.checkpoint_policies.
#                 nothing_saveable: the same saved set as 'full' (kept as its own name so a
#                 config says what it means).
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "block_inputs": jax.checkpoint_policies.nothing_saveable,
}
REMAT_NAMES = ("none", *REMAT_POLICIES)

# The logical axis of the depth dimension of scanned parameters (vljax.sharding maps it).
LAYERS_AXIS = "layers"

# Parameter-tree names of the stacks: unrolled `{prefix}_{i}`, scanned `{prefix}`.
STACK_PREFIXES = ("encoderblock", "layers", "unimodal", "multimodal", "fusionblock", "block",
                  "vlblock")
# Stacks whose unrolled blocks are not all alike. The Multiway transformer's top blocks have a
# VL expert the bottom ones lack, so its scanned layout has two stacks: unrolled
# `block_0 .. block_{n-1}` whose subtree has the child `ffn_vl` are stacked under `vlblock`
# (they must be the last ones), the others under `block`; unrolled again, `vlblock`'s layers
# are numbered on from `block`'s. {unrolled prefix: (its second stack, the child that sends
# a block there)}.
SPLIT_STACKS = {"block": ("vlblock", "ffn_vl")}
_CONTINUES = {second: first for first, (second, _) in SPLIT_STACKS.items()}


# How jax.nn.dot_product_attention runs (config.layers.attention; layers.attend applies it):
#   xla    XLA's implementation everywhere: JAX's own default (its implementation=None is XLA's
#          even on GPUs), and vljax's.
#   auto   cuDNN's fused kernel on GPUs wherever it applies (bf16 or fp16, head dim a multiple
#          of 8 up to 128, no additive bias), XLA's everywhere else.
#   cudnn  cuDNN's kernel, an error where it does not apply.
# The default stays XLA's: the cuDNN path has not been checked on a GPU here (docs/scale.md).
ATTENTION_IMPLEMENTATIONS = ("xla", "auto", "cudnn")
_ATTENTION = {"implementation": "xla"}


def set_attention_implementation(name: str) -> None:
  """Sets how `layers.attend` runs from here on (train.build does, from config.layers)."""
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(f"config.layers.attention={name!r} is unknown; choose one of "
                      f"{list(ATTENTION_IMPLEMENTATIONS)}.")
  _ATTENTION["implementation"] = name


def attention_implementation() -> str:
  """The name set_attention_implementation last set ('xla' until then)."""
  return _ATTENTION["implementation"]


def remat_name(remat: bool | str) -> str:
  """The policy name of a module's `remat` attribute (False: 'none', True: 'full')."""
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_NAMES:
    raise ConfigError(f"config.layers.remat={remat!r} is unknown; choose one of "
                      f"{list(REMAT_NAMES)}.")
  return remat


def check_layers_config(layers_config: Any) -> dict[str, Any]:
  """Validates config.layers ({scan: bool, remat: name, attention: name}); returns {'scan',
  'remat'} (the attention implementation is set per run: layers.set_attention_implementation).

  Raises:
    ConfigError: naming the key, for an unknown key, a non-bool scan or an unknown remat or
      attention name.
  """
  given = dict(layers_config or {})
  unknown = sorted(set(given) - {"scan", "remat", "attention"})
  if unknown:
    raise ConfigError(f"config.layers has unknown keys {unknown}; valid keys are "
                      f"['attention', 'remat', 'scan'].")
  attention = given.get("attention", "xla")
  if attention not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(f"config.layers.attention={attention!r} is unknown; choose one of "
                      f"{list(ATTENTION_IMPLEMENTATIONS)}.")
  scan, remat = given.get("scan", False), given.get("remat", "none")
  if not isinstance(scan, bool):
    raise ConfigError(f"config.layers.scan={scan!r} must be true or false.")
  if not isinstance(remat, str) or remat not in REMAT_NAMES:
    raise ConfigError(f"config.layers.remat={remat!r} is unknown; choose one of "
                      f"{list(REMAT_NAMES)}.")
  return {"scan": scan, "remat": remat}


def block_class(block_cls: type, remat: bool | str, scan: bool,
                static_argnums: Sequence[int]) -> type:
  """`block_cls`, wrapped in nn.remat under the named policy unless remat is 'none'.

  static_argnums count `self` as 0 and name the arguments that select Python control flow
  (train flags, modes). Under scan, lax.scan already keeps XLA from merging the recomputation
  with the forward pass, so prevent_cse is off there (it would only block optimisations);
  unrolled, it must stay on for the remat to save anything.
  """
  name = remat_name(remat)
  if name == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[name], prevent_cse=not scan,
                  static_argnums=tuple(static_argnums))


def scanned(block_cls: type, length: int, in_axes: tuple, out_axes: Any = 0) -> type:
  """nn.scan of a block whose __call__ is (carry, *args) -> (carry, per-layer output).

  Parameters get a leading axis of size `length` named LAYERS_AXIS; params and dropout rngs
  are split per layer. `in_axes` gives, per non-carry argument, nn.broadcast (the same for
  every layer: masks, biases, flags) or the axis of the per-layer slices (decoding caches,
  stacked on axis 1 so that the batch stays their leading axis); `out_axes` likewise for the
  per-layer outputs.
  """
  return nn.scan(block_cls, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True}, in_axes=in_axes,
                 out_axes=out_axes, length=length,
                 metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})


def scan_step(block_cls: type) -> type:
  """A subclass of block_cls whose __call__ returns (output, None): the (carry, y) form that
  nn.scan wants, for blocks that return their output only. Same children, same parameters."""

  class ScanStep(block_cls):

    def __call__(self, x, *args):
      return super().__call__(x, *args), None

  ScanStep.__name__ = ScanStep.__qualname__ = f"{block_cls.__name__}ScanStep"
  return ScanStep


# ---------------------------------------------------------------------------- layouts

def _is_mapping(x: Any) -> bool:
  return isinstance(x, dict) or hasattr(x, "items") and not hasattr(x, "shape")


def _stacked_keys(node: dict, prefix: str) -> list[str]:
  """`prefix_0 .. prefix_{n-1}` of node, in order; [] if none (a gap is an error)."""
  pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
  indices = sorted(int(m.group(1)) for k in node if (m := pattern.match(k)))
  if indices and indices != list(range(len(indices))):
    raise ValueError(f"Layers {prefix}_* are not numbered 0..n-1: {indices}.")
  return [f"{prefix}_{i}" for i in indices]


def stack_layers(params: Any, prefixes: Sequence[str] = STACK_PREFIXES) -> Any:
  """Unrolled -> scanned layout: every `{prefix}_0 .. {prefix}_{n-1}` subtree becomes one
  `{prefix}` subtree whose leaves are the layers' leaves stacked on a new leading axis (a
  SPLIT_STACKS prefix becomes two stacks).

  Works on any nested dict of arrays (numpy or jax); other keys are kept as they are.
  """
  if not _is_mapping(params):
    return params
  out = {}
  grouped = {}
  for prefix in prefixes:
    keys = _stacked_keys(params, prefix)
    if keys:
      if prefix in params:
        raise ValueError(f"Both {prefix} and {keys[0]} are present: mixed layouts.")
      grouped.update(_split_stack(params, prefix, keys))
  members = {k for keys in grouped.values() for k in keys}
  for key, value in params.items():
    if key not in members:
      out[key] = stack_layers(value, prefixes)
  for prefix, keys in grouped.items():
    layers_ = [stack_layers(params[k], prefixes) for k in keys]
    stack = np.stack if all(isinstance(x, np.ndarray)
                            for x in jax.tree.leaves(layers_)) else jnp.stack
    out[prefix] = jax.tree.map(lambda *xs: stack(xs), *layers_)
  return out


def _split_stack(params: dict, prefix: str, keys: list[str]) -> dict[str, list[str]]:
  """{stack name: its unrolled keys}: `prefix` alone, or for a SPLIT_STACKS prefix the blocks
  without the marking child under `prefix` and the (trailing) blocks with it under the second
  stack."""
  if prefix not in SPLIT_STACKS:
    return {prefix: keys}
  second, child = SPLIT_STACKS[prefix]
  marked = [_is_mapping(params[k]) and child in params[k] for k in keys]
  first = marked.index(True) if any(marked) else len(keys)
  if not all(marked[first:]):
    raise ValueError(f"Blocks {prefix}_* with {child!r} are not the last ones: "
                     f"{[k for k, m in zip(keys, marked) if m]}.")
  return {name: ks for name, ks in ((prefix, keys[:first]), (second, keys[first:])) if ks}


def unstack_layers(params: Any, prefixes: Sequence[str] = STACK_PREFIXES) -> Any:
  """Scanned -> unrolled layout: every `{prefix}` subtree (leading depth axis) becomes
  `{prefix}_0 .. {prefix}_{n-1}` (a SPLIT_STACKS second stack continues its first stack's
  numbering). The inverse of stack_layers."""
  if not _is_mapping(params):
    return params
  out = {}
  for key, value in params.items():
    if key in prefixes and _is_mapping(value):
      name, first = _CONTINUES.get(key, key), 0
      if key in _CONTINUES and _is_mapping(params.get(name)):
        first = jax.tree.leaves(params[name])[0].shape[0]
      depth = jax.tree.leaves(value)[0].shape[0]
      for i in range(depth):
        out[f"{name}_{first + i}"] = unstack_layers(jax.tree.map(lambda x: x[i], value),
                                                    prefixes)
    else:
      out[key] = unstack_layers(value, prefixes)
  return out


def layout_of_paths(paths: Sequence[str],
                    prefixes: Sequence[str] = STACK_PREFIXES) -> str | None:
  """'scanned', 'unrolled' or None (no stack) for parameter paths such as 'a/layers_0/b'."""
  stacked = re.compile(rf"(^|/)({'|'.join(map(re.escape, prefixes))})/")
  unrolled = re.compile(rf"(^|/)({'|'.join(map(re.escape, prefixes))})_\d+/")
  if any(stacked.search(p) for p in paths):
    return "scanned"
  if any(unrolled.search(p) for p in paths):
    return "unrolled"
  return None


def to_layout(params: Any, layout: str) -> Any:
  """params in the given layout ('scanned' or 'unrolled'), whichever it is in now."""
  if layout == "scanned":
    return stack_layers(params)
  if layout == "unrolled":
    return unstack_layers(params)
  raise ValueError(f"Unknown layout {layout!r}.")
