"""big_vision SigLIP checkpoints (.npz of flattened 'img/...', 'txt/...', 't', 'b') -> vljax.

The released files name their tensors 'params/img/...'; files without the 'params/' prefix
load too. The architecture is read from the tensors' shapes: widths, depths, MLP sizes, head
counts (attention kernels are [D, heads, head_dim]), patch size, image size (a square grid of
learned position embeddings), vocabulary, text length and embedding size. Layer stacks stored
by a scanned big_vision run ('encoderblock' with a leading depth axis) are unrolled.

SigLIP 2's NaFlex checkpoints (big_vision's naflex_vit.py) embed flattened patches with a Dense
'img/embedding/kernel' [p*p*3, width] (pixels in (row, column, channel) order) and store the
position table as a grid 'img/pos_embedding' [n, n, width], resized to each image's grid; they
are told apart by the kernel's rank and read as vljax's conv kernel [p, p, 3, width] and table
[1, n*n, width] (the ViT option posemb_grid=(n, n)).
"""
from __future__ import annotations

import math
import os
import re

import numpy as np

from vljax.interop import siglip
from vljax.interop.tensors import TensorFile, read_npz

PREFIX = "params/"
_ENCODERS = {"img": "img/Transformer", "txt": "txt/Encoder_0"}
_ATTN = "MultiHeadDotProductAttention_0"


def _unroll_scanned(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """'.../encoderblock/...' [depth, ...] -> '.../encoderblock_{i}/...'."""
  out = {}
  for name, value in arrays.items():
    head, sep, tail = name.partition("/encoderblock/")
    if not sep:
      out[name] = value
      continue
    for i in range(value.shape[0]):
      out[f"{head}/encoderblock_{i}/{tail}"] = value[i]
  return out


def _shaped(source: TensorFile, name: str, layout: str) -> np.ndarray:
  """The array `name`, whose rank must be that of `layout` (e.g. '[D, heads, head_dim]')."""
  value = source.take(name)  # raises if missing
  if value.ndim != layout.count(",") + 1:
    raise source.error(name, f"has shape {value.shape}, expected {layout}.")
  return value


def _tower(source: TensorFile, encoder: str) -> siglip.Tower:
  blocks = {int(m.group(1)) for n in source.names()
            if (m := re.match(re.escape(encoder) + r"/encoderblock_(\d+)/", n))}
  block = f"{encoder}/encoderblock_0"
  if not blocks:
    raise source.error(f"{block}/{_ATTN}/query/kernel",
                       "is missing: the file has no transformer blocks there.")
  query = _shaped(source, f"{block}/{_ATTN}/query/kernel", "[D, heads, head_dim]")
  mlp = _shaped(source, f"{block}/MlpBlock_0/Dense_0/kernel", "[D, mlp_dim]")
  return siglip.Tower(width=query.shape[0], depth=max(blocks) + 1, mlp_dim=mlp.shape[1],
                      num_heads=query.shape[1])


_NAFLEX_CHANNELS = 3  # NaFlex patches are flattened RGB pixels


def _naflex_patch(source: TensorFile) -> int:
  """The patch size of a NaFlex checkpoint's Dense patch embedding [p*p*3, width]."""
  rows = source.arrays["img/embedding/kernel"].shape[0]
  patch = math.isqrt(rows // _NAFLEX_CHANNELS)
  if patch * patch * _NAFLEX_CHANNELS != rows:
    raise source.error("img/embedding/kernel", f"has {rows} rows; a NaFlex patch embedding "
                                               f"has patch * patch * 3.")
  return patch


def spec_from_tensors(source: TensorFile) -> siglip.SiglipSpec:
  """The SigLIP (or SigLIP 2 NaFlex) architecture that the tensors' shapes describe."""
  image, text = _tower(source, _ENCODERS["img"]), _tower(source, _ENCODERS["txt"])
  naflex_grid = None
  if "img/embedding/kernel" in source and source.arrays["img/embedding/kernel"].ndim == 2:
    patch = _naflex_patch(source)
    posemb = _shaped(source, "img/pos_embedding", "[n, n, width]")
    naflex_grid = grid = posemb.shape[0]
    square = posemb.shape[0] == posemb.shape[1]
  else:
    kernel = _shaped(source, "img/embedding/kernel", "[patch, patch, channels, width]")
    posemb = _shaped(source, "img/pos_embedding", "[1, n*n, width]")
    patch, grid = kernel.shape[0], math.isqrt(posemb.shape[1])
    square = grid * grid == posemb.shape[1] and kernel.shape[0] == kernel.shape[1]
  if not square:
    raise source.error("img/pos_embedding", f"has shape {posemb.shape}: only square grids of "
                                            f"square patches are supported.")
  if "img/MAPHead_0/probe" not in source:
    raise source.error("img/MAPHead_0/probe", "is missing: only MAP-head (SigLIP) image towers "
                                              "are supported.")
  embed = _shaped(source, "txt/Embed_0/embedding", "[vocab, width]")
  txt_pos = _shaped(source, "txt/pos_embedding", "[1, length, width]")
  # SigLIP 2 pads with <pad> and lowercases; SigLIP pads with EOS.
  siglip2 = siglip.is_siglip2(embed.shape[0], naflex=naflex_grid is not None)
  text_head = "txt/head/kernel" in source
  image_head = "img/head/kernel" in source
  if text_head:
    embed_dim = source.arrays["txt/head/kernel"].shape[-1]
  elif image_head:
    embed_dim = source.arrays["img/head/kernel"].shape[-1]
  else:
    embed_dim = image.width
  return siglip.SiglipSpec(
      image=image, text=text, image_size=grid * patch, patch_size=patch,
      vocab_size=embed.shape[0], max_len=txt_pos.shape[1], embed_dim=embed_dim,
      image_head=image_head, text_head=text_head, has_bias="b" in source,
      naflex_grid=naflex_grid, source_pad_id=siglip.SIGLIP2_PAD_ID if siglip2 else 1,
      lowercase_text=siglip2)


def read(path: str) -> tuple[siglip.SiglipSpec, dict[str, np.ndarray], TensorFile]:
  """(spec, big_vision-layout arrays without the 'params/' prefix, the file)."""
  source = read_npz(path)
  names = source.names()
  if names and all(n.startswith(PREFIX) for n in names):
    source.arrays = {n[len(PREFIX):]: v for n, v in source.arrays.items()}
    source.name_prefix = PREFIX  # errors name the tensors as the file does
  source.arrays = _unroll_scanned(source.arrays)
  if "t" not in source:
    raise source.error("t", "is missing: not a big_vision two-tower checkpoint (it names "
                            f"{source.names()[:3]} ...).")
  spec = spec_from_tensors(source)
  arrays = {n: source.take(n) for n in source.names()}
  if spec.naflex_grid is not None:
    kernel, table = arrays["img/embedding/kernel"], arrays["img/pos_embedding"]
    p = spec.patch_size
    arrays["img/embedding/kernel"] = kernel.reshape(p, p, _NAFLEX_CHANNELS, kernel.shape[-1])
    arrays["img/pos_embedding"] = table.reshape(1, -1, table.shape[-1])
  return spec, arrays, source


def write(path: str, arrays: dict[str, np.ndarray], naflex_grid: int | None = None) -> str:
  """Writes big_vision-layout arrays as a .npz with the released files' 'params/' names
  (naflex_grid set: a NaFlex checkpoint's Dense patch kernel and position grid)."""
  if naflex_grid is not None:
    kernel, table = arrays["img/embedding/kernel"], arrays["img/pos_embedding"]
    arrays = dict(arrays, **{
        "img/embedding/kernel": kernel.reshape(-1, kernel.shape[-1]),
        "img/pos_embedding": table.reshape(naflex_grid, naflex_grid, table.shape[-1])})
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **{PREFIX + name: value for name, value in sorted(arrays.items())})
  return path
