"""Dual-encoder contrastive objective: CLIP/ALIGN (softmax), SigLIP (sigmoid), LiT (locked tower)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vljax import losses
from vljax.configlib import ConfigError
from vljax.models import two_towers

LOSSES = ("softmax", "sigmoid")


class TwoTowersObjective:
  """Contrastive loss between the L2-normalised image and text embeddings of a batch."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.loss_cfg = config.loss
    if self.loss_cfg.kind not in LOSSES:
      raise ConfigError(f"config.loss.kind={self.loss_cfg.kind!r}; choose one of {LOSSES}.")
    model_cfg = config.model.to_dict()
    model_cfg["text"] = dict(model_cfg["text"], vocab_size=tokenizer.vocab_size,
                             pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id,
                             max_len=config.data.max_len)
    if self.loss_cfg.kind == "softmax" and model_cfg.get("bias_init") is not None:
      raise ConfigError("config.model.bias_init is only used by the sigmoid loss; set it to "
                        "None for config.loss.kind='softmax'.")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    self.model = two_towers.TwoTowers(**model_cfg, dtype=dtype)

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def loss_fn(self, params: Any, batch: dict[str, jax.Array],
              rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    zimg, ztxt, out = self.model.apply({"params": params}, batch["image"], batch["text"],
                                       train=True, rngs={"dropout": rng})
    scale = out["scale"]
    if self.loss_cfg.get("max_scale") is not None:
      # CLIP caps the logit scale at 100 to keep training stable.
      scale = jnp.minimum(scale, self.loss_cfg.max_scale)
    metrics = {"scale": scale}
    if self.loss_cfg.kind == "sigmoid":
      bias = out.get("bias")
      if bias is None:
        bias = jnp.zeros((), jnp.float32)
      metrics["bias"] = bias
      loss = losses.sigmoid_loss(zimg, ztxt, scale, bias, chunked=self.loss_cfg.chunked)
    else:
      loss = losses.softmax_loss(zimg, ztxt, scale)
    return loss, metrics

  def embed_images(self, params: Any, images: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, images, None)[0]

  def embed_texts(self, params: Any, texts: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, None, texts)[1]
