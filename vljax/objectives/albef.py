"""ALBEF objective (Li et al., 2021): ITC with momentum distillation + ITM + MLM, one step.

  loss = itc + itm + mlm   (ALBEF's equal weights)

  itc  losses.fusion.itc_mod_loss: online [CLS] features against the momentum model's features
       of the batch ++ the feature queues; soft targets weighted by config.loss.alpha. This
       slice uses a CONSTANT alpha (ALBEF ramps it from 0 over the first epoch: alpha_ramp).
  itm  one hard negative text per image and one hard negative image per text
       (losses.fusion.sample_hard_negatives, online queries against momentum keys, as ALBEF's
       sim[:, :bs]), the 3N pairs of itm_layout through the fusion encoder, itm_loss.
  mlm  losses.fusion.mask_tokens (mask id = vocab_size, the extra embedding row; pad and EOS
       never chosen), the masked caption through the text and fusion encoders with its own
       image, mlm_loss with hard targets only (no momentum distillation of MLM in this slice).

Batch: base.Objective's fields (image + brightness, 'text' [max_len] int32, and 'label', which
the loss does not use).

Non-gradient state (TrainState.extra):
  momentum     an EMA copy of the params (config.loss.momentum, ALBEF 0.995), updated from the
               params AFTER each optimizer step;
  image_queue, text_queue   [Q, embed_dim] momentum features of earlier batches (Q =
               config.loss.queue_size, a multiple of the global batch);
  queue_ptr    int32 scalar, the queue row the next batch is written to.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vljax.configlib import ConfigError
from vljax.losses import fusion as fusion_losses
from vljax.models import fusion
from vljax.models import stacks
from vljax.objectives import base
from vljax.objectives import contrastive


def model_kwargs(config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
  """config.model as Albef keyword arguments, with the tokenizer's ids and the data's length."""
  layer_options = stacks.check_layers_config(config.get("layers"))
  kwargs = config.model.to_dict()
  kwargs["image"] = dict(kwargs["image"], **layer_options)
  kwargs["text"] = dict(kwargs["text"], vocab_size=tokenizer.vocab_size,
                        pad_id=tokenizer.pad_id, max_len=config.data.max_len, **layer_options)
  kwargs["dtype"] = contrastive.DTYPES[config.dtype]
  return kwargs


class AlbefObjective(base.Objective):
  """ALBEF pre-training: ITC-MoD with queues, ITM with hard negatives, MLM."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.loss_cfg = config.loss
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.tokenizer = tokenizer
    self.model = fusion.Albef(**model_kwargs(config, tokenizer))
    self.queue_size = int(config.loss.queue_size)
    if self.queue_size % config.batch_size:
      raise ConfigError(f"config.loss.queue_size={self.queue_size} must be a multiple of "
                        f"config.batch_size={config.batch_size} (ALBEF's queue requirement).")
    if not 0.0 <= config.loss.momentum < 1.0:
      raise ConfigError(f"config.loss.momentum={config.loss.momentum} must be in [0, 1).")
    self.vocab_size = tokenizer.vocab_size
    self.special_ids = (tokenizer.pad_id, tokenizer.eos_id)
    self.mask_id = tokenizer.vocab_size  # the extra embedding row

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def init_extra(self, rng: jax.Array, params: Any, batch: dict[str, Any]) -> Any:
    del batch
    k_img, k_txt = jax.random.split(rng)
    d = self.model.embed_dim
    return {"momentum": jax.tree.map(lambda p: p, params),  # keeps the logical names
            "image_queue": fusion_losses.init_queue(k_img, self.queue_size, d),
            "text_queue": fusion_losses.init_queue(k_txt, self.queue_size, d),
            "queue_ptr": jnp.zeros((), jnp.int32)}

  def _apply(self, params, method, *args, rng=None, **kwargs):
    """model.apply of one Albef method; `rng` feeds dropout (train=True is passed explicitly)."""
    rngs = {} if rng is None else {"dropout": rng}
    return self.model.apply({"params": params}, *args, rngs=rngs, method=method, **kwargs)

  def momentum_features(self, momentum: Any, batch: dict[str, jax.Array]
                        ) -> dict[str, jax.Array]:
    """The momentum model's unit-norm [CLS] features [B, D] of the batch (no gradient)."""
    momentum = jax.lax.stop_gradient(momentum)
    _, zimg = self._apply(momentum, fusion.Albef.encode_image, batch["image"])
    _, _, ztxt = self._apply(momentum, fusion.Albef.encode_text, batch["text"])
    return {"image_feat_m": jax.lax.stop_gradient(zimg),
            "text_feat_m": jax.lax.stop_gradient(ztxt)}

  def itm_pairs(self, key: jax.Array, zimg: jax.Array, ztxt: jax.Array, zimg_m: jax.Array,
                ztxt_m: jax.Array, temp: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The 3N ITM pairs (image_idx, text_idx, labels) [3N] int32 of a batch's [N, D] features.

    Hard negatives are sampled with online queries against momentum keys (ALBEF's
    sim[:, :bs]); the layout is losses.fusion.itm_layout over the global batch (num_blocks=1:
    the ITM loss is a mean over the pairs, so their order does not change it).
    """
    neg_text, neg_image = fusion_losses.sample_hard_negatives(
        key, zimg, ztxt, temp, image_feat_m=zimg_m, text_feat_m=ztxt_m)
    return fusion_losses.itm_layout(neg_text, neg_image)

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
    feats_m = self.momentum_features(extra["momentum"], batch)
    zimg_m, ztxt_m = feats_m["image_feat_m"], feats_m["text_feat_m"]

    itc = fusion_losses.itc_mod_loss(zimg, ztxt, zimg_m, ztxt_m, extra["image_queue"],
                                     extra["text_queue"], temp, self.loss_cfg.alpha)

    # ITM: positives, hard negative images, hard negative texts, all through the fusion.
    image_idx, text_idx, labels = self.itm_pairs(k_neg, zimg, ztxt, zimg_m, ztxt_m, temp)
    fused = self._apply(params, fusion.Albef.fuse, jnp.take(states, text_idx, axis=0),
                        jnp.take(valid, text_idx, axis=0),
                        jnp.take(image_tokens, image_idx, axis=0), rng=d2, train=True)
    itm_logits = self._apply(params, fusion.Albef.itm_logits, fused)
    itm = fusion_losses.itm_loss(itm_logits, labels)
    itm_accuracy = jnp.mean((jnp.argmax(itm_logits, axis=-1) == labels).astype(jnp.float32))

    # MLM: the masked caption through the text encoder, then fused with its own image.
    masked, mlm_labels = fusion_losses.mask_tokens(
        k_mask, tokens, mask_id=self.mask_id, vocab_size=self.vocab_size,
        random_low=max(self.special_ids) + 1, special_ids=self.special_ids,
        mask_prob=self.loss_cfg.mlm_prob)
    m_states, m_valid, _ = self._apply(params, fusion.Albef.encode_text, masked, rng=d3,
                                       train=True)
    m_fused = self._apply(params, fusion.Albef.fuse, m_states, m_valid, image_tokens, rng=d3,
                          train=True)
    mlm = fusion_losses.mlm_loss(
        self._apply(params, fusion.Albef.mlm_logits, m_fused), mlm_labels)

    loss = itc + itm + mlm
    clamped = fusion_losses.clamp_temperature(temp)
    metrics = {"itc_loss": itc, "itm_loss": itm, "mlm_loss": mlm, "temp": clamped,
               "scale": 1.0 / clamped, "itm_accuracy": itm_accuracy}
    return loss, (metrics, feats_m)

  def update_extra(self, extra: Any, params: Any, outputs: Any, step: jax.Array) -> Any:
    del step
    m = self.loss_cfg.momentum
    momentum = jax.tree.map(lambda e, p: m * e + (1 - m) * p, extra["momentum"], params)
    image_queue, ptr = fusion_losses.enqueue(extra["image_queue"], extra["queue_ptr"],
                                             outputs["image_feat_m"])
    text_queue, _ = fusion_losses.enqueue(extra["text_queue"], extra["queue_ptr"],
                                          outputs["text_feat_m"])
    return {"momentum": momentum, "image_queue": image_queue, "text_queue": text_queue,
            "queue_ptr": ptr}

  def embed_images(self, params: Any, images: jax.Array) -> jax.Array:
    return self._apply(params, fusion.Albef.encode_image, images)[1]

  def embed_texts(self, params: Any, texts: jax.Array) -> jax.Array:
    return self._apply(params, fusion.Albef.encode_text, texts)[2]

  def logit_scalars(self, params: Any) -> dict[str, jax.Array]:
    """The ITC logit scale, 1 / the clamped temperature."""
    temp = self._apply(params, fusion.Albef.temperature)
    return {"scale": 1.0 / fusion_losses.clamp_temperature(temp)}
