"""BLIP VQA fine-tuning (Li et al., 2022): an answer decoder generates the answer to a question
about an image (vljax.models.blip.BlipVqa), started from a BLIP run (configs/blip_vqa.py).

  loss = mean over the questions q of the batch of
         sum over q's kept answers a of weight(a) * sum over a's tokens of CE_0.1(token)

as BLIP's BLIP_VQA.forward: each distinct human answer of a question is a target of the
decoder, weighted by the fraction of the humans who gave it (count / number of answers), its
token cross-entropy (label smoothing config.loss.label_smoothing, BLIP's 0.1) summed over its
tokens up to and including EOS. The answers are BLIP's raw strings (no normalisation).

A batch row holds config.vqa.answers_per_question answer slots: a question's distinct answers,
most frequent first (ties: first given), the rest of the slots empty (weight 0). A question with
more distinct answers than slots loses the rarest ones: train/answer_weight is the mean total
weight kept (1.0 when none is lost). VQAv2 questions have at most 10 distinct answers, so 10
slots keep every answer, as BLIP does; fewer trade some of the rare answers' loss for speed.

Evaluation generates greedy answers of at most config.eval.decode_len tokens (VqaEvaluator,
official VQA accuracy); BLIP generates with 3 beams, or ranks a list of candidate answers, and
neither is the default here (docs/fusion.md).

Batch: 'image' (+ 'brightness'), 'question' [max_len] int32, 'answers' [slots, answer_len]
int32, 'answer_weights' [slots] float32. The loss splits into per-question terms (embed) and
their mean (loss_from_embeddings), so gradient accumulation is exact.
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
from vljax.losses.captioning import per_example_token_terms
from vljax.models import blip
from vljax.models import coca
from vljax.objectives import base
from vljax.objectives import blip as objectives_blip
from vljax.objectives import momentum_queues


def answer_targets(answers: Sequence[str], slots: int) -> tuple[list[str], list[float]]:
  """(the `slots` most frequent distinct answers, their weights count / len(answers)),
  most frequent first, ties in the order first given; padded with ('', 0.0)."""
  if isinstance(answers, str) or not answers:
    raise ValueError(f"a VQA record needs a non-empty list of answers, got {answers!r}")
  counts = collections.Counter(answers)
  distinct = sorted(counts, key=lambda a: -counts[a])  # sorted() is stable: ties keep order
  kept = distinct[:slots]
  weights = [counts[a] / len(answers) for a in kept]
  pad = slots - len(kept)
  return kept + [""] * pad, weights + [0.0] * pad


class BlipVqaObjective(objectives_blip.MedDecoding, base.Objective):
  """Weighted answer LM of BlipVqa (module docstring); greedy answers for VqaEvaluator."""

  decoder_step = staticmethod(blip.BlipVqa.decode_step)

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.tokenizer = tokenizer
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    vqa = config.get("vqa") or {}
    self.answer_len = int(vqa.get("answer_len", 0))
    self.slots = int(vqa.get("answers_per_question", 0))
    if not 2 <= self.answer_len <= self.max_len:
      raise ConfigError(f"config.vqa.answer_len={self.answer_len} must be in [2, "
                        f"config.data.max_len={self.max_len}] (an answer and its EOS; the "
                        "decoder has max_len positions).")
    if self.slots < 1:
      raise ConfigError(f"config.vqa.answers_per_question={self.slots} must be >= 1 (10 "
                        "keeps every distinct VQAv2 answer).")
    if config.data.get("eval"):
      raise ConfigError(f"config.data.eval={config.data.eval!r}: the VQA model is scored on "
                        "config.data.eval_vqa only (it has no contrastive heads and does not "
                        "caption); set config.data.eval=''.")
    self.label_smoothing = float(config.loss.get("label_smoothing", 0.0))
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f"config.loss.label_smoothing={self.label_smoothing} must be in "
                        "[0, 1).")
    kwargs = momentum_queues.model_kwargs(config, tokenizer)
    self.model = blip.BlipVqa(image=kwargs["image"], text=kwargs["text"],
                              dtype=kwargs["dtype"])
    self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
    self.special = blip.special_ids(tokenizer.vocab_size)

  # The batch.

  def batch_fields(self) -> dict[str, base.BatchField]:
    return {**base.image_fields(self.image_size),
            "question": base.BatchField((self.max_len,), np.int32, ("act_len",)),
            "answers": base.BatchField((self.slots, self.answer_len), np.int32),
            "answer_weights": base.BatchField((self.slots,), np.float32)}

  def encode_prefixes(self, questions: Sequence[str]) -> np.ndarray:
    """Question tokens [N, max_len] (VqaEvaluator's and vljax.predict's prompts)."""
    return self.tokenizer.encode(list(questions), self.max_len)

  def vqa_prefix(self, question: str) -> str:
    """BLIP asks the question as it is (no task prompt)."""
    return question

  def batch_from_examples(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    missing = [i for i, e in enumerate(examples) if not e.get("question")]
    if missing:
      raise ValueError(f"BLIP VQA trains on records with a question and answers; example "
                       f"{missing[0]} of the batch has none (its source is not a VQA source, "
                       "e.g. synthetic?task=vqa, vqav2:..., jsonl with question; docs/data.md).")
    targets = [answer_targets(e["answers"], self.slots) for e in examples]
    answers = [a for texts, _ in targets for a in texts]
    encoded = self.tokenizer.encode(answers, self.answer_len)
    encoded[np.asarray([a == "" for a in answers])] = self.pad_id  # empty slots: no tokens
    return {"question": self.encode_prefixes([e["question"] for e in examples]),
            "answers": encoded.reshape(len(examples), self.slots, self.answer_len),
            "answer_weights": np.asarray([w for _, w in targets], np.float32)}

  # Training.

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["question"],
                           batch["answers"][:, 0])["params"]

  def embed(self, params: Any, batch: dict[str, jax.Array],
            rng: jax.Array) -> dict[str, jax.Array]:
    """Per question [B]: 'nll' the weighted sum of its answers' summed token losses,
    'weight' its kept answer weight, 'tokens' / 'correct' of its top answer."""
    answers = batch["answers"]
    batch_size, slots, length = answers.shape

    def forward(model):
      states, valid = model.encode_question(batch["image"], batch["question"], train=True)
      states, valid = (jnp.repeat(x, slots, axis=0) for x in (states, valid))
      return model.answer_logits(states, valid, answers.reshape(-1, length), train=True)

    logits = self.model.apply({"params": params}, method=forward, rngs={"dropout": rng})
    flat = answers.reshape(-1, length)
    terms = per_example_token_terms(logits, flat, coca.caption_mask(flat, self.pad_id,
                                                                     self.eos_id),
                                    self.label_smoothing)
    terms = {k: v.reshape(batch_size, slots) for k, v in terms.items()}
    weights = batch["answer_weights"]
    return {"nll": jnp.sum(weights * terms["nll"], axis=1),
            "weight": jnp.sum(weights, axis=1),
            "tokens": terms["tokens"][:, 0], "correct": terms["correct"][:, 0]}

  def loss_from_embeddings(self, params: Any, embeddings: dict[str, jax.Array],
                           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mean over questions (BLIP: loss.sum() / batch size); token accuracy of the top
    answers; the mean kept answer weight."""
    del params, rng
    loss = jnp.mean(embeddings["nll"])
    accuracy = jnp.sum(embeddings["correct"]) / jnp.maximum(jnp.sum(embeddings["tokens"]), 1.0)
    return loss, {"token_accuracy": accuracy, "answer_weight": jnp.mean(embeddings["weight"])}

  # Answering.

  def _apply(self, params, method, *args):
    return self.model.apply({"params": params}, *args, method=method)

  def init_decode_state(self, params: Any, images: jax.Array, max_len: int,
                        prefix: jax.Array | None = None) -> Any:
    """The answer decoder's caches for images [N, H, W, 3] and their questions `prefix`
    [N, max_len] (encode_prefixes): the question is grounded in the image and its states
    projected to every layer's cross-attention keys/values here, once."""
    if prefix is None:
      raise ValueError("BLIP VQA answers questions: give one (python -m vljax.predict "
                       "--prompt=QUESTION; in code, encode_prefixes' tokens as `prefix`).")
    self.check_decode_len(max_len)
    states, valid = self._apply(params, blip.BlipVqa.encode_question, images, prefix)
    return self._apply(params, blip.BlipVqa.init_decode_cache, states, valid, max_len)

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def generate(self, params: Any, images: jax.Array, max_len: int,
               prefix: jax.Array | None = None) -> jax.Array:
    """Greedy answers [B, max_len] int32 (EOS-terminated, padded with pad_id) to the questions
    `prefix` [B, max_len] about images [B, H, W, 3], KV-cached."""
    tokens, _ = decode.greedy(self.step_fn(params),
                              self.init_decode_state(params, images, max_len, prefix),
                              self.start_tokens(images.shape[0]), max_len, self.eos_id,
                              self.pad_id)
    return tokens
