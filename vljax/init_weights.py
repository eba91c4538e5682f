"""Starting from weights: loads (part of) another run's parameters into a fresh model.

config.init.path names the source, one of
  a vljax workdir with checkpoints  WORKDIR/checkpoints/<latest step>/state, its params only
  a workdir with only an export     WORKDIR/export/params
  an export directory               DIR/params
and config.init.mapping, a list of [regex, replacement] rules, says where each source parameter
goes: for a source path (optim.param_path, e.g. 'img/encoder/embedding/kernel') the first rule
whose regex `re.search`-matches gives the target path re.sub(regex, replacement, path, count=1);
a source path no rule matches is not loaded; [] loads every source parameter under its own name.
A rule's replacement may be a list, [regex, [replacement, ...]]: the source parameter is loaded
into each of those targets (two stacks that start from one, as BLIP's VQA encoder and decoder).
[['^img/', 'img/']] loads the image tower only (LiT); [['^img/encoder/', 'img/encoder/']] the
image encoder without its projection head (fine-tuning at a new embedding size).

Every loaded value must fit its target's shape, except a ViT's learned position embedding over a
different token grid (new image size or patch size), which is resampled bilinearly. Values are
cast to the target's dtype and placed with the target's sharding.

Layer stacks are stored unrolled (`encoderblock_0`, `layers_0`, ...) by a run with
config.layers.scan=False and stacked (`encoderblock`, `layers`, ... with a leading depth axis)
by a scanned run (vljax.models.stacks). When the source's layout differs from the model's, the
source is converted to the model's layout first, so the mapping rules and error messages see
the model's names (a scanned run can start from an unrolled SigLIP run and vice versa). Mistakes (nothing to load, a
target that does not exist, a shape that does not fit) raise ConfigError naming the parameter.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vljax import optim
from vljax.configlib import ConfigError
from vljax.models import stacks

LOOKED_FOR = ("checkpoints/<step>/state (a vljax workdir), export/params (a workdir with an "
              "export), params (an export directory)")


def _restore_as_numpy(directory: str, subtree: str | None) -> dict:
  """Restores an Orbax PyTree checkpoint (or only its `subtree` item) as host numpy arrays.

  The checkpoint's own metadata gives the tree, so nothing about the optimizer state that
  shares the directory needs to be known; partial_restore reads the `subtree` arrays only.
  """
  directory = epath.Path(directory)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(directory).tree
    if subtree is not None:
      if subtree not in tree:
        raise ConfigError(f"{directory} holds no {subtree!r} (it has {sorted(tree)}).")
      tree = {subtree: tree[subtree]}
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = handler.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=subtree is not None))
  except ConfigError:
    raise
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise ConfigError(f"config.init.path: {directory} could not be read ({type(e).__name__}: "
                      f"{e}). It may be truncated or not an Orbax checkpoint.") from e
  finally:
    handler.close()
  return restored[subtree] if subtree is not None else restored


def _read_source(path: str, log: Callable[[str], Any]) -> dict:
  """The params tree (numpy) of the workdir or export directory at `path`."""
  if not path:
    raise ConfigError("config.init.path is empty: set it to a vljax workdir or export "
                      f"directory to start from, one with {LOOKED_FOR}.")
  root = os.path.abspath(path)
  if not os.path.isdir(root):
    raise ConfigError(f"config.init.path={path!r}: {root} is not a directory. Expected a vljax "
                      f"workdir or export directory with {LOOKED_FOR}.")
  checkpoints = os.path.join(root, "checkpoints")
  steps = ocp.path.step.checkpoint_steps(checkpoints) if os.path.isdir(checkpoints) else []
  steps = [s for s in steps if os.path.isdir(os.path.join(checkpoints, str(s), "state"))]
  if steps:
    step = max(steps)
    directory = os.path.join(checkpoints, str(step), "state")
    log(f"Initialising from the params of checkpoint {directory} (step {step}).")
    return _restore_as_numpy(directory, "params")
  for directory in (os.path.join(root, "export", "params"), os.path.join(root, "params")):
    if os.path.isdir(directory):
      log(f"Initialising from the exported params {directory} (step not recorded).")
      return _restore_as_numpy(directory, None)
  raise ConfigError(f"config.init.path={path!r} holds nothing to load: looked for {LOOKED_FOR} "
                    f"under {root}.")


def _mapping_rules(mapping: Any) -> list[tuple[re.Pattern, list[str]]]:
  rules = []
  for rule in mapping or ():
    pair = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
    targets = rule[1] if pair else None
    targets = [targets] if isinstance(targets, str) else targets
    if (not isinstance(targets, (list, tuple)) or not targets or
        not all(isinstance(x, str) for x in targets)):
      raise ConfigError(f"config.init.mapping: {rule!r} is not a [regex, replacement] pair "
                        f"of strings (or [regex, [replacement, ...]]), e.g. ['^img/', 'img/'].")
    try:
      rules.append((re.compile(rule[0]), list(targets)))
    except re.error as e:
      raise ConfigError(f"config.init.mapping: {rule[0]!r} is not a valid regex ({e}).") from None
  return rules


def _target_names(rules: list[tuple[re.Pattern, list[str]]], source: str) -> list[str]:
  """Where `source` goes: the first matching rule's substitutions (one per replacement), itself
  for no rules, nowhere ([]) when no rule matches."""
  if not rules:
    return [source]
  for pattern, replacements in rules:
    if pattern.search(source):
      try:
        return [pattern.sub(r, source, count=1) for r in replacements]
      except re.error as e:
        raise ConfigError(f"config.init.mapping: a replacement in {replacements!r} of "
                          f"{pattern.pattern!r} is invalid ({e}).") from None
  return []


def _is_vit_posemb(name: str, target_shapes: dict[str, tuple]) -> bool:
  """A ViT learned position embedding: 'pos_embedding' next to a conv patch embedding.

  The sibling check keeps text position embeddings (next to a token embedding table) out, whose
  length may well be a perfect square too.
  """
  parent, _, leaf = name.rpartition("/")
  patch_kernel = f"{parent}/embedding/kernel" if parent else "embedding/kernel"
  return leaf == "pos_embedding" and len(target_shapes.get(patch_kernel, ())) == 4


def _square_side(n: int) -> int | None:
  side = math.isqrt(n)
  return side if side * side == n else None


def resample_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """Resamples a [1, gh*gw, C] square-grid position embedding to `num_tokens` grid positions.

  Bilinear interpolation (jax.image.resize, half-pixel centres, antialiased when shrinking) on
  the [gh, gw, C] grid. vljax's ViT adds its class token after the position embedding, so every
  row is a grid position; there are no class-token rows to keep aside.
  """
  _, n, c = posemb.shape
  old, new = _square_side(n), _square_side(num_tokens)
  grid = np.asarray(posemb, np.float32).reshape(old, old, c)
  resized = jax.image.resize(grid, (new, new, c), method="bilinear")
  return np.asarray(resized).reshape(1, new * new, c)


def _fit(source: str, target: str, value: np.ndarray, leaf: Any,
         target_shapes: dict[str, tuple], log: Callable[[str], Any]) -> np.ndarray:
  """`value` in the shape of the target leaf, resampling a ViT position embedding."""
  shape = tuple(leaf.shape)
  if tuple(value.shape) == shape:
    return value
  resamplable = (_is_vit_posemb(target, target_shapes) and value.ndim == 3 and len(shape) == 3
                 and value.shape[0] == shape[0] == 1 and value.shape[2] == shape[2]
                 and _square_side(value.shape[1]) and _square_side(shape[1]))
  if not resamplable:
    names = source if source == target else f"{source} (loaded as {target})"
    raise ConfigError(f"config.init: parameter {names} has shape {tuple(value.shape)} in "
                      f"config.init.path but {shape} in this model. Change the model config, or "
                      f"leave the parameter out of config.init.mapping.")
  old, new = _square_side(value.shape[1]), _square_side(shape[1])
  log(f"Resampled the position embedding {source} -> {target} from a {old}x{old} to a "
      f"{new}x{new} token grid (bilinear).")
  return resample_posemb(value, shape[1])


def _place(value: np.ndarray, leaf: Any) -> Any:
  """`value` cast to the leaf's dtype and laid out like it (sharded the same on the mesh)."""
  value = np.asarray(value).astype(leaf.dtype)
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    return jax.numpy.asarray(value)
  # Every process holds the whole value; each device takes its own slice of it.
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _param_paths(tree: Any) -> list[str]:
  return [optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def match_layer_layout(source: Any, params: Any,
                       log: Callable[[str], Any] = logging.info) -> Any:
  """`source` (a params tree) in the layer-stack layout of `params`, scanned or unrolled.

  A tree without layer stacks, or already in the target's layout, comes back as it is.
  """
  have = stacks.layout_of_paths(_param_paths(source))
  want = stacks.layout_of_paths(_param_paths(params))
  if have is None or want is None or have == want:
    return source
  log(f"config.init.path stores its layer stacks {have}; converting them to this model's "
      f"{want} layout (config.layers.scan).")
  return stacks.to_layout(source, want)


def load_initial_params(init_cfg: ml_collections.ConfigDict, params: Any, *,
                        log: Callable[[str], Any] = logging.info) -> tuple[Any, list[str]]:
  """Replaces leaves of `params` by those config.init names. Returns (params, loaded names).

  `params` is the freshly initialised (unboxed, possibly sharded) param tree of the model being
  trained; the result has the same structure, shapes, dtypes and shardings. The loaded names
  are the sorted target paths that were replaced.
  """
  rules = _mapping_rules(init_cfg.get("mapping", []))
  source = _read_source(init_cfg.get("path", ""), log)
  source = match_layer_layout(source, params, log)
  source_leaves = {optim.param_path(p): np.asarray(x)
                   for p, x in jax.tree_util.tree_flatten_with_path(source)[0]}
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  target_names = [optim.param_path(p) for p, _ in flat]
  targets = dict(zip(target_names, (x for _, x in flat)))
  target_shapes = {n: tuple(x.shape) for n, x in targets.items()}

  for pattern, _ in rules:
    if not any(pattern.search(n) for n in source_leaves):
      raise ConfigError(f"config.init.mapping rule {pattern.pattern!r} matches no parameter of "
                        f"config.init.path; its names look like "
                        f"{sorted(source_leaves)[:3]}.")

  new_values, loaded_from = {}, {}
  for source_name, value in sorted(source_leaves.items()):
    for target in _target_names(rules, source_name):
      if target not in targets:
        close = difflib.get_close_matches(target, target_names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config.init.mapping sends {source_name} to {target}, which is not "
                          f"a parameter of this model.{hint}")
      if target in loaded_from:
        raise ConfigError(f"config.init.mapping sends both {loaded_from[target]} and "
                          f"{source_name} to {target}.")
      loaded_from[target] = source_name
      fitted = _fit(source_name, target, value, targets[target], target_shapes, log)
      new_values[target] = _place(fitted, targets[target])

  if not new_values:
    raise ConfigError(f"config.init loaded nothing: config.init.mapping matches none of the "
                      f"{len(source_leaves)} parameters of config.init.path "
                      f"({init_cfg.get('path')!r}).")
  n_values = sum(int(np.prod(v.shape)) for v in new_values.values())
  n_total = sum(int(np.prod(s)) for s in target_shapes.values())
  log(f"Initialised {len(new_values)} of {len(targets)} parameters ({n_values:,} of {n_total:,} "
      f"values) from config.init.path; the rest keep their fresh initialisation.")
  leaves = [new_values.get(name, leaf) for name, (_, leaf) in zip(target_names, flat)]
  return jax.tree_util.tree_unflatten(treedef, leaves), sorted(new_values)
