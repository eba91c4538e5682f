"""Entry point: python -m vljax.main --config=configs/siglip.py[:args] --workdir=DIR [--config.a.b=v]."""
from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags, logging

from vljax import configlib

FLAGS = flags.DEFINE_string("config", None, "Config file, optionally with :k=v,... arguments.")
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates --config.a.b=v overrides (handled by configlib) from the other flags."""
  overrides, rest = [], []
  for arg in argv:
    if arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return overrides, rest


def load_from_flags(overrides: list[str]):
  if not FLAGS.value:
    raise configlib.ConfigError("--config is required, e.g. --config=configs/siglip.py.")
  config = configlib.load_config_file(FLAGS.value)
  return configlib.apply_overrides(config, overrides)


class _OwnInfoOnly(py_logging.Filter):
  """Console filter: vljax's own INFO lines, and only warnings and errors from libraries."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    own = f"{os.sep}vljax{os.sep}" in record.pathname
    return own or record.levelno >= py_logging.WARNING


def run_app(main_fn) -> None:
  """Runs `main_fn(config, workdir)` with config errors printed as one readable line."""
  overrides, argv = split_overrides(sys.argv)

  def _main(_):
    if not WORKDIR.value:
      raise app.UsageError("--workdir is required.")
    try:
      config = load_from_flags(overrides)
    except configlib.ConfigError as e:
      print(f"Config error: {e}", file=sys.stderr)
      sys.exit(2)
    os.makedirs(WORKDIR.value, exist_ok=True)
    # Everything goes to WORKDIR/log.*; the console shows vljax's progress lines.
    logging.get_absl_handler().use_absl_log_file("log", WORKDIR.value)
    logging.set_verbosity(logging.INFO)
    logging.set_stderrthreshold(logging.INFO)
    console = py_logging.StreamHandler(sys.stderr)
    console.setFormatter(py_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console.addFilter(_OwnInfoOnly())
    logging.set_stderrthreshold(logging.FATAL)  # the console handler below replaces it
    py_logging.getLogger().addHandler(console)
    try:
      main_fn(config, WORKDIR.value)
    except configlib.ConfigError as e:
      print(f"Config error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main, argv=argv)


def _train(config, workdir):
  from vljax import train  # pylint: disable=g-import-not-at-top  (jax after flags)
  train.run(config, workdir)


if __name__ == "__main__":
  run_app(_train)
