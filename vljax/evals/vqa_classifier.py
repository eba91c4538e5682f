"""VQA accuracy of an answer classifier (vljax.objectives.vqa_classifier) on its held-out set.

Every question of the 'vqa' set (config.data.eval_vqa; capped only by
config.eval.max_examples['vqa']) is answered with the vocabulary answer of the largest logit and
scored against all its human answers with the official VQAv2 accuracy (vljax.evals.vqa), so a
question none of whose answers is in the vocabulary counts, and scores 0. Metrics:

  eval/vqa_accuracy, eval/vqa_examples       overall, and how many questions were scored
  eval/vqa_accuracy/<type>, .../vqa_examples/<type>   per answer type, where the set has types
  eval/vqa_accuracy_most_common_answer       always answering the most common training answer
                                             (vocabulary answer 0): the prior, to read the
                                             model's accuracy against
  eval/vqa_accuracy_shuffled_images          the model with every question asked about the NEXT
                                             question's image: what the question alone earns
  eval/vqa_in_vocabulary                     the share of questions with a human answer in the
                                             vocabulary (normalised): no answer earns more
"""
from __future__ import annotations

import logging
from typing import Any

from jax.sharding import Mesh

from vljax.data import answer_vocabulary
from vljax.evals import classification
from vljax.evals import vqa


class VqaClassifierEvaluator:
  """Scores the argmax answers of objective.answer_logits on the 'vqa' set."""

  def __init__(self, objective, eval_sets: dict[str, Any], tokenizer, max_len: int,
               mesh: Mesh, batch_size: int):
    self.vocabulary = tuple(objective.answer_vocabulary)
    if not self.vocabulary:
      raise ValueError("The VQA classifier has no answer vocabulary to answer from "
                       "(config.vqa.answers is empty): evaluate a run's workdir or export, "
                       "whose config.json or answer_vocabulary.json holds it.")
    data = eval_sets["vqa"]
    self.answers = data["answers"]
    self.answer_types = data.get("answer_type")
    if self.answer_types is not None and not any(self.answer_types):
      self.answer_types = None
    self.predictions = classification.ShardedArgmax(
        objective.answer_logits, tokenizer.encode(data["question"], max_len), [data["image"]],
        classification.image_options_of(data), mesh, batch_size)
    prior = vqa.vqa_accuracy([self.vocabulary[0]] * len(self.answers), self.answers)
    in_vocabulary = set(self.vocabulary)
    self.baselines = {
        "eval/vqa_accuracy_most_common_answer": prior["vqa_accuracy"],
        "eval/vqa_in_vocabulary": sum(
            any(answer_vocabulary.normalized(a) in in_vocabulary for a in answers)
            for answers in self.answers) / len(self.answers)}
    logging.info("VQA baseline: answering the most common training answer %r to every "
                 "question scores %.4f.", self.vocabulary[0], prior["vqa_accuracy"])

  def answer(self, params: Any, shift: int = 0) -> list[str]:
    """The predicted answer of every question (`shift`: asked about image i + shift)."""
    return [self.vocabulary[i] for i in self.predictions(params, shift)]

  def __call__(self, params: Any) -> dict[str, float]:
    scores = vqa.vqa_accuracy(self.answer(params), self.answers, self.answer_types)
    metrics = {f"eval/{k}": float(v) for k, v in scores.items()}
    if len(self.answers) > 1:
      metrics["eval/vqa_accuracy_shuffled_images"] = vqa.vqa_accuracy(
          self.answer(params, shift=1), self.answers)["vqa_accuracy"]
    return {**metrics, **self.baselines}
