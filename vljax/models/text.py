"""Text transformer encoder for the dual-encoder families."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import layers

Array = jax.Array
Dtype = Any

POOL_TYPES = ("last", "last_position", "eos", "argmax", "first", "map", "none")


class TextTransformer(nn.Module):
  """Token + learned position embedding, pre-LN encoder, final LN, pooling.

  Positions holding `pad_id` are masked out as attention keys (and from MAP pooling), so real
  tokens' outputs do not depend on how much padding follows them (unless mask_pad is False).

  Attributes:
    vocab_size: vocabulary size.
    width, depth, mlp_dim, num_heads: transformer size.
    max_len: maximum sequence length (size of the position embedding).
    causal: use a causal (left-to-right) attention mask in addition to the padding mask.
    pool_type: 'last' (last non-pad position), 'last_position' (position L-1 whatever it
      holds, as big_vision's and Hugging Face's SigLIP), 'eos' (first eos_id, else last
      non-pad), 'argmax' (the first position of the largest id: CLIP's end-of-text token),
      'first' (position 0), 'map' (attention pooling over non-pad tokens), 'none'.
    pad_id: padding token id.
    eos_id: end-of-sequence token id (for pool_type 'eos').
    mask_pad: mask padding positions out as attention keys (and from MAP pooling). False:
      padding is attended to like any token (big_vision / Hugging Face SigLIP, trained without
      a text mask).
    embed_pad_as: if set, padding positions are embedded as this token id (SigLIP pads with
      EOS, id 1: `embed_pad_as=1` makes vljax's pad-0 tokenization give SigLIP's inputs).
    norm_eps, activation: the LayerNorms' epsilon and the MLPs' activation
      (vljax.models.layers.ACTIVATIONS); CLIP: 1e-5 and 'gelu' or 'quick_gelu'.
    dropout: dropout rate inside the blocks (train only).
    remat: remat policy of each block (vljax.models.stacks.REMAT_NAMES; True = 'full').
    scan: run the blocks as one nn.scan (parameters stacked on a leading 'layers' axis).
  """
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_len: int
  causal: bool = False
  pool_type: str = "last"
  pad_id: int = 0
  eos_id: int = 1
  mask_pad: bool = True
  embed_pad_as: int | None = None
  norm_eps: float = 1e-6
  activation: str = "gelu_tanh"
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, train: bool = False) -> tuple[Array | None, Array]:
    """Encodes int tokens [B, L].

    Returns:
      (pooled [B, width] or None for pool_type 'none', sequence [B, L, width] after final LN).
    """
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown pool_type {self.pool_type!r}; valid: {POOL_TYPES}.")
    batch, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"Text length {length} exceeds max_len={self.max_len}.")

    valid = tokens != self.pad_id  # [B, L]
    embedded_ids = tokens if self.embed_pad_as is None else jnp.where(valid, tokens,
                                                                      self.embed_pad_as)
    x = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        name="embedding",
        embedding_init=layers.partitioned(nn.initializers.normal(stddev=0.02),
                                          ("vocab", "embed")))(embedded_ids)
    pos = self.param(
        "pos_embedding",
        layers.partitioned(nn.initializers.normal(stddev=0.01), (None, None, "embed")),
        (1, self.max_len, self.width), self.param_dtype)
    x = x + pos[:, :length].astype(self.dtype)
    x = layers.constrain(x, layers.ACT_SEQ)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)

    # Each query may always attend to itself: a padding query then never sees an all-masked row
    # (which would spread uniformly over every key, future ones included), and real queries are
    # unaffected because their own key is real.
    eye = jnp.eye(length, dtype=bool)
    mask = valid[:, None, None, :] | eye[None, None] if self.mask_pad else None
    if self.causal:
      causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
      mask = causal if mask is None else mask & causal

    x = layers.Encoder(
        self.depth, self.mlp_dim, self.num_heads, dropout=self.dropout, remat=self.remat,
        scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype, norm_eps=self.norm_eps,
        activation=self.activation, name="Encoder_0")(x, mask, train)

    positions = jnp.arange(length)
    last = jnp.max(jnp.where(valid, positions[None], 0), axis=1)  # 0 for an all-pad row
    if self.pool_type == "last":
      pooled = _gather(x, last)
    elif self.pool_type == "last_position":
      pooled = x[:, -1]
    elif self.pool_type == "eos":
      is_eos = tokens == self.eos_id
      idx = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), last)
      pooled = _gather(x, idx)
    elif self.pool_type == "argmax":
      pooled = _gather(x, jnp.argmax(tokens, axis=1))
    elif self.pool_type == "first":
      pooled = x[:, 0]
    elif self.pool_type == "map":
      pooled = layers.MAPHead(self.num_heads, self.mlp_dim, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              name="MAPHead_0")(x, valid if self.mask_pad else None)
    else:
      pooled = None
    return pooled, x


def _gather(x: Array, idx: Array) -> Array:
  """x[b, idx[b]] for x [B, L, D], idx [B]."""
  return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
