"""Vision Transformer (ViT) image encoder, as used by the dual-encoder families."""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import layers
from vljax.models import naflex

Array = jax.Array
Dtype = Any

# name -> (width, depth, mlp_dim, num_heads)
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}

POOL_TYPES = ("map", "tok", "gap", "none")
POSEMB_TYPES = ("learn", "sincos2d")


def decode_variant(variant: str) -> dict[str, Any]:
  """Parses "B/16" into width/depth/mlp_dim/num_heads and patch_size=(16, 16).

  A bare name ("B") gives no patch_size key.

  Raises:
    ValueError: unknown name or malformed patch size.
  """
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"Unknown model variant {variant!r}: valid names are "
                     f"{list(VARIANTS)}, optionally followed by /PATCH (e.g. 'B/16').")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  out: dict[str, Any] = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    if not patch.isdigit() or int(patch) <= 0:
      raise ValueError(f"Bad patch size in variant {variant!r}: expected e.g. 'B/16'.")
    out["patch_size"] = (int(patch), int(patch))
  return out


class VisionTransformer(nn.Module):
  """ViT: strided-conv patchify, position embedding, pre-LN encoder, final LN, pooling.

  Attributes:
    width, depth, mlp_dim, num_heads: transformer size (see VARIANTS).
    patch_size: (ph, pw) patch size in pixels.
    posemb: 'learn' (learned, normal(1/sqrt(width))) or 'sincos2d' (fixed).
    pool_type: 'map' (attention pooling), 'tok' (class token), 'gap' (mean), 'none'.
    dropout: dropout rate inside the blocks (train only).
    remat: remat policy of each block (vljax.models.stacks.REMAT_NAMES; True = 'full').
    scan: run the blocks as one nn.scan (parameters stacked on a leading 'layers' axis).
    patch_bias: the patch embedding has a bias (big_vision, SigLIP); CLIP's has none.
    pre_norm: a LayerNorm ('pre_norm') on the tokens before the blocks (CLIP's ln_pre).
    norm_eps, activation: the LayerNorms' epsilon and the MLPs' activation
      (vljax.models.layers.ACTIVATIONS); CLIP: 1e-5 and 'gelu' or 'quick_gelu'.
    posemb_grid: (rows, columns) the learned position table is stored at, resized to each
      image's patch grid (antialiased bilinear: SigLIP 2's NaFlex,
      vljax.models.naflex.resize_posemb); None (default): the table has the input's grid.
      Needed for NaFlex batches.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: tuple[int, int] = (16, 16)
  posemb: str = "learn"
  pool_type: str = "map"
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  patch_bias: bool = True
  pre_norm: bool = False
  norm_eps: float = 1e-6
  activation: str = "gelu_tanh"
  posemb_grid: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, images: Array | Mapping[str, Array], train: bool = False
               ) -> tuple[Array | None, Array]:
    """Encodes images [B, H, W, C], or a NaFlex batch (vljax.models.naflex: padded patches of
    images of any sizes, with their grids and a mask; needs posemb_grid).

    Returns:
      (pooled [B, width] or None for pool_type 'none', tokens [B, n, width]) where tokens are
      the patch tokens after the final LayerNorm (the class token excluded; a NaFlex batch's
      padding rows included, their values meaningless).
    """
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown pool_type {self.pool_type!r}; valid: {POOL_TYPES}.")
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f"Unknown posemb {self.posemb!r}; valid: {POSEMB_TYPES}.")
    grid = self.posemb_grid
    if grid is not None and (len(grid) != 2 or not all(isinstance(g, int) and g > 0
                                                       for g in grid)):
      raise ValueError(f"posemb_grid={grid!r}: expected (rows, columns), two positive ints.")
    ph, pw = self.patch_size
    is_naflex = isinstance(images, Mapping)
    if is_naflex:
      if self.posemb_grid is None or self.posemb != "learn":
        raise ValueError("A NaFlex batch needs a learned position table stored at one grid "
                         "(posemb='learn' and posemb_grid set).")
      b, n, _ = images["patches"].shape
      # Each patch through the same strided conv as a whole image: one kernel for both inputs.
      pixels = jnp.reshape(images["patches"], (b * n, ph, pw, -1))
      mask = images["mask"].astype(bool)
    else:
      _, h, w, _ = images.shape
      if h % ph or w % pw:
        raise ValueError(f"Image size {h}x{w} is not a multiple of the patch size {ph}x{pw}.")
      pixels, mask = images, None

    x = nn.Conv(
        self.width, (ph, pw), strides=(ph, pw), padding="VALID", dtype=self.dtype,
        param_dtype=self.param_dtype, name="embedding", use_bias=self.patch_bias,
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                       (None, None, None, "embed")),
        bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))(
            pixels.astype(self.dtype))
    if is_naflex:
      c = x.shape[-1]
      x = jnp.reshape(x, (b, n, c))
    else:
      b, gh, gw, c = x.shape
      x = jnp.reshape(x, (b, gh * gw, c))

    if self.posemb == "learn":
      table_grid = self.posemb_grid or (gh, gw)
      pos = self.param(
          "pos_embedding",
          layers.partitioned(nn.initializers.normal(stddev=1 / self.width ** 0.5),
                             (None, None, "embed")),
          (1, table_grid[0] * table_grid[1], c), self.param_dtype)
      if is_naflex:
        pos = naflex.resize_posemb(pos[0], table_grid, images["spatial_shapes"], n)
      elif tuple(table_grid) != (gh, gw):  # one grid for the whole batch: resized once
        pos = naflex.resize_posemb(pos[0], table_grid, jnp.array([[gh, gw]]), gh * gw)
    else:
      pos = layers.posemb_sincos_2d(gh, gw, c, dtype=self.dtype)
    x = x + pos.astype(self.dtype)

    if self.pool_type == "tok":
      cls = self.param("cls",
                       layers.partitioned(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (b, 1, 1)), x], axis=1)
      if mask is not None:
        mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
    if self.pre_norm:
      x = layers.layer_norm(self.dtype, self.param_dtype, name="pre_norm",
                            epsilon=self.norm_eps)(x)
    x = layers.constrain(x, layers.ACT_SEQ)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)

    x = layers.Encoder(
        self.depth, self.mlp_dim, self.num_heads, dropout=self.dropout, remat=self.remat,
        scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype, norm_eps=self.norm_eps,
        activation=self.activation, name="Transformer")(
            x, None if mask is None else mask[:, None, None, :], train)

    if self.pool_type == "tok":
      pooled, tokens = x[:, 0], x[:, 1:]
    elif self.pool_type == "map":
      tokens = x
      pooled = layers.MAPHead(self.num_heads, self.mlp_dim, dtype=self.dtype,
                              param_dtype=self.param_dtype, norm_eps=self.norm_eps,
                              activation=self.activation, name="MAPHead_0")(x, mask)
    elif self.pool_type == "gap":
      tokens = x
      if mask is None:
        pooled = jnp.mean(x, axis=1)
      else:  # the mean over each image's own patches
        weights = mask[..., None].astype(x.dtype)
        pooled = jnp.sum(x * weights, axis=1) / jnp.sum(weights, axis=1)
    else:
      tokens, pooled = x, None
    return pooled, tokens
