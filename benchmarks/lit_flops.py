"""Compiled FLOPs of one train step with the image tower locked (LiT) vs trained.

A locked tower gets no backward pass: the step differentiates only the trainable parameters,
so the image tower runs forward only. Prints XLA's cost-analysis FLOPs of both compiled steps
(one device, nothing is run) and their ratio.

Usage: python benchmarks/lit_flops.py [--config scale=laptop]
"""
from __future__ import annotations

import argparse
import os

import jax

from vljax import configlib, sharding, train
from vljax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_flops(config) -> float:
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  return train.compiled_step_flops(config, tokenizer_lib.get_tokenizer(None), mesh)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="scale=laptop", help="configs/lit.py arguments.")
  args = parser.parse_args()
  path = os.path.join(ROOT, "configs", f"lit.py:{args.config},init=/not/read")
  locked = configlib.load_config_file(path)
  whole = configlib.apply_overrides(configlib.load_config_file(path), ["optim.freeze=[]"])
  flops_locked, flops_whole = step_flops(locked), step_flops(whole)
  print(f"config lit.py:{args.config}, batch {locked.batch_size}")
  print(f"image tower trained: {flops_whole / 1e9:10.2f} GFLOP per step")
  print(f"image tower locked:  {flops_locked / 1e9:10.2f} GFLOP per step")
  print(f"locked / trained:    {flops_locked / flops_whole:10.3f}")


if __name__ == "__main__":
  main()
