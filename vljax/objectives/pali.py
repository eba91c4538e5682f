"""PaLI objective: every task is prefix -> target text, trained with token cross-entropy.

A decoded example becomes one (prefix, target) pair (config.tasks):
  an example with a question   "answer en {question}" -> its most frequent human answer
  any other example            "caption en"           -> its caption
so a multitask run is a data mixture of caption and VQA sources, weighted per source
(`0.5*synthetic|0.5*synthetic?task=vqa`). The loss counts target tokens only (the prefix and the
image carry none), averaged over the real target tokens of the global batch.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vljax import decode
from vljax.configlib import ConfigError
from vljax.losses.captioning import per_example_token_terms, reduce_token_terms
from vljax.models import coca
from vljax.models import pali
from vljax.models import stacks
from vljax.objectives import base
from vljax.objectives import contrastive


def most_frequent_answer(answers: Sequence[str]) -> str:
  """The answer most humans gave (the first of those tied): VQA's usual training target."""
  counts = collections.Counter(answers)
  best = max(counts.values())
  return next(a for a in answers if counts[a] == best)


class PaliObjective(base.Objective):
  """PaLI / prefix-LM captioning and VQA: cross-entropy of the target given image + prefix."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    tasks = config.tasks
    if "{question}" not in tasks.vqa:
      raise ConfigError(f"config.tasks.vqa={tasks.vqa!r} must contain '{{question}}'.")
    if tasks.prefix_len < 2:
      raise ConfigError(f"config.tasks.prefix_len={tasks.prefix_len} must be >= 2.")
    self.tasks = tasks
    self.tokenizer = tokenizer
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.prefix_len = int(tasks.prefix_len)
    self.label_smoothing = float(config.loss.get("label_smoothing", 0.0))
    # config.layers (scan, remat) applies to the ViT and to every text stack alike.
    layer_options = stacks.check_layers_config(config.get("layers"))
    text = dict(config.model.text, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                eos_id=tokenizer.eos_id, **layer_options)
    image = dict(config.model.image, **layer_options)
    self.model = pali.PaLI(image=image, text=text,
                           architecture=config.model.architecture,
                           dtype=contrastive.DTYPES[config.dtype])
    self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
    self.bos_id = tokenizer.vocab_size
    self.caption_prefix = self.encode_prefixes([tasks.caption])[0]

  # ------------------------------------------------------------------ the batch

  def batch_fields(self) -> dict[str, base.BatchField]:
    return {**base.image_fields(self.image_size),
            "prefix": base.BatchField((self.prefix_len,), np.int32, ("act_len",)),
            "targets": base.BatchField((self.max_len,), np.int32, ("act_len",))}

  def encode_prefixes(self, prefixes: Sequence[str]) -> np.ndarray:
    return self.tokenizer.encode(list(prefixes), self.prefix_len)

  def vqa_prefix(self, question: str) -> str:
    return self.tasks.vqa.format(question=question)

  def batch_from_examples(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    prefixes, targets = [], []
    for e in examples:
      if e.get("question"):
        prefixes.append(self.vqa_prefix(e["question"]))
        targets.append(most_frequent_answer(e["answers"]))
      else:
        prefixes.append(self.tasks.caption)
        targets.append(e["caption"])
    return {"prefix": self.encode_prefixes(prefixes),
            "targets": self.tokenizer.encode(targets, self.max_len)}

  # ------------------------------------------------------------------ training

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["prefix"], batch["targets"])["params"]

  def embed(self, params: Any, batch: dict[str, jax.Array],
            rng: jax.Array) -> dict[str, jax.Array]:
    """Each example's summed target-token cross-entropy, real-token and correct-token counts."""
    logits = self.model.apply({"params": params}, batch["image"], batch["prefix"],
                              batch["targets"], train=True, rngs={"dropout": rng})
    targets = batch["targets"]
    mask = coca.caption_mask(targets, self.pad_id, self.eos_id)
    return per_example_token_terms(logits, targets, mask, self.label_smoothing)

  def loss_from_embeddings(self, params: Any, embeddings: dict[str, jax.Array],
                           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy averaged over every real target token of the batch."""
    del params, rng
    loss, acc = reduce_token_terms(embeddings)
    return loss, {"token_accuracy": acc, "target_tokens": jnp.sum(embeddings["tokens"])}

  # ------------------------------------------------------------------ decoding

  def _mask_pad(self, logits: jax.Array) -> jax.Array:
    # Padding is never a target, so it is never generated.
    return logits.at[:, self.pad_id].set(jnp.finfo(logits.dtype).min)

  def step_fn(self, params: Any) -> decode.StepFn:
    """step_fn(cache, token [N], position) -> (logits [N, V], cache) for vljax.decode."""

    def step(cache, token, position):
      logits, cache = self.model.apply({"params": params}, token[:, None], position, cache,
                                       method=pali.PaLI.decode_step)
      return self._mask_pad(logits[:, 0]), cache

    return step

  def default_prefix(self, batch: int) -> jax.Array:
    """The captioning prompt (config.tasks.caption) for `batch` rows."""
    return jnp.broadcast_to(jnp.asarray(self.caption_prefix), (batch, self.prefix_len))

  def init_decode_state(self, params: Any, images: jax.Array, max_len: int,
                        prefix: jax.Array | None = None) -> Any:
    """The decoding cache: the image and prefix are encoded once (encoder output and every
    layer's cross-attention keys/values, or the prefix-LM prefill)."""
    if prefix is None:
      prefix = self.default_prefix(images.shape[0])
    return self.model.apply({"params": params}, images, prefix, max_len,
                            method=pali.PaLI.init_cache)

  def start_tokens(self, batch: int) -> jax.Array:
    return jnp.full((batch,), self.bos_id, jnp.int32)

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def generate(self, params: Any, images: jax.Array, max_len: int,
               prefix: jax.Array | None = None) -> jax.Array:
    """Greedy target tokens [B, max_len] (EOS-terminated, pad after) for images and prefix
    tokens [B, prefix_len] (default: the captioning prompt)."""
    state = self.init_decode_state(params, images, max_len, prefix)
    tokens, _ = decode.greedy(self.step_fn(params), state, self.start_tokens(images.shape[0]),
                              max_len, self.eos_id, self.pad_id)
    return tokens
