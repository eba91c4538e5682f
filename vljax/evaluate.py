"""Standalone evaluation of the latest checkpoint in a workdir, or of an export directory.

python -m vljax.evaluate --workdir=DIR [--config=configs/NAME.py[:args]] [--config.a.b=v ...]

DIR is a workdir (its latest checkpoint), an export directory (DIR/params, config.json and
tokenizer.model: `python -m vljax.interop import` writes one from Hugging Face, big_vision or
open_clip weights) or a workdir holding only its export (DIR/export/params).

Starts from the config the run was trained with (WORKDIR/config.json) and the tokenizer it
saved, so the evaluation sees exactly the run's eval sets and preprocessing; --config replaces
that config and --config.a.b=v overrides change it (e.g. --config.data.eval_zeroshot=SPEC to
score another set). Runs the evaluations that fit the objective, sharded over the available
devices, prints the results and appends them, with what was evaluated (checkpoint step, eval
sources, example counts, overrides), to WORKDIR/evaluations.jsonl. The training run's
metrics.jsonl is never written: a re-evaluation is not a row of the training run.
"""
from __future__ import annotations

import json
import os
import sys
import time

from vljax import main as main_lib

EVALUATIONS_FILE = "evaluations.jsonl"


def evaluate(config, workdir: str) -> dict[str, float]:
  import jax  # pylint: disable=g-import-not-at-top
  from vljax import sharding, train  # pylint: disable=g-import-not-at-top

  train.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  setup, tokenizer, params, step = train.load_for_inference(config, workdir, mesh)
  evaluator = train.make_evaluator(config, setup.objective, tokenizer, mesh, setup.rules)
  results = evaluator(params)
  record = {"checkpoint_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sources": dict(evaluator.sources),
            "overrides": [a for a in sys.argv[1:] if a.startswith("--config")],
            **{k: float(v) for k, v in sorted(results.items())}}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, EVALUATIONS_FILE), "a") as f:
      f.write(json.dumps(record) + "\n")
  for name, value in sorted(results.items()):
    print(f"{name} = {value:.4g}")
  weights = "exported params" if step is None else f"checkpoint step {step}"
  print(f"({weights}; sources {record['sources']}; appended to "
        f"{os.path.join(workdir, EVALUATIONS_FILE)})")
  return results


if __name__ == "__main__":
  main_lib.run_app(evaluate, config_from_workdir=True, log_name="evaluate")
