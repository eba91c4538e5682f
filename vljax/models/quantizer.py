"""A vector quantiser on the unit sphere with an EMA codebook (BEiT v2's VQ-KD quantiser).

Vectors z [N, d] and the K codes [K, d] are l2-normalised, so the nearest code in Euclidean
distance is the one of largest dot product. The codebook is not trained by gradients: after
each step every code moves towards the mean of the vectors assigned to it,

  c_k <- l2norm(decay * c_k + (1 - decay) * l2norm(mean of the z assigned to k))

(BEiT v2's norm-EMA; a code no vector chose keeps its value), and codes that fell out of use are
restarted on vectors of the batch (`restart_dead_codes`). The encoder learns through a
straight-through estimator: the quantised vector's forward value with the identity gradient
to z, and a commitment term beta * mean((sg[z_q] - z)^2) pulls z towards its code.

All functions take the global batch (under jit the sums run over every device's vectors).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / ||x|| along the last axis (PyTorch's F.normalize: the norm clamped at eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def nearest_codes(z: Array, codebook: Array) -> Array:
  """[N] int32: for unit vectors z [N, d], the index of the nearest unit code of [K, d]."""
  scores = jnp.einsum("nd,kd->nk", z, codebook, preferred_element_type=jnp.float32)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def quantize(z: Array, codebook: Array, beta: float = 1.0) -> tuple[Array, Array, Array]:
  """(z_q [N, d] with the straight-through gradient, codes [N] int32, commitment loss) of unit
  vectors z [N, d]; the codebook gets no gradient."""
  codebook = jax.lax.stop_gradient(codebook)
  codes = nearest_codes(z, codebook)
  z_q = jnp.take(codebook, codes, axis=0)
  commitment = beta * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
  return z + jax.lax.stop_gradient(z_q - z), codes, commitment


def code_counts(codes: Array, num_codes: int) -> Array:
  """[K] float32: how many vectors chose each code."""
  return jnp.zeros((num_codes,), jnp.float32).at[codes].add(1.0)


def norm_ema_update(codebook: Array, z: Array, codes: Array, decay: float) -> Array:
  """The codebook after one norm-EMA step towards the mean of its assigned unit vectors."""
  num_codes = codebook.shape[0]
  counts = code_counts(codes, num_codes)
  sums = jnp.zeros_like(codebook).at[codes].add(z.astype(codebook.dtype))
  means = l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])
  moved = l2_normalize(decay * codebook + (1.0 - decay) * means)
  return jnp.where((counts > 0)[:, None], moved, codebook)


def restart_dead_codes(codebook: Array, dead: Array, z: Array, rng: Array) -> Array:
  """The codebook with every code where dead [K] is True replaced by a vector of z [N, d]
  drawn uniformly (with replacement); the others unchanged."""
  picks = jax.random.randint(rng, (codebook.shape[0],), 0, z.shape[0])
  return jnp.where(dead[:, None], jnp.take(z, picks, axis=0).astype(codebook.dtype), codebook)


def usage_metrics(codes: Array, num_codes: int) -> dict[str, Array]:
  """codebook_usage: the fraction of codes some vector chose; codebook_perplexity: exp of the
  entropy of the codes' frequencies (K when uniform, 1 when one code takes everything)."""
  counts = code_counts(codes, num_codes)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"codebook_usage": jnp.mean((counts > 0).astype(jnp.float32)),
          "codebook_perplexity": jnp.exp(entropy)}
