"""Embedding a whole evaluation set in sharded batches."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vljax import sharding
from vljax.data import preprocess


def embed_all(embed_fn: Callable[..., jax.Array], params: Any,
              inputs: np.ndarray | tuple[np.ndarray, ...], mesh: Mesh, batch_size: int,
              prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> jax.Array:
  """Applies a jitted `embed_fn(params, x, ...)` to `inputs` in global batches sharded over the
  mesh.

  `inputs` is one array or a tuple of arrays with the same number of rows (e.g. images and
  their prompts), passed to embed_fn as separate arguments. `prepare`, if given, maps each host
  batch of the first array before it goes to the devices (e.g. uint8 pixels to normalised
  float32, so a whole set never exists as floats). The last batch is padded by repeating its
  final row; the padding rows are cut off again, so the result has exactly len(inputs) rows.
  Returns a [N, ...] array.
  """
  arrays = inputs if isinstance(inputs, tuple) else (inputs,)
  n = len(arrays[0])
  if n == 0:
    raise ValueError("Cannot evaluate on an empty set of inputs.")
  if any(len(a) != n for a in arrays):
    raise ValueError(f"Inputs with different row counts: {[len(a) for a in arrays]}.")
  devices = mesh.size
  batch_size = max(devices, batch_size - batch_size % devices)
  outputs = []
  for start in range(0, n, batch_size):
    chunks = []
    for k, array in enumerate(arrays):
      chunk = array[start:start + batch_size]
      real = len(chunk)
      if real < batch_size:
        pad = np.repeat(chunk[-1:], batch_size - real, axis=0)
        chunk = np.concatenate([chunk, pad], axis=0)
      if k == 0 and prepare is not None:
        chunk = prepare(chunk)
      # Every process holds the whole chunk and places the rows its devices own.
      chunks.append(jax.make_array_from_callback(
          chunk.shape, sharding.batch_sharding(mesh, chunk.ndim),
          lambda index, c=chunk: c[index]))
    outputs.append(embed_fn(params, *chunks)[:real])
  return jnp.concatenate(outputs, axis=0)


def image_prepare(data: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray] | None:
  """The per-batch conversion of an eval set's stored images into model inputs.

  Eval sets keep their images as uint8 (a quarter of float32's memory); a batch is normalised
  with the set's 'image_options' (default: the [-1, 1] range) just before it is embedded,
  giving exactly the values of eager normalisation. Float images are used as they are.
  """
  images = data["image"]
  if images.dtype != np.uint8:
    return None
  opts = data.get("image_options") or preprocess.ImageOptions(size=int(images.shape[1]))
  return functools.partial(preprocess.normalize, opts=opts)


def embed_images(embed_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                 data: dict[str, Any], mesh: Mesh, batch_size: int) -> jax.Array:
  """`embed_all` over an eval set's images, normalising uint8 ones per batch."""
  return embed_all(embed_fn, params, data["image"], mesh, batch_size, image_prepare(data))
