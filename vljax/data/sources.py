"""Data sources by name, as written in config.data.train / config.data.eval.

Only the embedded synthetic dataset exists so far: 'synthetic'.
"""
from __future__ import annotations

from vljax.configlib import ConfigError
from vljax.data import synthetic

KNOWN = ("synthetic",)


def _check(spec: str) -> None:
  if spec not in KNOWN:
    raise ConfigError(f"Unknown data source {spec!r} in config.data; known sources: {KNOWN}.")


def get_source(spec: str, split: str, image_size: int, seed: int):
  """A grain random-access source of {'image', 'caption', 'label', 'key'} records."""
  _check(spec)
  return synthetic.SyntheticImageText(split=split, image_size=image_size, seed=seed)


def class_prompts(spec: str) -> list[list[str]]:
  """Zero-shot prompts of the source's classes: one list of prompts (templates) per class."""
  _check(spec)
  return synthetic.class_prompts()
