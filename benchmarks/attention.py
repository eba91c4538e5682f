"""Train-step time with the fused attention (jax.nn.dot_product_attention) against the explicit
einsum-softmax-einsum it replaced, on one device, at a config's laptop size.

Both variants are compiled first; then rounds alternate between them (5 steps each per round),
and the medians over rounds are printed with their ratio last.

Usage: python benchmarks/attention.py [--config siglip] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax import configlib, sharding, train
from vljax.data import tokenizer as tokenizer_lib
from vljax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from train_helpers import random_batch  # pylint: disable=g-import-not-at-top,wrong-import-position


def explicit_attention(q, k, v, mask, dtype, probs_dropout=None, bias=None, scale=None):
  """The attention before the fused path: float32 logits, masked, softmax, weighted values."""
  del probs_dropout
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="siglip")
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  tokenizer = tokenizer_lib.get_tokenizer(None)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  fused = layers.attend
  variants = {}
  for name, fn in (("fused", fused), ("explicit", explicit_attention)):
    layers.attend = fn  # read when the step is traced, so each compiled step keeps its own
    config = configlib.load_config_file(
        os.path.join(ROOT, "configs", f"{args.config}.py:scale=laptop"))
    setup = train.build(config, tokenizer, mesh, epoch_size=None)
    state = train.init_state(setup, 0)
    batch = sharding.global_batch_from_host(random_batch(config, setup.objective), mesh,
                                            setup.batch_shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
      compiled = train.make_train_step(setup).lower(state, batch, jax.random.key(0)).compile()
    variants[name] = [compiled, state, batch]
  layers.attend = fused
  times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, variant in variants.items():
      compiled, state, batch = variant
      start = time.perf_counter()
      for _ in range(5):
        state, metrics = compiled(state, batch, jax.random.key(0))
      jax.block_until_ready(metrics["train/loss"])
      times[name].append((time.perf_counter() - start) / 5)
      variant[1] = state
  print(f"{args.config} laptop train step, batch {config.batch_size}, "
        f"{jax.devices()[0].platform} x1; median of {args.rounds} interleaved rounds")
  for name, values in times.items():
    print(f"  {name:9s} {statistics.median(values) * 1e3:8.1f} ms/step")
  print(f"explicit / fused step time: "
        f"{statistics.median(times['explicit']) / statistics.median(times['fused']):.3f}")


if __name__ == "__main__":
  main()
