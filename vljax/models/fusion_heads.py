"""Fine-tuning heads on ALBEF's encoders or VLMo's Multiway transformer: visual entailment
(SNLI-VE) and NLVR2.

  image -> ViT -> image tokens ┐
  text  -> text encoder ───────┴-> fusion encoder -> fused [CLS] ─────────> cls_head -> [B, C]
  NLVR2: the text is fused once with each image (the same fusion encoder); the two fused [CLS]
         states, left then right, are concatenated [B, 2W] before cls_head.

cls_head is ALBEF's fine-tuning MLP, Linear(W) -> ReLU -> Linear(num_classes) (for a pair its
input is 2W wide). The encoders are built exactly as vljax.models.fusion.Albef builds them and
under the same names, so an ALBEF checkpoint's img/, txt/ and fusion/ subtrees load as they are
(config.init.mapping); the ITC projections, ITM/MLM heads and temperature are not part of this
model.

Parameter tree:
  img/...      fusion.ClsViT (a VisionTransformer pooled at its [CLS]), as Albef's
  txt/...      AlbefTextEncoder, as Albef's
  fusion/...   FusionEncoder, as Albef's
  cls_head/    hidden (W -> W, or 2W -> W), out (W -> num_classes); trained from scratch

MultiwayClassifier is the same head on VLMo (vljax.models.vlmo): [text ++ image] through the
Multiway transformer's fused mode, the text [CLS] through VLMo's pooler (Dense, tanh; the ITM
head's input), then cls_head; its tree is mw/, pooler/ (named as Vlmo's, so a VLMo run loads
into them) and cls_head/. Its `head` picks cls_head's style: 'albef' (above) or 'vlmo' (VLMo's
and BEiT-3's task head, Linear(W -> 2W) -> LayerNorm -> GELU -> Linear(num_classes), the VQA
classifier's; cls_head/ hidden, norm, out).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import fusion
from vljax.models import layers
from vljax.models import multiway

Array = jax.Array
Dtype = Any


class ClassifierHead(nn.Module):
  """Linear(hidden) -> activation -> Linear(num_classes); float32 logits.

  style 'albef': ReLU (ALBEF's fine-tuning MLP); 'vlmo': LayerNorm then GELU (VLMo's
  vqa_classifier and BEiT-3's VQA head, with PyTorch's defaults there: epsilon 1e-5, the exact
  erf GELU; its LayerNorm is cls_head/norm).
  """
  hidden: int
  num_classes: int
  style: str = "albef"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = fusion.dense(self.hidden, ("embed", "mlp"), "hidden", self.dtype, self.param_dtype)(x)
    if self.style == "vlmo":
      x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="norm", scale_init=layers.partitioned(nn.initializers.ones, ("mlp",)),
                       bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)))(x)
      x = nn.gelu(x, approximate=False)
    else:
      x = nn.relu(x)
    return fusion.dense(self.num_classes, ("mlp", None), "out", jnp.float32,
                        self.param_dtype)(x)


# ClassifierHead.style -> its hidden width as a multiple of the encoder's (VLMo: 2W).
HEAD_WIDTHS = {"albef": 1, "vlmo": 2}


class PairClassifier(nn.Module):
  """The classification over fused_cls, shared by the two encoders below (each has the
  attributes `pair` and `cls_head`)."""

  def fused_cls(self, tokens: Array, images: Array, images2: Array | None = None,
                train: bool = False) -> Array:
    raise NotImplementedError

  def __call__(self, images: Array, tokens: Array, images2: Array | None = None,
               train: bool = False) -> Array:
    """[B, num_classes] float32 logits; `images2` is required when `pair`."""
    if self.pair != (images2 is not None):
      raise ValueError(f"{type(self).__name__}(pair={self.pair}) got "
                       f"{'a' if images2 is not None else 'no'} second image batch.")
    return self.cls_head(self.fused_cls(tokens, images, images2, train))


class FusionClassifier(PairClassifier):
  """ALBEF's encoders + a classification head over the fused [CLS] (of one or two images).

  Attributes:
    image, text: as fusion.Albef's (text: width, mlp_dim, num_heads, text_depth,
      fusion_depth, vocab_size, max_len, pad_id, optionally dropout / remat / scan).
    num_classes: 3 (SNLI-VE) or 2 (NLVR2).
    pair: two images per example (NLVR2): cls_head reads [left CLS ++ right CLS].
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  num_classes: int
  pair: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.img, self.txt, self.fusion = fusion.albef_encoders(self.image, self.text, self.dtype,
                                                            self.param_dtype)
    self.cls_head = ClassifierHead(self.text["width"], self.num_classes, dtype=self.dtype,
                                   param_dtype=self.param_dtype)

  def fused_cls(self, tokens: Array, images: Array, images2: Array | None = None,
                train: bool = False) -> Array:
    """The fused [CLS] [B, W], or for a pair [B, 2W] (left, right)."""
    states, valid = self.txt(tokens, train)
    if images2 is None:
      return self.fusion(states, valid, self.img(images, train), train)[:, 0]
    # One pass over both images and one through the fusion encoder: the text states are
    # repeated for the right images, then the two [CLS] states go side by side.
    batch = images.shape[0]
    both = self.img(jnp.concatenate([images, images2], axis=0), train)
    fused = self.fusion(jnp.concatenate([states, states], axis=0),
                        jnp.concatenate([valid, valid], axis=0), both, train)[:, 0]
    return jnp.concatenate([fused[:batch], fused[batch:]], axis=-1)


class MultiwayClassifier(PairClassifier):
  """VLMo's Multiway transformer (fused mode) and pooler + a classification head over the
  pooled text [CLS] (of one or two images).

  Attributes:
    transformer: multiway.Multiway keyword arguments, as vljax.models.vlmo.Vlmo's.
    num_classes: 3 (SNLI-VE), 2 (NLVR2) or the answer vocabulary's size (VQA).
    pair: two images per example (NLVR2): cls_head reads [left ++ right] pooled states.
    head: cls_head's style, 'albef' (ReLU, hidden W) or 'vlmo' (LayerNorm + GELU, hidden 2W).
  """
  transformer: Mapping[str, Any]
  num_classes: int
  pair: bool = False
  head: str = "albef"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.mw = multiway.Multiway(**self.transformer, dtype=self.dtype,
                                param_dtype=self.param_dtype)
    width = self.transformer["width"]
    # Vlmo's pooler, under its name (a VLMo run's pooler/ loads into it).
    self.pooler = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                          ("embed", None)),
                           bias_init=layers.partitioned(nn.initializers.zeros, (None,)))
    if self.head not in HEAD_WIDTHS:
      raise ValueError(f"MultiwayClassifier(head={self.head!r}); choose one of "
                       f"{', '.join(HEAD_WIDTHS)}.")
    self.cls_head = ClassifierHead(HEAD_WIDTHS[self.head] * width, self.num_classes,
                                   style=self.head, dtype=self.dtype,
                                   param_dtype=self.param_dtype)

  def fused_cls(self, tokens: Array, images: Array, images2: Array | None = None,
                train: bool = False) -> Array:
    """The pooled fused text [CLS] [B, W], or for a pair [B, 2W] (left, right)."""
    if images2 is None:
      states = self.mw.fused(self.mw.embed_image(images), tokens, train)
      return jnp.tanh(self.pooler(states[:, 0]))
    # One pass over both images: the statement is fused with the left, then the right images.
    batch = images.shape[0]
    both = self.fused_cls(jnp.concatenate([tokens, tokens], axis=0),
                          jnp.concatenate([images, images2], axis=0), None, train)
    return jnp.concatenate([both[:batch], both[batch:]], axis=-1)
