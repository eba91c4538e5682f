"""Masked data modelling (BEiT-3) on held-out image-caption pairs: how many masked visual and
text tokens the model predicts.

For objectives with `masked_modelling_hits(params, images, tokens, example_ids) -> [B, 2T]`
(per pair and per term: the masked positions predicted right, the masked positions; the masks
fixed by the example's id) and `TERMS` names, over every caption of the held-out retrieval set
with its own image, whole, in sharded batches (common.embed_all; the padded last batch is cut
off):

  eval/TERM_accuracy          predicted right / masked positions, over the whole set, for TERM
                              in image_mim, text_mlm, pair_mlm, pair_mim
  eval/masked_modelling_pairs how many (image, caption) pairs were scored
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vljax.evals import common
from vljax.evals import retrieval


class MaskedModellingEvaluator:
  """Held-out masked-token accuracies (module docstring)."""

  def __init__(self, objective, eval_sets: dict[str, Any], tokenizer, max_len: int,
               mesh: Mesh, batch_size: int):
    data = eval_sets["retrieval"]
    self.terms = tuple(objective.TERMS)
    # caption_image None: caption i is image i's (the synthetic set's one caption an image).
    pair_image = retrieval.check_caption_image(data["caption_image"], len(data["image"]),
                                               len(data["captions"]))
    self.inputs = (np.asarray(data["image"])[pair_image],
                   tokenizer.encode(data["captions"], max_len),
                   np.arange(len(pair_image), dtype=np.int32))
    self.prepare = common.image_prepare(data)
    self.mesh, self.batch_size = mesh, batch_size
    self._hits = jax.jit(objective.masked_modelling_hits)

  def pair_counts(self, params: Any) -> np.ndarray:
    """[pairs, 2 * len(terms)]: each pair's hits and masked positions, term by term."""
    out = common.embed_all(self._hits, params, self.inputs, self.mesh, self.batch_size,
                           self.prepare)
    return np.asarray(multihost_utils.process_allgather(out, tiled=True), np.float64)

  def __call__(self, params: Any) -> dict[str, float]:
    counts = self.pair_counts(params)
    sums = counts.sum(0)
    metrics = {f"eval/{term}_accuracy": float(sums[2 * k] / max(sums[2 * k + 1], 1.0))
               for k, term in enumerate(self.terms)}
    metrics["eval/masked_modelling_pairs"] = float(len(counts))
    return metrics
