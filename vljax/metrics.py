"""Metric output: a readable progress line, WORKDIR/metrics.jsonl and TensorBoard event files."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

import jax
import numpy as np


def _to_float(value) -> float | None:
  value = np.asarray(jax.device_get(value))
  if value.size != 1:
    return None
  return float(value.reshape(()))


class MetricWriter:
  """Writes scalar metrics from process 0; other processes write nothing."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, object]) -> dict[str, float]:
    """Appends one JSON object {step, name: value, ...}; returns the scalars written."""
    scalars = {}
    for name, value in metrics.items():
      if value is None:
        continue
      number = _to_float(value)
      if number is not None:
        scalars[name] = number
    if not self.active:
      return scalars
    record = {"step": int(step)}
    # JSON has no NaN/inf: write them as strings so the file stays parseable.
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, step)
      self._tb.flush()
    return scalars

  def close(self):
    if self._tb is not None:
      self._tb.close()


def progress_line(step: int, total: int, scalars: Mapping[str, float]) -> str:
  """'step 120/1000 | loss 3.21 | lr 1.0e-03 | ...' from the metrics worth reading at a glance."""
  short = [("train/loss", "loss", "{:.4f}"), ("train/lr", "lr", "{:.2e}"),
           ("train/scale", "t", "{:.2f}"), ("train/bias", "b", "{:.2f}"),
           ("train/grad_norm", "|g|", "{:.3f}"), ("perf/step_time_s", "s/step", "{:.3f}"),
           ("perf/examples_per_s", "ex/s", "{:.1f}"),
           ("perf/examples_per_s_per_device", "ex/s/dev", "{:.1f}"),
           ("perf/tflops_per_device", "TFLOP/s/dev", "{:.4f}")]
  parts = [f"step {step}/{total}"]
  for key, label, fmt in short:
    if key in scalars:
      parts.append(f"{label} {fmt.format(scalars[key])}")
  return " | ".join(parts)


def log_progress(step: int, total: int, scalars: Mapping[str, float]) -> None:
  logging.info("%s", progress_line(step, total, scalars))


def read_metrics(workdir: str) -> list[dict]:
  """Reads WORKDIR/metrics.jsonl back (for tests and tools)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
