"""A dense layer's training step on [B, L, D] activations: as one 3-D dot_general, as a 2-D matmul
over the flattened [B * L, D] (vljax.models.layers.matmul_dot_general), and as the MLP block.

The gradient of a dot whose input has several free dims reaches XLA's CPU backend as a
kernel-gradient dot it lays out badly (a transposed copy of the cotangent, then a strided
matmul); flattening the input first gives the same products and sums in a layout it runs
well. Each variant is jitted once; the variants then take turns, `--steps` calls each per round,
and the median call time of each and the ratios are printed with the load average.

Usage: python benchmarks/dense_layout.py [--rounds 7] [--steps 20] [--batch 128] [--length 24]
       [--width 128] [--mlp 512]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vljax.models import layers  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--length", type=int, default=24)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--mlp", type=int, default=512)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, args.length, args.width)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(args.width, args.mlp)) / args.width ** 0.5, jnp.float32)
  dims = (((2,), (0,)), ((), ()))

  def grad_of(dot):
    return jax.jit(jax.grad(lambda w, x: jnp.sum(dot(x, w, dims) ** 2), argnums=(0, 1)))

  mlp = layers.MlpBlock(args.mlp)
  params = mlp.init(jax.random.key(0), x)
  variants = {
      "dense, 3-D dot_general": (grad_of(jax.lax.dot_general), (w, x)),
      "dense, 2-D matmul": (grad_of(layers.matmul_dot_general), (w, x)),
      "MlpBlock (2-D matmuls)": (jax.jit(jax.grad(
          lambda p, x: jnp.sum(mlp.apply(p, x) ** 2), argnums=(0, 1))), (params, x)),
  }
  # Same values: the 2-D form only changes the shapes XLA sees.
  a, b = (variants[k][0](*variants[k][1]) for k in list(variants)[:2])
  for u, v in zip(a, b):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
  times = {name: [] for name in variants}
  for fn, fn_args in variants.values():
    jax.block_until_ready(fn(*fn_args))
  load = os.getloadavg()[0]
  for _ in range(args.rounds):
    for name, (fn, fn_args) in variants.items():  # interleaved: noise hits every variant
      start = time.perf_counter()
      for _ in range(args.steps):
        out = fn(*fn_args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / args.steps)
  print(f"gradient of a dense layer [{args.batch}, {args.length}, {args.width}] -> "
        f"{args.mlp} on {jax.devices()[0].platform}; median of {args.rounds} interleaved rounds "
        f"of {args.steps} calls; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
  medians = {name: statistics.median(t) for name, t in times.items()}
  for name, m in medians.items():
    print(f"  {name:26s} {1000 * m:7.2f} ms")
  print(f"3-D / 2-D: {medians['dense, 3-D dot_general'] / medians['dense, 2-D matmul']:.2f}x")


if __name__ == "__main__":
  main()
