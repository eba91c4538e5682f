"""VLMo (Bao et al., 2022): one Multiway transformer used as a dual encoder and a fusion encoder.

  image  -> Multiway 'image' mode -> [CLS] -> img_proj -> L2 -> zimg        (ITC)
  tokens -> Multiway 'text' mode  -> [CLS] -> txt_proj -> L2 -> ztxt        (ITC)
  [text ++ image] -> Multiway 'fused' mode -> text [CLS] -> pooler (Dense, tanh) -> itm_head [2]
                                           -> text positions -> mlm_head [vocab]

Parameter tree: mw/... (vljax.models.multiway.Multiway), img_proj, txt_proj (no bias, as
VLMo's ITC heads), logit_scale (log of the ITC scale, initialised to log(1/0.07)), pooler,
itm_head, mlm_transform / mlm_norm / mlm_decoder (BERT's prediction head: Dense + GELU + LN,
then the vocabulary projection; float32 logits; shared by the fused MLM and the text-only MLM
stage), mim_head (width -> patch * patch * 3 pixels, the image-only stage).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import layers
from vljax.models import multiway
from vljax.models import two_towers

Array = jax.Array
Dtype = Any


def head_dense(features: int, names: tuple[str | None, ...], name: str, dtype: Dtype,
               param_dtype: Dtype, use_bias: bool = True, init=None) -> nn.Dense:
  """A Dense head layer with logical names (kernel `names`, bias `names[1:]`), lecun-normal
  kernel unless `init` is given, zero bias."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=layers.partitioned(init or nn.initializers.lecun_normal(), names),
                  bias_init=layers.partitioned(nn.initializers.zeros, names[1:]))


def bert_mlm_head(width: int, vocab: int, dtype: Dtype,
                  param_dtype: Dtype) -> tuple[nn.Module, nn.Module, nn.Module]:
  """BERT's prediction head, built inside a parent's setup() (the parameters are the parent's
  mlm_transform, mlm_norm, mlm_decoder): Dense + GELU, LayerNorm, then the vocabulary
  projection with float32 logits (they feed a float32 log-softmax). Apply with apply_mlm_head."""
  return (head_dense(width, ("embed", None), "mlm_transform", dtype, param_dtype),
          layers.layer_norm(dtype, param_dtype, name="mlm_norm"),
          head_dense(vocab, ("embed", "vocab"), "mlm_decoder", jnp.float32, param_dtype,
                     init=nn.initializers.xavier_uniform()))


def apply_mlm_head(head: tuple[nn.Module, nn.Module, nn.Module], states: Array) -> Array:
  """[..., vocab] float32 logits of bert_mlm_head's layers on states [..., W]."""
  transform, norm, decoder = head
  return decoder(norm(nn.gelu(transform(states))))


class Vlmo(nn.Module):
  """VLMo's Multiway transformer and heads; the objective (vljax.objectives.vlmo) calls the
  methods.

  Attributes:
    transformer: multiway.Multiway keyword arguments (vocab_size, max_len, image_size,
      patch_size, width, depth, mlp_dim, num_heads, vl_depth, pad_id, ...).
    embed_dim: ITC projection width.
    temperature_init: initial ITC temperature (the scale is its inverse; VLMo: 0.07).
  """
  transformer: Mapping[str, Any]
  embed_dim: int
  temperature_init: float = 0.07
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    sizes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.mw = multiway.Multiway(**self.transformer, **sizes)
    width, vocab = self.transformer["width"], self.transformer["vocab_size"]
    dense = functools.partial(head_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    self.img_proj = dense(self.embed_dim, ("embed", None), "img_proj", use_bias=False)
    self.txt_proj = dense(self.embed_dim, ("embed", None), "txt_proj", use_bias=False)
    self.pooler = dense(width, ("embed", None), "pooler")
    self.itm_head = dense(2, (None, None), "itm_head")
    self.mlm_head = bert_mlm_head(width, vocab, self.dtype, self.param_dtype)
    patch = self.transformer["patch_size"]
    # Masked image modelling (the image-only stage): per-patch pixels, float32.
    self.mim_head = dense(patch * patch * 3, ("embed", None), "mim_head", dtype=jnp.float32)
    self.logit_scale = layers.scalar_param(self, "logit_scale",
                                           math.log(1.0 / self.temperature_init),
                                           self.param_dtype)

  def embed_image(self, images: Array) -> Array:
    """[B, 1 + n, W]: the image embeddings the fused mode takes (before any block)."""
    return self.mw.embed_image(images)

  def encode_image(self, images: Array, train: bool = False) -> Array:
    """zimg [B, D], unit norm: the image-only mode's [CLS]."""
    return two_towers.l2_normalize(self.img_proj(self.mw.image(images, train)[:, 0]))

  def encode_text(self, tokens: Array, train: bool = False) -> Array:
    """ztxt [B, D], unit norm: the text-only mode's [CLS]."""
    return two_towers.l2_normalize(self.txt_proj(self.mw.text(tokens, train)[0][:, 0]))

  def fused_states(self, image_embeds: Array, tokens: Array, train: bool = False) -> Array:
    return self.mw.fused(image_embeds, tokens, train)

  def itm_logits(self, image_embeds: Array, tokens: Array, train: bool = False) -> Array:
    """[B, 2] float32 from the fused text [CLS]; column 1 = 'the pair matches'."""
    states = self.fused_states(image_embeds, tokens, train)
    return self.itm_head(jnp.tanh(self.pooler(states[:, 0]))).astype(jnp.float32)

  def mlm_logits(self, image_embeds: Array, tokens: Array, train: bool = False) -> Array:
    """[B, L, vocab] float32 at the caption positions of the fused sequence."""
    states = self.fused_states(image_embeds, tokens, train)[:, 1:1 + tokens.shape[1]]
    return apply_mlm_head(self.mlm_head, states)

  def mim_predictions(self, images: Array, patch_mask: Array, train: bool = False) -> Array:
    """[B, n, patch * patch * 3] float32 pixel predictions for every patch, the image-only mode
    run with the patches of patch_mask [B, n] replaced by the mask token."""
    return self.mim_head(self.mw.image(images, train, patch_mask)[:, 1:])

  def text_mlm_logits(self, tokens: Array, train: bool = False) -> Array:
    """[B, L, vocab] float32 from the text-only mode (the text-only MLM stage)."""
    return apply_mlm_head(self.mlm_head, self.mw.text(tokens, train)[0][:, 1:])

  def scale(self) -> Array:
    return jnp.exp(self.logit_scale.astype(jnp.float32))

  def __call__(self, images: Array, tokens: Array, train: bool = False) -> dict[str, Array]:
    """Every part once (what init uses)."""
    embeds = self.embed_image(images)
    mask = jnp.zeros(embeds.shape[:1] + (embeds.shape[1] - 1,), bool)
    return {"zimg": self.encode_image(images, train), "ztxt": self.encode_text(tokens, train),
            "itm": self.itm_logits(embeds, tokens, train),
            "mlm": self.mlm_logits(embeds, tokens, train),
            "mim": self.mim_predictions(images, mask, train),
            "text_mlm": self.text_mlm_logits(tokens, train), "scale": self.scale()}
