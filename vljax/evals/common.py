"""Embedding a whole evaluation set in sharded batches."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vljax import sharding


def embed_all(embed_fn: Callable[[Any, jax.Array], jax.Array], params: Any, inputs: np.ndarray,
              mesh: Mesh, batch_size: int) -> jax.Array:
  """Applies a jitted `embed_fn(params, x)` to `inputs` in global batches sharded over the mesh.

  The last batch is padded by repeating its final row; the padding rows are cut off again, so
  the result has exactly len(inputs) rows. Returns a [N, d] array.
  """
  n = len(inputs)
  if n == 0:
    raise ValueError("Cannot evaluate on an empty set of inputs.")
  devices = mesh.size
  batch_size = max(devices, batch_size - batch_size % devices)
  outputs = []
  for start in range(0, n, batch_size):
    chunk = inputs[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      pad = np.repeat(chunk[-1:], batch_size - real, axis=0)
      chunk = np.concatenate([chunk, pad], axis=0)
    # Every process holds the whole chunk and places the rows its devices own.
    x = jax.make_array_from_callback(chunk.shape, sharding.batch_sharding(mesh, chunk.ndim),
                                     lambda index, c=chunk: c[index])
    outputs.append(embed_fn(params, x)[:real])
  return jnp.concatenate(outputs, axis=0)
