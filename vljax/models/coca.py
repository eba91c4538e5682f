"""CoCa (Yu et al., 2022): image encoder, attentional poolers, decoupled text decoder.

One forward pass gives the contrastive image and text embeddings and the captioning logits:

  image -> ViT tokens -> pooler(1 query)   -> LN'd query -> head -> zimg
                      -> pooler(n queries) -> decoder context (n tokens)
  [BOS, caption] + CLS -> unimodal causal layers -> CLS output -> LN -> head -> ztxt
                       -> (without CLS) multimodal causal + cross-attention layers -> logits

Parameter tree (so that '^img/' selects the whole image side, as for the two towers):
  img/encoder/...        VisionTransformer (pool_type 'none')
  img/contrastive_pooler AttentionalPooler with 1 query;  img/head  width -> embed_dim
  img/caption_pooler     AttentionalPooler with num_decoder_queries queries
  txt/...                CocaTextDecoder
  t                      log of the contrastive logit scale;  b  sigmoid bias (optional)

Masking: a caption is its tokens up to and including the first EOS; whatever follows (padding,
or any other ids) is never attended to, so neither the text embedding nor the logits at real
positions depend on the padding. The CLS token is appended after the padding without a
position embedding, so its output does not depend on where the padding ends either.

Decoding: init_cache runs everything that does not depend on the generated tokens once (the
image side, and each multimodal layer's cross-attention keys/values of the decoder context);
decode_step(tokens, position, cache) then projects only the new tokens. Every cache leaf has the
batch as leading dimension (see vljax.decode).

Scan (scan=True): each half is one nn.scan over its layers ('txt/unimodal', 'txt/multimodal',
parameters with a leading depth axis) and each half's cache is one stacked dict whose leaves
are [B, depth, ...]: the depth sits on axis 1 so that the batch stays leading.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import layers
from vljax.models import stacks
from vljax.models import two_towers
from vljax.models import vit

Array = jax.Array
Dtype = Any


def caption_mask(tokens: Array, pad_id: int, eos_id: int) -> Array:
  """True at the real tokens of [B, L] captions: up to and including the first EOS, non-pad."""
  is_eos = tokens == eos_id
  before_or_at_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0
  return before_or_at_eos & (tokens != pad_id)


class CocaTextDecoder(nn.Module):
  """Decoupled text decoder: unimodal (text-only) layers, then multimodal (cross-attending) ones.

  The embedding table has vocab_size + 1 rows: the extra id `vocab_size` is the start (BOS)
  token fed before the caption; the vocabulary head predicts the vocab_size real ids only.

  Attributes:
    vocab_size: tokenizer vocabulary size.
    width, mlp_dim, num_heads: transformer size (shared by both halves).
    unimodal_depth: causal self-attention layers without cross-attention (the CLS token's).
    multimodal_depth: causal self-attention + cross-attention layers (captioning).
    max_len: the longest caption (tokens incl. EOS); positions 0 .. max_len are embedded.
    embed_dim: width of the contrastive embedding.
    pad_id, eos_id: tokenizer ids.
    remat: remat policy of each layer (vljax.models.stacks.REMAT_NAMES; True = 'full').
    scan: run each half as one nn.scan over its layers.
  """
  vocab_size: int
  width: int
  mlp_dim: int
  num_heads: int
  unimodal_depth: int
  multimodal_depth: int
  max_len: int
  embed_dim: int
  pad_id: int = 0
  eos_id: int = 1
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def bos_id(self) -> int:
    return self.vocab_size

  def setup(self):
    self.embedding = nn.Embed(
        self.vocab_size + 1, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=layers.partitioned(nn.initializers.normal(stddev=0.02),
                                          ("vocab", "embed")))
    self.pos_embedding = self.param(
        "pos_embedding",
        layers.partitioned(nn.initializers.normal(stddev=0.01), (None, None, "embed")),
        (1, self.max_len + 1, self.width), self.param_dtype)
    self.cls = self.param(
        "cls", layers.partitioned(nn.initializers.normal(stddev=0.02), (None, None, "embed")),
        (1, 1, self.width), self.param_dtype)
    sizes = dict(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan:
      def half(cross, depth):
        # Arguments (self, x, mask, context, cache, position, train, cache_length): the last two
        # select Python control flow (static); per-layer caches are stacked on axis 1.
        cls = stacks.block_class(_DecoderScanStep, self.remat, True, (6, 7))
        b = nn.broadcast
        cls = stacks.scanned(cls, depth, in_axes=(b, b, 1, b, b, b), out_axes=1)
        return cls(self.mlp_dim, self.num_heads, cross_attention=cross, **sizes)
      self.unimodal = half(False, self.unimodal_depth)
      self.multimodal = half(True, self.multimodal_depth)
    else:
      # Arguments (self, x, mask, context, cache, position, train): `train` is static.
      block_cls = stacks.block_class(layers.DecoderBlock, self.remat, False, (6,))
      block = lambda cross: block_cls(self.mlp_dim, self.num_heads, cross_attention=cross,
                                      **sizes)
      self.unimodal = [block(False) for _ in range(self.unimodal_depth)]
      self.multimodal = [block(True) for _ in range(self.multimodal_depth)]
    self.embed_dropout = nn.Dropout(rate=self.dropout)
    self.cls_norm = layers.layer_norm(self.dtype, self.param_dtype)
    self.head = nn.Dense(
        self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", None)),
        bias_init=layers.partitioned(nn.initializers.zeros, (None,)))
    self.decoder_norm = layers.layer_norm(self.dtype, self.param_dtype)
    # float32 whatever the compute dtype: the caption logits feed a float32 log-softmax, and
    # bf16 logits over a large vocabulary would be rounded before it.
    self.logits_head = nn.Dense(
        self.vocab_size, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), ("embed", "vocab")),
        bias_init=layers.partitioned(nn.initializers.zeros, ("vocab",)))

  def _embed(self, tokens: Array, start: Array | int = 0) -> Array:
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embedding, start, tokens.shape[1], axis=1)
    return layers.constrain(self.embedding(tokens) + pos.astype(self.dtype), layers.ACT_SEQ)

  def _unimodal(self, tokens: Array, train: bool) -> tuple[Array, Array, Array]:
    """Runs [BOS, tokens] + CLS through the unimodal layers.

    Returns (hidden states of the L+1 text positions, the unnormalised contrastive text
    embedding [B, embed_dim], the text-position attention mask [B, 1, L+1, L+1]).
    """
    batch, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"Text length {length} exceeds max_len={self.max_len}.")
    valid = caption_mask(tokens, self.pad_id, self.eos_id)
    inputs = jnp.concatenate([jnp.full((batch, 1), self.bos_id, tokens.dtype), tokens], axis=1)
    valid = jnp.concatenate([jnp.ones((batch, 1), bool), valid], axis=1)  # BOS is real
    x = self._embed(inputs)
    # The CLS token gets no position embedding: it sits after the padding, whose length varies.
    cls = jnp.broadcast_to(self.cls.astype(self.dtype), (batch, 1, self.width))
    x = layers.constrain(jnp.concatenate([x, cls], axis=1), layers.ACT_SEQ)
    n = length + 2
    keys = jnp.concatenate([valid, jnp.ones((batch, 1), bool)], axis=1)
    # Causal over real keys; every query may attend to itself, so a padding query never has an
    # all-masked row (real queries are unaffected: their own key is real).
    causal = jnp.tril(jnp.ones((n, n), bool))
    mask = (keys[:, None, None, :] | jnp.eye(n, dtype=bool)[None, None]) & causal[None, None]
    x = self.embed_dropout(x, deterministic=not train)
    if self.scan:
      x, _ = self.unimodal(x, mask, None, None, None, train, None)
    else:
      for blk in self.unimodal:
        x, _ = blk(x, mask, None, None, None, train)
    ztxt = self.head(self.cls_norm(x[:, -1]))
    return x[:, :-1], ztxt, mask[:, :, :-1, :-1]

  def __call__(self, tokens: Array, context: Array | None,
               train: bool = False) -> tuple[Array, Array | None]:
    """Embeds captions [B, L] and, given image context [B, n, Dc], predicts them.

    Returns:
      (unnormalised text embedding [B, embed_dim], logits [B, L, vocab] float32 or None) where
      logits[:, i] predicts tokens[:, i] from the image and tokens[:, :i].
    """
    x, ztxt, mask = self._unimodal(tokens, train)
    if context is None:
      return ztxt, None
    # The input after the last token only predicts beyond the caption: drop it.
    x, mask = x[:, :-1], mask[:, :, :-1, :-1]
    if self.scan:
      x, _ = self.multimodal(x, mask, context, None, None, train, None)
    else:
      for blk in self.multimodal:
        x, _ = blk(x, mask, context, None, None, train)
    return ztxt, self._logits(x)

  def _logits(self, x: Array) -> Array:
    logits = self.logits_head(self.decoder_norm(x)).astype(jnp.float32)
    return layers.constrain(logits, ("act_batch", "act_len", None))

  def init_cache(self, context: Array, length: int) -> dict[str, Any]:
    """Decoding cache for up to `length` decoder inputs, given image context [B, n, Dc].

    'unimodal' / 'multimodal': one cache per layer (layers.DecoderBlock.init_cache), every leaf
    batch-leading. Each multimodal layer's holds empty self-attention keys/values and the
    cross-attention keys/values of the context, computed here once; the context itself is not
    kept, decode_step needs only these.
    """
    batch = context.shape[0]
    if self.scan:
      # The carry is a placeholder: in cache mode a layer only builds its cache.
      carry = jnp.zeros((batch, 1, self.width), self.dtype)
      return {"unimodal": self.unimodal(carry, None, None, None, None, False, length)[1],
              "multimodal": self.multimodal(carry, None, context, None, None, False,
                                            length)[1]}
    return {"unimodal": [blk.init_cache(batch, length, self.width) for blk in self.unimodal],
            "multimodal": [blk.init_cache(batch, length, self.width, context)
                           for blk in self.multimodal]}

  def decode_step(self, tokens: Array, position: Array,
                  cache: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
    """Feeds the decoder inputs [B, T] at positions position.. and returns next-token logits.

    The CLS token is not needed: under the causal mask no caption position attends to it. The
    image enters only through the cached cross-attention keys/values (init_cache).

    Returns:
      (logits [B, T, vocab] float32, updated cache).
    """
    x = self._embed(tokens, position)
    if self.scan:
      x, unimodal = self.unimodal(x, None, None, cache["unimodal"], position, False, None)
      x, multimodal = self.multimodal(x, None, None, cache["multimodal"], position, False,
                                      None)
      return self._logits(x), {"unimodal": unimodal, "multimodal": multimodal}
    new = {"unimodal": [], "multimodal": []}
    for half, blocks in (("unimodal", self.unimodal), ("multimodal", self.multimodal)):
      for blk, c in zip(blocks, cache[half]):
        x, c = blk(x, None, None, c, position, False)
        new[half].append(c)
    return self._logits(x), new


class _DecoderScanStep(layers.DecoderBlock):
  """A DecoderBlock as the body of nn.scan: (x, ...) -> (x, this layer's cache).

  With cache_length it builds this layer's decoding cache instead (init_cache; x passes
  through), so that a scanned half creates every layer's cross-attention keys/values with that
  layer's parameters. Same children and parameters as DecoderBlock.
  """

  def __call__(self, x: Array, mask: Array | None, context: Array | None,
               cache: dict[str, Array] | None, position: Array | None, train: bool,
               cache_length: int | None) -> tuple[Array, dict[str, Array] | None]:
    if cache_length is not None:
      return x, self.init_cache(x.shape[0], cache_length, x.shape[-1], context)
    return super().__call__(x, mask, context, cache, position, train)


class CocaImageEncoder(nn.Module):
  """ViT tokens -> (contrastive embedding before L2 [B, embed_dim], decoder context [B, n, D])."""
  image: Mapping[str, Any]
  embed_dim: int
  num_decoder_queries: int
  pooler_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> tuple[Array, Array]:
    kwargs = two_towers.tower_kwargs(self.image, self.dtype, self.param_dtype)
    kwargs["pool_type"] = "none"  # CoCa pools with its own attentional poolers
    _, tokens = vit.VisionTransformer(**kwargs, name="encoder")(images, train)
    pooled = layers.AttentionalPooler(1, self.pooler_heads, dtype=self.dtype,
                                      param_dtype=self.param_dtype,
                                      name="contrastive_pooler")(tokens)[:, 0]
    zimg = nn.Dense(
        self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", None)),
        bias_init=layers.partitioned(nn.initializers.zeros, (None,)))(pooled)
    context = layers.AttentionalPooler(self.num_decoder_queries, self.pooler_heads,
                                       dtype=self.dtype, param_dtype=self.param_dtype,
                                       name="caption_pooler")(tokens)
    return zimg, context


class CoCa(nn.Module):
  """Contrastive captioner: image encoder + poolers, decoupled text decoder, logit scale.

  Attributes:
    image: VisionTransformer kwargs (may hold 'variant', e.g. 'B/18').
    text: CocaTextDecoder kwargs other than embed_dim/dtypes (vocab_size, width, mlp_dim,
      num_heads, unimodal_depth, multimodal_depth, max_len, pad_id, eos_id).
    embed_dim: contrastive embedding width.
    num_decoder_queries: queries of the captioning pooler (256 in the paper).
    temperature_init: initial contrastive logit scale (stored as its log in 't').
    bias_init: sigmoid-loss bias init; None creates no 'b'.
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  embed_dim: int
  num_decoder_queries: int = 256
  temperature_init: float = 1 / 0.07
  bias_init: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    image = two_towers.tower_kwargs(self.image, self.dtype, self.param_dtype)
    self.img = CocaImageEncoder(self.image, self.embed_dim, self.num_decoder_queries,
                                pooler_heads=image["num_heads"], dtype=self.dtype,
                                param_dtype=self.param_dtype)
    self.txt = CocaTextDecoder(**self.text, embed_dim=self.embed_dim, dtype=self.dtype,
                               param_dtype=self.param_dtype)
    self.t = layers.scalar_param(self, "t", math.log(self.temperature_init), self.param_dtype)
    if self.bias_init is not None:
      self.b = layers.scalar_param(self, "b", float(self.bias_init), self.param_dtype)

  def logit_scalars(self) -> dict[str, Array]:
    """{'scale': exp(t)} and, with a sigmoid bias, {'bias': b}."""
    out = {"scale": jnp.exp(self.t.astype(jnp.float32))}
    if self.bias_init is not None:
      out["bias"] = self.b.astype(jnp.float32)
    return out

  def __call__(self, images: Array, tokens: Array, train: bool = False) -> dict[str, Array]:
    """One pass for both objectives.

    Returns a dict with 'zimg', 'ztxt' ([B, embed_dim], float32, unit norm), 'logits'
    ([B, L, vocab] float32, logits[:, i] predicts tokens[:, i]), 'scale' and maybe 'bias'.
    """
    zimg, context = self.img(images, train)
    ztxt, logits = self.txt(tokens, context, train)
    return {"zimg": two_towers.l2_normalize(zimg), "ztxt": two_towers.l2_normalize(ztxt),
            "logits": logits, **self.logit_scalars()}

  def embed_images(self, images: Array) -> Array:
    return two_towers.l2_normalize(self.img(images)[0])

  def embed_texts(self, tokens: Array) -> Array:
    return two_towers.l2_normalize(self.txt(tokens, None)[0])

  def decoder_context(self, images: Array) -> Array:
    """The captioning pooler's tokens [B, n, D] that the multimodal layers attend to."""
    return self.img(images)[1]

  def caption_logits(self, context: Array, tokens: Array) -> Array:
    """Full-prefix logits [B, L, vocab] of captions [B, L] given the decoder context."""
    return self.txt(tokens, context)[1]

  def init_cache(self, images: Array, length: int) -> dict[str, Any]:
    """Decoding cache for captions of up to `length` tokens of images [B, H, W, 3]: the image
    side and every multimodal layer's cross-attention keys/values run here, once (see
    CocaTextDecoder.init_cache)."""
    return self.txt.init_cache(self.decoder_context(images), length)

  def decode_step(self, tokens: Array, position: Array,
                  cache: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
    """Decoder inputs [B, T] at positions position.. -> (logits [B, T, vocab], cache)."""
    return self.txt.decode_step(tokens, position, cache)
