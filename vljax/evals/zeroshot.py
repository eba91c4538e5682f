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
def _accuracy(zimg: jax.Array, zcls: jax.Array, labels: jax.Array) -> jax.Array:
  # Reduced on the devices: in a multi-process run the predictions are spread over hosts,
  # while the mean is a replicated scalar every process can read.
  return jnp.mean(jnp.argmax(zimg @ zcls.T, axis=-1) == labels)


def top1(zimg: jax.Array, zcls: jax.Array, labels: np.ndarray) -> float:
  return float(_accuracy(zimg, zcls, np.asarray(labels)))
