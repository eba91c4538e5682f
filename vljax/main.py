"""Entry point: python -m vljax.main --config=configs/siglip.py[:args] --workdir=DIR [--config.a.b=v]."""
from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags, logging

from vljax import configlib

FLAGS = flags.DEFINE_string("config", None, "Config file, optionally with :k=v,... arguments.")
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run started by "
    "hand (see launch/). TPU pods and SLURM jobs are detected without it.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, n).")
DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Build and compile the train step for the configured mesh, write "
    "WORKDIR/compile.json (per-device memory, FLOPs, compile time) and exit without training.")
DRY_RUN_VOCAB = flags.DEFINE_integer(
    "dry_run_vocab_size", None, "With --dry_run: size the text embedding for this many pieces "
    "without a tokenizer file (e.g. 32000 for the paper recipes).")


def init_distributed() -> None:
  """Joins a multi-process run: explicit flags, or what jax detects (TPU pod, SLURM)."""
  import jax  # pylint: disable=g-import-not-at-top
  if NUM_PROCESSES.value is not None and NUM_PROCESSES.value > 1:
    if COORDINATOR.value is None or PROCESS_ID.value is None:
      raise app.UsageError("--num_processes needs --coordinator_address and --process_id.")
    # CPU devices of several processes talk through gloo (no effect on GPU/TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                               process_id=PROCESS_ID.value)
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates --config.a.b=v overrides (handled by configlib) from the other flags."""
  overrides, rest = [], []
  for arg in argv:
    if arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return overrides, rest


def load_from_flags(overrides: list[str], notes: list[str] | None = None,
                    workdir_config: str | None = None):
  """--config (or, without it, WORKDIR/config.json when `workdir_config` names a workdir) with
  the --config.a.b=v overrides applied."""
  if FLAGS.value:
    config = configlib.load_config_file(FLAGS.value)
  elif workdir_config is not None:
    config = configlib.load_run_config(workdir_config)
    if notes is not None:
      notes.append(f"starting from {os.path.join(workdir_config, 'config.json')}.")
  else:
    raise configlib.ConfigError("--config is required, e.g. --config=configs/siglip.py.")
  return configlib.apply_overrides(config, overrides, notes)


# The vljax package's own source files, wherever the checkout or the venv lives (a clone named
# 'vljax' with its .venv inside must not let library INFO lines through).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SITE_DIRS = ("site-packages", "dist-packages")


def is_own_source(pathname: str) -> bool:
  path = os.path.abspath(pathname)
  return path.startswith(_PACKAGE_DIR) and not any(
      f"{os.sep}{d}{os.sep}" in path[len(_PACKAGE_DIR) - 1:] for d in _SITE_DIRS)


class _OwnInfoOnly(py_logging.Filter):
  """Console filter: vljax's own INFO lines, and only warnings and errors from libraries."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return is_own_source(record.pathname) or record.levelno >= py_logging.WARNING


def run_app(main_fn, config_from_workdir: bool = False, log_name: str = "log") -> None:
  """Runs `main_fn(config, workdir)` with config errors printed as one readable line.

  config_from_workdir: without --config, start from WORKDIR/config.json (evaluation of a run).
  """
  overrides, argv = split_overrides(sys.argv)

  def _main(_):
    if not WORKDIR.value:
      raise app.UsageError("--workdir is required.")
    notes: list[str] = []
    try:
      config = load_from_flags(overrides, notes,
                               WORKDIR.value if config_from_workdir else None)
    except configlib.ConfigError as e:
      print(f"Config error: {e}", file=sys.stderr)
      sys.exit(2)
    os.makedirs(WORKDIR.value, exist_ok=True)
    # Everything goes to WORKDIR/log.*; the console shows vljax's progress lines.
    logging.get_absl_handler().use_absl_log_file(log_name, WORKDIR.value)
    logging.set_verbosity(logging.INFO)
    console = py_logging.StreamHandler(sys.stderr)
    console.setFormatter(py_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console.addFilter(_OwnInfoOnly())
    logging.set_stderrthreshold(logging.FATAL)  # the console handler below replaces it
    py_logging.getLogger().addHandler(console)
    for note in notes:
      logging.info("Config: %s", note)
    init_distributed()
    try:
      main_fn(config, WORKDIR.value)
    except configlib.ConfigError as e:
      print(f"Config error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main, argv=argv)


def _train(config, workdir):
  from vljax import train  # pylint: disable=g-import-not-at-top  (jax after flags)
  if DRY_RUN.value:
    train.dry_run(config, workdir, DRY_RUN_VOCAB.value)
  else:
    train.run(config, workdir)


if __name__ == "__main__":
  run_app(_train)
