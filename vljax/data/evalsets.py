"""Held-out evaluation sets named by config.data (see vljax.evals for the structure).

config.data.eval names one source used for everything it can serve:
  synthetic       zero-shot and retrieval on the same held-out images
  imagefolder:DIR zero-shot (class names = folder names, config.data.prompt_templates)
  tfds:NAME[:S]   zero-shot if its label feature has class names, else retrieval
  anything else   retrieval (records sharing an image, or a record with a list of
                  captions, give several captions per image)
config.data.eval_zeroshot / eval_retrieval, when set, name the source of that task instead.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from vljax.configlib import ConfigError
from vljax.data import pipeline, preprocess, sources


def _get(data_config, key: str, default: Any = None) -> Any:
  value = data_config.get(key, default) if hasattr(data_config, "get") else default
  return default if value in (None, "") else value


def _load(data_config, spec: str, tokenizer, require_caption: bool):
  if "|" in spec:
    raise ConfigError(f"Evaluation data cannot be a mixture: {spec!r}.")
  source = sources.get_source(spec, "heldout", data_config.image_size, data_config.seed,
                              data_config)
  data = pipeline.load_eval_data(
      source, tokenizer, image_size=data_config.image_size, max_len=data_config.max_len,
      num_examples=data_config.eval_examples,
      image_options=preprocess.image_options_from_config(data_config, data_config.image_size,
                                                         train=False),
      text_options=_text_options(data_config), require_caption=require_caption)
  return source, data


def _text_options(data_config) -> preprocess.TextOptions:
  return preprocess.TextOptions(lowercase=bool(_get(data_config, "lowercase", False)),
                                canonicalize=bool(_get(data_config, "canonicalize", False)))


def zeroshot_set(data_config, spec: str, tokenizer) -> dict[str, Any]:
  """{'image', 'label', 'class_prompts'} from a labelled source."""
  source, data = _load(data_config, spec, tokenizer, require_caption=False)
  prompts = sources.class_prompts(spec, source, _get(data_config, "prompt_templates"))
  if np.any(data["label"] < 0) or np.any(data["label"] >= len(prompts)):
    raise ConfigError(f"Zero-shot source {spec!r} has labels outside its {len(prompts)} "
                      f"classes.")
  return {"image": data["image"], "label": data["label"], "class_prompts": prompts}


def group_captions(data: dict[str, Any]) -> dict[str, Any]:
  """Records -> retrieval set: one row per distinct image, every caption of it."""
  first: dict[str, int] = {}
  keep, captions, caption_image = [], [], []
  for row, (image_id, caps) in enumerate(zip(data["image_id"], data["captions"])):
    if image_id not in first:
      first[image_id] = len(keep)
      keep.append(row)
    captions.extend(caps)
    caption_image.extend([first[image_id]] * len(caps))
  return {"image": data["image"][np.asarray(keep)], "captions": captions,
          "caption_image": np.asarray(caption_image, dtype=np.int32)}


def retrieval_set(data_config, spec: str, tokenizer) -> dict[str, Any]:
  """{'image', 'captions', 'caption_image'} from any captioned source."""
  _, data = _load(data_config, spec, tokenizer, require_caption=True)
  return group_captions(data)


def load_eval_sets(data_config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
  """The zero-shot and/or retrieval sets the config names."""
  spec = _get(data_config, "eval", "")
  zs_spec = _get(data_config, "eval_zeroshot", "")
  rt_spec = _get(data_config, "eval_retrieval", "")
  out: dict[str, Any] = {}
  if spec == "synthetic" and not zs_spec and not rt_spec:
    # The same held-out images serve both tasks (one caption per image).
    source, data = _load(data_config, spec, tokenizer, require_caption=True)
    return {
        "zeroshot": {"image": data["image"], "label": data["label"],
                     "class_prompts": sources.class_prompts(spec)},
        "retrieval": {"image": data["image"], "captions": data["caption"],
                      "caption_image": None},
    }
  if spec and not (zs_spec or rt_spec):
    kind = spec.partition(":")[0]
    if kind in ("imagefolder", "synthetic"):
      zs_spec = spec
    if kind == "synthetic":
      rt_spec = spec
    elif kind == "tfds":
      source = sources.get_source(spec, "heldout", data_config.image_size, data_config.seed,
                                  data_config)
      if source.label_names():
        zs_spec = spec
      else:
        rt_spec = spec
    elif kind != "imagefolder":
      rt_spec = spec
  if zs_spec:
    out["zeroshot"] = zeroshot_set(data_config, zs_spec, tokenizer)
  if rt_spec:
    out["retrieval"] = retrieval_set(data_config, rt_spec, tokenizer)
  return out
