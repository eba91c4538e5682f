"""Token cross-entropy for every family that generates text (CoCa, PaLI, ...)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def per_example_token_terms(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                            label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """Each example's summed token cross-entropy, real-token count and correct-token count.

  Args:
    logits: [B, L, V] float32.
    targets: [B, L] int ids.
    mask: [B, L] bool, True where the target counts.
    label_smoothing: mass spread uniformly over the vocabulary.

  Returns:
    {'nll': [B], 'tokens': [B], 'correct': [B]} float32. Sums like these can be split over
    micro-batches and added up (gradient accumulation): `reduce_token_terms` normalises them
    over whatever batch they are gathered from.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  mask = mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"nll": jnp.sum(nll * mask, axis=1), "tokens": jnp.sum(mask, axis=1),
          "correct": jnp.sum(correct * mask, axis=1)}


def reduce_token_terms(terms: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(loss, token accuracy) of per_example_token_terms: means over every real token."""
  denom = jnp.maximum(jnp.sum(terms["tokens"]), 1.0)
  return jnp.sum(terms["nll"]) / denom, jnp.sum(terms["correct"]) / denom


def captioning_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                    label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Token cross-entropy averaged over the real (mask) target positions, and token accuracy.

  Arguments as per_example_token_terms. Under jit the arrays are the *global* batch (sharded or
  not), so the sums run over the global batch's real tokens: the normalisation does not depend
  on how the batch is split over devices.
  """
  return reduce_token_terms(per_example_token_terms(logits, targets, mask, label_smoothing))
