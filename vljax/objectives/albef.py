"""ALBEF objective (Li et al., 2021): ITC with momentum distillation + ITM + MLM, one step.

  loss = itc + itm + mlm   (ALBEF's equal weights)

  itc  losses.fusion.itc_mod_loss: online [CLS] features against the momentum model's features
       of the batch ++ the feature queues; soft targets weighted by alpha, which ramps linearly
       from 0 to config.loss.alpha over the first config.loss.alpha_ramp_steps steps (ALBEF:
       over the first epoch; 0 = constant alpha).
  itm  one hard negative text per image and one hard negative image per text
       (losses.fusion.sample_hard_negatives, online queries against momentum keys, as ALBEF's
       sim[:, :bs]), the 3N pairs of itm_layout through the fusion encoder, itm_loss.
  mlm  losses.fusion.mask_tokens (mask id = vocab_size, the extra embedding row; pad and EOS
       never chosen), the masked caption through the text and fusion encoders with its own
       image, mlm_loss distilled from the momentum model's predictions on the same masked
       input and its own image tokens (weight alpha; config.loss.mlm_distill=False: hard
       targets only).

Batch: base.Objective's fields (image + brightness, 'text' [max_len] int32, and 'label', which
the loss does not use).

Non-gradient state (TrainState.extra, vljax.objectives.momentum_queues): the momentum model
(an EMA copy of all the params), the image/text feature queues, the queue pointer and the step
count.

For retrieval, encode_image_tokens and itm_scores let the evaluator re-rank ITC candidates
with the ITM head (vljax.evals.rerank).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vljax.losses import fusion as fusion_losses
from vljax.models import fusion
from vljax.objectives import momentum_queues


class AlbefObjective(momentum_queues.MomentumQueueObjective):
  """ALBEF pre-training: ITC-MoD with queues, ITM with hard negatives, MLM."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    super().__init__(config, tokenizer)
    self.model = fusion.Albef(**momentum_queues.model_kwargs(config, tokenizer))
    self.mlm_distill = bool(config.loss.get("mlm_distill", True))
    self.vocab_size = tokenizer.vocab_size
    self.special_ids = (tokenizer.pad_id, tokenizer.eos_id)
    self.mask_id = tokenizer.vocab_size  # the extra embedding row

  def momentum_features(self, momentum: Any, batch: dict[str, jax.Array]
                        ) -> dict[str, jax.Array]:
    """The momentum model's image tokens [B, 1+n, Wi] and unit-norm [CLS] features [B, D] of
    the batch (no gradient, no dropout)."""
    momentum = jax.lax.stop_gradient(momentum)
    tokens_m, zimg = self._apply(momentum, fusion.Albef.encode_image, batch["image"])
    _, _, ztxt = self._apply(momentum, fusion.Albef.encode_text, batch["text"])
    return {"image_tokens_m": jax.lax.stop_gradient(tokens_m),
            "image_feat_m": jax.lax.stop_gradient(zimg),
            "text_feat_m": jax.lax.stop_gradient(ztxt)}

  def loss_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array],
                      rng: jax.Array):
    """(itc + itm + mlm, (metrics, momentum features {'image_feat_m', 'text_feat_m'} [B, D]))
    for a batch of images [B, H, W, 3] float32 and 'text' [B, L] int32."""
    k_neg, k_mask, k_drop = jax.random.split(rng, 3)
    d1, d2, d3, d4 = jax.random.split(k_drop, 4)  # dropout of each encoder pass
    images, tokens = batch["image"], batch["text"]
    image_tokens, zimg = self._apply(params, fusion.Albef.encode_image, images, rng=d1,
                                     train=True)
    states, valid, ztxt = self._apply(params, fusion.Albef.encode_text, tokens, rng=d4,
                                      train=True)
    temp = self._apply(params, fusion.Albef.temperature)
    itc, alpha, feats_m, (image_idx, text_idx, labels) = self.itc_and_pairs(
        extra, batch, zimg, ztxt, temp, k_neg)

    # ITM: positives, hard negative images, hard negative texts, all through the fusion.
    fused = self._apply(params, fusion.Albef.fuse, jnp.take(states, text_idx, axis=0),
                        jnp.take(valid, text_idx, axis=0),
                        jnp.take(image_tokens, image_idx, axis=0), rng=d2, train=True)
    itm_logits = self._apply(params, fusion.Albef.itm_logits, fused)
    itm = fusion_losses.itm_loss(itm_logits, labels)
    itm_accuracy = jnp.mean((jnp.argmax(itm_logits, axis=-1) == labels).astype(jnp.float32))

    # MLM: the masked caption through the text encoder, then fused with its own image.
    masked, mlm_labels = self.mlm_inputs(k_mask, tokens)
    m_states, m_valid, _ = self._apply(params, fusion.Albef.encode_text, masked, rng=d3,
                                       train=True)
    m_fused = self._apply(params, fusion.Albef.fuse, m_states, m_valid, image_tokens, rng=d3,
                          train=True)
    soft_targets = None
    if self.mlm_distill:  # the momentum model's predictions for the same masked input
      soft_targets = jax.nn.softmax(self.momentum_mlm_logits(extra["momentum"], masked,
                                                             feats_m["image_tokens_m"]), axis=-1)
    mlm = fusion_losses.mlm_loss(self._apply(params, fusion.Albef.mlm_logits, m_fused),
                                 mlm_labels, soft_targets, alpha)

    loss = itc + itm + mlm
    clamped = fusion_losses.clamp_temperature(temp)
    metrics = {"itc_loss": itc, "itm_loss": itm, "mlm_loss": mlm, "temp": clamped,
               "scale": 1.0 / clamped, "itm_accuracy": itm_accuracy, "alpha": alpha}
    # update_extra enqueues the momentum features; the image tokens are not needed there.
    return loss, (metrics, {k: feats_m[k] for k in ("image_feat_m", "text_feat_m")})

  def mlm_inputs(self, key: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(masked tokens, labels) [B, L]: BERT's 80/10/10 masking of config.loss.mlm_prob of the
    real tokens (mask id = vocab_size; pad and EOS never chosen; random ids above them)."""
    return fusion_losses.mask_tokens(
        key, tokens, mask_id=self.mask_id, vocab_size=self.vocab_size,
        random_low=max(self.special_ids) + 1, special_ids=self.special_ids,
        mask_prob=self.loss_cfg.mlm_prob)

  def momentum_mlm_logits(self, momentum: Any, masked: jax.Array, image_tokens_m: jax.Array
                          ) -> jax.Array:
    """[B, L, vocab] MLM logits of the momentum model (no gradient, no dropout)."""
    momentum = jax.lax.stop_gradient(momentum)
    states, valid, _ = self._apply(momentum, fusion.Albef.encode_text, masked)
    fused = self._apply(momentum, fusion.Albef.fuse, states, valid, image_tokens_m)
    return jax.lax.stop_gradient(self._apply(momentum, fusion.Albef.mlm_logits, fused))

  def embed_images(self, params: Any, images: jax.Array) -> jax.Array:
    return self._apply(params, fusion.Albef.encode_image, images)[1]

  def embed_texts(self, params: Any, texts: jax.Array) -> jax.Array:
    return self._apply(params, fusion.Albef.encode_text, texts)[2]

  def encode_image_tokens(self, params: Any, images: jax.Array) -> jax.Array:
    """[B, 1 + n, Wi] image tokens ([CLS] first), what the fusion encoder cross-attends to."""
    return self._apply(params, fusion.Albef.encode_image, images)[0]

  def itm_scores(self, params: Any, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
    """[P] float32 ITM 'match' logits (column 1, as ALBEF's retrieval ranks by) of the pairs
    (image_tokens [P, n, Wi], tokens [P, L])."""
    states, valid, _ = self._apply(params, fusion.Albef.encode_text, tokens)
    fused = self._apply(params, fusion.Albef.fuse, states, valid, image_tokens)
    return self._apply(params, fusion.Albef.itm_logits, fused)[:, fusion_losses.ITM_MATCH]

  def logit_scalars(self, params: Any) -> dict[str, jax.Array]:
    """The ITC logit scale, 1 / the clamped temperature."""
    temp = self._apply(params, fusion.Albef.temperature)
    return {"scale": 1.0 / fusion_losses.clamp_temperature(temp)}
