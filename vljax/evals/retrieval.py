"""Image<->text retrieval recall@k, computed with the queries sharded across devices."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax import sharding

RECALL_AT = (1, 5, 10)


def _match_ranks(queries: jax.Array, keys: jax.Array) -> jax.Array:
  """Rank of key i among all keys for query i (0 = retrieved first).

  Ties with a wrong key count against the query, so constant embeddings score zero recall.
  """
  sims = queries @ keys.T
  # Read the positive off the same matmul so it compares equal to itself bit for bit.
  rows = jnp.arange(queries.shape[0])[:, None]
  positive = jnp.take_along_axis(sims, rows, axis=1)
  ahead = (sims >= positive).astype(jnp.int32)
  # The matching key itself satisfies >= and is not ahead of itself.
  return jnp.sum(ahead, axis=-1) - 1


@jax.jit
def _recalls(queries: jax.Array, keys: jax.Array) -> jax.Array:
  # Reduced on the devices, so every process can read the (replicated) result.
  r = _match_ranks(queries, keys)
  return jnp.stack([jnp.mean(r < k) for k in RECALL_AT])


def recalls(queries: jax.Array, keys: jax.Array, mesh: Mesh) -> dict[int, float]:
  """{k: recall@k}, sharded over the query rows: each device holds its rows × all keys."""
  n = queries.shape[0]
  axes = sharding.BATCH_AXES if n % mesh.size == 0 else None
  queries = jax.device_put(queries, NamedSharding(mesh, P(axes, None)))
  keys = jax.device_put(keys, NamedSharding(mesh, P()))
  return dict(zip(RECALL_AT, np.asarray(_recalls(queries, keys)).tolist()))


def recall_metrics(zimg: jax.Array, ztxt: jax.Array, mesh: Mesh,
                   prefix: str = "eval/") -> dict[str, float]:
  """i2t and t2i recall@{1,5,10} for paired embeddings (row i of each is a pair)."""
  out = {}
  for name, queries, keys in (("i2t", zimg, ztxt), ("t2i", ztxt, zimg)):
    for k, value in recalls(queries, keys, mesh).items():
      out[f"{prefix}{name}_recall@{k}"] = value
  return out
