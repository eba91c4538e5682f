"""BEiT-3 (Wang et al., 2023): a Multiway transformer with masked-data-modelling heads and the
frozen visual tokenizer whose codes are its image targets.

  image (patches masked) -> Multiway 'image' mode -> patch positions -> mim_head [K]
  tokens (masked)        -> Multiway 'text' mode  -> token positions -> MLM head [vocab]
  [tokens (masked) ++ image (patches masked)] -> Multiway 'fused' mode
                         -> token positions -> MLM head [vocab], patch positions -> mim_head [K]
  image (unmasked) -> tokenizer (VQ-KD encoder + codebook, frozen) -> codes [B, n] in [0, K)

Without a tokenizer (tokenizer=None) the MIM head regresses each masked patch's normalised
pixels instead (width -> patch * patch * 3; the fallback targets, as VLMo's image stage).

One MLM head and one MIM head serve every mode (BEiT-3 shares its output heads between the
monomodal and the paired data). Both give float32 logits (they feed a float32 log-softmax).

Parameter tree: mw/... (vljax.models.multiway.Multiway), mlm_transform / mlm_norm /
mlm_decoder (BERT's prediction head, as VLMo's: vljax.models.vlmo.bert_mlm_head), mim_head
(width -> K), tokenizer/{encoder, encode_task, codebook} (vljax.models.vqkd.VqKd without its
decoder and teacher: a VQ-KD run's parameters under the same names, loaded and frozen by
configs/beit3.py).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import multiway
from vljax.models import vlmo
from vljax.models import vqkd

Array = jax.Array
Dtype = Any


class Beit3(nn.Module):
  """BEiT-3's Multiway transformer, heads and visual tokenizer; the objective
  (vljax.objectives.beit3) calls the methods.

  Attributes:
    transformer: multiway.Multiway keyword arguments (vocab_size, max_len, image_size,
      patch_size, width, depth, mlp_dim, num_heads, vl_depth, pad_id, ...).
    tokenizer: the VQ-KD run's sizes: encoder (VisionTransformer kwargs), num_codes (K),
      code_dim; None: no tokenizer, the MIM head predicts normalised pixels.
  """
  transformer: Mapping[str, Any]
  tokenizer: Mapping[str, Any] | None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.mw = multiway.Multiway(**self.transformer, dtype=self.dtype,
                                param_dtype=self.param_dtype)
    width, vocab = self.transformer["width"], self.transformer["vocab_size"]
    self.mlm_head = vlmo.bert_mlm_head(width, vocab, self.dtype, self.param_dtype)
    patch = self.transformer["patch_size"]
    outputs = (self.tokenizer["num_codes"] if self.tokenizer is not None
               else patch * patch * 3)
    self.mim_head = vlmo.head_dense(outputs, ("embed", None), "mim_head", jnp.float32,
                                    self.param_dtype)
    if self.tokenizer is not None:
      # The tokenizer runs in float32 whatever the model's dtype: its codes are argmaxes of dot
      # products, and a lower precision would change the targets.
      # Its ViT takes the Multiway stack's layout (config.layers.scan): a model has one layout,
      # which is what converts a run's parameters between the two as a whole.
      encoder = dict(self.tokenizer["encoder"], scan=self.transformer.get("scan", False))
      self.visual_tokenizer = vqkd.VqKd(encoder=encoder,
                                        num_codes=self.tokenizer["num_codes"],
                                        code_dim=self.tokenizer["code_dim"], name="tokenizer")

  def visual_tokens(self, images: Array) -> Array:
    """codes [B, n] int32 of the unmasked images: the MIM targets. No gradient reaches the
    tokenizer (its parameters are frozen as well, so no backward pass runs through it)."""
    return jax.lax.stop_gradient(self.visual_tokenizer.tokenize(jax.lax.stop_gradient(images)))

  def image_mim_logits(self, images: Array, patch_mask: Array, train: bool = False) -> Array:
    """[B, n, K] float32 (or [B, n, patch * patch * 3] pixel predictions without a tokenizer):
    image-only mode with the patches of patch_mask [B, n] replaced by the mask token."""
    return self.mim_head(self.mw.image(images, train, patch_mask)[:, 1:])

  def text_mlm_logits(self, tokens: Array, train: bool = False) -> Array:
    """[B, L, vocab] float32: text-only mode."""
    return vlmo.apply_mlm_head(self.mlm_head, self.mw.text(tokens, train)[0][:, 1:])

  def pair_logits(self, images: Array, patch_mask: Array, tokens: Array,
                  train: bool = False) -> tuple[Array, Array]:
    """([B, L, vocab], [B, n, K]) float32: fused mode over [tokens ++ masked image]."""
    embeds = self.mw.embed_image(images, patch_mask)
    states = self.mw.fused(embeds, tokens, train)
    length = tokens.shape[1]
    mlm = vlmo.apply_mlm_head(self.mlm_head, states[:, 1:1 + length])
    mim = self.mim_head(states[:, 1 + length + 1:])  # after the text and the image [CLS]
    return mlm, mim

  def __call__(self, images: Array, tokens: Array, train: bool = False) -> dict[str, Array]:
    """Every part once (what init uses)."""
    grid = self.transformer["image_size"] // self.transformer["patch_size"]
    mask = jnp.zeros((images.shape[0], grid * grid), bool)
    pair_mlm, pair_mim = self.pair_logits(images, mask, tokens, train)
    out = {"image_mim": self.image_mim_logits(images, mask, train),
           "text_mlm": self.text_mlm_logits(tokens, train), "pair_mlm": pair_mlm,
           "pair_mim": pair_mim}
    if self.tokenizer is not None:
      out["codes"] = self.visual_tokens(images)
    return out
