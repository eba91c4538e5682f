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
  """Writes scalar metrics from process 0; other processes write nothing.

  `resumed_from`: the step a resumed run restored. Rows that an earlier attempt wrote past it
  are dropped from the JSON lines file and purged from TensorBoard, so the steps the resumed
  run repeats appear once, with the resumed run's values.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, filename: str = "metrics.jsonl",
               resumed_from: int | None = None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      if resumed_from is not None:
        _drop_rows_after(self.path, resumed_from)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        purge = None if resumed_from is None else resumed_from + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

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
      self._write_tensorboard(step, scalars)
    return scalars

  def _write_tensorboard(self, step: int, scalars: Mapping[str, float]) -> None:
    # add_scalar would rewrite tags such as 'eval/i2t_recall@1' to 'eval/i2t_recall_1'; the
    # summary proto is written directly so TensorBoard shows the names metrics.jsonl has.
    from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=g-import-not-at-top
    summary = Summary(value=[Summary.Value(tag=name, simple_value=value)
                             for name, value in scalars.items()])
    self._tb._get_file_writer().add_summary(summary, step)  # pylint: disable=protected-access
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites a JSON lines file without its rows past `step` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
  if len(kept) == len(lines):
    return
  logging.info("Resumed at step %d: dropped %d rows past it from %s.", step,
               len(lines) - len(kept), path)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
  os.replace(tmp, path)


def progress_line(step: int, total: int, scalars: Mapping[str, float]) -> str:
  """'step 120/1000 | loss 3.21 | lr 1.0e-03 | ...' from the metrics worth reading at a glance."""
  short = [("train/loss", "loss", "{:.4f}"), ("train/lr", "lr", "{:.2e}"),
           ("train/scale", "t", "{:.2f}"), ("train/bias", "b", "{:.2f}"),
           ("train/teacher_cosine", "cos", "{:.3f}"), ("train/codebook_usage", "codes used", "{:.1%}"),
           ("train/grad_norm", "|g|", "{:.3f}"), ("perf/step_time_s", "s/step", "{:.3f}"),
           ("perf/examples_per_s", "ex/s", "{:.1f}"),
           ("perf/examples_per_s_per_device", "ex/s/dev", "{:.1f}"),
           ("perf/tflops_per_device", "TFLOP/s/dev", "{:.4f}"), ("perf/mfu", "MFU", "{:.1%}")]
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
