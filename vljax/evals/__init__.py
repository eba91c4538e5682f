"""Evaluations over a sharded model: zero-shot classification and image<->text retrieval."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from vljax.evals import common, retrieval, zeroshot


class ContrastiveEvaluator:
  """Zero-shot top-1 and retrieval recall for any objective with embed_images/embed_texts.

  eval_data: {'image': [N,H,W,3], 'text': [N,L] (one caption per image), 'label': [N]};
  prompt_tokens: [C*T, L] class prompts, class-major (T templates per class).
  """

  def __init__(self, objective, eval_data: dict[str, np.ndarray], prompt_tokens: np.ndarray,
               num_classes: int, mesh: Mesh, rules, batch_size: int = 256):
    self.data = eval_data
    self.prompts = prompt_tokens
    self.num_classes = num_classes
    self.mesh = mesh
    self.rules = rules
    self.batch_size = batch_size
    self._embed_images = jax.jit(objective.embed_images)
    self._embed_texts = jax.jit(objective.embed_texts)

  def __call__(self, params: Any) -> dict[str, float]:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      zimg = common.embed_all(self._embed_images, params, self.data["image"], self.mesh,
                              self.batch_size)
      ztxt = common.embed_all(self._embed_texts, params, self.data["text"], self.mesh,
                              self.batch_size)
      zprompt = common.embed_all(self._embed_texts, params, self.prompts, self.mesh,
                                 self.batch_size)
      zcls = zeroshot.class_embeddings(zprompt, self.num_classes)
      metrics = {"eval/zeroshot_top1": zeroshot.top1(zimg, zcls, self.data["label"])}
      metrics.update(retrieval.recall_metrics(zimg, ztxt, self.mesh))
    return metrics
