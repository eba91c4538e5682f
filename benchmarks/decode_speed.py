"""Greedy decoding speed of CoCa: KV-cached steps vs recomputing the whole prefix every step.

Builds a CoCa of the config's size with freshly initialised weights, compiles greedy decoding
of `--len` tokens for `--batch` images both ways (EOS disabled, so every row decodes every
position), checks that both give the same tokens, and prints generated tokens per second
(best of `--repeats` timed runs, after one compiling run).

Usage: python benchmarks/decode_speed.py [--config scale=laptop] [--batch 64] [--len 24]
"""
from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax import configlib, decode
from vljax.data import tokenizer as tokenizer_lib
from vljax.objectives import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="scale=laptop", help="configs/coca.py arguments.")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--len", type=int, default=0, help="Tokens per caption (0: max_len).")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"coca.py:{args.config}"))
  length = args.len or config.data.max_len
  if length > config.data.max_len:
    configlib.apply_overrides(config, [f"data.max_len={length}"])
  tokenizer = tokenizer_lib.get_tokenizer(config.tokenizer.path or None)
  obj = make_objective(config, tokenizer)
  size = config.data.image_size
  images = jax.random.normal(jax.random.key(0), (args.batch, size, size, 3))
  params = nn.meta.unbox(jax.jit(obj.init)(
      jax.random.key(1), {"image": images[:1], "text": jnp.ones((1, length), jnp.int32)}))

  def run(params, images, cached):
    state = obj.init_decode_state(params, images, length, cached=cached)
    # eos_id -1 never matches: every row decodes all `length` positions.
    return decode.greedy(obj.step_fn(params, cached), state, obj.start_tokens(len(images)),
                         length, eos_id=-1, pad_id=obj.pad_id)[0]

  print(f"CoCa {args.config}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M "
        f"params, batch {args.batch}, {length} tokens, {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}")
  outputs = {}
  for cached in (True, False):
    fn = jax.jit(run, static_argnums=2)
    start = time.time()
    outputs[cached] = np.asarray(fn(params, images, cached))
    compile_s = time.time() - start
    best = float("inf")
    for _ in range(args.repeats):
      start = time.time()
      fn(params, images, cached).block_until_ready()
      best = min(best, time.time() - start)
    name = "cached  " if cached else "uncached"
    print(f"{name}: {args.batch * length / best:10.1f} tokens/s  ({best * 1e3:.1f} ms per "
          f"batch; first call incl. compile {compile_s:.1f} s)")
  # The model's own EOS (which the timed runs decode past) ends a caption: compare up to it;
  # the full-prefix decoder masks everything after a caption's EOS, the cache does not.
  tokens = outputs[True]
  real = np.cumsum(tokens == obj.eos_id, axis=1) - (tokens == obj.eos_id) == 0
  same = np.array_equal(tokens[real], outputs[False][real])
  print(f"cached and uncached captions identical (up to EOS): {same}")


if __name__ == "__main__":
  main()
