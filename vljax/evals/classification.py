"""Accuracy of a fine-tuned classifier (SNLI-VE, NLVR2) on its held-out set.

The set ('classification', vljax.data.evalsets.classification_set) is scored whole, or the
seeded sample config.eval.max_examples['classification'] picks, in sharded batches
(common.embed_all; the padded last batch is cut off). Metrics, with TASK = objective.task:

  eval/TASK_accuracy                  argmax of the logits == label, over the scored examples
  eval/TASK_examples                  how many were scored
  eval/TASK_accuracy/NAME             per class (the examples whose label is NAME)
  eval/TASK_accuracy_majority_class   always answering the set's most frequent label
  eval/TASK_accuracy_shuffled_images  the same model with every text paired with the NEXT
                                      example's image(s): what it scores when the image it sees
                                      says nothing about its text (an image-blind reading)
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vljax.data import preprocess
from vljax.evals import common


def accuracy_metrics(predictions: np.ndarray, labels: np.ndarray, task: str,
                     label_names: tuple[str, ...]) -> dict[str, float]:
  """Accuracy overall and per class, the example count, and the majority-class baseline."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape or not len(labels):
    raise ValueError(f"{predictions.shape} predictions for {labels.shape} labels.")
  counts = np.bincount(labels, minlength=len(label_names))
  out = {f"eval/{task}_accuracy": float(np.mean(predictions == labels)),
         f"eval/{task}_examples": float(len(labels)),
         f"eval/{task}_accuracy_majority_class": float(counts.max() / len(labels))}
  for k, name in enumerate(label_names):
    if counts[k]:
      out[f"eval/{task}_accuracy/{name}"] = float(np.mean(predictions[labels == k] == k))
  return out


class ShardedArgmax:
  """The argmax class of `logits_fn(params, images, tokens[, images2])` for every example of
  a held-out set, in sharded batches (the padded last batch is cut off): what the fine-tuning
  evaluators (classification here, classifier VQA) score.

  `images` are the set's image arrays (uint8 pixels are normalised on the device with
  `image_options`, as in training; float32 ones are used as they are), `tokens` its texts.
  """

  def __init__(self, logits_fn, tokens: np.ndarray, images: list[np.ndarray],
               image_options: preprocess.ImageOptions, mesh: Mesh, batch_size: int):
    self.tokens, self.images = tokens, images
    self.mesh, self.batch_size = mesh, batch_size

    def classify(params, tokens, *images):
      # uint8 pixels are normalised on the device, as in training (zero brightness deltas).
      from vljax import train  # pylint: disable=g-import-not-at-top
      images = [train.normalize_on_device(x, jax.numpy.zeros(x.shape[:1]), image_options)
                if x.dtype == np.uint8 else x for x in images]
      return logits_fn(params, images[0], tokens, *images[1:])
    self._classify = jax.jit(classify)

  def __call__(self, params: Any, shift: int = 0) -> np.ndarray:
    """Predicted class ids [N]; `shift` pairs text i with the images of example i + shift
    (an image-blind reading: the image a text sees says nothing about it)."""
    images = tuple(np.roll(x, -shift, axis=0) if shift else x for x in self.images)
    logits = common.embed_all(self._classify, params, (self.tokens,) + images, self.mesh,
                              self.batch_size)
    logits = multihost_utils.process_allgather(logits, tiled=True)
    return np.argmax(np.asarray(logits), axis=-1)


def image_options_of(data: dict[str, Any]) -> preprocess.ImageOptions:
  """How a held-out set's uint8 images are normalised (the set's own options, else [-1, 1])."""
  return data.get("image_options") or preprocess.ImageOptions(size=int(data["image"].shape[1]))


class ClassificationEvaluator:
  """Scores objective.classify(params, images, tokens[, images2]) on the 'classification' set."""

  def __init__(self, objective, eval_sets: dict[str, Any], tokenizer, max_len: int,
               mesh: Mesh, batch_size: int):
    data = eval_sets["classification"]
    self.task, self.label_names = objective.task, tuple(objective.label_names)
    self.labels = np.asarray(data["label"])
    if self.labels.min() < 0 or self.labels.max() >= len(self.label_names):
      raise ValueError(f"The {self.task} eval set has labels outside [0, "
                       f"{len(self.label_names)}).")
    tokens = tokenizer.encode(data["statement"], max_len)
    images = [data["image"]] + ([data["image2"]] if objective.pair else [])
    self.predictions = ShardedArgmax(objective.classify, tokens, images, image_options_of(data),
                                     mesh, batch_size)

  def __call__(self, params: Any) -> dict[str, float]:
    metrics = accuracy_metrics(self.predictions(params), self.labels, self.task,
                               self.label_names)
    if len(self.labels) > 1:
      shuffled = self.predictions(params, shift=1)
      metrics[f"eval/{self.task}_accuracy_shuffled_images"] = float(
          np.mean(shuffled == self.labels))
    return metrics
