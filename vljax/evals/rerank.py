"""Retrieval by ITC candidates re-ranked with the ITM head, for the fusion families.

Fusion models (ALBEF, BLIP) retrieve in two stages: the k keys with the highest ITC similarity
to a query are its candidates, and the candidates are ranked by the ITM "match" logit of the
(image, text) pair through the fusion encoder; every key outside the k candidates ranks below
every candidate (ALBEF's evaluation fills the score matrix with -100 outside the top k).
Recall@K of that ranking uses the relevance and tie rules of vljax.evals.retrieval: a key is
relevant when its caption text equals a text of the query's image, and a tie with a wrong
candidate is a miss. Because keys outside the candidates are never ranked, recall@K is only
defined for K <= k; `check_k` refuses a k below the largest K reported.

The candidate search is sharded like retrieval's (each device: its query rows x all keys); the
pair scores are computed in batches of pairs sharded over the devices (vljax.evals.common).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax import sharding
from vljax.configlib import ConfigError
from vljax.evals import retrieval

# (image indices [P], caption indices [P]) -> [P] ITM match scores, as host numpy.
PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def check_k(k: int) -> int:
  """k as an int, or a ConfigError when it cannot give every reported recall@K."""
  k = int(k)
  if k < max(retrieval.RECALL_AT):
    raise ConfigError(
        f"config.eval.itm_rerank_k={k}: re-ranked recall@{max(retrieval.RECALL_AT)} needs at "
        f"least {max(retrieval.RECALL_AT)} ITC candidates per query (0 = no re-ranking).")
  return k


@functools.partial(jax.jit, static_argnums=2)
def _top_k(queries: jax.Array, keys: jax.Array, k: int) -> jax.Array:
  return jax.lax.top_k(queries @ keys.T, k)[1].astype(jnp.int32)


def top_candidates(queries: jax.Array, keys: jax.Array, k: int, mesh: Mesh) -> np.ndarray:
  """[Q, k] int32: each query's k keys of highest similarity, best first (rows sharded)."""
  n = queries.shape[0]
  shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
  pad = -n % shards
  queries = jax.device_put(jnp.pad(jnp.asarray(queries), ((0, pad), (0, 0))),
                           NamedSharding(mesh, P(sharding.BATCH_AXES, None)))
  keys = jax.device_put(keys, NamedSharding(mesh, P()))
  # Every process ranks every query (the candidates are small: [Q, k] ids).
  return np.asarray(multihost_utils.process_allgather(_top_k(queries, keys, k), tiled=True))[:n]


def candidate_relevance(query_ids: np.ndarray, key_ids: np.ndarray,
                        candidates: np.ndarray) -> np.ndarray:
  """[Q, k] bool: whether candidate j of query q is relevant (their id sets intersect).

  query_ids [Q, A] and key_ids [K, B] are retrieval's id rows, -1 padded.
  """
  query_ids = np.asarray(query_ids)
  cand_ids = np.asarray(key_ids)[candidates]  # [Q, k, B]
  match = query_ids[:, None, :, None] == cand_ids[:, :, None, :]  # [Q, k, A, B]
  real = (query_ids >= 0)[:, None, :, None] & (cand_ids >= 0)[:, :, None, :]
  return np.any(match & real, axis=(2, 3))


def ranked_recalls(scores: np.ndarray, relevant: np.ndarray,
                   recall_at: Sequence[int] = retrieval.RECALL_AT) -> dict[int, float]:
  """{K: recall@K} when each query ranks its candidates by `scores` [Q, k].

  The rank of a query is the number of wrong candidates scoring >= its best relevant one; a
  query with no relevant candidate misses at every K <= k.
  """
  scores = np.asarray(scores, np.float64)
  best = np.max(np.where(relevant, scores, -np.inf), axis=1, keepdims=True)
  ranks = np.sum((scores >= best) & ~relevant, axis=1)
  ranks = np.where(np.any(relevant, axis=1), ranks, np.iinfo(np.int32).max)
  return {k: float(np.mean(ranks < k)) for k in recall_at}


def reranked_recall_metrics(score_pairs: PairScorer, zimg: jax.Array, ztxt: jax.Array,
                            caption_image: np.ndarray | None, k: int, mesh: Mesh,
                            captions: Sequence[str] | None = None, prefix: str = "eval/"
                            ) -> dict[str, float]:
  """i2t and t2i recall@{1,5,10} of ITC top-k candidates re-ranked by `score_pairs`.

  zimg [N, d], ztxt [M, d]: unit-norm ITC features; caption_image, captions: as
  retrieval.recall_metrics. `k` is capped at the number of keys of each direction (then every
  key is a candidate).
  """
  n, m = zimg.shape[0], ztxt.shape[0]
  caption_image = retrieval.check_caption_image(caption_image, n, m)
  text_ids = (np.arange(m, dtype=np.int32) if captions is None
              else retrieval.caption_text_ids(captions))
  image_texts = retrieval.image_text_ids(caption_image, text_ids, n)
  out = {}
  for name, queries, keys, qid, kid in (("i2t", zimg, ztxt, image_texts, text_ids[:, None]),
                                        ("t2i", ztxt, zimg, text_ids[:, None], image_texts)):
    cand = top_candidates(queries, keys, min(k, keys.shape[0]), mesh)
    rows = np.repeat(np.arange(cand.shape[0], dtype=np.int32), cand.shape[1])
    image_idx, text_idx = (rows, cand.ravel()) if name == "i2t" else (cand.ravel(), rows)
    scores = np.asarray(score_pairs(image_idx, text_idx)).reshape(cand.shape)
    relevant = candidate_relevance(qid, kid, cand)
    for at, value in ranked_recalls(scores, relevant).items():
      out[f"{prefix}{name}_recall@{at}"] = value
  return out
