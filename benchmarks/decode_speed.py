"""Greedy decoding speed with a decoding cache vs recomputing the whole prefix every step.

Two models, freshly initialised at their configs' sizes, each decoding `--len` tokens for
`--batch` images both ways (EOS disabled, so every row decodes every position):
  CoCa  objective-level: CocaObjective.step_fn(cached=True), whose cache holds the self-attention
        keys/values and each multimodal layer's cross-attention keys/values of the image
        (computed once), vs cached=False, the full decoder over the prefix every step.
  PaLI  model-level (no objective): PaLI.init_cache (image encoder, text encoder and every
        decoder layer's cross-attention keys/values, once) + PaLI.decode_step, vs PaLI.__call__
        on the image, the prompt and the whole target prefix every step.
Every variant is compiled first; then each timed round runs every variant once, in turn, so
that load from other jobs on the machine falls on all of them alike, and the table reports the
median over rounds. Both ways of decoding must give the same tokens (checked, up to EOS).

Usage: python benchmarks/decode_speed.py [--config scale=laptop] [--pali_config scale=laptop]
  [--batch 64] [--len 24] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax import configlib, decode
from vljax.data import tokenizer as tokenizer_lib
from vljax.models import pali
from vljax.objectives import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _num_params(params: Any) -> float:
  return sum(x.size for x in jax.tree.leaves(params)) / 1e6


def _up_to_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  """True at each row's tokens up to and including its first EOS."""
  is_eos = tokens == eos_id
  return np.cumsum(is_eos, axis=1) - is_eos == 0


def coca_decoders(config_arg: str, tokenizer, batch: int,
                  length: int) -> tuple[str, int, dict[str, Callable[[], jax.Array]]]:
  """CoCa's (header, eos id, {'cached': run, 'uncached': run}); run() -> tokens [batch, length]."""
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"coca.py:{config_arg}"))
  if length > config.data.max_len:
    configlib.apply_overrides(config, [f"data.max_len={length}"])
  obj = make_objective(config, tokenizer)
  size = config.data.image_size
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  params = nn.meta.unbox(jax.jit(obj.init)(
      jax.random.key(1), {"image": images[:1], "text": jnp.ones((1, length), jnp.int32)}))

  def run(params, images, cached):
    state = obj.init_decode_state(params, images, length, cached=cached)
    # eos_id -1 never matches: every row decodes all `length` positions.
    return decode.greedy(obj.step_fn(params, cached), state, obj.start_tokens(len(images)),
                         length, eos_id=-1, pad_id=obj.pad_id)[0]

  fn = jax.jit(run, static_argnums=2)
  header = f"CoCa {config_arg}: {_num_params(params):.2f}M params"
  return header, obj.eos_id, {"cached": lambda: fn(params, images, True),
                              "uncached": lambda: fn(params, images, False)}


def pali_decoders(config_arg: str, tokenizer, batch: int,
                  length: int) -> tuple[str, int, dict[str, Callable[[], jax.Array]]]:
  """PaLI's (header, eos id, {'cached': run, 'recompute': run}); run() -> tokens."""
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"pali.py:{config_arg}"))
  text = dict(config.model.text, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
              eos_id=tokenizer.eos_id)
  model = pali.PaLI(image=config.model.image, text=text,
                    architecture=config.model.architecture)
  size, prefix_len = config.data.image_size, config.tasks.prefix_len
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  prefix = jnp.broadcast_to(jnp.asarray(tokenizer.encode([config.tasks.caption], prefix_len)),
                            (batch, prefix_len))
  params = nn.meta.unbox(jax.jit(model.init)(
      jax.random.key(1), images[:1], prefix[:1], jnp.ones((1, length), jnp.int32)))["params"]
  start = jnp.full((batch,), model.bos_id, jnp.int32)

  def run(params, images, prefix, cached):
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)

    def cached_step(cache, token, position):
      logits, cache = apply(token[:, None], position, cache, method=pali.PaLI.decode_step)
      return logits[:, 0], cache

    def recompute_step(state, token, position):
      # The decoder inputs so far, BOS first, in a buffer [N, length + 1] whose future slots
      # hold pad (the decoder is causal, so they do not matter); PaLI.__call__ takes targets
      # and shifts them right itself, so its logits[:, p] come from buffer slot p.
      history = jax.lax.dynamic_update_slice(state["history"], token[:, None], (0, position))
      logits = apply(state["images"], state["prefix"], history[:, 1:])
      return jnp.take(logits, position, axis=1), {**state, "history": history}

    if cached:
      step, state = cached_step, apply(images, prefix, length, method=pali.PaLI.init_cache)
    else:
      history = jnp.full((len(images), length + 1), tokenizer.pad_id, jnp.int32)
      step, state = recompute_step, {"images": images, "prefix": prefix, "history": history}
    # eos_id -1 never matches: every row decodes all `length` positions.
    return decode.greedy(step, state, start, length, eos_id=-1, pad_id=tokenizer.pad_id)[0]

  fn = jax.jit(run, static_argnums=3)
  header = (f"PaLI {config_arg} ({config.model.architecture}): {_num_params(params):.2f}M "
            f"params, prompt of {prefix_len} tokens")
  return header, tokenizer.eos_id, {"cached": lambda: fn(params, images, prefix, True),
                                    "recompute": lambda: fn(params, images, prefix, False)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="scale=laptop", help="configs/coca.py arguments.")
  parser.add_argument("--pali_config", default="scale=laptop",
                      help="configs/pali.py arguments.")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--len", type=int, default=0, help="Tokens per caption (0: CoCa max_len).")
  parser.add_argument("--rounds", type=int, default=5, help="Interleaved timed rounds.")
  args = parser.parse_args()

  coca_config = configlib.load_config_file(
      os.path.join(ROOT, "configs", f"coca.py:{args.config}"))
  length = args.len or coca_config.data.max_len
  tokenizer = tokenizer_lib.get_tokenizer(coca_config.tokenizer.path or None)
  models = {"CoCa": coca_decoders(args.config, tokenizer, args.batch, length),
            "PaLI": pali_decoders(args.pali_config, tokenizer, args.batch, length)}

  outputs, compile_s, times = {}, {}, {}
  for model, (_, _, runs) in models.items():
    for way, run in runs.items():
      start = time.time()
      outputs[model, way] = np.asarray(run())
      compile_s[model, way] = time.time() - start
      times[model, way] = []
  for _ in range(args.rounds):
    for model, (_, _, runs) in models.items():
      for way, run in runs.items():
        start = time.time()
        run().block_until_ready()
        times[model, way].append(time.time() - start)

  print(f"batch {args.batch}, {length} tokens, {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}; median of {args.rounds} interleaved rounds")
  for model, (header, eos_id, runs) in models.items():
    print(header)
    (cached, cached_s), (reference, reference_s) = [
        (way, statistics.median(times[model, way])) for way in runs]
    for way, seconds in ((cached, cached_s), (reference, reference_s)):
      print(f"  {way:9}: {args.batch * length / seconds:10.1f} tokens/s  ({seconds * 1e3:.1f} ms "
            f"per batch; first call incl. compile {compile_s[model, way]:.1f} s)")
    print(f"  {cached} / {reference} tokens/s: {reference_s / cached_s:.2f}x")
    # The model's own EOS (which the timed runs decode past) ends a caption: compare up to it;
    # a full-prefix decoder may mask what follows a caption's EOS, a cache does not.
    tokens = outputs[model, cached]
    real = _up_to_eos(tokens, eos_id)
    same = np.array_equal(tokens[real], outputs[model, reference][real])
    print(f"  {cached} and {reference} tokens identical (up to EOS): {same}")

if __name__ == "__main__":
  main()
