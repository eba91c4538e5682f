"""Contrastive losses for dual encoders: softmax (CLIP) and pairwise sigmoid (SigLIP).

Both functions take the L2-normalised embeddings of the *global* batch and return the global
loss as a replicated scalar. Where to compute is decided by the mesh in context
(`jax.set_mesh`):

* no mesh, or a mesh whose batch axes (those of `vljax.sharding.BATCH_AXES` it has) total one
  device: a dense [N, N] computation on plain arrays;
* otherwise: an explicit `jax.shard_map` over the batch axes. Each device holds b = N / D rows
  of each modality.
    - softmax: each device all-gathers the other modality and computes its b x N logits for
      both directions; the cross-entropy sums are `psum`-med and divided by N.
    - sigmoid, chunked=False: the same all-gather form, b x N logits per device.
    - sigmoid, chunked=True: a ring. Text chunks (b x d) travel between devices with
      `ppermute`; at each of the D steps a device computes only the b x b block of logits
      against the chunk it currently holds. The loop is a `lax.scan` whose block computation is
      under `jax.checkpoint`, so the backward pass recomputes each block instead of keeping
      all D of them alive, and the transpose of `ppermute` sends the text gradients back
      around the ring. Per device, only the current b x b block (and, in the backward pass,
      its cotangent) is alive at any time; the saved residuals are the D - 1 text chunks.

Gradients come from autodiff through the collectives of a function that returns the *global*
loss, so every cross-device term (device k's text embeddings appearing in other devices'
logits) is included by construction.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from vljax.sharding import BATCH_AXES


class _BatchMesh(NamedTuple):
  """The mesh in context and the axes the global batch is split over."""
  mesh: jax.sharding.AbstractMesh
  axes: tuple[str, ...]
  size: int
  explicit: bool


def _batch_mesh() -> _BatchMesh | None:
  """Returns the batch-axes view of the current mesh, or None when the dense path applies."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    return None
  size = math.prod(mesh.shape[a] for a in axes)
  if size == 1:
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if any(types[a] == AxisType.Manual for a in axes):
    # Inside a caller's shard_map the arrays are local shards; a loss computed on them would
    # silently miss the cross-device terms.
    raise ValueError(
        f"Contrastive losses take the global batch, but mesh axes {axes} are Manual here "
        "(called inside shard_map). Call the loss outside shard_map, on global arrays.")
  kinds = {types[a] for a in axes}
  if len(kinds) > 1:
    # reshard only takes Explicit axes and with_sharding_constraint only Auto ones.
    raise ValueError(
        f"The batch mesh axes {axes} mix axis types {[types[a].name for a in axes]}; "
        "contrastive losses need them all Explicit or all Auto.")
  return _BatchMesh(mesh, axes, size, kinds == {AxisType.Explicit})


def _check_embeddings(zimg: jax.Array, ztxt: jax.Array) -> None:
  if jnp.ndim(zimg) != 2 or jnp.ndim(ztxt) != 2:
    raise ValueError(
        f"zimg and ztxt must be [N, d] matrices, got shapes {jnp.shape(zimg)} and "
        f"{jnp.shape(ztxt)}.")
  if jnp.shape(zimg) != jnp.shape(ztxt):
    raise ValueError(
        f"zimg and ztxt must have the same shape [N, d] (row i of each is a matching pair), "
        f"got {jnp.shape(zimg)} and {jnp.shape(ztxt)}.")


def _as_scalar(x: jax.Array, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.size != 1:
    raise ValueError(f"{name} must be a scalar, got shape {x.shape}.")
  return x.reshape(())


def _place(x: jax.Array, spec: P, bm: _BatchMesh) -> jax.Array:
  """Puts traced x on the mesh with `spec`, which shard_map asserts (Explicit) or infers (Auto).

  Only called under jit (see `_sharded`): eagerly, neither op accepts an array that is not yet on
  the mesh, while under jit both do.
  """
  if bm.explicit:
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def _check_divisible(n: int, bm: _BatchMesh) -> None:
  if n % bm.size:
    raise ValueError(
        f"The global batch ({n}) must be divisible by the number of devices along the batch "
        f"mesh axes {bm.axes} ({bm.size}).")


def _sharded(fn, static_argnames=()):
  """Wraps a sharded loss path in jit (inlined when the caller is already under jit).

  Under jit the placement ops accept inputs that are not on the mesh yet (e.g. plain arrays in
  an eager call); the jit cache keys on the context mesh, so each mesh gets its own trace.
  """
  return jax.jit(fn, static_argnames=static_argnames)


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T, accumulated in (at least) float32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _pair_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise dot products <a_i, b_i>, in float32."""
  return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=-1)


# ---------------------------------------------------------------------------------------------
# Softmax (CLIP)
# ---------------------------------------------------------------------------------------------


def softmax_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array) -> jax.Array:
  """CLIP loss: 0.5 * (CE image->text + CE text->image), each a mean over the global batch.

  Args:
    zimg: [N, d] L2-normalised image embeddings of the global batch.
    ztxt: [N, d] L2-normalised text embeddings; row i matches zimg row i.
    scale: positive scalar multiplying the cosine similarities (already exponentiated).

  Returns:
    The global loss, a float32 scalar (replicated when a mesh is in context).
  """
  _check_embeddings(zimg, ztxt)
  scale = _as_scalar(scale, "scale")
  bm = _batch_mesh()
  if bm is None:
    return _softmax_dense(zimg, ztxt, scale)
  _check_divisible(zimg.shape[0], bm)
  return _softmax_sharded(zimg, ztxt, scale)


@_sharded
def _softmax_sharded(zimg, ztxt, scale):
  """All-gather form over the batch axes: b x N logits per device and direction."""
  bm = _batch_mesh()
  n = zimg.shape[0]
  axes = bm.axes
  row = P(axes, None)

  def local(zi, zt, s):
    s = s.astype(jnp.float32)
    zi_all = jax.lax.all_gather(zi, axes, tiled=True)  # [N, d]
    zt_all = jax.lax.all_gather(zt, axes, tiled=True)
    # The positive logit of local row r is the same in both directions.
    pos = s * _pair_dot(zi, zt)  # [b]
    i2t = s * _dot_t(zi, zt_all)  # [b, N]
    t2i = s * _dot_t(zt, zi_all)
    ce = (jax.nn.logsumexp(i2t, axis=-1) - pos) + (jax.nn.logsumexp(t2i, axis=-1) - pos)
    return jax.lax.psum(jnp.sum(ce), axes) / (2 * n)

  return jax.shard_map(local, mesh=bm.mesh, in_specs=(row, row, P()), out_specs=P())(
      _place(zimg, row, bm), _place(ztxt, row, bm), _place(scale, P(), bm))


def _softmax_dense(zimg, ztxt, scale):
  logits = scale.astype(jnp.float32) * _dot_t(zimg, ztxt)  # [N, N]
  pos = jnp.diagonal(logits)
  ce = (jax.nn.logsumexp(logits, axis=1) - pos) + (jax.nn.logsumexp(logits, axis=0) - pos)
  return jnp.mean(ce) / 2


# ---------------------------------------------------------------------------------------------
# Sigmoid (SigLIP)
# ---------------------------------------------------------------------------------------------


def sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array,
                 chunked: bool = True) -> jax.Array:
  """SigLIP loss: -(1/N) sum_ij log sigmoid(z_ij * (scale * <x_i, y_j> + bias)).

  z_ij is +1 for matching pairs (i == j) and -1 otherwise.

  Args:
    zimg: [N, d] L2-normalised image embeddings of the global batch.
    ztxt: [N, d] L2-normalised text embeddings; row i matches zimg row i.
    scale: positive scalar multiplying the cosine similarities (already exponentiated).
    bias: scalar added to the scaled similarities.
    chunked: on a mesh, use the ppermute ring (one b x b logits block per device at a time,
      forward and backward) instead of all-gathering the text (b x N logits per device).
      Both give the same value and gradients; without a mesh the dense path is used either way.

  Returns:
    The global loss, a float32 scalar (replicated when a mesh is in context).
  """
  _check_embeddings(zimg, ztxt)
  scale = _as_scalar(scale, "scale")
  bias = _as_scalar(bias, "bias")
  bm = _batch_mesh()
  if bm is None:
    return _sigmoid_dense(zimg, ztxt, scale, bias)
  _check_divisible(zimg.shape[0], bm)
  return _sigmoid_sharded(zimg, ztxt, scale, bias, chunked=bool(chunked))


@functools.partial(_sharded, static_argnames=("chunked",))
def _sigmoid_sharded(zimg, ztxt, scale, bias, chunked):
  """Ring (chunked) or all-gather form over the batch axes; see the module docstring."""
  bm = _batch_mesh()
  n = zimg.shape[0]
  local = _sigmoid_ring if chunked else _sigmoid_all_gather
  row = P(bm.axes, None)
  return jax.shard_map(
      lambda zi, zt, s, b: local(zi, zt, s, b, bm.axes, bm.size) / n,
      mesh=bm.mesh, in_specs=(row, row, P(), P()), out_specs=P())(
          _place(zimg, row, bm), _place(ztxt, row, bm), _place(scale, P(), bm),
          _place(bias, P(), bm))


def _sigmoid_terms(logits: jax.Array, offset: jax.Array | int | None) -> jax.Array:
  """Sum of -log sigmoid(z * logits) over a block whose positives sit at column row + offset.

  offset=None means the block holds no positives. The sign is chosen elementwise (not by
  subtracting a correction for the diagonal) so large positive logits lose no precision.
  """
  if offset is None:
    return -jnp.sum(jax.nn.log_sigmoid(-logits))
  rows = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  z = jnp.where(cols == rows + offset, 1.0, -1.0).astype(logits.dtype)
  return -jnp.sum(jax.nn.log_sigmoid(z * logits))


def _sigmoid_dense(zimg, ztxt, scale, bias):
  logits = scale.astype(jnp.float32) * _dot_t(zimg, ztxt) + bias.astype(jnp.float32)
  return _sigmoid_terms(logits, 0) / zimg.shape[0]


def _sigmoid_all_gather(zi, zt, s, b, axes, num_devices):
  """Per-device body of the all-gather form: b x N logits. Returns the psum-med loss sum."""
  del num_devices
  zt_all = jax.lax.all_gather(zt, axes, tiled=True)  # [N, d]
  logits = s.astype(jnp.float32) * _dot_t(zi, zt_all) + b.astype(jnp.float32)  # [b, N]
  # Local row r's positive is global column (device index * b + r).
  offset = jax.lax.axis_index(axes) * zi.shape[0]
  return jax.lax.psum(_sigmoid_terms(logits, offset), axes)


def _sigmoid_ring(zi, zt, s, b, axes, num_devices):
  """Per-device body of the chunked form: a ring of D b x b blocks. Returns the psum-med sum."""
  s = s.astype(jnp.float32)
  b = b.astype(jnp.float32)

  # Checkpointed so that the backward pass recomputes the b x b logits of a block from its
  # inputs (the b x d text chunk is the only per-step residual) rather than storing D blocks.
  @functools.partial(jax.checkpoint, static_argnums=(1,))
  def block(chunk, positives):
    logits = s * _dot_t(zi, chunk) + b
    return _sigmoid_terms(logits, 0 if positives else None)

  # Step 0: the device's own text chunk; the only block holding positives (the diagonal).
  total = block(zt, True)
  # Steps 1..D-1: pass the chunk one device along the ring, then score pure negatives. The
  # ppermute stays outside the checkpoint so the backward pass does not re-send chunks; its
  # transpose (the reverse permutation) carries the text gradients back to their owners.
  ring = [(j, (j + 1) % num_devices) for j in range(num_devices)]

  def step(carry, _):
    chunk, acc = carry
    chunk = jax.lax.ppermute(chunk, axes, ring)
    return (chunk, acc + block(chunk, False)), None

  (_, total), _ = jax.lax.scan(step, (zt, total), None, length=num_devices - 1)
  return jax.lax.psum(total, axes)
