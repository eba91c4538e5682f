"""LiT end to end: a SigLIP run's image tower, locked, and a text tower trained against it."""
import os

import jax
import numpy as np
import pytest

from vljax import configlib, optim, sharding, train
from vljax.checkpoint import load_exported_params
from vljax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name_and_args: str, *overrides: str):
  config = configlib.load_config_file(os.path.join(ROOT, "configs", name_and_args))
  return configlib.apply_overrides(config, ["eval.every_steps=-1", "tensorboard=false",
                                            *overrides])


def _leaves(params):
  return {optim.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _step_flops(config) -> float:
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  return train.compiled_step_flops(config, tokenizer_lib.get_tokenizer(None), mesh)


def test_lit_locks_the_loaded_image_tower_bit_identically(tmp_path):
  base, lit = str(tmp_path / "siglip"), str(tmp_path / "lit")
  train.run(_config("siglip.py:scale=tiny"), base)
  train.run(_config(f"lit.py:scale=tiny,init={base}", "total_steps=6"), lit)

  before = _leaves(load_exported_params(os.path.join(base, "export")))
  after = _leaves(load_exported_params(os.path.join(lit, "export")))
  assert set(before) == set(after)
  image = [n for n in before if n.startswith("img/")]
  text = [n for n in before if n.startswith("txt/")]
  assert len(image) > 10 and len(text) > 10
  for name in image:  # loaded, then never changed: no update, no weight decay
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  # The text tower trained from its own random start, not from the SigLIP text tower.
  assert sum(not np.array_equal(after[n], before[n]) for n in text) > len(text) // 2
  assert configlib.read_run_config(lit)["init"]["path"] == base

  # Locked parameters have no optimizer state.
  config = _config(f"lit.py:scale=tiny,init={base}")
  tokenizer = tokenizer_lib.get_tokenizer(None)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  state_paths = [optim.param_path(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(setup.abstract_state.opt_state)[0]]
  assert not any("/img/" in f"/{p}" for p in state_paths)
  assert any("/txt/" in f"/{p}" for p in state_paths)


def test_lit_step_runs_no_backward_pass_through_the_locked_tower():
  # Compiled FLOPs of the same model trained whole and with the image tower locked: the locked
  # step skips the image tower's backward pass (about twice its forward FLOPs).
  locked = _config("lit.py:scale=tiny,init=/unused")
  whole = _config("lit.py:scale=tiny,init=/unused", "optim.freeze=[]")
  flops_locked, flops_whole = _step_flops(locked), _step_flops(whole)
  assert flops_locked < 0.8 * flops_whole, (flops_locked, flops_whole)


def test_lit_needs_weights_to_start_from(tmp_path):
  with pytest.raises(configlib.ConfigError, match="config.init.path is empty"):
    train.validate(_config("lit.py:scale=tiny"), 8, 1)
  with pytest.raises(configlib.ConfigError, match="config.init.path"):
    train.run(_config(f"lit.py:scale=tiny,init={tmp_path}/nothing"), str(tmp_path / "run"))
