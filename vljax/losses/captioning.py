"""Token cross-entropy for every family that generates text (CoCa, PaLI, ...)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def captioning_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                    label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Token cross-entropy averaged over the real (mask) target positions.

  Args:
    logits: [B, L, V] float32.
    targets: [B, L] int ids.
    mask: [B, L] bool, True where the target counts.
    label_smoothing: mass spread uniformly over the vocabulary.

  Returns:
    (loss, token accuracy), both scalars. Under jit the arrays are the *global* batch (sharded
    or not), so these sums already run over the global batch's real tokens: the normalisation
    does not depend on how the batch is split over devices.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  mask = mask.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  loss = jnp.sum(nll * mask) / denom
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return loss, jnp.sum(correct * mask) / denom
