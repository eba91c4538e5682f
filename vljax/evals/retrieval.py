"""Image<->text retrieval recall@k with several captions per image (as in COCO and Flickr30k).

image->text: a hit at k when any of the image's captions is among the k best captions.
text->image: a hit at k when the caption's image is among the k best images.
Ties with a wrong item count against the query, so constant embeddings score zero recall.
Queries are sharded over the devices; each holds its rows x all keys of similarities.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax import sharding

RECALL_AT = (1, 5, 10)


def _ranks(sims: jax.Array, relevant: jax.Array) -> jax.Array:
  """Rank of the best relevant key per query row: wrong keys scoring >= it (0 = first)."""
  best = jnp.max(jnp.where(relevant, sims, -jnp.inf), axis=1, keepdims=True)
  return jnp.sum((sims >= best) & ~relevant, axis=1)


@jax.jit
def _recalls(queries: jax.Array, keys: jax.Array, query_ids: jax.Array,
             key_ids: jax.Array) -> jax.Array:
  # A key is relevant to a query when their ids agree (the image index of a caption). Reduced
  # on the devices, so every process can read the (replicated) result.
  relevant = query_ids[:, None] == key_ids[None, :]
  r = _ranks(queries @ keys.T, relevant)
  return jnp.stack([jnp.mean(r < k) for k in RECALL_AT])


def recalls(queries: jax.Array, keys: jax.Array, query_ids: np.ndarray, key_ids: np.ndarray,
            mesh: Mesh) -> dict[int, float]:
  """{k: recall@k} of queries against keys; relevance is equality of ids."""
  n = queries.shape[0]
  axes = sharding.BATCH_AXES if n % mesh.size == 0 else None
  queries = jax.device_put(queries, NamedSharding(mesh, P(axes, None)))
  keys = jax.device_put(keys, NamedSharding(mesh, P()))
  query_ids = jax.device_put(np.asarray(query_ids, np.int32), NamedSharding(mesh, P(axes)))
  key_ids = jax.device_put(np.asarray(key_ids, np.int32), NamedSharding(mesh, P()))
  return dict(zip(RECALL_AT, np.asarray(_recalls(queries, keys, query_ids, key_ids)).tolist()))


def recall_metrics(zimg: jax.Array, ztxt: jax.Array, caption_image: np.ndarray | None, mesh: Mesh,
                   prefix: str = "eval/") -> dict[str, float]:
  """i2t and t2i recall@{1,5,10}.

  zimg [N, d] images, ztxt [M, d] captions, caption_image [M]: the image index of each caption
  (None: M == N and caption i belongs to image i).
  """
  n, m = zimg.shape[0], ztxt.shape[0]
  if caption_image is None:
    caption_image = np.arange(m)
  caption_image = np.asarray(caption_image)
  if caption_image.shape != (m,) or caption_image.min() < 0 or caption_image.max() >= n:
    raise ValueError(f"caption_image must hold one image index in [0, {n}) per caption "
                     f"({m} captions); got shape {caption_image.shape}.")
  out = {}
  images = np.arange(n)
  for name, queries, keys, qid, kid in (("i2t", zimg, ztxt, images, caption_image),
                                        ("t2i", ztxt, zimg, caption_image, images)):
    for k, value in recalls(queries, keys, qid, kid, mesh).items():
      out[f"{prefix}{name}_recall@{k}"] = value
  return out
