"""Data sources by name, as written in config.data.train / config.data.eval.

Spec strings:
  synthetic                      the embedded synthetic dataset
  webdataset:GLOB                img2dataset-style tar shards ({00000..01242} and * work)
  jsonl:PATH, csv:PATH           one record per line: image path (relative to the file) + caption
  arrayrecord:GLOB               shards written by `python -m vljax.data.convert`
  tfds:NAME[:SPLIT]              a prepared TFDS dataset (TFDS_DATA_DIR or config.data.tfds_data_dir)
  imagefolder:DIR                DIR/CLASS/*.jpg, for zero-shot classification
  W1*SPEC1|W2*SPEC2              a weighted mixture (training only)
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from vljax.configlib import ConfigError
from vljax.data import formats
from vljax.data import mixture
from vljax.data import synthetic

KNOWN = ("synthetic", "webdataset", "jsonl", "csv", "arrayrecord", "tfds", "imagefolder")

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
)

# Split names of `tfds:NAME` without an explicit split.
_TFDS_SPLITS = {"train": "train", "heldout": "test"}


def _prefix(spec: str) -> tuple[str, str]:
  name, _, arg = spec.partition(":")
  if name not in KNOWN:
    raise ConfigError(f"Unknown data source {spec!r} in config.data; known sources: {KNOWN} "
                      f"(e.g. 'webdataset:/data/cc12m/{{00000..01242}}.tar'), or a mixture "
                      f"'0.7*SPEC|0.3*SPEC'.")
  if name != "synthetic" and not arg:
    raise ConfigError(f"Data source {spec!r} needs a path or name after '{name}:'.")
  return name, arg


def _opt(options: Mapping[str, Any] | None, key: str, default: Any) -> Any:
  if not options:
    return default
  value = options.get(key, default) if hasattr(options, "get") else default
  return default if value in (None, "") else value


def get_source(spec: str, split: str, image_size: int, seed: int,
               options: Mapping[str, Any] | None = None) -> Any:
  """A random-access source of raw records (see vljax.data.formats), or a Mixture.

  Args:
    spec: the source string (see the module docstring).
    split: 'train' or 'heldout' (selects the synthetic split and the default TFDS split).
    image_size: size of synthetic images.
    seed: seed of synthetic data.
    options: config.data, for the feature keys (image_key, caption_key, label_key) and
      tfds_data_dir.

  Raises:
    ConfigError: unknown prefix or a missing path/name.
    formats.EmptySourceError: the source yields nothing (naming the path).
  """
  if "|" in spec:
    parts = mixture.split_spec(spec)
    return mixture.Mixture(
        [get_source(s, split, image_size, seed + k, options) for k, (_, s) in enumerate(parts)],
        [w for w, _ in parts], names=[s for _, s in parts])
  name, arg = _prefix(spec)
  image_key = _opt(options, "image_key", "image")
  caption_key = _opt(options, "caption_key", "caption")
  label_key = _opt(options, "label_key", "label")
  if name == "synthetic":
    return synthetic.SyntheticImageText(split=split, image_size=image_size, seed=seed)
  if name == "webdataset":
    return formats.WebDataset(arg, caption_key=caption_key)
  if name == "jsonl":
    return formats.JsonLines(arg, image_key, caption_key, label_key)
  if name == "csv":
    return formats.Csv(arg, image_key, caption_key, label_key)
  if name == "arrayrecord":
    return formats.ArrayRecord(arg)
  if name == "imagefolder":
    return formats.ImageFolder(arg)
  # tfds
  dataset, _, tfds_split = arg.partition(":")
  data_dir = _opt(options, "tfds_data_dir", None) or os.environ.get("TFDS_DATA_DIR")
  return formats.Tfds(dataset, tfds_split or _TFDS_SPLITS.get(split, split),
                      image_key=image_key, text_key=caption_key, label_key=label_key,
                      data_dir=data_dir)


def class_prompts(spec: str, source: Any = None,
                  templates: Sequence[str] | None = None) -> list[list[str]]:
  """Zero-shot prompts of the source's classes: one list of prompts (templates) per class.

  The synthetic data has its own prompts; imagefolder takes class names from folder names,
  tfds from its label feature; `templates` ('{}' = class name) default to DEFAULT_TEMPLATES.
  """
  name, _ = _prefix(spec)
  if name == "synthetic":
    return synthetic.class_prompts()
  names = None
  if isinstance(source, formats.ImageFolder):
    names = source.class_names
  elif isinstance(source, formats.Tfds):
    names = source.label_names()
  if not names:
    raise ConfigError(f"Zero-shot evaluation needs class names; {spec!r} has none "
                      f"(use imagefolder:DIR or a TFDS dataset with a ClassLabel feature).")
  templates = list(templates or DEFAULT_TEMPLATES)
  return [[t.format(n.replace("_", " ")) for t in templates] for n in names]
