"""ALBEF (Li et al., 2021): ViT image encoder, BERT-style text encoder, fusion encoder, heads.

  image -> ViT (pool_type 'tok') -> [CLS ++ patch tokens] -> img_proj(CLS) -> L2 -> zimg
  [CLS] ++ tokens -> text encoder (text_depth bidirectional layers) -> txt_proj(CLS) -> L2 -> ztxt
  text states + image tokens -> fusion encoder (fusion_depth layers: self-attention over the
      text, cross-attention to every image token, MLP) -> itm_head(fused CLS) [B, 2]
                                                       -> mlm_head(fused tokens) [B, L, vocab]

Choices of this implementation (ALBEF uses BERT's post-LN layers):
  * every layer is pre-LN (vljax.models.layers), with a final LayerNorm after each stack;
  * the text [CLS] is an extra learned token prepended at position 0 (it takes position
    embedding 0, the caption's tokens positions 1..L), not a tokenizer id;
  * the fusion layers are layers.DecoderBlock with cross-attention, run with a NON-causal
    padding mask (every text query attends to every real text key, and to itself);
  * the embedding table has vocab_size + 1 rows: id `vocab_size` is the MLM [MASK] token.

Parameter tree:
  img/...        VisionTransformer (pool_type 'tok')
  txt/...        text encoder: embedding, cls, pos_embedding, Encoder_0 (with encoder_norm)
  fusion/...     fusionblock_{i} (DecoderBlock with cross-attention; scanned: fusionblock),
                 fusion_norm
  img_proj, txt_proj   width -> embed_dim (ITC)
  itm_head       width -> 2;   mlm_head   width -> vocab_size (float32 logits)
  temp           the ITC temperature (not its log), initialised to 0.07
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import layers
from vljax.models import stacks
from vljax.models import two_towers
from vljax.models import vit

Array = jax.Array
Dtype = Any


def dense(features: int, names: tuple, name: str, dtype: Dtype, param_dtype: Dtype,
          init=None) -> nn.Dense:
  """A Dense layer whose kernel carries the logical `names` (bias: names[1:]); lecun-normal
  kernel (or `init`) and zero bias."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=layers.partitioned(init or nn.initializers.lecun_normal(), names),
      bias_init=layers.partitioned(nn.initializers.zeros, names[1:]))


class ClsViT(vit.VisionTransformer):
  """The fusion families' image encoder: a ViT whose output is every token, its [CLS] first.

  Built from VisionTransformer keyword arguments (two_towers.tower_kwargs) with pool_type
  'tok'; __call__ returns [B, 1 + n, Wi], what the fusion layers cross-attend to.
  """

  def __call__(self, images: Array, train: bool = False) -> Array:
    cls, patches = super().__call__(images, train)
    return jnp.concatenate([cls[:, None], patches], axis=1)


def cls_vit(image: Mapping[str, Any], dtype: Dtype, param_dtype: Dtype) -> ClsViT:
  """ClsViT from an image config (may hold 'variant'), called from a parent's setup."""
  return ClsViT(**dict(two_towers.tower_kwargs(image, dtype, param_dtype), pool_type="tok"))


def albef_encoders(image: Mapping[str, Any], text: Mapping[str, Any], dtype: Dtype,
                   param_dtype: Dtype) -> tuple[ClsViT, "AlbefTextEncoder", "FusionEncoder"]:
  """ALBEF's image encoder, text encoder and fusion layers, for a parent's setup to assign to
  `img`, `txt` and `fusion` (the names an ALBEF checkpoint has)."""
  t = dict(text)
  common = dict(dropout=t.get("dropout", 0.0), remat=t.get("remat", False),
                scan=t.get("scan", False), dtype=dtype, param_dtype=param_dtype)
  return (cls_vit(image, dtype, param_dtype),
          AlbefTextEncoder(t["vocab_size"], t["width"], t["text_depth"], t["mlp_dim"],
                           t["num_heads"], t["max_len"], pad_id=t.get("pad_id", 0), **common),
          FusionEncoder(t["fusion_depth"], t["mlp_dim"], t["num_heads"], **common))


class AlbefTextEncoder(nn.Module):
  """[CLS] ++ tokens -> `depth` bidirectional pre-LN layers -> final LN.

  Pad positions are masked out as keys (each query may attend to itself, so no row is empty).
  """
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_len: int
  pad_id: int = 0
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, train: bool = False) -> tuple[Array, Array]:
    """tokens [B, L] int -> (states [B, L+1, width] ([CLS] first), valid [B, L+1] bool)."""
    batch, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"Text length {length} exceeds max_len={self.max_len}.")
    x = nn.Embed(
        self.vocab_size + 1, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        name="embedding",
        embedding_init=layers.partitioned(nn.initializers.normal(stddev=0.02),
                                          ("vocab", "embed")))(tokens)
    cls = self.param(
        "cls", layers.partitioned(nn.initializers.normal(stddev=0.02), (None, None, "embed")),
        (1, 1, self.width), self.param_dtype)
    pos = self.param(
        "pos_embedding",
        layers.partitioned(nn.initializers.normal(stddev=0.01), (None, None, "embed")),
        (1, self.max_len + 1, self.width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.width)), x],
                        axis=1)
    x = layers.constrain(x + pos[:, :length + 1].astype(self.dtype), layers.ACT_SEQ)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
    valid = jnp.concatenate([jnp.ones((batch, 1), bool), tokens != self.pad_id], axis=1)
    x = layers.Encoder(self.depth, self.mlp_dim, self.num_heads, dropout=self.dropout,
                       remat=self.remat, scan=self.scan, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="Encoder_0")(
                           x, padding_mask(valid), train)
    return x, valid


def padding_mask(valid: Array) -> Array:
  """[B, 1, L, L] non-causal mask from valid [B, L]: real keys, and each query's own key."""
  n = valid.shape[1]
  return valid[:, None, None, :] | jnp.eye(n, dtype=bool)[None, None]


class FusionEncoder(nn.Module):
  """`depth` layers of (bidirectional self-attention, cross-attention to the image, MLP).

  Unrolled: parameters fusionblock_0 .. fusionblock_{depth-1}; scanned (scan=True): one
  `fusionblock` with a leading depth axis (vljax.models.stacks converts between the two).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, valid: Array, image: Array, train: bool = False) -> Array:
    """x [B, T, W] text states, valid [B, T], image [B, n, Wi] -> fused [B, T, W] (final LN)."""
    # Arguments (self, x, mask, context, cache, position, train): `train` is static.
    block_cls = stacks.block_class(layers.DecoderBlock, self.remat, self.scan, (6,))
    mask = padding_mask(valid)
    block = dict(cross_attention=True, dropout=self.dropout, dtype=self.dtype,
                 param_dtype=self.param_dtype)
    if self.scan:
      b = nn.broadcast  # mask, image tokens, no cache, no position, train: the same per layer
      x, _ = stacks.scanned(block_cls, self.depth, in_axes=(b, b, b, b, b))(
          self.mlp_dim, self.num_heads, name="fusionblock", **block)(
              x, mask, image, None, None, train)
    else:
      for i in range(self.depth):
        x, _ = block_cls(self.mlp_dim, self.num_heads, name=f"fusionblock_{i}", **block)(
            x, mask, image, None, None, train)
    return layers.layer_norm(self.dtype, self.param_dtype, name="fusion_norm")(x)


class Albef(nn.Module):
  """ALBEF's encoders and heads; the objective (vljax.objectives.albef) calls the methods.

  Attributes:
    image: VisionTransformer kwargs (may hold 'variant'); pool_type is forced to 'tok'.
    text: width, mlp_dim, num_heads, text_depth, fusion_depth, vocab_size, max_len, pad_id
      (and optionally dropout, remat, scan: for the text encoder and the fusion layers).
    embed_dim: ITC projection width.
    temperature_init: initial ITC temperature (ALBEF: 0.07).
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  embed_dim: int
  temperature_init: float = 0.07
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.img, self.txt, self.fusion = albef_encoders(self.image, self.text, self.dtype,
                                                     self.param_dtype)
    t = dict(self.text)
    sizes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.img_proj = dense(self.embed_dim, ("embed", None), "img_proj", **sizes)
    self.txt_proj = dense(self.embed_dim, ("embed", None), "txt_proj", **sizes)
    self.itm_head = dense(2, ("embed", None), "itm_head", **sizes)
    # float32 logits: they feed a float32 log-softmax over the vocabulary.
    self.mlm_head = dense(t["vocab_size"], ("embed", "vocab"), "mlm_head", jnp.float32,
                          self.param_dtype, nn.initializers.xavier_uniform())
    self.temp = layers.scalar_param(self, "temp", self.temperature_init, self.param_dtype)

  def encode_image(self, images: Array, train: bool = False) -> tuple[Array, Array]:
    """images [B, H, W, 3] -> (tokens [B, 1 + n, Wi] ([CLS] first), zimg [B, D] unit-norm)."""
    tokens = self.img(images, train)
    return tokens, two_towers.l2_normalize(self.img_proj(tokens[:, 0]))

  def encode_text(self, tokens: Array, train: bool = False) -> tuple[Array, Array, Array]:
    """tokens [B, L] -> (states [B, L+1, W], valid [B, L+1], ztxt [B, D] unit-norm)."""
    states, valid = self.txt(tokens, train)
    return states, valid, two_towers.l2_normalize(self.txt_proj(states[:, 0]))

  def fuse(self, states: Array, valid: Array, image_tokens: Array,
           train: bool = False) -> Array:
    """Text states [B, L+1, W] + image tokens [B, n, Wi] -> fused states [B, L+1, W]."""
    return self.fusion(states, valid, image_tokens, train)

  def itm_logits(self, fused: Array) -> Array:
    """[B, 2] float32 from the fused [CLS]; column 1 = 'the pair matches'."""
    return self.itm_head(fused[:, 0]).astype(jnp.float32)

  def mlm_logits(self, fused: Array) -> Array:
    """[B, L, vocab] float32 at the caption positions (the [CLS] dropped)."""
    return self.mlm_head(fused[:, 1:]).astype(jnp.float32)

  def temperature(self) -> Array:
    return self.temp.astype(jnp.float32)

  def __call__(self, images: Array, tokens: Array, train: bool = False) -> dict[str, Array]:
    """Every part once (what init uses): zimg, ztxt, itm [B, 2], mlm [B, L, V], temp."""
    image_tokens, zimg = self.encode_image(images, train)
    states, valid, ztxt = self.encode_text(tokens, train)
    fused = self.fuse(states, valid, image_tokens, train)
    return {"zimg": zimg, "ztxt": ztxt, "itm": self.itm_logits(fused),
            "mlm": self.mlm_logits(fused), "temp": self.temperature()}
