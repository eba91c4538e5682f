"""vljax.decode: KV-cached == full-prefix decoding, beam search, sampling, under a mesh."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import configlib, decode, sharding
from vljax.data import tokenizer as tokenizer_lib
from vljax.objectives import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 10


@pytest.fixture(scope="module")
def coca():
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "coca.py:scale=tiny"))
  configlib.apply_overrides(config, [f"data.max_len={MAX_LEN}"])
  obj = make_objective(config, tokenizer_lib.get_tokenizer(None))
  images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  params = nn.meta.unbox(obj.init(jax.random.key(1), {
      "image": images, "text": jnp.ones((8, MAX_LEN), jnp.int32)}))
  # A push towards EOS, so that some rows stop early and others run to max_len.
  bias = params["txt"]["logits_head"]["bias"]
  params["txt"]["logits_head"]["bias"] = bias.at[obj.eos_id].add(2.0)
  return obj, params, images


def _greedy(obj, params, images, cached, max_len=MAX_LEN):
  state = obj.init_decode_state(params, images, max_len, cached=cached)
  return decode.greedy(obj.step_fn(params, cached), state, obj.start_tokens(len(images)),
                       max_len, obj.eos_id, obj.pad_id, return_logits=True)


def test_cached_decoding_equals_full_prefix_recomputation(coca):
  obj, params, images = coca
  fn = jax.jit(_greedy, static_argnums=(0, 3))
  tok_c, log_c = fn(obj, params, images, True)
  tok_u, log_u = fn(obj, params, images, False)
  np.testing.assert_array_equal(tok_c, tok_u)
  # Compare the logits up to each row's EOS (after it both only emit padding).
  tok = np.asarray(tok_c)
  alive = np.cumsum(tok == obj.eos_id, axis=1) - (tok == obj.eos_id) == 0
  np.testing.assert_allclose(np.asarray(log_c)[alive], np.asarray(log_u)[alive], atol=1e-4)
  assert len({tuple(r) for r in tok}) > 2  # the images really give different captions
  assert 0 < np.sum(np.any(tok == obj.eos_id, axis=1)) < len(tok)  # some stop, some do not
  # And teacher-forced full-sequence logits of the generated caption agree with the steps.
  full = obj.model.apply({"params": params}, images, jnp.asarray(tok))["logits"]
  full = np.asarray(full).copy()
  full[..., obj.pad_id] = np.asarray(log_c)[..., obj.pad_id]  # pad is masked in decoding
  np.testing.assert_allclose(full[alive], np.asarray(log_c)[alive], atol=1e-4)


def test_greedy_output_format_and_generate_under_mesh(coca):
  obj, params, images = coca
  tokens = np.asarray(obj.generate(params, images, MAX_LEN))
  assert tokens.shape == (8, MAX_LEN) and tokens.dtype == np.int32
  for row in tokens:
    eos = np.flatnonzero(row == obj.eos_id)
    if len(eos):
      assert np.all(row[eos[0] + 1:] == obj.pad_id)
      assert np.all(row[:eos[0]] != obj.pad_id)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    placed = jax.device_put(images, sharding.batch_sharding(mesh, 4))
    sharded = obj.generate(params, placed, MAX_LEN)
  np.testing.assert_array_equal(np.asarray(sharded), tokens)


def _toy_step(table):
  """A bigram "model": logits of the next token depend only on the current token."""

  def step(cache, token, position):
    del position
    return table[token], cache + 1

  return step


def test_beam_search_finds_the_best_sequence_greedy_misses():
  # Vocabulary: 0 pad, 1 eos, 2 start, 3, 4. From the start, 3 looks better (0.6 vs 0.4) but
  # leads to a flat distribution; 4 leads to EOS with certainty.
  p = np.full((5, 5), 1e-9)
  p[2, 3], p[2, 4] = 0.6, 0.4
  p[3, 1], p[3, 3], p[3, 4] = 0.34, 0.33, 0.33
  p[4, 1] = 1.0
  p[1, 1] = 1.0
  table = jnp.log(jnp.asarray(p / p.sum(1, keepdims=True), jnp.float32))
  step = _toy_step(table)
  start = jnp.full((2,), 2, jnp.int32)
  cache = jnp.zeros((2,), jnp.int32)
  greedy, _ = decode.greedy(step, cache, start, 4, eos_id=1)
  np.testing.assert_array_equal(greedy[0], [3, 1, 0, 0])
  seqs, scores = jax.jit(decode.beam_search, static_argnums=(0, 3, 4, 5, 6))(
      step, cache, start, 4, 1, 3, 0.0)
  np.testing.assert_array_equal(seqs[0, 0], [4, 1, 0, 0])
  np.testing.assert_allclose(scores[0, 0], np.log(0.4), rtol=1e-5)
  np.testing.assert_array_equal(seqs[0, 1], [3, 1, 0, 0])
  np.testing.assert_allclose(scores[0, 1], np.log(0.6 * 0.34), rtol=1e-5)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)  # best first
  # A length penalty divides by ((5 + len) / 6) ** alpha.
  _, pen = decode.beam_search(step, cache, start, 4, 1, beam_size=3, alpha=1.0)
  np.testing.assert_allclose(pen[0, 0], np.log(0.4) / (7 / 6), rtol=1e-5)


def test_beam_search_on_coca_scores_at_least_greedy(coca):
  obj, params, images = coca
  state = obj.init_decode_state(params, images, MAX_LEN)
  tokens, logits = _greedy(obj, params, images, True)
  tokens = np.asarray(tokens)
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  real = np.cumsum(tokens == obj.eos_id, axis=1) - (tokens == obj.eos_id) == 0
  greedy_lp = np.sum(np.take_along_axis(logp, tokens[..., None], -1)[..., 0] * real, axis=1)
  for beams in (1, 4):
    seqs, scores = decode.beam_search(obj.step_fn(params), state, obj.start_tokens(8),
                                      MAX_LEN, obj.eos_id, beam_size=beams, alpha=0.0)
    assert seqs.shape == (8, beams, MAX_LEN) and np.all(np.isfinite(scores))
    # Greedy's hypothesis is among those the beam scores (alpha 0: raw log-probability).
    assert np.all(np.asarray(scores[:, 0]) >= greedy_lp - 1e-4)
    if beams == 4:
      assert np.any(np.asarray(scores[:, 0]) > greedy_lp + 1e-3)


def test_beam_search_and_sampling_on_coca_cached_equal_uncached(coca):
  # Beam search repeats and reorders every state leaf, the cached cross-attention keys/values
  # included: a row mixed up with another image's would change the beams.
  obj, params, images = coca
  out = {}
  for cached in (True, False):
    state = obj.init_decode_state(params, images, MAX_LEN, cached=cached)
    step = obj.step_fn(params, cached)
    start = obj.start_tokens(len(images))
    beams = jax.jit(decode.beam_search, static_argnums=(0, 3, 4, 5, 6))(
        step, state, start, MAX_LEN, obj.eos_id, 3, 0.6)
    sampled = jax.jit(decode.sample, static_argnums=(0, 3, 4, 6, 7))(
        step, state, start, MAX_LEN, obj.eos_id, jax.random.key(3), 1.0, 20)
    out[cached] = beams, sampled
  (beams_c, scores_c), sampled_c = out[True]
  (beams_u, scores_u), sampled_u = out[False]
  np.testing.assert_array_equal(beams_c, beams_u)
  np.testing.assert_allclose(scores_c, scores_u, atol=1e-4)
  np.testing.assert_array_equal(sampled_c, sampled_u)
  assert len({tuple(r) for r in np.asarray(sampled_c)}) > 2


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda x: np.flatnonzero(np.asarray(x[0]) > decode.NEG_INF / 2).tolist()
  assert kept(decode.filter_logits(logits, top_k=2)) == [0, 1]
  assert kept(decode.filter_logits(logits, top_p=0.5)) == [0]
  assert kept(decode.filter_logits(logits, top_p=0.6)) == [0, 1]
  assert kept(decode.filter_logits(logits, top_p=0.86)) == [0, 1, 2, 3]
  assert kept(decode.filter_logits(logits, top_k=3, top_p=0.99)) == [0, 1, 2]


def test_sampling_follows_the_distribution_and_filters():
  p = np.array([1e-9, 0.1, 1e-9, 0.6, 0.3])
  table = jnp.log(jnp.tile(jnp.asarray(p / p.sum(), jnp.float32), (5, 1)))
  step = _toy_step(table)
  n = 4000
  start = jnp.full((n,), 2, jnp.int32)
  cache = jnp.zeros((n,), jnp.int32)
  out = decode.sample(step, cache, start, 1, 1, jax.random.key(0))
  freq = np.bincount(np.asarray(out[:, 0]), minlength=5) / n
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)
  out = decode.sample(step, cache, start, 1, 1, jax.random.key(0), top_k=1)
  assert np.all(np.asarray(out) == 3)
  out = decode.sample(step, cache, start, 1, 1, jax.random.key(0), top_p=0.8)
  assert set(np.asarray(out[:, 0]).tolist()) == {3, 4}
  # Low temperature concentrates on the mode; temperature 0 is greedy.
  out = decode.sample(step, cache, start, 1, 1, jax.random.key(0), temperature=0.05)
  assert np.mean(np.asarray(out) == 3) > 0.99
  out = decode.sample(step, cache, start, 3, 1, jax.random.key(0), temperature=0.0)
  assert np.all(np.asarray(out) == 3)
  # After EOS a row only holds padding.
  out = np.asarray(decode.sample(step, cache, start, 6, 1, jax.random.key(1)))
  for row in out:
    eos = np.flatnonzero(row == 1)
    if len(eos):
      assert np.all(row[eos[0] + 1:] == 0)
