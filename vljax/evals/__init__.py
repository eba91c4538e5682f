"""Evaluations over a sharded model, chosen by what the objective can do.

Eval sets (vljax.data.evalsets.load_eval_sets) are a dict with any of
  'zeroshot':  {'image': [N,H,W,3], 'label': [N] int, 'class_prompts': [[str]] per class}
  'retrieval': {'image': [N,H,W,3], 'captions': [str] (M), 'caption_image': [M] int or None}
Images are uint8 (normalised per batch with the set's 'image_options', default [-1, 1]) or
already-normalised float32. A set may also carry 'spec' (the source string it came from) and
'skipped' (bad records left out while loading).

Objectives with embed_images/embed_texts get zero-shot top-1 and retrieval recall@{1,5,10}
(objectives with an ITM head, itm_scores, rank ITC candidates by it: config.eval.itm_rerank_k);
objectives with generate(params, images, max_len) get captioning CIDEr-D and BLEU-4 on the
retrieval set's images against its captions; objectives that also ask questions (vqa_prefix) get
VQA accuracy on the 'vqa' set ({'image', 'question', 'answers', 'answer_type'}), and so do answer
classifiers (answer_vocabulary: vljax.evals.vqa_classifier); visual
tokenizers (tokenizer_outputs) get codebook usage and reconstruction on the held-out images
(vljax.evals.tokenizer); masked data modelling (masked_modelling_hits, BEiT-3) gets held-out
masked-token accuracies on the retrieval set's pairs (vljax.evals.masked_modeling). Every
evaluation also reports what it scored
(eval/zeroshot_examples, eval/retrieval_images, ...; docs/evaluation.md).
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax.configlib import ConfigError
from vljax.evals import common, rerank, retrieval, zeroshot


class ContrastiveEvaluator:
  """Zero-shot top-1 and retrieval recall through the objective's embedding heads."""

  def __init__(self, objective, eval_sets: dict[str, Any], tokenizer, max_len: int,
               mesh: Mesh, batch_size: int, rerank_k: int = 0):
    self.sets = eval_sets
    self.mesh = mesh
    self.batch_size = batch_size
    self._embed_images = jax.jit(objective.embed_images)
    self._embed_texts = jax.jit(objective.embed_texts)
    # Fusion objectives re-rank ITC candidates with their ITM head (vljax.evals.rerank).
    self.rerank_k = 0
    if rerank_k and hasattr(objective, "itm_scores") and "retrieval" in eval_sets:
      self.rerank_k = rerank.check_k(rerank_k)
      self._image_tokens = jax.jit(objective.encode_image_tokens)
      self._itm_scores = jax.jit(lambda ctx, image_idx, text_idx: objective.itm_scores(
          ctx[0], jnp.take(ctx[1], image_idx, axis=0), jnp.take(ctx[2], text_idx, axis=0)))
    self._prompt_tokens = self._captions = None
    self._counts: dict[str, float] = {}
    if "zeroshot" in eval_sets:
      prompts = eval_sets["zeroshot"]["class_prompts"]
      if len({len(p) for p in prompts}) != 1:
        raise ConfigError("Every zero-shot class needs the same number of prompt templates.")
      self.num_classes = len(prompts)
      self._prompt_tokens = tokenizer.encode([p for ps in prompts for p in ps], max_len)
      data = eval_sets["zeroshot"]
      # Classes with at least one scored image: a truncated set shows up as missing classes.
      self._counts.update({"eval/zeroshot_examples": float(len(data["image"])),
                           "eval/zeroshot_classes": float(len(np.unique(data["label"])))})
    if "retrieval" in eval_sets:
      data = eval_sets["retrieval"]
      self._captions = tokenizer.encode(data["captions"], max_len)
      caption_image = retrieval.check_caption_image(data["caption_image"], len(data["image"]),
                                                    len(data["captions"]))
      duplicates = retrieval.duplicate_captions(
          caption_image, retrieval.caption_text_ids(data["captions"]))
      self._counts.update({"eval/retrieval_images": float(len(data["image"])),
                           "eval/retrieval_captions": float(len(data["captions"])),
                           "eval/retrieval_duplicate_captions": float(duplicates)})

  def _embed(self, params: Any, data: dict[str, Any], cache: dict) -> jax.Array:
    # Zero-shot and retrieval often share their images: embed each array once.
    if id(data["image"]) not in cache:
      cache[id(data["image"])] = common.embed_images(self._embed_images, params, data,
                                                     self.mesh, self.batch_size)
    return cache[id(data["image"])]

  def __call__(self, params: Any) -> dict[str, float]:
    metrics, cache = dict(self._counts), {}
    if self._prompt_tokens is not None:
      data = self.sets["zeroshot"]
      zimg = self._embed(params, data, cache)
      zprompt = common.embed_all(self._embed_texts, params, self._prompt_tokens, self.mesh,
                                 self.batch_size)
      zcls = zeroshot.class_embeddings(zprompt, self.num_classes)
      metrics["eval/zeroshot_top1"] = zeroshot.top1(zimg, zcls, data["label"])
    if self._captions is not None:
      data = self.sets["retrieval"]
      zimg = self._embed(params, data, cache)
      ztxt = common.embed_all(self._embed_texts, params, self._captions, self.mesh,
                              self.batch_size)
      if not self.rerank_k:
        metrics.update(retrieval.recall_metrics(zimg, ztxt, data["caption_image"], self.mesh,
                                                captions=data["captions"]))
      else:
        metrics.update(retrieval.recall_metrics(zimg, ztxt, data["caption_image"], self.mesh,
                                                prefix="eval/itc_", captions=data["captions"]))
        metrics.update(rerank.reranked_recall_metrics(
            self._pair_scorer(params, data), zimg, ztxt, data["caption_image"], self.rerank_k,
            self.mesh, captions=data["captions"]))
        metrics["eval/itm_rerank_k"] = float(self.rerank_k)
    return metrics

  def _pair_scorer(self, params: Any, data: dict[str, Any]) -> rerank.PairScorer:
    """ITM scores of (image, caption) index pairs of the retrieval set, in sharded batches."""
    image_tokens = common.embed_images(self._image_tokens, params, data, self.mesh,
                                       self.batch_size)
    captions = jax.device_put(self._captions, NamedSharding(self.mesh, P()))

    def score(image_idx: np.ndarray, text_idx: np.ndarray) -> np.ndarray:
      out = common.embed_all(self._itm_scores, (params, image_tokens, captions),
                             (image_idx.astype(np.int32), text_idx.astype(np.int32)),
                             self.mesh, self.batch_size)
      return np.asarray(multihost_utils.process_allgather(out, tiled=True))
    return score


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
    self._prepare = common.image_prepare(data)
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
    self.baseline = self._constant_caption_baseline(data["captions"])

  def _constant_caption_baseline(self, captions: list[str]) -> dict[str, float]:
    """CIDEr-D of giving every image the set's most frequent caption: an image-blind baseline
    to read eval/cider against."""
    from vljax.evals import captioning  # pylint: disable=g-import-not-at-top
    frequent = collections.Counter(captions).most_common(1)[0][0]
    scores = captioning.compute_scores(self.references, [frequent] * len(self.references))
    return {"eval/cider_most_frequent_caption": float(scores["cider"])}

  def __call__(self, params: Any) -> dict[str, float]:
    from vljax.evals import captioning  # pylint: disable=g-import-not-at-top
    tokens = common.embed_all(self._generate, params, self.images, self.mesh, self.batch_size,
                              self._prepare)
    # Every process scores the whole set: gather the batch-sharded tokens to each host.
    tokens = multihost_utils.process_allgather(tokens, tiled=True)
    self.last_captions = self.tokenizer.decode_batch(np.asarray(tokens))
    scores = captioning.compute_scores(self.references, self.last_captions)
    return {"eval/cider": float(scores["cider"]), "eval/bleu4": float(scores["bleu4"]),
            "eval/captioning_examples": float(len(self.images)), **self.baseline}


class VqaEvaluator:
  """VQA accuracy (the official VQAv2 definition, vljax.evals.vqa) of greedy answers.

  Each question is asked as the objective's VQA prompt (objective.vqa_prefix(question),
  e.g. "answer en {question}") about its image; the answer is decoded greedily.
  """

  def __init__(self, objective, eval_sets: dict[str, Any], tokenizer, max_len: int,
               mesh: Mesh, batch_size: int):
    data = eval_sets["vqa"]
    self.images = data["image"]
    self._prepare = common.image_prepare(data)
    self.prefixes = objective.encode_prefixes([objective.vqa_prefix(q)
                                               for q in data["question"]])
    self.answers = data["answers"]
    self.answer_types = data.get("answer_type")
    if self.answer_types is not None and not any(self.answer_types):
      self.answer_types = None
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.batch_size = batch_size
    self._generate = lambda params, images, prefix: objective.generate(params, images, max_len,
                                                                       prefix)
    self.last_answers: list[str] = []
    self.baseline = self._best_constant_answer()

  def _best_constant_answer(self) -> dict[str, float]:
    """The accuracy of the best single answer given to every question (among the 20 most
    common human answers): what a model that ignores the image and question can score."""
    from vljax.evals import vqa  # pylint: disable=g-import-not-at-top
    counts = collections.Counter(a for answers in self.answers for a in answers)
    best, best_answer = -1.0, ""
    for answer, _ in counts.most_common(20):
      score = vqa.vqa_accuracy([answer] * len(self.answers), self.answers)["vqa_accuracy"]
      if score > best:
        best, best_answer = score, answer
    logging.info("VQA baseline: answering %r to every question scores %.4f.", best_answer,
                 best)
    return {"eval/vqa_accuracy_best_constant": float(best)}

  def __call__(self, params: Any) -> dict[str, float]:
    from vljax.evals import vqa  # pylint: disable=g-import-not-at-top
    tokens = common.embed_all(self._generate, params, (self.images, self.prefixes), self.mesh,
                              self.batch_size, self._prepare)
    tokens = multihost_utils.process_allgather(tokens, tiled=True)
    self.last_answers = self.tokenizer.decode_batch(np.asarray(tokens))
    scores = vqa.vqa_accuracy(self.last_answers, self.answers, self.answer_types)
    return {**{f"eval/{k}": float(v) for k, v in scores.items()}, **self.baseline}


class Evaluator:
  """Runs every evaluation that applies to the objective, under the mesh and axis rules.

  Attributes:
    parts: the evaluations, each params -> metrics.
    sources: {'zeroshot': SPEC, 'retrieval': SPEC} for the sets the parts score: the source
      string each set was read from ('' for a set built in code).
  """

  def __init__(self, parts: list[Callable[[Any], dict[str, float]]], mesh: Mesh, rules,
               sets: dict[str, Any] | None = None):
    self.parts = parts
    self.mesh = mesh
    self.rules = rules
    sets = sets or {}
    self.sources = {name: str(data.get("spec") or "") for name, data in sets.items()}
    # Bad records are reported per scored set; a set built in code has no count.
    self._skipped = {f"eval/{name}_skipped": float(data["skipped"])
                     for name, data in sets.items() if data.get("skipped") is not None}

  def __call__(self, params: Any) -> dict[str, float]:
    metrics = dict(self._skipped)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for part in self.parts:
        metrics.update(part(params))
    return metrics


def build_evaluator(config, objective, eval_sets: dict[str, Any], tokenizer, mesh: Mesh,
                    rules) -> Evaluator:
  """The evaluations that fit `objective`: contrastive heads, captioning."""
  parts, scored = [], set()
  decode_len = config.eval.get("decode_len", -1)
  if decode_len is None or decode_len < 0:
    decode_len = config.data.max_len
  if hasattr(objective, "embed_images") and hasattr(objective, "embed_texts"):
    parts.append(ContrastiveEvaluator(objective, eval_sets, tokenizer, config.data.max_len,
                                      mesh, config.eval.batch_size,
                                      config.eval.get("itm_rerank_k", 0)))
    scored.update(k for k in eval_sets if k in ("zeroshot", "retrieval"))
  if hasattr(objective, "generate") and "retrieval" in eval_sets:
    scored.add("retrieval")
    parts.append(CaptioningEvaluator(objective, eval_sets, tokenizer, decode_len, mesh,
                                     config.eval.batch_size))
  if hasattr(objective, "vqa_prefix") and "vqa" in eval_sets:
    scored.add("vqa")
    parts.append(VqaEvaluator(objective, eval_sets, tokenizer, decode_len, mesh,
                              config.eval.batch_size))
  if hasattr(objective, "answer_vocabulary") and "vqa" in eval_sets:
    from vljax.evals import vqa_classifier  # pylint: disable=g-import-not-at-top
    scored.add("vqa")
    parts.append(vqa_classifier.VqaClassifierEvaluator(
        objective, eval_sets, tokenizer, config.data.max_len, mesh, config.eval.batch_size))
  if hasattr(objective, "classify") and "classification" in eval_sets:
    from vljax.evals import classification  # pylint: disable=g-import-not-at-top
    scored.add("classification")
    parts.append(classification.ClassificationEvaluator(
        objective, eval_sets, tokenizer, config.data.max_len, mesh, config.eval.batch_size))
  if hasattr(objective, "tokenizer_outputs") and ({"retrieval", "zeroshot"} & set(eval_sets)):
    from vljax.evals import tokenizer  # pylint: disable=g-import-not-at-top
    scored.add("retrieval" if "retrieval" in eval_sets else "zeroshot")
    parts.append(tokenizer.TokenizerEvaluator(objective, eval_sets, mesh,
                                              config.eval.batch_size))
  if hasattr(objective, "masked_modelling_hits") and "retrieval" in eval_sets:
    from vljax.evals import masked_modeling  # pylint: disable=g-import-not-at-top
    scored.add("retrieval")
    parts.append(masked_modeling.MaskedModellingEvaluator(
        objective, eval_sets, tokenizer, config.data.max_len, mesh, config.eval.batch_size))
  return Evaluator(parts, mesh, rules, {name: eval_sets[name] for name in sorted(scored)})
