"""Model-agnostic autoregressive decoding: greedy, beam search and sampling.

A model is seen through a step function

  step_fn(cache, tokens [N] int32, position scalar int32) -> (logits [N, V] float32, cache)

which feeds the input token at `position` (the start token at position 0) and returns the
distribution of the token at that position; `cache` is any pytree whose leaves have the batch
(N) as leading dimension (KV caches, or the token history for a model that recomputes the whole
prefix). Every function here has static shapes and uses lax loops, so it runs inside jit and
under a mesh (batch-sharded inputs stay batch-sharded). Output rows are
[tokens..., EOS, pad, pad, ...] of length max_len; a row that never produces EOS is cut off
at max_len.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
StepFn = Callable[[Any, Array, Array], tuple[Array, Any]]

NEG_INF = -1e9  # finite, so that (-inf) - (-inf) never makes NaN in the beam scores


def greedy(step_fn: StepFn, cache: Any, start_tokens: Array, max_len: int, eos_id: int,
           pad_id: int = 0, return_logits: bool = False) -> tuple[Array, Any]:
  """Greedy decoding: the argmax token at every position until EOS.

  Args:
    step_fn: see the module docstring.
    cache: initial cache (batch N).
    start_tokens: [N] input tokens at position 0.
    max_len: number of output positions.
    eos_id: end token; a row stops after emitting it.
    pad_id: written after a row's EOS.
    return_logits: also return the logits of every step, [N, max_len, V].

  Returns:
    (tokens [N, max_len] int32, logits or None). The loop stops early once every row is done.
  """
  batch = start_tokens.shape[0]
  tokens = jnp.full((batch, max_len), pad_id, jnp.int32)
  logits_buf = None
  if return_logits:
    vocab = jax.eval_shape(step_fn, cache, start_tokens, jnp.int32(0))[0].shape[-1]
    logits_buf = jnp.zeros((batch, max_len, vocab), jnp.float32)

  def cond(state):
    pos, _, _, done, _, _ = state
    return (pos < max_len) & ~jnp.all(done)

  def body(state):
    pos, token, cache, done, tokens, logits_buf = state
    logits, cache = step_fn(cache, token, pos)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, pos))
    if logits_buf is not None:
      logits_buf = jax.lax.dynamic_update_slice(
          logits_buf, logits.astype(jnp.float32)[:, None], (0, pos, 0))
    return pos + 1, nxt, cache, done | (nxt == eos_id), tokens, logits_buf

  state = (jnp.int32(0), start_tokens.astype(jnp.int32), cache, jnp.zeros((batch,), bool),
           tokens, logits_buf)
  _, _, _, _, tokens, logits_buf = jax.lax.while_loop(cond, body, state)
  return tokens, logits_buf


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Keeps the top_k largest logits (0 = all) and the smallest nucleus of mass >= top_p.

  Removed entries become NEG_INF. The most likely token is always kept.
  """
  logits = logits.astype(jnp.float32)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token stays if the mass strictly before it is below top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


def sample(step_fn: StepFn, cache: Any, start_tokens: Array, max_len: int, eos_id: int,
           rng: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           pad_id: int = 0) -> Array:
  """Ancestral sampling with temperature, top-k and nucleus (top-p) filtering.

  temperature 0 is greedy decoding. Returns tokens [N, max_len] int32.
  """
  if temperature == 0.0:
    return greedy(step_fn, cache, start_tokens, max_len, eos_id, pad_id)[0]
  batch = start_tokens.shape[0]

  def body(state):
    pos, token, cache, done, tokens = state
    logits, cache = step_fn(cache, token, pos)
    logits = filter_logits(logits / temperature, top_k, top_p)
    key = jax.random.fold_in(rng, pos)
    nxt = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, pos))
    return pos + 1, nxt, cache, done | (nxt == eos_id), tokens

  def cond(state):
    return (state[0] < max_len) & ~jnp.all(state[3])

  state = (jnp.int32(0), start_tokens.astype(jnp.int32), cache, jnp.zeros((batch,), bool),
           jnp.full((batch, max_len), pad_id, jnp.int32))
  return jax.lax.while_loop(cond, body, state)[-1]


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT length normalisation ((5 + length) / 6) ** alpha; alpha 0 is none."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _gather_beams(tree: Any, indices: Array, batch: int, beams: int) -> Any:
  """Selects beams: leaves [batch * beams, ...] re-indexed by indices [batch, beams]."""
  flat = (indices + jnp.arange(batch)[:, None] * beams).reshape(-1)
  return jax.tree.map(lambda x: jnp.take(x, flat, axis=0), tree)


def beam_search(step_fn: StepFn, cache: Any, start_tokens: Array, max_len: int, eos_id: int,
                beam_size: int = 4, alpha: float = 0.6,
                pad_id: int = 0) -> tuple[Array, Array]:
  """Beam search with GNMT length penalty.

  Args:
    step_fn: see the module docstring; it is called on batch * beam_size rows.
    cache: initial cache for the N rows (it is repeated per beam here).
    start_tokens: [N] input tokens at position 0.
    max_len: number of output positions.
    eos_id: a hypothesis that emits EOS is finished; its score is its log-probability divided
      by length_penalty(its length incl. EOS, alpha).
    beam_size: hypotheses kept per row.
    alpha: length-penalty exponent (0: raw log-probability, which favours short outputs).
    pad_id: written after EOS.

  Returns:
    (tokens [N, beam_size, max_len] int32, best first; scores [N, beam_size]). Hypotheses
    still alive at max_len are scored like finished ones.
  """
  batch, k = start_tokens.shape[0], beam_size
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
  token = jnp.repeat(start_tokens.astype(jnp.int32), k)
  # Only the first beam is live at the start: the others are copies of it.
  alive_lp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  alive_seq = jnp.full((batch, k, max_len), pad_id, jnp.int32)
  fin_seq = jnp.full((batch, k, max_len), pad_id, jnp.int32)
  fin_score = jnp.full((batch, k), NEG_INF, jnp.float32)

  def body(pos, state):
    token, cache, alive_lp, alive_seq, fin_seq, fin_score = state
    logits, cache = step_fn(cache, token, pos)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    cand = (alive_lp[:, :, None] + logp.reshape(batch, k, vocab)).reshape(batch, k * vocab)
    # 2k candidates always hold k that do not end here, whatever k of them emit EOS.
    top_lp, top_idx = jax.lax.top_k(cand, 2 * k)
    beam_idx, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive_seq, beam_idx[:, :, None], axis=1)
    seqs = seqs.at[:, :, pos].set(tok)
    is_eos = tok == eos_id
    last = pos == max_len - 1
    # Finished: those emitting EOS (and, at the last position, every candidate).
    ends = is_eos | last
    score = top_lp / length_penalty(pos + 1, alpha)
    score = jnp.where(ends & (top_lp > NEG_INF / 2), score, NEG_INF)
    all_seq = jnp.concatenate([fin_seq, seqs], axis=1)
    all_score = jnp.concatenate([fin_score, score], axis=1)
    fin_score, keep = jax.lax.top_k(all_score, k)
    fin_seq = jnp.take_along_axis(all_seq, keep[:, :, None], axis=1)
    # Alive: the best k candidates that did not emit EOS.
    alive_cand = jnp.where(is_eos, NEG_INF, top_lp)
    alive_lp, keep = jax.lax.top_k(alive_cand, k)
    alive_seq = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
    src = jnp.take_along_axis(beam_idx, keep, axis=1)
    cache = _gather_beams(cache, src, batch, k)
    token = jnp.take_along_axis(tok, keep, axis=1).reshape(-1)
    return token, cache, alive_lp, alive_seq, fin_seq, fin_score

  state = (token, cache, alive_lp, alive_seq, fin_seq, fin_score)
  state = jax.lax.fori_loop(0, max_len, body, state)
  return state[4], state[5]
