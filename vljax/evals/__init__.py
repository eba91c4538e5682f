"""Evaluations over a sharded model, chosen by what the objective can do.

Eval sets (vljax.data.evalsets.load_eval_sets) are a dict with any of
  'zeroshot':  {'image': [N,H,W,3] float32, 'label': [N] int, 'class_prompts': [[str]] per class}
  'retrieval': {'image': [N,H,W,3] float32, 'captions': [str] (M), 'caption_image': [M] int}
Objectives with embed_images/embed_texts get zero-shot top-1 and retrieval recall@{1,5,10};
objectives with generate(params, images, max_len) get captioning CIDEr-D and BLEU-4 on the
retrieval set's images against its captions.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vljax.configlib import ConfigError
from vljax.evals import common, retrieval, zeroshot


class ContrastiveEvaluator:
  """Zero-shot top-1 and retrieval recall through the objective's embedding heads."""

  def __init__(self, objective, eval_sets: dict[str, Any], tokenizer, max_len: int,
               mesh: Mesh, batch_size: int):
    self.sets = eval_sets
    self.mesh = mesh
    self.batch_size = batch_size
    self._embed_images = jax.jit(objective.embed_images)
    self._embed_texts = jax.jit(objective.embed_texts)
    self._prompt_tokens = self._captions = None
    if "zeroshot" in eval_sets:
      prompts = eval_sets["zeroshot"]["class_prompts"]
      if len({len(p) for p in prompts}) != 1:
        raise ConfigError("Every zero-shot class needs the same number of prompt templates.")
      self.num_classes = len(prompts)
      self._prompt_tokens = tokenizer.encode([p for ps in prompts for p in ps], max_len)
    if "retrieval" in eval_sets:
      self._captions = tokenizer.encode(eval_sets["retrieval"]["captions"], max_len)

  def _embed(self, fn: Callable, params: Any, inputs: np.ndarray, cache: dict) -> jax.Array:
    # Zero-shot and retrieval often share their images: embed each array once.
    if id(inputs) not in cache:
      cache[id(inputs)] = common.embed_all(fn, params, inputs, self.mesh, self.batch_size)
    return cache[id(inputs)]

  def __call__(self, params: Any) -> dict[str, float]:
    metrics, cache = {}, {}
    if self._prompt_tokens is not None:
      data = self.sets["zeroshot"]
      zimg = self._embed(self._embed_images, params, data["image"], cache)
      zprompt = common.embed_all(self._embed_texts, params, self._prompt_tokens, self.mesh,
                                 self.batch_size)
      zcls = zeroshot.class_embeddings(zprompt, self.num_classes)
      metrics["eval/zeroshot_top1"] = zeroshot.top1(zimg, zcls, data["label"])
    if self._captions is not None:
      data = self.sets["retrieval"]
      zimg = self._embed(self._embed_images, params, data["image"], cache)
      ztxt = common.embed_all(self._embed_texts, params, self._captions, self.mesh,
                              self.batch_size)
      metrics.update(retrieval.recall_metrics(zimg, ztxt, data["caption_image"], self.mesh))
    return metrics


class CaptioningEvaluator:
  """CIDEr-D and BLEU-4 of greedy captions of the retrieval set's images.

  The references of image i are the captions c with caption_image[c] == i (caption_image None:
  caption i belongs to image i). Scores use the COCO caption toolkit's definitions
  (vljax.evals.captioning.compute_scores).
  """

  def __init__(self, objective, eval_sets: dict[str, Any], tokenizer, max_len: int,
               mesh: Mesh, batch_size: int):
    data = eval_sets["retrieval"]
    self.images = data["image"]
    owner = data["caption_image"]
    if owner is None:
      owner = range(len(data["captions"]))
    self.references = [[] for _ in range(len(self.images))]
    for caption, image in zip(data["captions"], owner):
      self.references[int(image)].append(caption)
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.batch_size = batch_size
    self._generate = lambda params, images: objective.generate(params, images, max_len)
    self.last_captions: list[str] = []

  def __call__(self, params: Any) -> dict[str, float]:
    from vljax.evals import captioning  # pylint: disable=g-import-not-at-top
    tokens = common.embed_all(self._generate, params, self.images, self.mesh, self.batch_size)
    # Every process scores the whole set: gather the batch-sharded tokens to each host.
    tokens = multihost_utils.process_allgather(tokens, tiled=True)
    self.last_captions = self.tokenizer.decode_batch(np.asarray(tokens))
    scores = captioning.compute_scores(self.references, self.last_captions)
    return {"eval/cider": float(scores["cider"]), "eval/bleu4": float(scores["bleu4"])}


class Evaluator:
  """Runs every evaluation that applies to the objective, under the mesh and axis rules."""

  def __init__(self, parts: list[Callable[[Any], dict[str, float]]], mesh: Mesh, rules):
    self.parts = parts
    self.mesh = mesh
    self.rules = rules

  def __call__(self, params: Any) -> dict[str, float]:
    metrics = {}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for part in self.parts:
        metrics.update(part(params))
    return metrics


def build_evaluator(config, objective, eval_sets: dict[str, Any], tokenizer, mesh: Mesh,
                    rules) -> Evaluator:
  """The evaluations that fit `objective`: contrastive heads, captioning."""
  parts = []
  if hasattr(objective, "embed_images") and hasattr(objective, "embed_texts"):
    parts.append(ContrastiveEvaluator(objective, eval_sets, tokenizer, config.data.max_len,
                                      mesh, config.eval.batch_size))
  if hasattr(objective, "generate") and "retrieval" in eval_sets:
    decode_len = config.eval.get("decode_len", -1)
    if decode_len is None or decode_len < 0:
      decode_len = config.data.max_len
    parts.append(CaptioningEvaluator(objective, eval_sets, tokenizer, decode_len, mesh,
                                     config.eval.batch_size))
  return Evaluator(parts, mesh, rules)
