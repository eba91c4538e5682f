"""BLIP objective (Li et al., 2022): ITC with momentum distillation + ITM + LM, one step.

  loss = itc + itm + lm   (BLIP's equal weights)

  itc  losses.fusion.itc_mod_loss: online [CLS] features against the momentum model's features
       of the batch ++ the feature queues; soft targets weighted by alpha, ramped linearly from
       0 over config.loss.alpha_ramp_steps (BLIP: the first 2 epochs; 0 = constant alpha):
       the shared alpha() of the step counter kept in the extra state.
  itm  one hard negative text per image and one hard negative image per text (the shared
       itm_pairs: online queries against momentum keys), the 3N pairs through the
       image-grounded text encoder ([ENC] first), itm_loss. BLIP's +1e-4 floor on the
       negative weights is left out (docs/fusion.md).
  lm   the image-grounded decoder ([DEC] first, causal) predicts every caption token up to
       and including EOS (pad positions ignored), token cross-entropy with label smoothing
       config.loss.label_smoothing (BLIP: 0.1), averaged over the batch's real tokens.

Batch: base.Objective's fields (image + brightness, 'text' [max_len] int32, 'label' unused).

Non-gradient state (TrainState.extra, vljax.objectives.momentum_queues, shared with ALBEF):
momentum, image_queue, text_queue, queue_ptr and step (the alpha ramp's clock); `momentum` is
an EMA copy of models.blip.momentum_params(params) only (the image encoder, the text encoder's
unimodal path and the projections, as BLIP's momentum model; not the decoder's
self-attention, the cross-attention or the heads).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vljax import decode
from vljax.configlib import ConfigError
from vljax.losses import fusion as fusion_losses
from vljax.losses.captioning import captioning_loss
from vljax.models import blip
from vljax.models import coca
from vljax.objectives import momentum_queues


class MedDecoding:
  """KV-cached decoding of a MED decoder ([DEC] first, padding never generated), shared by BLIP's
  captioner (BlipObjective) and its VQA answer decoder (objectives.blip_vqa). A subclass sets
  `decoder_step` (the model method, e.g. staticmethod(blip.Blip.decode_step)) and has
  `_apply(params, method, *args)`, `pad_id`, `special` and `max_len`."""

  decoder_step: Any

  def step_fn(self, params: Any) -> decode.StepFn:
    """step_fn(caches, token [N], position) -> (logits [N, V], caches) for vljax.decode."""

    def step(caches, token, position):
      logits, caches = self._apply(params, self.decoder_step, token[:, None], position, caches)
      # Padding is never a target, so it is never generated (as CoCa's decoding).
      return logits[:, 0].at[:, self.pad_id].set(jnp.finfo(jnp.float32).min), caches

    return step

  def check_decode_len(self, max_len: int) -> None:
    if max_len > self.max_len:
      raise ValueError(f"generate: max_len={max_len} exceeds the model's "
                       f"max_len={self.max_len} (its position embeddings).")

  def start_tokens(self, batch: int) -> jax.Array:
    """[DEC], the decoder's first input."""
    return jnp.full((batch,), self.special["dec"], jnp.int32)


class BlipObjective(MedDecoding, momentum_queues.MomentumQueueObjective):
  """BLIP pre-training (without CapFilt): ITC-MoD with queues, hard-negative ITM, LM."""

  decoder_step = staticmethod(blip.Blip.decode_step)

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    super().__init__(config, tokenizer)
    self.model = blip.Blip(**momentum_queues.model_kwargs(config, tokenizer))
    self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
    self.special = blip.special_ids(tokenizer.vocab_size)
    self.label_smoothing = float(config.loss.label_smoothing)
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f"config.loss.label_smoothing={self.label_smoothing} must be in "
                        "[0, 1).")

  def momentum_params(self, params: Any) -> Any:
    """BLIP's momentum model: the encoders and projections only (models.blip)."""
    return blip.momentum_params(params)

  # The loss.

  def momentum_features(self, momentum: Any, batch: dict[str, jax.Array]
                        ) -> dict[str, jax.Array]:
    """The momentum model's unit-norm [CLS] features [B, D] of the batch (no gradient)."""
    momentum = jax.lax.stop_gradient(momentum)
    _, zimg = self._apply(momentum, blip.Blip.encode_image, batch["image"])
    _, ztxt = self._apply(momentum, blip.Blip.encode_text, batch["text"])
    return {"image_feat_m": jax.lax.stop_gradient(zimg),
            "text_feat_m": jax.lax.stop_gradient(ztxt)}

  def lm_loss(self, lm_logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(label-smoothed token cross-entropy, token accuracy) over the real caption tokens
    (up to and including the first EOS, pad excluded) of the whole batch."""
    mask = coca.caption_mask(tokens, self.pad_id, self.eos_id)
    return captioning_loss(lm_logits, tokens, mask, self.label_smoothing)

  def loss_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array],
                      rng: jax.Array):
    """(itc + itm + lm, (metrics, momentum features {'image_feat_m', 'text_feat_m'} [B, D]))
    for a batch of images [B, H, W, 3] float32 and 'text' [B, L] int32."""
    k_neg, k_drop = jax.random.split(rng)
    d_img, d_txt, d_itm, d_lm = jax.random.split(k_drop, 4)  # dropout of each pass
    images, tokens = batch["image"], batch["text"]
    image_tokens, zimg = self._apply(params, blip.Blip.encode_image, images, rng=d_img,
                                     train=True)
    _, ztxt = self._apply(params, blip.Blip.encode_text, tokens, rng=d_txt, train=True)
    temp = self._apply(params, blip.Blip.temperature)
    itc, alpha, feats_m, (image_idx, text_idx, labels) = self.itc_and_pairs(
        extra, batch, zimg, ztxt, temp, k_neg)

    # ITM: positives, hard negative images, hard negative texts, through the grounded encoder.
    itm_logits = self._apply(params, blip.Blip.itm_logits,
                             jnp.take(image_tokens, image_idx, axis=0),
                             jnp.take(tokens, text_idx, axis=0), rng=d_itm, train=True)
    itm = fusion_losses.itm_loss(itm_logits, labels)
    itm_accuracy = jnp.mean((jnp.argmax(itm_logits, axis=-1) == labels).astype(jnp.float32))

    # LM: the caption decoded from its own image, teacher forcing.
    lm_logits = self._apply(params, blip.Blip.lm_logits, image_tokens, tokens, rng=d_lm,
                            train=True)
    lm, token_accuracy = self.lm_loss(lm_logits, tokens)

    loss = itc + itm + lm
    clamped = fusion_losses.clamp_temperature(temp)
    metrics = {"itc_loss": itc, "itm_loss": itm, "lm_loss": lm, "temp": clamped,
               "scale": 1.0 / clamped, "itm_accuracy": itm_accuracy,
               "token_accuracy": token_accuracy, "alpha": alpha}
    return loss, (metrics, feats_m)

  # Evaluation: ITC features (zero-shot, retrieval), ITM scores (re-ranking), captions.

  def embed_images(self, params: Any, images: jax.Array) -> jax.Array:
    return self._apply(params, blip.Blip.encode_image, images)[1]

  def embed_texts(self, params: Any, texts: jax.Array) -> jax.Array:
    return self._apply(params, blip.Blip.encode_text, texts)[1]

  def logit_scalars(self, params: Any) -> dict[str, jax.Array]:
    """The ITC logit scale, 1 / the clamped temperature."""
    temp = self._apply(params, blip.Blip.temperature)
    return {"scale": 1.0 / fusion_losses.clamp_temperature(temp)}

  def encode_image_tokens(self, params: Any, images: jax.Array) -> jax.Array:
    """The image tokens [B, 1 + n, Wi] ([CLS] first) the ITM encoder cross-attends to."""
    return self._apply(params, blip.Blip.encode_image, images)[0]

  def itm_scores(self, params: Any, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
    """The ITM 'match' logit [P] float32 (column ITM_MATCH) of pairs image_tokens [P, n, Wi]
    (from encode_image_tokens) and tokens [P, L] int32; no dropout."""
    logits = self._apply(params, blip.Blip.itm_logits, image_tokens, tokens)
    return logits[:, fusion_losses.ITM_MATCH]

  def init_decode_state(self, params: Any, images: jax.Array, max_len: int) -> Any:
    """The decoder's caches for images [N, H, W, 3]: the image is encoded and every layer's
    cross-attention keys/values projected here, once."""
    self.check_decode_len(max_len)
    image_tokens = self.encode_image_tokens(params, images)
    return self._apply(params, blip.Blip.init_decode_cache, image_tokens, max_len)

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def generate(self, params: Any, images: jax.Array, max_len: int) -> jax.Array:
    """Greedy captions [B, max_len] int32 (EOS-terminated, padded with pad_id), KV-cached
    ([DEC] at position 0; vljax.predict samples through the same step_fn and state)."""
    tokens, _ = decode.greedy(self.step_fn(params),
                              self.init_decode_state(params, images, max_len),
                              self.start_tokens(images.shape[0]), max_len, self.eos_id,
                              self.pad_id)
    return tokens

  def itm_match_probability(self, params: Any, image_tokens: jax.Array, tokens: jax.Array
                            ) -> jax.Array:
    """[P] float32 softmax probability of 'match' of each pair (CapFilt's filter)."""
    logits = self._apply(params, blip.Blip.itm_logits, image_tokens, tokens)
    return jax.nn.softmax(logits, axis=-1)[:, fusion_losses.ITM_MATCH]
