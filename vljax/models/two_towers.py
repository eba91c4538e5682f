"""Dual encoder (CLIP / ALIGN / SigLIP / LiT): image and text towers with projection heads.

Parameter tree:
  img/encoder/...   VisionTransformer      img/head/{kernel, bias}   width -> embed_dim
  txt/encoder/...   TextTransformer        txt/head/{kernel, bias}
  (a tower with head 'none' has no head: its pooled output is its embedding, as the image
  tower of big_vision's and Hugging Face's SigLIP)
  t                 log of the logit scale (scalar)
  b                 logit bias (scalar; only when bias_init is not None)
so regexes such as '^img/' select the whole image tower (LiT locking).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import layers
from vljax.models import text as text_lib
from vljax.models import vit

Array = jax.Array
Dtype = Any


def tower_kwargs(config: Mapping[str, Any] | None, dtype: Dtype,
                 param_dtype: Dtype) -> dict[str, Any]:
  """Expands an optional 'variant' (e.g. 'B/16') and fills in dtypes; explicit keys win."""
  config = dict(config or {})
  variant = config.pop("variant", None)
  kwargs = vit.decode_variant(variant) if variant else {}
  kwargs.update(config)
  kwargs.setdefault("dtype", dtype)
  kwargs.setdefault("param_dtype", param_dtype)
  return kwargs


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / ||x|| along the last axis, in float32; an all-zero row stays zero instead of NaN."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def _head(embed_dim: int, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True) -> nn.Dense:
  # Lecun-normal, not zeros: two zero heads would give identical (zero) embeddings and no signal.
  return nn.Dense(
      embed_dim, dtype=dtype, param_dtype=param_dtype, name="head", use_bias=use_bias,
      kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", None)),
      bias_init=layers.partitioned(nn.initializers.zeros, (None,)))


# A tower's projection to the shared space: 'dense' (Dense with bias, named 'head'), 'linear'
# (without bias: CLIP's proj / text_projection) or 'none' (the pooled encoder output is the
# embedding; its width must be embed_dim).
HEAD_TYPES = ("dense", "linear", "none")


class Tower(nn.Module):
  """An encoder ('encoder': ViT or text transformer) + linear projection ('head') to embed_dim."""
  encoder_cls: type
  config: Mapping[str, Any]
  embed_dim: int
  head: str = "dense"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, train: bool = False) -> tuple[Array, Array, Array]:
    """Returns (projected [B, embed_dim], pooled [B, width], sequence [B, n, width])."""
    kwargs = tower_kwargs(self.config, self.dtype, self.param_dtype)
    kind = self.encoder_cls.__name__
    if self.encoder_cls is text_lib.TextTransformer and "patch_size" in kwargs:
      raise ValueError(f"Text tower config has a patch size ({kwargs['patch_size']}); use a "
                       "bare variant name such as 'B'.")
    if kwargs.get("pool_type") == "none":
      raise ValueError(f"TwoTowers needs a pooled embedding: pool_type 'none' is invalid for "
                       f"the {kind}.")
    if self.head not in HEAD_TYPES:
      raise ValueError(f"Unknown head {self.head!r} for the {kind}; valid: {HEAD_TYPES}.")
    pooled, sequence = self.encoder_cls(**kwargs, name="encoder")(inputs, train)
    if self.head == "none":
      if pooled.shape[-1] != self.embed_dim:
        raise ValueError(f"The {kind} has no head, so its width ({pooled.shape[-1]}) must be "
                         f"embed_dim ({self.embed_dim}).")
      return pooled, pooled, sequence
    head = _head(self.embed_dim, self.dtype, self.param_dtype, self.head == "dense")
    return head(pooled), pooled, sequence


class TwoTowers(nn.Module):
  """Image and text encoders projected to a shared, L2-normalised embedding space.

  Attributes:
    image: kwargs of VisionTransformer; may hold 'variant' (e.g. 'B/16'), merged under the
      explicit keys.
    text: kwargs of TextTransformer; may hold a bare 'variant' (e.g. 'B').
    embed_dim: width of the shared embedding space.
    temperature_init: initial logit scale (1/0.07 for CLIP, 10 for SigLIP); the parameter 't'
      holds its log.
    bias_init: initial logit bias (-10 for SigLIP); None creates no 'b' parameter.
    image_head, text_head: each tower's projection, 'dense' (default), 'linear' or 'none' (see
      HEAD_TYPES; SigLIP's image tower has none, CLIP's heads have no bias).
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  embed_dim: int
  temperature_init: float = 10.0
  bias_init: float | None = None
  image_head: str = "dense"
  text_head: str = "dense"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array | None = None, tokens: Array | None = None,
               train: bool = False) -> tuple[Array | None, Array | None, dict[str, Any]]:
    """Embeds images [B, H, W, C] and/or tokens [B, L]; either may be None.

    Returns:
      (zimg [B, embed_dim] float32 unit-norm or None, ztxt likewise, out) where out holds
      'scale' = exp(t), 'bias' = b (key absent without a bias), and per tower
      'img/pre_logits' (pooled encoder output), 'img/unnormed' (projection before L2), and the
      same under 'txt/...'.
    """
    out: dict[str, Any] = {}
    zimg = ztxt = None
    if images is not None:
      proj, pooled, _ = Tower(vit.VisionTransformer, self.image, self.embed_dim,
                              head=self.image_head, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              name="img")(images, train)
      out["img/pre_logits"] = pooled
      out["img/unnormed"] = proj
      zimg = l2_normalize(proj)
    if tokens is not None:
      proj, pooled, _ = Tower(text_lib.TextTransformer, self.text, self.embed_dim,
                              head=self.text_head, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              name="txt")(tokens, train)
      out["txt/pre_logits"] = pooled
      out["txt/unnormed"] = proj
      ztxt = l2_normalize(proj)

    t = layers.scalar_param(self, "t", math.log(self.temperature_init), self.param_dtype)
    out["scale"] = jnp.exp(t.astype(jnp.float32))
    if self.bias_init is not None:
      b = layers.scalar_param(self, "b", float(self.bias_init), self.param_dtype)
      out["bias"] = b.astype(jnp.float32)
    return zimg, ztxt, out
