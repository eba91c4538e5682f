"""Orbax checkpoints: train state + data-iterator state, asynchronous, keep the last K; export.

Layout under WORKDIR:
  config.json                the resolved config of the run
  tokenizer.model            the sentencepiece model the run tokenises with
  checkpoints/<step>/state   the TrainState (sharded arrays, restored straight onto the mesh)
  checkpoints/<step>/data    the input iterator state (JSON)
  export/params              params only, for inference (written at the end of training),
  export/config.json, export/tokenizer.model
  unrestorable_checkpoints/<step>   checkpoints moved aside by on_restore_error="previous"
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp


ON_RESTORE_ERROR = ("stop", "previous")


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored; the message names its path."""


class Checkpointer:
  """Saves and restores (train state, data-iterator state) pairs."""

  def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.every_steps = every_steps
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_state: dict | None) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {})), force=True)

  def restore(self, abstract_state: Any, on_error: str = "stop"
              ) -> tuple[int, Any, dict] | None:
    """Restores the latest checkpoint onto the shardings of `abstract_state`, or None.

    A latest checkpoint that cannot be restored raises CheckpointError naming it (on_error
    "stop"; nothing is deleted), or (on_error "previous") is moved aside to
    WORKDIR/unrestorable_checkpoints/ and the next older one is tried.
    """
    if on_error not in ON_RESTORE_ERROR:
      raise ValueError(f"on_error={on_error!r}; choose one of {ON_RESTORE_ERROR}.")
    while True:
      step = self.manager.latest_step()
      if step is None:
        return None
      path = os.path.join(self.directory, str(step))
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # Orbax raises many types for unreadable files.
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if on_error == "stop":
          raise CheckpointError(
              f"The checkpoint at {path} could not be restored ({reason}). It may be truncated "
              f"or written by an incompatible config. Nothing was deleted. Set "
              f"--config.checkpoint.on_restore_error=previous to move it aside and resume "
              f"from the previous checkpoint, or use a new --workdir to start afresh.") from e
        self._move_aside(step, path, reason)
        continue
      logging.info("Restored checkpoint %s", path)
      return step, restored["state"], dict(restored["data"] or {})

  def _move_aside(self, step: int, path: str, reason: str) -> None:
    """Moves an unrestorable checkpoint out of the manager's directory (process 0)."""
    aside = os.path.join(self.workdir, "unrestorable_checkpoints", f"{step}-{int(time.time())}")
    logging.warning("The checkpoint at %s could not be restored (%s); moving it to %s and "
                    "trying the previous one.", path, reason, aside)
    self.manager.close()
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      shutil.move(path, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"vljax_checkpoint_moved_{step}")
    self.manager = self._open()

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


def write_tokenizer(directory: str, tokenizer: Any) -> None:
  """DIRECTORY/tokenizer.model: the run's tokenizer travels with its checkpoints and export."""
  from vljax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    tokenizer_lib.save_to_dir(tokenizer, directory)


def export_params(workdir: str, params: Any, config_json: str, tokenizer: Any = None) -> str:
  """Writes params only (no optimizer state), the config and the tokenizer, for inference.

  Returns the export directory.
  """
  return write_export(os.path.join(workdir, "export"), params, config_json, tokenizer)


def write_export(path: str, params: Any, config_json: str, tokenizer: Any = None) -> str:
  """Writes an export directory at `path` itself (params/, config.json, tokenizer.model).

  Returns its absolute path.
  """
  path = os.path.abspath(path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, "params"), params, force=True)
  checkpointer.wait_until_finished()
  write_config(path, config_json)
  if tokenizer is not None:
    write_tokenizer(path, tokenizer)
  return path


def load_exported_params(path: str, abstract_params: Any | None = None) -> Any:
  """Loads params written by export_params (onto `abstract_params` shardings if given)."""
  params_dir = os.path.join(os.path.abspath(path), "params")
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"No exported params at {params_dir}.")
  return ocp.StandardCheckpointer().restore(params_dir, abstract_params)

