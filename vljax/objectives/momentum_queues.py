"""What ALBEF and BLIP share: a momentum model, feature queues, the alpha ramp, ITM pairs.

MomentumQueueObjective is the base of both objectives. It owns the non-gradient state
(TrainState.extra):

  momentum     an EMA copy of momentum_params(params) (all the params for ALBEF; BLIP's
               encoders and projections only), decay config.loss.momentum (0.995), updated
               from the params AFTER each optimizer step;
  image_queue, text_queue   [Q, embed_dim] momentum features of earlier batches
               (Q = config.loss.queue_size, a multiple of the global batch);
  queue_ptr    int32, the queue row the next batch is written to;
  step         int32, the steps taken (the alpha ramp's clock);

and the pieces of the loss that do not depend on the model's layout: alpha (linear ramp over
config.loss.alpha_ramp_steps, 0 = constant) and the 3N ITM pairs with hard negatives.
Subclasses build `self.model` (with an `embed_dim`) and return the momentum features of the
batch under 'image_feat_m' / 'text_feat_m' in the outputs of loss_with_extra.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vljax.configlib import ConfigError
from vljax.losses import fusion as fusion_losses
from vljax.models import stacks
from vljax.objectives import base
from vljax.objectives import contrastive


def model_kwargs(config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
  """config.model ({image, text, embed_dim, ...}) as keyword arguments of the fusion models
  (Albef, Blip), with the tokenizer's ids, the data's length and the layer options."""
  layer_options = stacks.check_layers_config(config.get("layers"))
  kwargs = config.model.to_dict()
  kwargs["image"] = dict(kwargs["image"], **layer_options)
  kwargs["text"] = dict(kwargs["text"], vocab_size=tokenizer.vocab_size,
                        pad_id=tokenizer.pad_id, max_len=config.data.max_len, **layer_options)
  kwargs["dtype"] = contrastive.DTYPES[config.dtype]
  return kwargs


class MomentumQueueObjective(base.Objective):
  """Momentum model + feature queues + alpha ramp + hard-negative ITM pairs (module docstring)."""

  model: Any

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.loss_cfg = config.loss
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.tokenizer = tokenizer
    self.queue_size = int(config.loss.queue_size)
    if self.queue_size % config.batch_size:
      raise ConfigError(f"config.loss.queue_size={self.queue_size} must be a multiple of "
                        f"config.batch_size={config.batch_size} (the queue takes whole "
                        "batches, as ALBEF's and BLIP's).")
    if not 0.0 <= config.loss.momentum < 1.0:
      raise ConfigError(f"config.loss.momentum={config.loss.momentum} must be in [0, 1).")
    self.alpha_ramp_steps = int(config.loss.get("alpha_ramp_steps", 0))
    if self.alpha_ramp_steps < 0:
      raise ConfigError(f"config.loss.alpha_ramp_steps={self.alpha_ramp_steps} must be >= 0 "
                        "(0 = a constant alpha).")

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def momentum_params(self, params: Any) -> Any:
    """The part of the params the momentum model copies (all of them by default)."""
    return params

  def init_extra(self, rng: jax.Array, params: Any, batch: dict[str, Any]) -> Any:
    del batch
    k_img, k_txt = jax.random.split(rng)
    d = self.model.embed_dim
    return {"momentum": jax.tree.map(lambda p: p, self.momentum_params(params)),  # boxed names
            "image_queue": fusion_losses.init_queue(k_img, self.queue_size, d),
            "text_queue": fusion_losses.init_queue(k_txt, self.queue_size, d),
            "queue_ptr": jnp.zeros((), jnp.int32),
            "step": jnp.zeros((), jnp.int32)}

  def update_extra(self, extra: Any, params: Any, outputs: Any, step: jax.Array) -> Any:
    del step  # extra['step'] is the alpha ramp's clock, checkpointed with the queues
    m = self.loss_cfg.momentum
    momentum = jax.tree.map(lambda e, p: m * e + (1 - m) * p, extra["momentum"],
                            self.momentum_params(params))
    image_queue, ptr = fusion_losses.enqueue(extra["image_queue"], extra["queue_ptr"],
                                             outputs["image_feat_m"])
    text_queue, _ = fusion_losses.enqueue(extra["text_queue"], extra["queue_ptr"],
                                          outputs["text_feat_m"])
    return {"momentum": momentum, "image_queue": image_queue, "text_queue": text_queue,
            "queue_ptr": ptr, "step": extra["step"] + 1}

  def _apply(self, params, method, *args, rng=None, **kwargs):
    """model.apply of one model method; `rng` feeds dropout (train=True is passed explicitly)."""
    rngs = {} if rng is None else {"dropout": rng}
    return self.model.apply({"params": params}, *args, rngs=rngs, method=method, **kwargs)

  def alpha(self, steps_taken: jax.Array) -> jax.Array:
    """The distillation weight at this step: the linear ramp, or constant."""
    if self.alpha_ramp_steps == 0:
      return jnp.float32(self.loss_cfg.alpha)
    return fusion_losses.alpha_ramp(steps_taken, self.alpha_ramp_steps, self.loss_cfg.alpha)

  def momentum_features(self, momentum: Any, batch: dict[str, jax.Array]
                        ) -> dict[str, jax.Array]:
    """The momentum model's unit-norm features 'image_feat_m', 'text_feat_m' [B, D] of the
    batch (no gradient, no dropout), and whatever else the subclass's loss needs."""
    raise NotImplementedError

  def itc_and_pairs(self, extra: Any, batch: dict[str, jax.Array], zimg: jax.Array,
                    ztxt: jax.Array, temp: jax.Array, key: jax.Array):
    """The shared first half of the ALBEF / BLIP loss: (itc, alpha, momentum features,
    (image_idx, text_idx, labels) of the 3N ITM pairs).

    ITC-MoD of the online features zimg, ztxt [N, D] against the momentum features of the
    batch ++ the queues, at this step's alpha; the ITM hard negatives sampled with the online
    queries against the momentum keys.
    """
    feats_m = self.momentum_features(extra["momentum"], batch)
    zimg_m, ztxt_m = feats_m["image_feat_m"], feats_m["text_feat_m"]
    alpha = self.alpha(extra["step"])
    itc = fusion_losses.itc_mod_loss(zimg, ztxt, zimg_m, ztxt_m, extra["image_queue"],
                                     extra["text_queue"], temp, alpha)
    return itc, alpha, feats_m, self.itm_pairs(key, zimg, ztxt, zimg_m, ztxt_m, temp)

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
