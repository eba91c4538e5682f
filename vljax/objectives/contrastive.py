"""Pieces shared by every objective with a contrastive image-text term (two towers, CoCa)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vljax import losses
from vljax.configlib import ConfigError
from vljax.models import stacks

LOSSES = ("softmax", "sigmoid")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_kwargs(config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
  """config.model as keyword arguments, with the tokenizer's vocabulary and the data's length.

  config.layers (scan, remat) goes to both towers (or CoCa's image encoder and decoder). Also
  checks config.loss.kind, config.layers and that a logit bias is only configured for the
  sigmoid loss.
  """
  kind = config.loss.kind
  if kind not in LOSSES:
    raise ConfigError(f"config.loss.kind={kind!r}; choose one of {LOSSES}.")
  layer_options = stacks.check_layers_config(config.get("layers"))
  kwargs = config.model.to_dict()
  kwargs["image"] = dict(kwargs["image"], **layer_options)
  kwargs["text"] = dict(kwargs["text"], vocab_size=tokenizer.vocab_size,
                        pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id,
                        max_len=config.data.max_len, **layer_options)
  if kind == "softmax" and kwargs.get("bias_init") is not None:
    raise ConfigError("config.model.bias_init is only used by the sigmoid loss; set it to "
                      "None for config.loss.kind='softmax'.")
  kwargs["dtype"] = DTYPES[config.dtype]
  return kwargs


def capped_scale(loss_cfg: ml_collections.ConfigDict, scale: jax.Array) -> jax.Array:
  """The logit scale the loss uses: CLIP caps the learned scale at 100 to keep training stable."""
  if loss_cfg.get("max_scale") is not None:
    return jnp.minimum(scale, loss_cfg.max_scale)
  return scale


def contrastive_loss(loss_cfg: ml_collections.ConfigDict, zimg: jax.Array, ztxt: jax.Array,
                     scale: jax.Array, bias: jax.Array | None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The configured softmax or sigmoid loss, and the scale/bias metrics it used."""
  scale = capped_scale(loss_cfg, scale)
  metrics = {"scale": scale}
  if loss_cfg.kind == "sigmoid":
    bias = jnp.zeros((), jnp.float32) if bias is None else bias
    metrics["bias"] = bias
    return losses.sigmoid_loss(zimg, ztxt, scale, bias, chunked=loss_cfg.chunked), metrics
  return losses.softmax_loss(zimg, ztxt, scale), metrics
