"""torch module layouts -> big_vision's flat flax layout, shared by the torch-side formats.

An Entry names one torch tensor, its expected shape, the big_vision name it becomes and how
its layout changes (KINDS, each with its inverse for export). torch's nn.MultiheadAttention
packs the query, key and value projections into one `in_proj_weight` [3D, D] and
`in_proj_bias` [3D]; `unpack_in_proj` splits them under stand-in names `{prefix}.q_proj.weight`
etc., so one `attention` helper serves packed and separate projections alike.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from vljax.interop.tensors import TensorFile, check_shape

# kind -> (torch -> big_vision, big_vision -> torch); `h` is the number of heads (for
# 'patch_dense', of image channels).
_Convert = Callable[[np.ndarray, int], np.ndarray]


def _patch_kernel(x: np.ndarray, channels: int) -> np.ndarray:
  """A Linear over flattened patches [D, p*p*C], pixels in (row, column, channel) order (SigLIP
  2's NaFlex) -> the equivalent conv kernel [p, p, C, D]."""
  p = int(round((x.shape[1] // channels) ** 0.5))
  return x.T.reshape(p, p, channels, x.shape[0])


KINDS: dict[str, tuple[_Convert, _Convert]] = {
    "copy": (lambda x, h: x, lambda x, h: x),
    "dense": (lambda x, h: x.T, lambda x, h: x.T),
    "qkv": (lambda x, h: x.T.reshape(x.shape[1], h, -1),
            lambda x, h: x.reshape(x.shape[0], -1).T),
    "qkv_bias": (lambda x, h: x.reshape(h, -1), lambda x, h: x.reshape(-1)),
    "out": (lambda x, h: x.T.reshape(h, -1, x.shape[0]),
            lambda x, h: x.reshape(-1, x.shape[-1]).T),
    "conv": (lambda x, h: x.transpose(2, 3, 1, 0), lambda x, h: x.transpose(3, 2, 0, 1)),
    "posemb": (lambda x, h: x[None], lambda x, h: x[0]),
    "patch_dense": (_patch_kernel, lambda x, h: x.reshape(-1, x.shape[-1]).T),
}


class Entry:
  """One tensor: its torch name and shape, big_vision name, layout kind and head count."""

  def __init__(self, hf: str, bv: str, kind: str, shape: tuple[int, ...], heads: int = 0):
    self.hf, self.bv, self.kind, self.shape, self.heads = hf, bv, kind, shape, heads


def attention(hf: str, bv: str, width: int, heads: int, out: str = "out_proj") -> list[Entry]:
  """q/k/v projections `{hf}.{q,k,v}_proj` and the output projection `{hf}.{out}`."""
  entries = []
  for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    entries += [Entry(f"{hf}.{proj}.weight", f"{bv}/{name}/kernel", "qkv", (width, width),
                      heads),
                Entry(f"{hf}.{proj}.bias", f"{bv}/{name}/bias", "qkv_bias", (width,), heads)]
  return entries + [
      Entry(f"{hf}.{out}.weight", f"{bv}/out/kernel", "out", (width, width), heads),
      Entry(f"{hf}.{out}.bias", f"{bv}/out/bias", "copy", (width,))]


def norm(hf: str, bv: str, width: int) -> list[Entry]:
  return [Entry(f"{hf}.weight", f"{bv}/scale", "copy", (width,)),
          Entry(f"{hf}.bias", f"{bv}/bias", "copy", (width,))]


def mlp(hf: str, bv: str, width: int, mlp_dim: int,
        names: tuple[str, str] = ("fc1", "fc2")) -> list[Entry]:
  up, down = names
  return [Entry(f"{hf}.{up}.weight", f"{bv}/Dense_0/kernel", "dense", (mlp_dim, width)),
          Entry(f"{hf}.{up}.bias", f"{bv}/Dense_0/bias", "copy", (mlp_dim,)),
          Entry(f"{hf}.{down}.weight", f"{bv}/Dense_1/kernel", "dense", (width, mlp_dim)),
          Entry(f"{hf}.{down}.bias", f"{bv}/Dense_1/bias", "copy", (width,))]



_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def unpack_in_proj(source: TensorFile, prefix: str, width: int) -> dict[str, tuple[np.ndarray,
                                                                                   str]]:
  """`{prefix}.in_proj_{weight,bias}` split into q/k/v: stand-in name -> (array, real name)."""
  out = {}
  for suffix, shape in (("weight", (3 * width, width)), ("bias", (3 * width,))):
    real = f"{prefix}.in_proj_{suffix}"
    for proj, part in zip(_PROJECTIONS, np.split(source.take(real, shape), 3)):
      out[f"{prefix}.{proj}.{suffix}"] = (part, real)
  return out


def unpack_fused(source: TensorFile, prefix: str, fused: str, projections: tuple[str, ...],
                 width: int) -> dict[str, tuple[np.ndarray, str]]:
  """`{prefix}.{fused}.{weight,bias}` (timm's `qkv`, its MAP head's `kv`) split into the
  `projections` in order: stand-in name -> (array, real name), as unpack_in_proj."""
  out, n = {}, len(projections)
  for suffix, shape in (("weight", (n * width, width)), ("bias", (n * width,))):
    real = f"{prefix}.{fused}.{suffix}"
    for proj, part in zip(projections, np.split(source.take(real, shape), n)):
      out[f"{prefix}.{proj}.{suffix}"] = (part, real)
  return out


def pack_in_proj(tensors: dict[str, np.ndarray], prefix: str) -> None:
  """The inverse of unpack_in_proj, in place on torch-named arrays."""
  for suffix in ("weight", "bias"):
    parts = [tensors.pop(f"{prefix}.{proj}.{suffix}") for proj in _PROJECTIONS]
    tensors[f"{prefix}.in_proj_{suffix}"] = np.concatenate(parts)


def to_big_vision(source: TensorFile, entries: list[Entry],
                  packed: dict[str, tuple[np.ndarray, str]] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(big_vision name -> array, big_vision name -> the file's tensor name), shapes checked."""
  packed = packed or {}
  arrays, names = {}, {}
  for e in entries:
    if e.hf in packed:
      value, names[e.bv] = packed[e.hf]
      check_shape(source, names[e.bv], value.shape, e.shape)
    else:
      value, names[e.bv] = source.take(e.hf, e.shape), e.hf
    arrays[e.bv] = KINDS[e.kind][0](value, e.heads)
  return arrays, names


def to_torch(arrays: dict[str, np.ndarray], entries: list[Entry]) -> dict[str, np.ndarray]:
  """big_vision-layout arrays -> torch-named float32 arrays (stand-in names kept)."""
  return {e.hf: np.ascontiguousarray(KINDS[e.kind][1](arrays[e.bv], e.heads), np.float32)
          for e in entries}
