"""Image<->text retrieval recall@k with several captions per image (as in COCO and Flickr30k).

Captions with exactly the same text (after the eval text clean-up) are the same answer:
image->text: a hit at k when a caption whose text equals the text of any of the image's
  captions is among the k best captions;
text->image: a hit at k when an image that has a caption with exactly the query's text is among
  the k best images.
Without that rule, an image whose caption text also belongs to another image could never score
an i2t hit at 1 (the other copy, equally good, counts as wrong). Ties with a wrong item count
against the query, so constant embeddings score zero recall.

Queries are sharded over the devices; each holds its rows x all keys of similarities, and
computes which keys are relevant to its rows from small padded per-row arrays of text ids (no
N x M relevance matrix ever exists on the host).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax import sharding

RECALL_AT = (1, 5, 10)
# Pads of the id arrays: different on the two sides, so a pad never matches anything.
_QUERY_PAD, _KEY_PAD = -1, -2


def _ranks(sims: jax.Array, relevant: jax.Array) -> jax.Array:
  """Rank of the best relevant key per query row: wrong keys scoring >= it (0 = first)."""
  best = jnp.max(jnp.where(relevant, sims, -jnp.inf), axis=1, keepdims=True)
  return jnp.sum((sims >= best) & ~relevant, axis=1)


@jax.jit
def _recalls(queries: jax.Array, keys: jax.Array, query_ids: jax.Array, key_ids: jax.Array,
             valid: jax.Array) -> jax.Array:
  # A key is relevant to a query when their id sets intersect: query_ids [Q, A] and key_ids
  # [K, B] hold non-negative ids padded with distinct negatives. A and B are small (captions per
  # image), so the loops build the [Q, K] relevance of this device's rows elementwise. Reduced on
  # the devices, so every process can read the (replicated) result.
  relevant = jnp.zeros((queries.shape[0], keys.shape[0]), bool)
  for a in range(query_ids.shape[1]):
    for b in range(key_ids.shape[1]):
      relevant = relevant | (query_ids[:, a, None] == key_ids[None, :, b])
  r = _ranks(queries @ keys.T, relevant)
  count = jnp.sum(valid)
  return jnp.stack([jnp.sum((r < k) & valid) / count for k in RECALL_AT])


def _id_matrix(ids: np.ndarray, pad: int) -> np.ndarray:
  ids = np.asarray(ids, np.int32)
  ids = ids[:, None] if ids.ndim == 1 else ids
  if ids.ndim != 2:
    raise ValueError(f"Relevance ids must be [n] or [n, k]; got shape {ids.shape}.")
  return np.where(ids < 0, pad, ids).astype(np.int32)


def recalls(queries: jax.Array, keys: jax.Array, query_ids: np.ndarray, key_ids: np.ndarray,
            mesh: Mesh) -> dict[int, float]:
  """{k: recall@k} of queries against keys.

  query_ids [Q] or [Q, A], key_ids [K] or [K, B]: the ids of each row (negative = none); a key
  is relevant to a query when they share an id.
  """
  n = queries.shape[0]
  shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
  pad = -n % shards
  query_ids = _id_matrix(query_ids, _QUERY_PAD)
  key_ids = _id_matrix(key_ids, _KEY_PAD)
  if query_ids.shape[0] != n or key_ids.shape[0] != keys.shape[0]:
    raise ValueError(f"One id row per query ({n}) and per key ({keys.shape[0]}) is needed; got "
                     f"{query_ids.shape[0]} and {key_ids.shape[0]}.")
  # Padded rows (so the rows always divide over the devices) match nothing and are not counted.
  query_ids = np.concatenate([query_ids, np.full((pad, query_ids.shape[1]), _QUERY_PAD,
                                                 np.int32)])
  valid = np.arange(n + pad) < n
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
  replicated = NamedSharding(mesh, P())
  queries = jax.device_put(jnp.pad(jnp.asarray(queries), ((0, pad), (0, 0))), rows)
  keys = jax.device_put(keys, replicated)
  query_ids = jax.device_put(query_ids, rows)
  key_ids = jax.device_put(key_ids, replicated)
  valid = jax.device_put(valid, NamedSharding(mesh, P(sharding.BATCH_AXES)))
  values = np.asarray(_recalls(queries, keys, query_ids, key_ids, valid))
  return dict(zip(RECALL_AT, values.tolist()))


def caption_text_ids(captions: Sequence[str]) -> np.ndarray:
  """[M] int32: the same id for exactly equal caption texts, ids in order of first use."""
  table: dict[str, int] = {}
  return np.asarray([table.setdefault(c, len(table)) for c in captions], np.int32)


def image_text_ids(caption_image: np.ndarray, text_ids: np.ndarray, num_images: int
                   ) -> np.ndarray:
  """[N, K] int32: the distinct text ids of each image's captions, padded with -1."""
  per_image: list[list[int]] = [[] for _ in range(num_images)]
  for image, text in zip(np.asarray(caption_image).tolist(), np.asarray(text_ids).tolist()):
    if text not in per_image[image]:
      per_image[image].append(text)
  width = max(1, max(len(t) for t in per_image))
  out = np.full((num_images, width), -1, np.int32)
  for image, texts in enumerate(per_image):
    out[image, :len(texts)] = texts
  return out


def duplicate_captions(caption_image: np.ndarray, text_ids: np.ndarray) -> int:
  """Number of captions whose exact text is also a caption of a different image."""
  caption_image = np.asarray(caption_image, np.int64)
  text_ids = np.asarray(text_ids, np.int64)
  if text_ids.size == 0:
    return 0
  pairs = np.unique(np.stack([text_ids, caption_image], axis=1), axis=0)
  images_per_text = np.bincount(pairs[:, 0], minlength=int(text_ids.max()) + 1)
  return int(np.sum(images_per_text[text_ids] > 1))


def check_caption_image(caption_image: np.ndarray | None, num_images: int,
                        num_captions: int) -> np.ndarray:
  """The image index of each caption (None: caption i belongs to image i), validated."""
  if caption_image is None:
    caption_image = np.arange(num_captions)
  caption_image = np.asarray(caption_image)
  if (caption_image.shape != (num_captions,) or caption_image.min() < 0 or
      caption_image.max() >= num_images):
    raise ValueError(f"caption_image must hold one image index in [0, {num_images}) per "
                     f"caption ({num_captions} captions); got shape {caption_image.shape}.")
  return caption_image


def recall_metrics(zimg: jax.Array, ztxt: jax.Array, caption_image: np.ndarray | None, mesh: Mesh,
                   prefix: str = "eval/", captions: Sequence[str] | None = None
                   ) -> dict[str, float]:
  """i2t and t2i recall@{1,5,10}.

  zimg [N, d] images, ztxt [M, d] captions, caption_image [M]: the image index of each caption
  (None: M == N and caption i belongs to image i). captions [M]: the caption texts; exactly equal
  texts are equivalent answers (module docstring). None: every caption is a distinct text.
  """
  n, m = zimg.shape[0], ztxt.shape[0]
  caption_image = check_caption_image(caption_image, n, m)
  if captions is None:
    text_ids = np.arange(m, dtype=np.int32)
  else:
    if len(captions) != m:
      raise ValueError(f"{len(captions)} caption texts for {m} caption embeddings.")
    text_ids = caption_text_ids(captions)
  image_texts = image_text_ids(caption_image, text_ids, n)
  out = {}
  for name, queries, keys, qid, kid in (("i2t", zimg, ztxt, image_texts, text_ids),
                                        ("t2i", ztxt, zimg, text_ids, image_texts)):
    for k, value in recalls(queries, keys, qid, kid, mesh).items():
      out[f"{prefix}{name}_recall@{k}"] = value
  return out
