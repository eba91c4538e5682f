"""Device mesh, logical-axis rules and helpers to place arrays on the mesh.

Parameters and activations are annotated with *logical* axis names (see LOGICAL_AXES);
a rules table (config.sharding.rules, defaulting to DEFAULT_RULES) maps each logical name to
mesh axes. The mesh always has the axes of MESH_AXES; axes of size 1 cost nothing.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vljax.configlib import ConfigError

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every mesh axis: fsdp shards the batch as well as the weights.
BATCH_AXES = ("data", "fsdp")

# Logical axis names used by vljax modules. Parameters:
#   embed   model width (d_model) of a weight matrix
#   mlp     hidden width of an MLP block
#   heads   attention heads;  kv  per-head width
#   vocab   vocabulary;  patch  flattened patch pixels
# Activations:
#   act_batch, act_len, act_embed, act_mlp, act_heads
LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "vocab", "patch",
                "act_batch", "act_len", "act_embed", "act_mlp", "act_heads")

# FSDP: every weight matrix is sharded along its model-width dimension over `fsdp`;
# activations are sharded along the batch over both axes.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("patch", None),
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", None),
    ("act_heads", None),
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


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Maps a tree of (possibly LogicallyPartitioned-boxed) ShapeDtypeStructs to NamedShardings.

  A dimension whose size does not divide its mesh axes is replicated instead (e.g. a 3-wide
  patch kernel on an 8-way fsdp axis), and logged, rather than failing deep inside XLA.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shapes = nn.meta.unbox(abstract_tree)

  def place(spec, shape_struct):
    spec = nn.logical_to_mesh_axes(spec, rules) if spec is not None else P()
    shape = getattr(shape_struct, "shape", ())
    dims = list(spec) + [None] * (len(shape) - len(spec))
    fixed = []
    for size, axes in zip(shape, dims):
      if axes is not None and size % _axis_size(mesh, axes):
        logging.info("Replicating a dimension of size %d: it does not divide mesh axes %s.",
                     size, axes)
        axes = None
      fixed.append(axes)
    return NamedSharding(mesh, P(*fixed))

  return jax.tree.map(place, specs, shapes,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


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
