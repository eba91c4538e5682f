"""Orbax checkpoints: train state + data-iterator state, asynchronous, keep the last K; export.

Layout under WORKDIR:
  checkpoints/<step>/state   the TrainState (sharded arrays, restored straight onto the mesh)
  checkpoints/<step>/data    the input iterator state (JSON)
  export/params              params only, for inference (written at the end of training)
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored; the message names its path."""


class Checkpointer:
  """Saves and restores (train state, data-iterator state) pairs."""

  def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_state: dict | None) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {})), force=True)

  def restore(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the latest checkpoint onto the shardings of `abstract_state`, or None."""
    step = self.manager.latest_step()
    if step is None:
      return None
    path = os.path.join(self.directory, str(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise CheckpointError(
          f"The checkpoint at {path} could not be restored ({type(e).__name__}: {e}). It may be "
          f"truncated or written by an incompatible config. Move it aside to resume from the "
          f"previous checkpoint, or use a new --workdir to start afresh.") from e
    logging.info("Restored checkpoint %s", path)
    return step, restored["state"], dict(restored["data"] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def write_config(directory: str, config_json: str) -> None:
  """WORKDIR/config.json: the resolved config, so a checkpoint can be used without the flags."""
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
      f.write(config_json)


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No config.json in {directory}: is it a vljax workdir or export?")
  with open(path) as f:
    return json.load(f)


def export_params(workdir: str, params: Any, config_json: str) -> str:
  """Writes params only (no optimizer state) plus the config, for inference. Returns the path."""
  path = os.path.abspath(os.path.join(workdir, "export"))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, "params"), params, force=True)
  checkpointer.wait_until_finished()
  write_config(path, config_json)
  return path


def load_exported_params(path: str, abstract_params: Any | None = None) -> Any:
  """Loads params written by export_params (onto `abstract_params` shardings if given)."""
  params_dir = os.path.join(os.path.abspath(path), "params")
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"No exported params at {params_dir}.")
  return ocp.StandardCheckpointer().restore(params_dir, abstract_params)

