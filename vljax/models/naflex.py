"""NaFlex inputs (SigLIP 2): images at their own aspect ratio and resolution, as padded patches.

A NaFlex batch is a dict
  patches         float [B, N, ph * pw * C]  each image's patches in row-major order, a patch's
                                              pixels in (row, column, channel) order; rows past
                                              the image's own patches are padding
  spatial_shapes  int   [B, 2]               each image's patch grid (rows, columns)
  mask            bool  [B, N]               True on the image's own patches
which vljax.models.vit.VisionTransformer encodes like an NHWC batch: the same patch embedding
(its conv kernel applied to each patch), a learned position table stored at one grid and
resized to each image's grid (`resize_posemb`), attention and pooling over the real patches
only. `pack` builds such a batch from images of any sizes.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

KEYS = ("patches", "spatial_shapes", "mask")


def patchify(images: np.ndarray | Array, patch: int) -> np.ndarray | Array:
  """[B, H, W, C] -> [B, (H/p) * (W/p), p * p * C], patches row-major, pixels (row, col, ch)."""
  xp = jnp if isinstance(images, jax.Array) else np
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def _axis_weights(size: Array, grid: int, positions: Array) -> Array:
  """[B, N, grid]: the weights of the `grid` stored rows for output row `positions` [B, N] of
  an image `size` [B, 1] rows tall, by antialiased bilinear resizing.

  Resizing by `scale` = grid / size samples the stored rows at (out + 0.5) * scale - 0.5 with
  a triangle filter; when shrinking (scale > 1) the triangle widens to `scale` rows so that
  every stored row contributes (the antialiasing), and the weights are renormalised to sum to 1.
  """
  scale = grid / size
  support = jnp.maximum(scale, 1.0)
  center = (positions + 0.5) * scale - 0.5
  source = jnp.arange(grid, dtype=jnp.float32)
  weights = jnp.maximum(
      0.0, 1.0 - jnp.abs(source - center[..., None]) / support[..., None])
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


def resize_posemb(table: Array, grid: tuple[int, int], spatial_shapes: Array,
                  length: int) -> Array:
  """The position table [grid_h * grid_w, D] resized to each image's patch grid.

  spatial_shapes: int [B, 2] (rows, columns), rows * columns <= length. Returns [B, length, D]
  float32: row r * columns + c holds the embedding of patch (r, c); rows past the image's own
  patches are zero. Antialiased bilinear resizing (SigLIP 2's NaFlex; `_axis_weights`), done
  as two small weight matrices so that shapes stay static whatever the images' sizes.
  """
  shapes = spatial_shapes.astype(jnp.float32)
  rows_n, cols_n = shapes[:, :1], shapes[:, 1:]
  index = jnp.arange(length, dtype=jnp.float32)[None, :]
  real = index < rows_n * cols_n
  # Padding rows take patch (0, 0)'s weights (a patch past the grid would have none: 0 / 0),
  # then zero.
  row = jnp.where(real, jnp.floor(index / cols_n), 0.0)
  col = jnp.where(real, index - row * cols_n, 0.0)
  wy = _axis_weights(rows_n, grid[0], row) * real[..., None]
  wx = _axis_weights(cols_n, grid[1], col)
  table = table.reshape(grid[0], grid[1], -1).astype(jnp.float32)
  return jnp.einsum("bny,bnx,yxd->bnd", wy, wx, table, precision=jax.lax.Precision.HIGHEST)


def grid_for_max_patches(height: int, width: int, patch: int, max_patches: int
                         ) -> tuple[int, int]:
  """(rows, columns) of the largest patch grid of the image's aspect ratio with at most
  `max_patches` patches: each side rounded up to whole patches, at least one patch
  (the rule of SigLIP 2's NaFlex preprocessing, found by the same bisection on the scale)."""

  def side(scale, size):
    return max(1, math.ceil(size * scale / patch))

  low, high = 1e-6, 100.0
  while high - low >= 1e-5:
    mid = (low + high) / 2
    if side(mid, height) * side(mid, width) <= max_patches:
      low = mid
    else:
      high = mid
  return side(low, height), side(low, width)


def pack(images: Sequence[np.ndarray], patch: int, max_patches: int) -> dict[str, np.ndarray]:
  """A NaFlex batch of float images [H_i, W_i, C] (preprocessed pixels, e.g. SigLIP's [-1, 1]),
  each resized (antialiased bilinear, jax.image.resize) to its grid_for_max_patches.

  The resize is vljax's: Hugging Face's Siglip2ImageProcessor resizes the uint8 image with
  torchvision, so pixels differ slightly from its; the model's arithmetic on a given batch is
  what the interop tests check.
  """
  patches = np.zeros((len(images), max_patches, patch * patch * images[0].shape[-1]),
                     np.float32)
  shapes = np.zeros((len(images), 2), np.int32)
  mask = np.zeros((len(images), max_patches), bool)
  for i, image in enumerate(images):
    image = np.asarray(image, np.float32)
    rows, cols = grid_for_max_patches(image.shape[0], image.shape[1], patch, max_patches)
    resized = np.asarray(jax.image.resize(
        image, (rows * patch, cols * patch, image.shape[-1]), "linear", antialias=True))
    n = rows * cols
    patches[i, :n] = patchify(resized[None], patch)[0]
    shapes[i], mask[i, :n] = (rows, cols), True
  return {"patches": patches, "spatial_shapes": shapes, "mask": mask}
