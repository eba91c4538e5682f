"""CoCa objective: contrastive + captioning from one forward pass, and KV-cached generation.

loss = contrastive_weight * contrastive + captioning_weight * captioning   (defaults 1 and 2,
the CoCa paper's ratio). contrastive_weight = 0 trains a pure captioner.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vljax import decode
from vljax.configlib import ConfigError
from vljax.losses.captioning import per_example_token_terms, reduce_token_terms
from vljax.models import coca
from vljax.objectives import base
from vljax.objectives import contrastive


class CocaObjective(base.Objective):
  """CoCa: image-text contrastive loss on the poolers/CLS + captioning LM loss on the decoder."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.loss_cfg = config.loss
    if self.loss_cfg.contrastive_weight < 0 or self.loss_cfg.captioning_weight < 0:
      raise ConfigError("config.loss.contrastive_weight and captioning_weight must be >= 0.")
    self.model = coca.CoCa(**contrastive.model_kwargs(config, tokenizer))
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.tokenizer = tokenizer
    self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
    self.bos_id = tokenizer.vocab_size

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def embed(self, params: Any, batch: dict[str, jax.Array],
            rng: jax.Array) -> dict[str, jax.Array]:
    """The per-example part of the loss: unit-norm embeddings [B, D] and each caption's summed
    token cross-entropy, real-token and correct-token counts [B]."""
    out = self.model.apply({"params": params}, batch["image"], batch["text"], train=True,
                           rngs={"dropout": rng})
    targets = batch["text"]
    mask = coca.caption_mask(targets, self.pad_id, self.eos_id)
    terms = per_example_token_terms(out["logits"], targets, mask, self.loss_cfg.label_smoothing)
    return {"zimg": out["zimg"], "ztxt": out["ztxt"], **terms}

  def loss_from_embeddings(self, params: Any, embeddings: dict[str, jax.Array],
                           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch-coupled part: the contrastive loss over every pair, and the captioning loss
    averaged over every real target token of the batch."""
    del rng
    scalars = self.model.apply({"params": params}, method=coca.CoCa.logit_scalars)
    con, metrics = contrastive.contrastive_loss(self.loss_cfg, embeddings["zimg"],
                                                embeddings["ztxt"], scalars["scale"],
                                                scalars.get("bias"))
    cap, acc = reduce_token_terms(embeddings)
    loss = self.loss_cfg.contrastive_weight * con + self.loss_cfg.captioning_weight * cap
    metrics.update({"contrastive_loss": con, "captioning_loss": cap, "token_accuracy": acc})
    return loss, metrics

  def embed_images(self, params: Any, images: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, images, method=coca.CoCa.embed_images)

  def embed_texts(self, params: Any, texts: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, texts, method=coca.CoCa.embed_texts)

  def logit_scalars(self, params: Any) -> dict[str, jax.Array]:
    """The contrastive logit 'scale' (as the loss uses it) and, for sigmoid, 'bias'."""
    scalars = self.model.apply({"params": params}, method=coca.CoCa.logit_scalars)
    scalars["scale"] = contrastive.capped_scale(self.loss_cfg, scalars["scale"])
    return scalars

  # Decoding. Every function below is pure and jit-able; `generate` is what evaluation calls.

  def _mask_pad(self, logits: jax.Array) -> jax.Array:
    # Padding is never a target, so it is never generated: a pad id inside a caption would be
    # ignored as a key by the full-sequence decoder but not by the cache.
    return logits.at[:, self.pad_id].set(jnp.finfo(logits.dtype).min)

  def step_fn(self, params: Any, cached: bool = True) -> decode.StepFn:
    """step_fn(state, token [N], position) -> (logits [N, V], state) for vljax.decode.

    The state comes from init_decode_state(cached=cached); every leaf is batch-leading, so beam
    search can repeat and reorder it. cached=True: the state is CoCa's decoding cache (the
    multimodal layers' cross-attention keys/values of the image, computed once, and the
    self-attention keys/values so far). cached=False recomputes the whole prefix, image
    cross-attention included, every step: the reference the cache is tested against.
    """

    def cached_step(cache, token, position):
      logits, cache = self.model.apply({"params": params}, token[:, None], position, cache,
                                       method=coca.CoCa.decode_step)
      return self._mask_pad(logits[:, 0]), cache

    def uncached_step(state, token, position):
      # The history is the input buffer [N, max_len + 1] (BOS first); its future slots hold pad
      # and causality makes them irrelevant.
      history = jax.lax.dynamic_update_slice(state["history"], token[:, None], (0, position))
      # caption_logits prepends BOS itself; its logits[:, p] come from input slot p.
      logits = self.model.apply({"params": params}, state["context"], history[:, 1:],
                                method=coca.CoCa.caption_logits)
      logits = self._mask_pad(jnp.take(logits, position, axis=1))
      return logits, {"context": state["context"], "history": history}

    return cached_step if cached else uncached_step

  def init_decode_state(self, params: Any, images: jax.Array, max_len: int,
                        cached: bool = True) -> dict[str, Any]:
    """The initial decoding state of step_fn(params, cached) for images [N, H, W, 3].

    cached: CoCa.init_cache (the image is encoded and cross-attention keys/values projected
    here, once); otherwise the decoder context and an empty token history.
    """
    if cached:
      return self.model.apply({"params": params}, images, max_len,
                              method=coca.CoCa.init_cache)
    context = self.model.apply({"params": params}, images, method=coca.CoCa.decoder_context)
    return {"context": context,
            "history": jnp.full((images.shape[0], max_len + 1), self.pad_id, jnp.int32)}

  def start_tokens(self, batch: int) -> jax.Array:
    return jnp.full((batch,), self.bos_id, jnp.int32)

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def generate(self, params: Any, images: jax.Array, max_len: int) -> jax.Array:
    """Greedy captions [B, max_len] int32 (EOS-terminated, padded with pad_id), KV-cached."""
    state = self.init_decode_state(params, images, max_len)
    tokens, _ = decode.greedy(self.step_fn(params), state, self.start_tokens(images.shape[0]),
                              max_len, self.eos_id, self.pad_id)
    return tokens
