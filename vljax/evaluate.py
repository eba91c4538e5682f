"""Standalone evaluation of the latest checkpoint in a workdir.

python -m vljax.evaluate --config=configs/siglip.py[:args] --workdir=DIR

Runs the config's evaluation suite (zero-shot top-1, retrieval recall@1/5/10) sharded over the
available devices, prints the results and appends them to WORKDIR/metrics.jsonl at the
checkpoint's step.
"""
from __future__ import annotations


from absl import logging

from vljax import main as main_lib


def evaluate(config, workdir: str) -> dict[str, float]:
  import jax  # pylint: disable=g-import-not-at-top
  from vljax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from vljax import sharding, train  # pylint: disable=g-import-not-at-top

  train.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  setup, tokenizer, step, state = train.load_latest(config, workdir, mesh)
  evaluator = train.make_evaluator(config, setup.objective, tokenizer, mesh, setup.rules)
  results = evaluator(state.params)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.tensorboard)
  writer.write(step, results)
  writer.close()
  for name, value in sorted(results.items()):
    logging.info("%s = %.4f", name, value)
    print(f"{name} = {value:.4f}")
  return results


if __name__ == "__main__":
  main_lib.run_app(evaluate)
