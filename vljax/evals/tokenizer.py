"""A visual tokenizer (VQ-KD) on held-out images: how much of its codebook it uses, and how well
its codes reconstruct the teacher's features.

For objectives with `tokenizer_outputs(params, images) -> [B, n + 1 + D] float32` (each
image's n codes, the mean cosine between its reconstruction and the teacher's n patch features,
and the mean of its n unit teacher features), over the images of the held-out retrieval (or
zero-shot) set, whole, in sharded batches:

  eval/codebook_usage        the fraction of the K codes that some held-out patch chose
  eval/codebook_perplexity   exp of the entropy of the codes' frequencies over those patches
  eval/teacher_cosine        the mean over patches of the reconstruction's cosine
  eval/teacher_cosine_mean_feature
                             the same for a constant reconstruction, the direction of the mean
                             held-out teacher feature: what a tokenizer that ignores the image
                             scores (teacher features of different patches are far from
                             orthogonal, so the cosine alone can look better than it is)
  eval/tokenizer_images      how many images were scored
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vljax.evals import common
from vljax.models import quantizer


class TokenizerEvaluator:
  """Codebook usage and reconstruction on the held-out images (module docstring)."""

  def __init__(self, objective, eval_sets: dict[str, Any], mesh: Mesh, batch_size: int):
    self.data = eval_sets["retrieval"] if "retrieval" in eval_sets else eval_sets["zeroshot"]
    self.num_codes, self.teacher_width = objective.num_codes, objective.teacher_width
    self.mesh, self.batch_size = mesh, batch_size
    self._prepare = common.image_prepare(self.data)
    self._outputs = jax.jit(objective.tokenizer_outputs)

  def __call__(self, params: Any) -> dict[str, float]:
    out = common.embed_all(self._outputs, params, self.data["image"], self.mesh,
                           self.batch_size, self._prepare)
    out = np.asarray(multihost_utils.process_allgather(out, tiled=True), np.float64)
    n = out.shape[1] - 1 - self.teacher_width
    codes = out[:, :n].astype(np.int32).reshape(-1)
    mean_features = out[:, n + 1:]
    direction = mean_features.mean(0) / np.linalg.norm(mean_features.mean(0))
    usage = quantizer.usage_metrics(jnp.asarray(codes), self.num_codes)
    return {"eval/codebook_usage": float(usage["codebook_usage"]),
            "eval/codebook_perplexity": float(usage["codebook_perplexity"]),
            "eval/teacher_cosine": float(np.mean(out[:, n])),
            "eval/teacher_cosine_mean_feature": float(np.mean(mean_features @ direction)),
            "eval/tokenizer_images": float(len(out))}
