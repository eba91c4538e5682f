"""Masked image modelling pieces (BEiT-style block-wise masks, normalised-pixel targets).

  blockwise_patch_mask(key, grid, num_masked)        -> bool [gh * gw]
  blockwise_patch_masks(key, batch, grid, num_masked) -> bool [batch, gh * gw]
  patch_pixel_targets(images, patch)                 -> [B, n, patch * patch * 3]
  masked_patch_loss(predictions, targets, mask)      -> scalar

Block-wise masking (BEiT, Bao et al. 2022): rectangles of patches are added one at a time until
`num_masked` patches (40% of the grid in BEiT / VLMo / BEiT-3) are masked. Each attempt draws a
target area uniformly in [min_patches, remaining] (BEiT: min 16 patches at 14 x 14; the
minimum here is min(16, num_masked)), a log-uniform aspect ratio in [0.3, 1/0.3], and a
uniform position; it is accepted when it masks at least one new patch and does not push the
count past `num_masked` (BEiT's rule). BEiT loops until the count is reached; here a fixed
number of attempts (static shapes, inside jit) runs, and a last step tops the mask up with
random unmasked patches, so every mask has exactly `num_masked` patches.

Targets (the fallback when no visual tokenizer is configured, as MAE's): each patch's pixels,
normalised by that patch's own mean and variance per channel-flattened vector; the loss is the
mean squared error over the masked patches only.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_RATIO = 0.4  # BEiT / VLMo / BEiT-3
MIN_BLOCK = 16  # BEiT's min_num_patches
ASPECT = 0.3  # aspect ratios in [0.3, 1 / 0.3]
ATTEMPTS = 64


def num_masked_patches(num_patches: int, ratio: float = MASK_RATIO) -> int:
  """round(ratio * num_patches), at least 1."""
  return max(1, int(round(ratio * num_patches)))


def blockwise_patch_mask(key: jax.Array, grid: tuple[int, int], num_masked: int,
                         min_block: int = MIN_BLOCK, attempts: int = ATTEMPTS) -> jax.Array:
  """bool [gh * gw] (row-major): exactly `num_masked` patches, mostly in blocks (module doc)."""
  gh, gw = grid
  if not 0 < num_masked <= gh * gw:
    raise ValueError(f"num_masked={num_masked} must be in [1, {gh * gw}].")
  min_block = min(min_block, num_masked)
  rows, cols = jnp.arange(gh)[:, None], jnp.arange(gw)[None, :]
  log_lo, log_hi = math.log(ASPECT), math.log(1 / ASPECT)

  def attempt(i, mask):
    k = jax.random.fold_in(key, i)
    k_area, k_aspect, k_top, k_left = jax.random.split(k, 4)
    remaining = num_masked - jnp.sum(mask)
    area = jax.random.uniform(k_area, (), minval=min_block,
                              maxval=jnp.maximum(remaining, min_block) + 1e-6)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (), minval=log_lo, maxval=log_hi))
    h = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, gh).astype(jnp.int32)
    w = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, gw).astype(jnp.int32)
    top = jax.random.randint(k_top, (), 0, gh - h + 1)
    left = jax.random.randint(k_left, (), 0, gw - w + 1)
    block = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    new = jnp.sum(block & ~mask)
    accept = (new > 0) & (new <= remaining)
    return jnp.where(accept, mask | block, mask)

  mask = jax.lax.fori_loop(0, attempts, attempt, jnp.zeros((gh, gw), bool)).reshape(-1)
  # Top up to exactly num_masked with random unmasked patches (rarely more than a few).
  short = num_masked - jnp.sum(mask)
  noise = jax.random.uniform(jax.random.fold_in(key, attempts), mask.shape)
  order = jnp.argsort(jnp.where(mask, 2.0, noise))  # unmasked patches first, in random order
  rank = jnp.argsort(order)
  return mask | (rank < short)


def blockwise_patch_masks(key: jax.Array, batch_size: int, grid: tuple[int, int],
                          num_masked: int) -> jax.Array:
  """bool [batch_size, gh * gw]: a block-wise mask per example of the (global) batch, each from
  its own key."""
  return jax.vmap(lambda k: blockwise_patch_mask(k, grid, num_masked))(
      jax.random.split(key, batch_size))


def patch_pixel_targets(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, n, patch * patch * C] per-patch normalised pixels (row-major patches,
  the order of a strided-conv patchify)."""
  b, h, w, c = images.shape
  x = images.astype(jnp.float32).reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6)


def per_example_patch_terms(predictions: jax.Array, targets: jax.Array,
                            mask: jax.Array) -> dict[str, jax.Array]:
  """Each example's summed per-patch mean squared error over its masked patches ('loss') and
  their number ('count'), float32 [B]: sums that add up over any split of the batch."""
  err = jnp.mean(jnp.square(predictions.astype(jnp.float32) - targets), axis=-1)
  mask = mask.astype(jnp.float32)
  return {"loss": jnp.sum(err * mask, axis=1), "count": jnp.sum(mask, axis=1)}


def masked_patch_loss(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over masked patches of the per-patch mean squared error (float32 scalar)."""
  terms = per_example_patch_terms(predictions, targets, mask)
  return jnp.sum(terms["loss"]) / jnp.maximum(jnp.sum(terms["count"]), 1.0)
