"""Device mesh, logical-axis rules and helpers to place arrays on the mesh.

Parameters and activations are annotated with *logical* axis names (see LOGICAL_AXES);
a rules table (config.sharding.rules, defaulting to DEFAULT_RULES) maps each logical name to
mesh axes. The mesh always has the axes of MESH_AXES; axes of size 1 cost nothing.

A parameter dimension whose size does not divide its mesh axes is a ConfigError naming the
parameter (logical_to_shardings), raised while the train step is built and before anything
compiles, except where REPLICATE_UNEVEN allows that one dimension to be replicated.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vljax import optim
from vljax.configlib import ConfigError

# "tensor" is last, so that its devices are the closest together (the fastest links): tensor
# parallelism communicates inside every layer, data and fsdp once per weight or step.
MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over data and fsdp (fsdp shards the batch as well as the weights).
# Not over tensor: the devices of one tensor group hold the same examples and split the weights.
BATCH_AXES = ("data", "fsdp")

# Logical axis names used by vljax modules. Parameters:
#   embed   model width (d_model) of a weight matrix
#   mlp     hidden width of an MLP block
#   heads   attention heads;  kv  per-head width
#   vocab   vocabulary;  patch  flattened patch pixels
#   layers  the depth axis of scanned layer stacks (vljax.models.stacks), never sharded
# Activations:
#   act_batch, act_len, act_embed, act_mlp, act_heads
LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "vocab", "patch", "layers",
                "act_batch", "act_len", "act_embed", "act_mlp", "act_heads")

# FSDP: every weight matrix is sharded along its model-width dimension over `fsdp`;
# activations are sharded along the batch over data and fsdp.
# Tensor parallelism (Megatron layout): attention heads, the MLP hidden width and the vocabulary
# are split over `tensor`, in the weights and in the activations between the two matmuls of a
# block, so each device computes its heads / its slice of the hidden layer and one reduction
# per block joins them. With mesh.tensor=1 (the default) these rules place nothing.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("layers", None),
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)

# The one allowance to "every sharded parameter dimension divides its mesh axes": (parameter
# path regex, logical axis) pairs whose dimension is replicated instead, with a warning naming
# the parameter, when it does not divide. Token-embedding tables qualify on their 'vocab'
# dimension: CoCa and PaLI embed vocab_size + 1 rows (the last is BOS), which no even tensor
# size divides whatever the tokenizer, and a lookup table replicated over `tensor` stays split
# over `fsdp` along 'embed'. Their output projections (logits heads, vocab_size wide) get no
# allowance: a vocabulary that does not divide mesh.tensor there is the error below.
REPLICATE_UNEVEN: tuple[tuple[str, str], ...] = (
    (r"(^|/)(embedding|token_embedder)/embedding$", "vocab"),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves a {axis: size} mapping in which at most one size is -1 ("the rest").

  Raises ConfigError naming the config key and the fix when the sizes cannot work.
  """
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"config.mesh has unknown axes {sorted(unknown)}; valid axes are "
                     f"{list(MESH_AXES)}.")
  sizes = {ax: int(mesh_config.get(ax, 1)) for ax in MESH_AXES}
  fill = [ax for ax, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {fill}.")
  for ax, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"config.mesh.{ax}={s}: sizes must be positive or -1 (fill).")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(
          f"config.mesh={dict(mesh_config)}: the fixed axes need a multiple of {known} devices "
          f"but {num_devices} are available. Set config.mesh sizes whose product divides "
          f"{num_devices}.")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(
        f"config.mesh={dict(mesh_config)} needs {known} devices but {num_devices} are "
        f"available. Set one axis to -1 to use all devices, e.g. --config.mesh.data=-1.")
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              explicit: bool = False) -> Mesh:
  """Builds the training mesh.

  The trainer uses Auto axis types (GSPMD propagation): flax.linen's embedding lookup raises a
  ShardingTypeError on batch-sharded ids under Explicit axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(kind,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """config.sharding.rules is a list of [logical_name, mesh_axes] pairs (or None: defaults)."""
  if not rules:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _axes_tuple(axes: Any) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _uneven_error(path: str, shape, logical: str | None, axes: Any, size: int, mesh: Mesh,
                  others: int) -> ConfigError:
  """The one-line ConfigError for a parameter dimension that does not divide its mesh axes."""
  axes = _axes_tuple(axes)
  keys = ", ".join(f"config.mesh.{a}={mesh.shape[a]}" for a in axes if mesh.shape[a] > 1)
  what = {"heads": "heads", "mlp": "MLP hidden units", "vocab": "vocabulary entries"}.get(
      logical, f"'{logical}' entries")
  split = [a for a in axes if mesh.shape[a] > 1]
  choose = (f"Choose a config.mesh.{split[0]} that" if len(split) == 1 else
            f"Choose config.mesh sizes whose product over {axes}")
  more = f" ({others} more parameter dimensions do not divide either)" if others else ""
  return ConfigError(
      f"{keys}: parameter '{path}' of shape {tuple(shape)} has logical axis '{logical}' of "
      f"size {size}, which does not divide mesh axes {axes} of size {_axis_size(mesh, axes)}"
      f"{more}. {choose} divides {size} {what}, or set "
      f"config.sharding.rules to replicate '{logical}' (a full rules list, as "
      f"vljax.sharding.DEFAULT_RULES, with ['{logical}', None]).")


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules,
                         replicate_uneven: Sequence[tuple[str, str]] = REPLICATE_UNEVEN) -> Any:
  """Maps a tree of (possibly LogicallyPartitioned-boxed) ShapeDtypeStructs to NamedShardings.

  A dimension whose size does not divide its mesh axes raises ConfigError naming the parameter,
  its shape, the logical axis and the mesh axes: replicating it instead (what this did before)
  would quietly put a whole embedding table on every device of a pod. The exceptions are the
  (path regex, logical axis) pairs of `replicate_uneven`, replicated with a warning. The check
  runs on abstract shapes, so it fails before anything compiles or is allocated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shapes = nn.meta.unbox(abstract_tree)
  allowed = [(re.compile(pattern), logical) for pattern, logical in replicate_uneven]
  uneven = []  # (path, shape, logical, axes, size) of each dimension that does not divide

  def place(path, spec, shape_struct):
    logical_names = tuple(spec) if spec is not None else ()
    spec = nn.logical_to_mesh_axes(spec, rules) if spec is not None else P()
    shape = getattr(shape_struct, "shape", ())
    dims = list(spec) + [None] * (len(shape) - len(spec))
    names = list(logical_names) + [None] * (len(shape) - len(logical_names))
    name = optim.param_path(path)  # as config.optim.freeze and the checkpoints name it
    fixed = []
    for size, axes, logical in zip(shape, dims, names):
      if axes is not None and size % _axis_size(mesh, axes):
        if any(logical == lg and rx.search(name) for rx, lg in allowed):
          logging.warning("Replicating dimension '%s' (size %d) of parameter '%s' %s: it does "
                          "not divide mesh axes %s (allowed by sharding.REPLICATE_UNEVEN).",
                          logical, size, name, tuple(shape), axes)
        else:
          uneven.append((name, shape, logical, axes, size))
        axes = None
      fixed.append(axes)
    return NamedSharding(mesh, P(*fixed))

  out = jax.tree_util.tree_map_with_path(place, specs, shapes,
                                         is_leaf=lambda x: isinstance(x, P) or x is None)
  if uneven:
    raise _uneven_error(*uneven[0], mesh=mesh, others=len(uneven) - 1)
  return out


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of an array whose leading dimension is the global batch."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch_from_host(batch: Mapping[str, np.ndarray], mesh: Mesh,
                           shardings: Mapping[str, NamedSharding] | None = None
                           ) -> dict[str, jax.Array]:
  """Assembles per-process numpy batches into global arrays sharded over the batch axes.

  Each process passes its own slice of the global batch (process-major order). `shardings`
  (e.g. the train step's declared input shardings) overrides the default of each key.
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    sharding = (shardings or {}).get(key) or batch_sharding(mesh, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
