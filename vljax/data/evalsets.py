"""Held-out evaluation sets named by config.data.eval (see vljax.evals for the structure)."""
from __future__ import annotations

from typing import Any

import ml_collections

from vljax.data import pipeline, sources


def load_eval_sets(data_config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
  """Zero-shot and retrieval sets; for the synthetic data both use the same held-out images."""
  source = sources.get_source(data_config.eval, "heldout", data_config.image_size,
                              data_config.seed)
  data = pipeline.load_eval_data(source, tokenizer, image_size=data_config.image_size,
                                 max_len=data_config.max_len,
                                 num_examples=data_config.eval_examples)
  return {
      "zeroshot": {"image": data["image"], "label": data["label"],
                   "class_prompts": sources.class_prompts(data_config.eval)},
      "retrieval": {"image": data["image"], "captions": data["caption"],
                    "caption_image": None},
  }
