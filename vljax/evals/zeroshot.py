"""Zero-shot classification: nearest class-prompt embedding, top-1 accuracy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def class_embeddings(prompt_embeddings: jax.Array, num_classes: int) -> jax.Array:
  """[C*T, d] prompt embeddings (class-major) -> [C, d]: mean over templates, re-normalised."""
  z = prompt_embeddings.reshape(num_classes, -1, prompt_embeddings.shape[-1]).mean(axis=1)
  return z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)


@jax.jit
def _predict(zimg: jax.Array, zcls: jax.Array) -> jax.Array:
  return jnp.argmax(zimg @ zcls.T, axis=-1)


def top1(zimg: jax.Array, zcls: jax.Array, labels: np.ndarray) -> float:
  predictions = np.asarray(_predict(zimg, zcls))
  return float(np.mean(predictions == np.asarray(labels)))
