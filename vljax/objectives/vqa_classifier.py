"""VQA as classification over an answer vocabulary (VLMo, BEiT-3): a question about an image ->
a score for each of the K answers the training set gives most (configs/vqa.py).

  image, question -> Multiway transformer (fused mode) -> pooled text [CLS]
                  -> cls_head: Linear(W -> 2W) -> LayerNorm -> GELU -> Linear(2W -> K)
  loss = sum over the K answers of BCE(logit, soft score), averaged over the questions

which is VLMo's and BEiT-3's `bce_with_logits(logits, targets) * K` (the mean over B x K
elements times K). The soft score of an answer given by `count` of a question's humans is
min(1, 0.3 * count); a question with no answer in the vocabulary has an all-zero target
(vljax.data.answer_vocabulary). The model is fusion_tasks.classifier_model with VLMo's task
head (the encoders come from the pre-training run through config.init, cls_head/ trains from
scratch); the predicted answer is the argmax, scored with the official VQA accuracy
(vljax.evals.vqa_classifier).

The vocabulary (config.vqa.answers) is derived from the training data before anything is built
(`prepare_run`, called by the trainer): counted on config.data.train, kept in
WORKDIR/answer_vocabulary.json and read back from there when the run resumes, then carried in
the run's config.json (so an evaluation of the workdir or its export has it). Built without one
(a dry run, a benchmark), the head has config.vqa.num_answers outputs and nothing can be
collated or scored.

Batch: 'image' (+ 'brightness'), 'text' [max_len] int32 (the question), 'answer_scores' [K]
float32. Training metrics: 'vqa_score' (the soft score of each question's top answer, VLMo's
training VQAScore) and 'in_vocabulary' (the share of questions with a non-zero target). The loss
is split into a per-question `embed` and the batch mean `loss_from_embeddings`, so
config.grad_accum_steps=K gives the whole batch's gradient (vljax.train).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vljax.configlib import ConfigError
from vljax.data import answer_vocabulary
from vljax.data import preprocess
from vljax.objectives import base
from vljax.objectives import fusion_tasks


def soft_score_bce(logits: jax.Array, scores: jax.Array) -> jax.Array:
  """[B]: per question, the sum over answers of the binary cross-entropy of sigmoid(logit)
  against the soft score (float32)."""
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), scores),
                 axis=-1)


def _num_answers(config: ml_collections.ConfigDict) -> int:
  """config.vqa.num_answers (K), checked."""
  k = int((config.get("vqa") or {}).get("num_answers", 0))
  if k < 1:
    raise ConfigError(f"config.vqa.num_answers={k} must be >= 1: the answer vocabulary keeps "
                      "the K most common training answers (VLMo and BEiT-3: 3129 for VQAv2).")
  return k


class VqaClassifierObjective(base.Objective):
  """Soft-score BCE of MultiwayClassifier's answer logits (module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    num_answers = _num_answers(config)
    self.answer_vocabulary = tuple(config.vqa.get("answers") or ())
    if len(self.answer_vocabulary) > num_answers:
      raise ConfigError(f"config.vqa.answers has {len(self.answer_vocabulary)} answers, more "
                        f"than config.vqa.num_answers={num_answers}.")
    self._index = {a: i for i, a in enumerate(self.answer_vocabulary)}
    if len(self._index) != len(self.answer_vocabulary):
      raise ConfigError("config.vqa.answers repeats an answer; each class needs its own.")
    if "transformer" not in config.model:
      raise ConfigError("objective='vqa_classifier' fine-tunes a Multiway transformer (VLMo, "
                        "BEiT-3): config.model has no transformer; use configs/vqa.py with "
                        "family=vlmo or beit3.")
    self.num_classes = len(self.answer_vocabulary) or num_answers
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.tokenizer = tokenizer
    self.model = fusion_tasks.classifier_model(config, tokenizer, self.num_classes, pair=False,
                                               head="vlmo")

  # The vocabulary, before the objective is built.

  @classmethod
  def prepare_run(cls, config: ml_collections.ConfigDict, directory: str,
                  train_source: Any = None) -> ml_collections.ConfigDict:
    """`config` with config.vqa.answers set: DIRECTORY's answer_vocabulary.json if it has
    one (a resumed run; it must agree with the config), else the answers the config gives,
    else (training: `train_source` given) the vocabulary counted on the training data, which
    is then written there. Without any of them `config` is returned as it is."""
    num_answers = _num_answers(config)
    given = tuple(config.vqa.get("answers") or ())
    saved = answer_vocabulary.load(directory) if directory else None
    if saved is not None:
      where = f"{directory}/{answer_vocabulary.FILENAME}"
      if saved.max_answers != num_answers:
        raise ConfigError(f"config.vqa.num_answers={num_answers} differs from the "
                          f"{saved.max_answers} this workdir's vocabulary was built with "
                          f"({where}); keep it, or use a new --workdir.")
      if given and given != saved.answers:
        raise ConfigError(f"config.vqa.answers differs from this workdir's vocabulary "
                          f"({where}); leave it empty, or use a new --workdir.")
      logging.info("Answer vocabulary: %d answers read from %s.", len(saved.answers), where)
      answers = saved.answers
    elif given:
      answers = given
      if train_source is not None and jax.process_index() == 0:
        answer_vocabulary.save(directory, answer_vocabulary.AnswerVocabulary(
            answers=given, votes=(), max_answers=num_answers, questions=0, covered=0,
            source="config.vqa.answers"))
    elif train_source is not None:
      answers = cls._count_vocabulary(config, directory, train_source, num_answers).answers
    else:
      return config
    config = config.copy_and_resolve_references()
    config.vqa.answers = list(answers)
    return config

  @staticmethod
  def _count_vocabulary(config, directory: str, train_source: Any,
                        num_answers: int) -> answer_vocabulary.AnswerVocabulary:
    """The vocabulary of config.data.train (every process counts the same; process 0 writes
    it to DIRECTORY)."""
    lists, skipped = answer_vocabulary.read_training_answers(
        train_source, int(config.vqa.get("vocabulary_questions", 0)), config.data.seed,
        preprocess.text_options_from_config(config.data))
    vocabulary = answer_vocabulary.build(lists, num_answers, source=config.data.train)
    if not vocabulary.answers:
      raise ConfigError(f"config.data.train={config.data.train!r} has no question with an "
                        f"answer ({skipped} records skipped): classifier VQA trains on VQA "
                        "records (synthetic?task=vqa, vqav2:...?annotations=..., jsonl with "
                        "question and answers; docs/data.md).")
    path = (answer_vocabulary.save(directory, vocabulary) if jax.process_index() == 0
            else "(process 0 writes it)")
    logging.info("Answer vocabulary: the %d most common of %d training questions' answers "
                 "(K=%d); %.1f%% of the questions have one of them; most common %r (%d); "
                 "%d records skipped; wrote %s.", len(vocabulary.answers),
                 vocabulary.questions, num_answers,
                 100.0 * vocabulary.covered / max(vocabulary.questions, 1),
                 vocabulary.answers[0], vocabulary.votes[0], skipped, path)
    return vocabulary

  # The batch.

  def batch_fields(self) -> dict[str, base.BatchField]:
    return {**base.image_fields(self.image_size),
            "text": base.BatchField((self.max_len,), np.int32, ("act_len",)),
            "answer_scores": base.BatchField((self.num_classes,), np.float32)}

  def batch_from_examples(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    if not self.answer_vocabulary:
      raise ValueError("The VQA classifier has no answer vocabulary (config.vqa.answers is "
                       "empty): the trainer builds it (VqaClassifierObjective.prepare_run).")
    missing = [i for i, e in enumerate(examples) if not e.get("question")]
    if missing:
      raise ValueError(f"Classifier VQA trains on records with a question and answers; "
                       f"example {missing[0]} of the batch has none (its source is not a VQA "
                       "source, e.g. synthetic?task=vqa, vqav2:..., jsonl with question; "
                       "docs/data.md).")
    return {"text": self.tokenizer.encode([e["question"] for e in examples], self.max_len),
            "answer_scores": np.stack([answer_vocabulary.answer_scores(
                e["answers"], self._index, self.num_classes) for e in examples])}

  # Training.

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def answer_logits(self, params: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, K] float32 answer logits (no dropout)."""
    return self.model.apply({"params": params}, images, tokens)

  def embed(self, params: Any, batch: dict[str, jax.Array],
            rng: jax.Array) -> dict[str, jax.Array]:
    """The per-question part of the loss, float32 [B]: 'bce' (soft_score_bce), 'top_score' the
    soft score of the top answer, 'in_vocabulary' 1 where the target is not all zero."""
    logits = self.model.apply({"params": params}, batch["image"], batch["text"], train=True,
                              rngs={"dropout": rng})
    scores = batch["answer_scores"]
    top = jnp.argmax(logits, axis=-1)
    return {"bce": soft_score_bce(logits, scores),
            "top_score": jnp.take_along_axis(scores, top[:, None], axis=-1)[:, 0],
            "in_vocabulary": jnp.any(scores > 0, axis=-1).astype(jnp.float32)}

  def loss_from_embeddings(self, params: Any, embeddings: dict[str, jax.Array],
                           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The means over every question of the batch."""
    del params, rng
    return jnp.mean(embeddings["bce"]), {"vqa_score": jnp.mean(embeddings["top_score"]),
                                         "in_vocabulary": jnp.mean(embeddings["in_vocabulary"])}
