"""Multiway transformer (VLMo, Bao et al. 2022; BEiT-3, Wang et al. 2023).

One stack of blocks serves three modes. Every block has ONE self-attention, shared by all
tokens, and a feed-forward "expert" per modality, each with its own pre-FFN LayerNorm:

  block(x) = x' + g2 * FFN_e(LN_e(x')),   x' = x + g1 * Attn(LN(x))
  e = 'v' (image tokens), 'l' (text tokens) or, in the top `vl_depth` blocks of the fused mode,
      'vl' (every token); g1, g2: per-channel layer scale (VLMo: 0.1 at init; None = off).

Modes (`route`):
  'image'  image tokens only, every block through its V expert (the image side of the dual
           encoder);
  'text'   text tokens only, every block through its L expert (the text side);
  'fused'  [text ++ image] in one sequence (VLMo's order: the text's [CLS] first); in the bottom
           depth - vl_depth blocks the first T positions go through L and the rest through V,
           in the top vl_depth blocks every position goes through VL.

Routing is by position, with static slices of the sequence (text first), so shapes never
depend on the data: no gathers, no padding of variable-sized groups. Each expert is a
layers.MlpBlock with the usual logical names ('embed', 'mlp'), so experts shard as any MLP.

Embeddings: image = patchify (strided conv) ++ a learned [CLS], + learned position embedding +
type embedding 1; text = a learned [CLS] ++ token embedding, + position + type embedding 0.
The token table has vocab_size + 1 rows: id `vocab_size` is the MLM [MASK].

Parameter tree (Multiway):
  patch, img_cls, img_pos, img_mask_token      embedding, txt_cls, txt_pos     type_embedding [2, W]
  block_{i}/{LayerNorm_0, MultiHeadAttention_0, ln_v, ffn_v, ln_l, ffn_l, [ln_vl, ffn_vl],
             gamma_1, gamma_2}     (ln_vl / ffn_vl only in the top vl_depth blocks)
  encoder_norm                      the final LayerNorm, shared by every mode
Scanned (scan=True): the bottom depth - vl_depth blocks are one nn.scan named `block` and the
top vl_depth blocks (with the VL expert) a second one named `vlblock`, each with a leading depth
axis on its parameters (vljax.models.stacks.SPLIT_STACKS converts between the layouts).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import layers
from vljax.models import stacks

Array = jax.Array
Dtype = Any

ROUTES = ("image", "text", "fused")
TEXT_TYPE, IMAGE_TYPE = 0, 1


class MultiwayBlock(nn.Module):
  """Pre-LN block with shared self-attention and per-modality FFN experts (module docstring)."""
  mlp_dim: int
  num_heads: int
  with_vl: bool = False
  layer_scale_init: float | None = 0.1
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _expert(self, name: str, x: Array, train: bool) -> Array:
    y = layers.layer_norm(self.dtype, self.param_dtype, name=f"ln_{name}")(x)
    y = layers.MlpBlock(self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"ffn_{name}")(y, train)
    return nn.Dropout(rate=self.dropout)(y, deterministic=not train)

  def _scale(self, name: str, width: int) -> Array | float:
    if self.layer_scale_init is None:
      return 1.0
    value = self.layer_scale_init
    gamma = self.param(name, layers.partitioned(
        lambda _, shape, dtype: jnp.full(shape, value, dtype), ("embed",)),
        (width,), self.param_dtype)
    return gamma.astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, route: str, num_text: int,
               train: bool = False) -> Array:
    """x [B, S, W] -> [B, S, W]. In the 'fused' route the first `num_text` positions are text."""
    width = x.shape[-1]
    x = layers.constrain(x, layers.ACT_SEQ)
    y = layers.layer_norm(self.dtype, self.param_dtype, name="LayerNorm_0")(x)
    y = layers.MultiHeadAttention(self.num_heads, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  name="MultiHeadAttention_0")(y, y, mask, train)
    y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
    x = layers.constrain(x + self._scale("gamma_1", width) * y, layers.ACT_SEQ)
    if route == "image":
      y = self._expert("v", x, train)
    elif route == "text":
      y = self._expert("l", x, train)
    elif route == "fused" and self.with_vl:
      y = self._expert("vl", x, train)
    elif route == "fused":
      y = jnp.concatenate([self._expert("l", x[:, :num_text], train),
                           self._expert("v", x[:, num_text:], train)], axis=1)
    else:
      raise ValueError(f"Unknown route {route!r}; expected one of {ROUTES}.")
    return layers.constrain(x + self._scale("gamma_2", width) * y, layers.ACT_SEQ)


def padding_mask(valid: Array) -> Array:
  """[B, 1, S, S]: every query attends to the real keys and to itself (no empty rows)."""
  n = valid.shape[1]
  return valid[:, None, None, :] | jnp.eye(n, dtype=bool)[None, None]


class Multiway(nn.Module):
  """The embeddings, `depth` Multiway blocks (the top `vl_depth` with a VL expert) and the final
  LayerNorm (module docstring)."""
  vocab_size: int
  max_len: int
  image_size: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  vl_depth: int
  pad_id: int = 0
  layer_scale_init: float | None = 0.1
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if not 0 <= self.vl_depth <= self.depth:
      raise ValueError(f"vl_depth={self.vl_depth} must be in [0, depth={self.depth}].")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size="
                       f"{self.patch_size}.")
    w, p = self.width, self.param_dtype
    normal = lambda std, names: layers.partitioned(nn.initializers.normal(stddev=std), names)
    self.patch = nn.Conv(w, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                         padding="VALID", dtype=self.dtype, param_dtype=p, name="patch",
                         kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                        (None, None, None, "embed")),
                         bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))
    num_patches = (self.image_size // self.patch_size) ** 2
    self.img_cls = self.param("img_cls", normal(0.02, (None, None, "embed")), (1, 1, w), p)
    # Replaces the embedding of a masked patch (masked image modelling, BEiT's [M]).
    self.img_mask_token = self.param("img_mask_token", normal(0.02, (None, None, "embed")),
                                     (1, 1, w), p)
    self.img_pos = self.param("img_pos", normal(0.02, (None, None, "embed")),
                              (1, 1 + num_patches, w), p)
    self.embedding = nn.Embed(self.vocab_size + 1, w, dtype=self.dtype, param_dtype=p,
                              name="embedding",
                              embedding_init=normal(0.02, ("vocab", "embed")))
    self.txt_cls = self.param("txt_cls", normal(0.02, (None, None, "embed")), (1, 1, w), p)
    self.txt_pos = self.param("txt_pos", normal(0.02, (None, None, "embed")),
                              (1, 1 + self.max_len, w), p)
    self.type_embedding = self.param("type_embedding", normal(0.02, (None, "embed")), (2, w), p)
    # Arguments (self, x, mask, route, num_text, train): the last three select Python control
    # flow or static slices, so they are static under remat (and broadcast under scan).
    block = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                 layer_scale_init=self.layer_scale_init, dropout=self.dropout, dtype=self.dtype,
                 param_dtype=p)
    bottom = self.depth - self.vl_depth
    if self.scan:
      block_cls = stacks.block_class(stacks.scan_step(MultiwayBlock), self.remat, True,
                                     (3, 4, 5))
      scanned = lambda n: stacks.scanned(block_cls, n, in_axes=(nn.broadcast,) * 4)
      # Two stacks: the top blocks' VL expert makes their parameters differ from the bottom's.
      self.blocks = [scanned(n)(with_vl=vl, name=name, **block)
                     for n, vl, name in ((bottom, False, "block"),
                                         (self.vl_depth, True, "vlblock")) if n]
    else:
      block_cls = stacks.block_class(MultiwayBlock, self.remat, False, (3, 4, 5))
      self.blocks = [block_cls(with_vl=i >= bottom, name=f"block_{i}", **block)
                     for i in range(self.depth)]
    self.encoder_norm = layers.layer_norm(self.dtype, p, name="encoder_norm")
    self.embed_dropout = nn.Dropout(rate=self.dropout)

  def embed_image(self, images: Array, patch_mask: Array | None = None) -> Array:
    """images [B, H, W, 3] -> [B, 1 + n, W] ([CLS] first), before any block; patches where
    patch_mask [B, n] is True are replaced by the learned mask token."""
    x = self.patch(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    if patch_mask is not None:
      x = jnp.where(patch_mask[..., None], self.img_mask_token.astype(self.dtype), x)
    x = jnp.concatenate([jnp.broadcast_to(self.img_cls.astype(self.dtype), (b, 1, self.width)),
                         x], axis=1)
    return x + (self.img_pos + self.type_embedding[IMAGE_TYPE]).astype(self.dtype)

  def embed_text(self, tokens: Array) -> tuple[Array, Array]:
    """tokens [B, L] -> ([B, 1 + L, W] ([CLS] first), valid [B, 1 + L])."""
    b, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"Text length {length} exceeds max_len={self.max_len}.")
    x = self.embedding(tokens)
    x = jnp.concatenate([jnp.broadcast_to(self.txt_cls.astype(self.dtype), (b, 1, self.width)),
                         x], axis=1)
    x = x + (self.txt_pos[:, :length + 1] + self.type_embedding[TEXT_TYPE]).astype(self.dtype)
    valid = jnp.concatenate([jnp.ones((b, 1), bool), tokens != self.pad_id], axis=1)
    return x, valid

  def encode(self, x: Array, valid: Array, route: str, num_text: int = 0,
             train: bool = False) -> Array:
    """Embedded tokens [B, S, W] with valid [B, S] through every block and the final LN."""
    x = self.embed_dropout(x, deterministic=not train)
    mask = padding_mask(valid)
    for block in self.blocks:
      x = block(x, mask, route, num_text, train)
      if self.scan:  # nn.scan's (carry, per-layer outputs)
        x = x[0]
    return self.encoder_norm(x)

  def image(self, images: Array, train: bool = False,
            patch_mask: Array | None = None) -> Array:
    """Image-only mode: [B, 1 + n, W] (patch_mask: embed_image's)."""
    x = self.embed_image(images, patch_mask)
    return self.encode(x, jnp.ones(x.shape[:2], bool), "image", 0, train)

  def text(self, tokens: Array, train: bool = False) -> tuple[Array, Array]:
    """Text-only mode: ([B, 1 + L, W], valid [B, 1 + L])."""
    x, valid = self.embed_text(tokens)
    return self.encode(x, valid, "text", 0, train), valid

  def fused(self, image_embeds: Array, tokens: Array, train: bool = False) -> Array:
    """Fused mode over [text ++ image]: image_embeds [B, 1 + n, W] (embed_image's output),
    tokens [B, L] -> [B, 1 + L + 1 + n, W] (the text's [CLS] first)."""
    text, valid = self.embed_text(tokens)
    x = jnp.concatenate([text, image_embeds.astype(self.dtype)], axis=1)
    valid = jnp.concatenate([valid, jnp.ones(image_embeds.shape[:2], bool)], axis=1)
    return self.encode(x, valid, "fused", text.shape[1], train)

  def __call__(self, images: Array, tokens: Array, train: bool = False) -> dict[str, Array]:
    """Every mode once (what init uses: together they create every expert)."""
    embeds = self.embed_image(images)
    mask = jnp.zeros(embeds.shape[:1] + (embeds.shape[1] - 1,), bool)
    return {"image": self.image(images, train, mask), "text": self.text(tokens, train)[0],
            "fused": self.fused(embeds, tokens, train)}
