"""T5 v1.1-style text transformers for PaLI: an encoder-decoder and a prefix-LM.

Both follow the T5 v1.1 / mT5 / UL2 conventions:
  * RMSNorm (scale only, eps 1e-6, statistics in float32), pre-norm residual blocks and a final
    RMSNorm per stack;
  * attention without biases and without the 1/sqrt(head_dim) logit scale: T5 folds that factor
    into the query initialisation (see `Attention`);
  * T5's relative position bias: a learned [num_buckets, heads] table per stack, held by the
    stack as `relpos_bias` and shared by all of its layers; relative positions are bucketed
    (exact for small distances, log-spaced up to max_distance). The encoder uses bidirectional
    buckets, the decoder's self-attention causal ones, cross-attention none;
  * gated-GELU MLP wo(gelu(wi_0 x) * wi_1 x), no biases (tanh-approximated GELU, as T5 v1.1);
  * a token embedding with vocab_size + 1 rows (the extra id `vocab_size` is the decoder's start
    token, BOS), shared by the encoder and decoder inputs, and an untied float32 output head
    `logits` over the vocab_size real ids;
  * T5's dropout placement: after the embedding, on the attention probabilities, inside the MLP,
    on every residual branch and after each stack's final norm (train only).

Initialisation (T5X's T5 v1.1): every kernel is variance_scaling(1, fan_in); attention kernels
draw from a normal, MLP and output-head kernels from a truncated normal; the query kernel's
standard deviation is further divided by sqrt(head_dim), which is what stands in for the missing
logit scale. Embeddings are N(0, 1), the relative-bias table variance_scaling(1, fan_avg,
uniform), norm scales ones.

EncoderDecoder parameter tree (names after T5X's):
  token_embedder/embedding                 [vocab_size + 1, width]
  encoder/relpos_bias/rel_embedding        [num_buckets, heads]
  encoder/layers_i/{pre_attention_norm, attention/{query,key,value,out}, pre_mlp_norm,
                    mlp/{wi_0, wi_1, wo}}
  encoder/encoder_norm
  decoder/relpos_bias, decoder/layers_i/{pre_self_attention_norm, self_attention,
                    pre_cross_attention_norm, encoder_decoder_attention, pre_mlp_norm, mlp}
  decoder/decoder_norm, decoder/logits/kernel [width, vocab_size]

PrefixLM (PaliGemma / SimVLM style) is ONE stack over [inputs, BOS, targets]: the real input
tokens attend to each other bidirectionally, a target position attends to every real input and
to the targets up to itself, nothing attends to padding. Its positions count real tokens only,
so padding between the inputs and the targets changes nothing. Tree: token_embedder,
relpos_bias (bidirectional buckets), layers_i (encoder layers), decoder_norm, logits.

Decoding: `init_cache` runs everything that does not depend on the generated tokens once (the
encoder output's cross-attention keys/values per decoder layer; the prefix-LM's input K/V), and
`decode_step(tokens, position, cache)` feeds decoder inputs, BOS at position 0. Every cache leaf
has the batch as leading dimension (see vljax.decode).

Scan (scan=True, every stack): `layers_i` become one nn.scan named `layers` whose parameters
have a leading depth axis; the relative position bias is still computed once per stack and
broadcast to every layer, and the per-layer decoding caches become one stacked dict whose
leaves are [B, depth, ...] (the depth on axis 1, so that the batch stays leading).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.configlib import ConfigError
from vljax.models import coca
from vljax.models import layers
from vljax.models import stacks

Array = jax.Array
Dtype = Any

# Named sizes (width, num_heads, head_dim, mlp_dim, encoder_depth, decoder_depth).
# T5 v1.1 (the t5.1.1.*.gin configs of google-research/text-to-text-transfer-transformer);
# mT5 (Xue et al., 2021, "mT5: A massively multilingual pre-trained text-to-text transformer")
# uses exactly these shapes with a 250k vocabulary; the UL2 paper (Tay et al., 2022) pretrains
# T5 v1.1-shaped encoder-decoders; PaLI-3 (Chen et al., 2023, "PaLI-3 Vision Language Models:
# Smaller, Faster, Stronger") uses a 3B UL2 encoder-decoder, which has the "xl" shape.
SIZES: dict[str, dict[str, int]] = {
    "small": dict(width=512, num_heads=6, head_dim=64, mlp_dim=1024, encoder_depth=8,
                  decoder_depth=8),
    "base": dict(width=768, num_heads=12, head_dim=64, mlp_dim=2048, encoder_depth=12,
                 decoder_depth=12),
    "large": dict(width=1024, num_heads=16, head_dim=64, mlp_dim=2816, encoder_depth=24,
                  decoder_depth=24),
    "xl": dict(width=2048, num_heads=32, head_dim=64, mlp_dim=5120, encoder_depth=24,
               decoder_depth=24),
    "xxl": dict(width=4096, num_heads=64, head_dim=64, mlp_dim=10240, encoder_depth=24,
                decoder_depth=24),
}

ARCHITECTURES = ("encdec", "prefix_lm")
_SIZE_KEYS = ("width", "num_heads", "head_dim", "mlp_dim")
_OPTIONAL_KEYS = ("num_buckets", "max_distance", "dropout", "pad_id", "eos_id", "scan",
                  "remat")
_DEPTH_KEYS = {"encdec": ("encoder_depth", "decoder_depth"), "prefix_lm": ("depth",)}


def text_kwargs(config: Mapping[str, Any], architecture: str) -> dict[str, Any]:
  """Resolves text-model kwargs: expands an optional 'variant' (a SIZES name); explicit keys win.

  For the prefix-LM, a variant's depth is encoder_depth + decoder_depth (about the parameters of
  the encoder-decoder without its cross-attention).

  Raises:
    ConfigError: unknown architecture, variant or key, or a missing size.
  """
  if architecture not in ARCHITECTURES:
    raise ConfigError(f"model.architecture={architecture!r} is unknown; choose one of "
                      f"{list(ARCHITECTURES)}.")
  config = dict(config)
  variant = config.pop("variant", None)
  kwargs: dict[str, Any] = {}
  if variant is not None:
    if variant not in SIZES:
      raise ConfigError(f"model.text.variant={variant!r} is unknown; choose one of "
                        f"{list(SIZES)} or give the sizes explicitly.")
    kwargs = dict(SIZES[variant])
    if architecture == "prefix_lm":
      kwargs["depth"] = kwargs.pop("encoder_depth") + kwargs.pop("decoder_depth")
  kwargs.update(config)
  allowed = {"vocab_size", *_SIZE_KEYS, *_OPTIONAL_KEYS, *_DEPTH_KEYS[architecture]}
  for key in kwargs:
    if key not in allowed:
      raise ConfigError(f"model.text.{key} is not a {architecture} setting; valid keys are "
                        f"{sorted(allowed)} (and 'variant').")
  for key in ("vocab_size", *_SIZE_KEYS, *_DEPTH_KEYS[architecture]):
    if key not in kwargs:
      raise ConfigError(f"model.text.{key} is missing; set it or a variant from {list(SIZES)}.")
  return kwargs


def relative_position_bucket(relative_position: Array, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """T5's bucket of each relative position (key position - query position), int32.

  Bidirectional: half the buckets for keys at or before the query, half (offset num_buckets/2)
  for keys after it. Causal: keys after the query share bucket 0 (the mask hides them anyway).
  Within a half of n buckets, distances below n/2 get their own bucket; larger ones are spaced
  logarithmically up to max_distance, and everything farther shares the last bucket.
  """
  rel = jnp.asarray(relative_position, jnp.int32)
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(rel > 0, num_buckets, 0)
    distance = jnp.abs(rel)
  else:
    offset = jnp.zeros_like(rel)
    distance = jnp.maximum(-rel, 0)
  max_exact = num_buckets // 2
  # float32 as in T5; eps keeps the log finite at distance 0 (which the exact branch takes).
  ratio = distance.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps
  log_bucket = (jnp.log(ratio) / math.log(max_distance / max_exact)
                * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(max_exact + log_bucket, num_buckets - 1)
  return offset + jnp.where(distance < max_exact, distance, large)


def real_positions(mask: Array) -> Array:
  """Position of each token counting real tokens only: cumsum(mask) - 1, [B, L] int32.

  A padding token gets the position of the real token before it; it is never attended to by
  another token, so its value only matters for its own (discarded) output.
  """
  return jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale: no mean subtraction, no bias; statistics in float32."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", layers.partitioned(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * scale.astype(jnp.float32)).astype(self.dtype)


class Projection(nn.Module):
  """Bias-free linear map contracting the last `in_ndim` dims of x into `features`.

  The kernel is variance_scaling(init_scale, fan_in, distribution) over its true N-D shape
  (fan_in = product of the contracted dims), with logical axis names `kernel_names`.
  """
  features: tuple[int, ...]
  kernel_names: tuple[str | None, ...]
  in_ndim: int = 1
  init_scale: float = 1.0
  distribution: str = "truncated_normal"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.in_ndim:]
    in_axes = tuple(range(self.in_ndim))
    out_axes = tuple(range(self.in_ndim, self.in_ndim + len(self.features)))
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", self.distribution,
                                            in_axis=in_axes, out_axis=out_axes)
    kernel = self.param("kernel", layers.partitioned(init, self.kernel_names),
                        in_shape + tuple(self.features), self.param_dtype)
    contract = tuple(range(x.ndim - self.in_ndim, x.ndim))
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                               ((contract, in_axes), ((), ())))


class RelativePositionBias(nn.Module):
  """T5 relative position bias: a learned [num_buckets, heads] table indexed by bucket."""
  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """Bias [B, heads, Lq, Lk] float32 for positions [B, Lq] and [B, Lk] (B may be 1)."""
    table = self.param(
        "rel_embedding",
        layers.partitioned(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                           (None, "heads")),
        (self.num_buckets, self.num_heads), self.param_dtype)
    rel = key_positions[:, None, :] - query_positions[:, :, None]
    buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [B, Lq, Lk, heads]
    return jnp.transpose(bias, (0, 3, 1, 2))


class Attention(nn.Module):
  """Multi-head attention without biases or logit scaling, with an optional additive bias.

  `kv` projects the key/value inputs and `attend` attends with given keys/values, so that
  callers can cache either (decoder self-attention buffers, cross-attention over the encoder).
  """
  width: int
  num_heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    heads = (self.num_heads, self.head_dim)
    names = ("embed", "heads", "kv")

    def proj(scale):
      return Projection(heads, names, init_scale=scale, distribution="normal", dtype=self.dtype,
                        param_dtype=self.param_dtype)

    # T5 does not divide the logits by sqrt(head_dim); the query kernel's init is that much
    # smaller instead (variance / head_dim), equivalent at initialisation.
    self.query = proj(1.0 / self.head_dim)
    self.key = proj(1.0)
    self.value = proj(1.0)
    self.out = Projection((self.width,), ("heads", "kv", "embed"), in_ndim=2,
                          distribution="normal", dtype=self.dtype, param_dtype=self.param_dtype)
    self.probs_dropout = nn.Dropout(rate=self.dropout)

  def kv(self, inputs: Array) -> tuple[Array, Array]:
    """Keys and values [B, L, heads, head_dim] of inputs [B, L, D]."""
    return (layers.constrain(self.key(inputs), layers.ACT_HEADS),
            layers.constrain(self.value(inputs), layers.ACT_HEADS))

  def attend(self, x: Array, keys: Array, values: Array, bias: Array | None,
             mask: Array | None, train: bool = False) -> Array:
    """Attends from x [B, Lq, D] to keys/values [B, Lk, heads, head_dim].

    Args:
      x: query inputs.
      keys, values: from `kv`.
      bias: optional float32, broadcastable to [B, heads, Lq, Lk], added to the logits.
      mask: optional bool, broadcastable to [B, heads, Lq, Lk]; True = may attend.
      train: enables dropout on the attention probabilities.

    Returns:
      [B, Lq, width].
    """
    q = layers.constrain(self.query(x), layers.ACT_HEADS)
    probs_dropout = None
    if self.dropout and train:
      probs_dropout = lambda p: self.probs_dropout(p, deterministic=False)
    # T5 does not scale the logits (its query initialisation does): scale 1.
    y = layers.attend(q, keys, values, mask, self.dtype, probs_dropout, bias=bias, scale=1.0)
    return self.out(layers.constrain(y, layers.ACT_HEADS))

  def __call__(self, x: Array, inputs_kv: Array, bias: Array | None = None,
               mask: Array | None = None, train: bool = False) -> Array:
    return self.attend(x, *self.kv(inputs_kv), bias, mask, train)


class GatedGeluMlp(nn.Module):
  """wo(gelu(wi_0 x) * wi_1 x), no biases; dropout on the hidden activations (train only)."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    width = x.shape[-1]
    proj = lambda n, names, name: Projection(  # pylint: disable=g-long-lambda
        (n,), names, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    gate = proj(self.mlp_dim, ("embed", "mlp"), "wi_0")(x)
    linear = proj(self.mlp_dim, ("embed", "mlp"), "wi_1")(x)
    h = layers.constrain(nn.gelu(gate, approximate=True) * linear,
                         ("act_batch", "act_len", "act_mlp"))
    h = nn.Dropout(rate=self.dropout)(h, deterministic=not train)
    return layers.constrain(proj(width, ("mlp", "embed"), "wo")(h), layers.ACT_SEQ)


def _cached_self_kv(attention: Attention, y: Array, cache: dict[str, Array] | None,
                    index: Array | int | None) -> tuple[Array, Array, dict[str, Array] | None]:
  """Self-attention keys/values of y, written into `cache` buffers at `index` when given.

  Returns (keys, values, new cache): the whole buffers with a cache, y's own K/V without.
  """
  keys, values = attention.kv(y)
  if cache is None:
    return keys, values, None
  start = (0, index, 0, 0)
  keys = jax.lax.dynamic_update_slice(cache["key"], keys.astype(cache["key"].dtype), start)
  values = jax.lax.dynamic_update_slice(cache["value"], values.astype(cache["value"].dtype),
                                        start)
  return keys, values, {"key": keys, "value": values}


class EncoderLayer(nn.Module):
  """x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x)). Also the prefix-LM's layer (with a KV cache)."""
  width: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array, mask: Array, cache: dict[str, Array] | None = None,
               cache_index: Array | int | None = None,
               train: bool = False) -> tuple[Array, dict[str, Array] | None]:
    """Returns (output [B, L, D], updated self-attention cache or None).

    With a cache ({'key', 'value'}: [B, S, heads, head_dim]) x's keys/values are written at
    cache_index and x attends over the whole buffer under `mask` [.., L, S].
    """
    norm = lambda name: RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    drop = nn.Dropout(rate=self.dropout)
    x = layers.constrain(x, layers.ACT_SEQ)
    attention = Attention(self.width, self.num_heads, self.head_dim, dropout=self.dropout,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="attention")
    y = norm("pre_attention_norm")(x)
    keys, values, cache = _cached_self_kv(attention, y, cache, cache_index)
    y = attention.attend(y, keys, values, bias, mask, train)
    x = layers.constrain(x + drop(y, deterministic=not train), layers.ACT_SEQ)
    y = GatedGeluMlp(self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="mlp")(norm("pre_mlp_norm")(x), train)
    return layers.constrain(x + drop(y, deterministic=not train), layers.ACT_SEQ), cache


class DecoderLayer(nn.Module):
  """Causal self-attention (KV-cacheable), cross-attention to the encoder output, MLP; pre-norm."""
  width: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    norm = lambda: RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype)
    attention = lambda: Attention(  # pylint: disable=g-long-lambda
        self.width, self.num_heads, self.head_dim, dropout=self.dropout, dtype=self.dtype,
        param_dtype=self.param_dtype)
    self.pre_self_attention_norm = norm()
    self.self_attention = attention()
    self.pre_cross_attention_norm = norm()
    self.encoder_decoder_attention = attention()
    self.pre_mlp_norm = norm()
    self.mlp = GatedGeluMlp(self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                            param_dtype=self.param_dtype)
    self.residual_dropout = nn.Dropout(rate=self.dropout)

  def cross_kv(self, encoded: Array) -> tuple[Array, Array]:
    """Cross-attention keys/values [B, L, heads, head_dim] of the encoder output [B, L, D]."""
    return self.encoder_decoder_attention.kv(encoded)

  def __call__(self, x: Array, self_bias: Array, self_mask: Array, cross_keys: Array,
               cross_values: Array, cross_mask: Array, cache: dict[str, Array] | None = None,
               position: Array | int | None = None,
               train: bool = False) -> tuple[Array, dict[str, Array] | None]:
    """Returns (output [B, T, D], updated self-attention cache or None)."""
    drop = lambda y: self.residual_dropout(y, deterministic=not train)
    x = layers.constrain(x, layers.ACT_SEQ)
    y = self.pre_self_attention_norm(x)
    keys, values, cache = _cached_self_kv(self.self_attention, y, cache, position)
    y = self.self_attention.attend(y, keys, values, self_bias, self_mask, train)
    x = layers.constrain(x + drop(y), layers.ACT_SEQ)
    y = self.pre_cross_attention_norm(x)
    y = self.encoder_decoder_attention.attend(y, cross_keys, cross_values, None, cross_mask,
                                              train)
    x = layers.constrain(x + drop(y), layers.ACT_SEQ)
    y = self.mlp(self.pre_mlp_norm(x), train)
    return layers.constrain(x + drop(y), layers.ACT_SEQ), cache


def _logits_head(vocab_size: int, param_dtype: Dtype) -> Projection:
  """The untied output head. It runs in float32 whatever the compute dtype (as T5X): its
  logits feed a softmax."""
  return Projection((vocab_size,), ("embed", "vocab"), dtype=jnp.float32,
                    param_dtype=param_dtype)


def _project_logits(norm: RMSNorm, dropout: nn.Dropout, head: Projection, x: Array,
                    train: bool) -> Array:
  """Final RMSNorm, dropout, float32 logits [B, T, vocab]."""
  x = dropout(norm(x), deterministic=not train)
  return layers.constrain(head(x), ("act_batch", "act_len", None))


class Encoder(nn.Module):
  """Bidirectional T5 encoder stack: relpos_bias, layers_0.., encoder_norm."""
  width: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  depth: int
  num_buckets: int = 32
  max_distance: int = 128
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, train: bool = False) -> Array:
    """Encodes embeddings x [B, L, D] whose real tokens are mask [B, L]; returns [B, L, D].

    Positions are token indices (as T5): pad the inputs on the right.
    """
    length = x.shape[1]
    positions = jnp.arange(length)[None]
    bias = RelativePositionBias(self.num_heads, True, self.num_buckets, self.max_distance,
                                param_dtype=self.param_dtype, name="relpos_bias")(
                                    positions, positions)
    # Nothing attends to padding; a padding query attends to itself so no row is empty.
    attn_mask = mask[:, None, None, :] | jnp.eye(length, dtype=bool)[None, None]
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
    layer_cls = _encoder_layer_class(self.remat, self.scan, self.depth)
    sizes = dict(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan:
      x, _ = layer_cls(self.width, self.num_heads, self.head_dim, self.mlp_dim, **sizes,
                       name="layers")(x, bias, attn_mask, None, None, train)
    else:
      for i in range(self.depth):
        x, _ = layer_cls(self.width, self.num_heads, self.head_dim, self.mlp_dim, **sizes,
                         name=f"layers_{i}")(x, bias, attn_mask, None, None, train)
    x = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="encoder_norm")(x)
    return nn.Dropout(rate=self.dropout)(x, deterministic=not train)


def _encoder_layer_class(remat: bool | str, scan: bool, depth: int) -> type:
  """EncoderLayer with the remat policy, scanned over `depth` layers under scan.

  Arguments (self, x, bias, mask, cache, cache_index, train): `train` is static; a cache is
  stacked on axis 1 (batch-leading), everything else is the same for every layer.
  """
  layer_cls = stacks.block_class(EncoderLayer, remat, scan, (6,))
  if not scan:
    return layer_cls
  b = nn.broadcast
  return stacks.scanned(layer_cls, depth, in_axes=(b, b, 1, b, b), out_axes=1)


class _DecoderLayerScanStep(DecoderLayer):
  """A DecoderLayer as the body of nn.scan, with its cache as one dict (Decoder's layout).

  Projects the encoder output's cross-attention keys/values itself (each layer with its own
  parameters): in the forward pass (no cache) to attend with them, with build_cache to return
  them as this layer's {'cross_key', 'cross_value'}. Decoding (a cache {'self_key',
  'self_value', 'cross_key', 'cross_value'}) takes them from the cache. Same parameters as
  DecoderLayer.
  """

  def __call__(self, x: Array, bias: Array | None, mask: Array | None, encoded: Array | None,
               cross_mask: Array | None, cache: dict[str, Array] | None,
               position: Array | int | None, train: bool,
               build_cache: bool) -> tuple[Array, dict[str, Array] | None]:
    if build_cache:
      keys, values = self.cross_kv(encoded)
      return x, {"cross_key": keys, "cross_value": values}
    if cache is None:
      keys, values = self.cross_kv(encoded)
      return super().__call__(x, bias, mask, keys, values, cross_mask, None, None, train)
    x, self_cache = super().__call__(
        x, bias, mask, cache["cross_key"], cache["cross_value"], cross_mask,
        {"key": cache["self_key"], "value": cache["self_value"]}, position, train)
    return x, {**cache, "self_key": self_cache["key"], "self_value": self_cache["value"]}


def _decoder_layer_class(remat: bool | str, scan: bool, depth: int) -> type:
  """DecoderLayer (or, under scan, _DecoderLayerScanStep scanned over `depth` layers) with
  the remat policy."""
  if not scan:
    # Arguments (self, x, self_bias, self_mask, cross_keys, cross_values, cross_mask, cache,
    # position, train): `train` is static.
    return stacks.block_class(DecoderLayer, remat, False, (9,))
  # Arguments (self, x, bias, mask, encoded, cross_mask, cache, position, train,
  # build_cache): the last two are static; the cache is stacked on axis 1.
  layer_cls = stacks.block_class(_DecoderLayerScanStep, remat, True, (8, 9))
  b = nn.broadcast
  return stacks.scanned(layer_cls, depth, in_axes=(b, b, b, b, 1, b, b, b), out_axes=1)


def _setup_generating_stack(module: nn.Module, layer_cls: type, bidirectional: bool) -> None:
  """Sets up, inside `module.setup`, what every stack that ends in logits has: relpos_bias,
  layers_0.. (or the scanned `layers`), decoder_norm, final_dropout, logits, embed_dropout
  (Decoder, PrefixLM). `layer_cls` is the (remat / scan) class from _encoder_layer_class or
  _decoder_layer_class."""
  module.relpos_bias = RelativePositionBias(module.num_heads, bidirectional, module.num_buckets,
                                            module.max_distance,
                                            param_dtype=module.param_dtype)
  make = lambda: layer_cls(module.width, module.num_heads, module.head_dim,  # pylint: disable=g-long-lambda
                           module.mlp_dim, dropout=module.dropout, dtype=module.dtype,
                           param_dtype=module.param_dtype)
  module.layers = make() if module.scan else [make() for _ in range(module.depth)]
  module.decoder_norm = RMSNorm(dtype=module.dtype, param_dtype=module.param_dtype)
  module.final_dropout = nn.Dropout(rate=module.dropout)
  module.logits = _logits_head(module.vocab_size, module.param_dtype)
  module.embed_dropout = nn.Dropout(rate=module.dropout)


class Decoder(nn.Module):
  """Causal T5 decoder stack with cross-attention: relpos_bias, layers_0.., decoder_norm, logits.

  Takes embedded decoder inputs (the embedding is the encoder-decoder's shared one).
  """
  vocab_size: int
  width: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  depth: int
  num_buckets: int = 32
  max_distance: int = 128
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    # Causal buckets: a decoder position never looks ahead.
    _setup_generating_stack(self, _decoder_layer_class(self.remat, self.scan, self.depth),
                            bidirectional=False)

  def _logits(self, x: Array, train: bool) -> Array:
    return _project_logits(self.decoder_norm, self.final_dropout, self.logits, x, train)

  def __call__(self, x: Array, encoded: Array, encoded_mask: Array,
               train: bool = False) -> Array:
    """Logits [B, T, vocab] float32 of embedded decoder inputs x [B, T, D] (causal)."""
    positions = jnp.arange(x.shape[1])[None]
    bias = self.relpos_bias(positions, positions)
    # Causal only: targets are right-padded, so a real position's past holds no padding.
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None, None]
    cross_mask = encoded_mask[:, None, None, :]
    x = self.embed_dropout(x, deterministic=not train)
    if self.scan:
      x, _ = self.layers(x, bias, causal, encoded, cross_mask, None, None, train, False)
      return self._logits(x, train)
    for layer in self.layers:
      cross_keys, cross_values = layer.cross_kv(encoded)
      x, _ = layer(x, bias, causal, cross_keys, cross_values, cross_mask, None, None, train)
    return self._logits(x, train)

  def init_cache(self, encoded: Array, encoded_mask: Array, max_len: int) -> dict[str, Any]:
    """Cross-attention K/V of `encoded` per layer (computed here, once) and empty self K/V."""
    batch = encoded.shape[0]
    encoded_mask = encoded_mask.astype(bool)
    if self.scan:
      # The carry is a placeholder: with build_cache a layer only projects `encoded`.
      carry = jnp.zeros((batch, 1, self.width), self.dtype)
      _, cross = self.layers(carry, None, None, encoded, None, None, None, False, True)
      empty = jnp.zeros((batch, self.depth, max_len, self.num_heads, self.head_dim),
                        self.dtype)
      return {"encoded_mask": encoded_mask,
              "layers": {"self_key": empty, "self_value": empty, **cross}}
    empty = jnp.zeros((batch, max_len, self.num_heads, self.head_dim), self.dtype)
    per_layer = []
    for layer in self.layers:
      cross_keys, cross_values = layer.cross_kv(encoded)
      per_layer.append({"self_key": empty, "self_value": empty, "cross_key": cross_keys,
                        "cross_value": cross_values})
    return {"encoded_mask": encoded_mask, "layers": per_layer}

  def decode_step(self, x: Array, position: Array | int,
                  cache: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
    """Logits [B, T, vocab] of embedded inputs x [B, T, D] at positions position.. (cached)."""
    if self.scan:  # stacked [B, depth, max_len, heads, head_dim]
      max_len = cache["layers"]["self_key"].shape[2]
    else:
      max_len = cache["layers"][0]["self_key"].shape[1]
    query_positions = position + jnp.arange(x.shape[1])
    key_positions = jnp.arange(max_len)
    bias = self.relpos_bias(query_positions[None], key_positions[None])
    # Buffer slots after the query hold zeros (or stale entries): never attend there.
    causal = (key_positions[None, :] <= query_positions[:, None])[None, None]
    cross_mask = cache["encoded_mask"][:, None, None, :]
    if self.scan:
      x, new_layers = self.layers(x, bias, causal, None, cross_mask, cache["layers"], position,
                                  False, False)
      return self._logits(x, False), {"encoded_mask": cache["encoded_mask"],
                                      "layers": new_layers}
    new_layers = []
    for layer, c in zip(self.layers, cache["layers"]):
      x, self_cache = layer(x, bias, causal, c["cross_key"], c["cross_value"], cross_mask,
                            {"key": c["self_key"], "value": c["self_value"]}, position, False)
      new_layers.append({**c, "self_key": self_cache["key"], "self_value": self_cache["value"]})
    return self._logits(x, False), {"encoded_mask": cache["encoded_mask"], "layers": new_layers}


def _token_embedder(vocab_size: int, width: int, dtype: Dtype, param_dtype: Dtype) -> nn.Embed:
  """vocab_size + 1 rows: the extra id vocab_size is BOS. N(0, 1) as T5 (no output tying)."""
  return nn.Embed(vocab_size + 1, width, dtype=dtype, param_dtype=param_dtype,
                  embedding_init=layers.partitioned(nn.initializers.normal(stddev=1.0),
                                                    ("vocab", "embed")))


def _shift_right(targets: Array, bos_id: int) -> Array:
  """Teacher-forcing decoder inputs [BOS, targets[:, :-1]]."""
  bos = jnp.full((targets.shape[0], 1), bos_id, targets.dtype)
  return jnp.concatenate([bos, targets[:, :-1]], axis=1)


class _T5Text(nn.Module):
  """What both T5-style text models share: sizes, ids, the token embedding.

  Attributes:
    vocab_size: tokenizer vocabulary; the embedding has one more row (BOS = vocab_size).
    width, num_heads, head_dim, mlp_dim: layer sizes (head_dim is independent of width).
    num_buckets, max_distance: relative position buckets.
    dropout: T5 dropout rate (train only).
    pad_id, eos_id: tokenizer ids (real tokens: coca.caption_mask).
    remat: remat policy of every layer (vljax.models.stacks.REMAT_NAMES; True = 'full').
    scan: run every stack as one nn.scan over its layers.
  """
  vocab_size: int
  width: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_buckets: int = 32
  max_distance: int = 128
  dropout: float = 0.0
  pad_id: int = 0
  eos_id: int = 1
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def bos_id(self) -> int:
    return self.vocab_size

  def embed(self, tokens: Array) -> Array:
    """Token embedding [B, L, D] of ids [B, L] (ids up to vocab_size = BOS)."""
    return layers.constrain(self.token_embedder(tokens), layers.ACT_SEQ)


class EncoderDecoder(_T5Text):
  """T5 v1.1 encoder-decoder (sizes: see SIZES and text_kwargs; attributes of _T5Text).

  Attributes:
    encoder_depth, decoder_depth: layers per stack (text_kwargs requires both).
  """
  encoder_depth: int = 0
  decoder_depth: int = 0

  def setup(self):
    self.token_embedder = _token_embedder(self.vocab_size, self.width, self.dtype,
                                          self.param_dtype)
    sizes = dict(width=self.width, num_heads=self.num_heads, head_dim=self.head_dim,
                 mlp_dim=self.mlp_dim, num_buckets=self.num_buckets,
                 max_distance=self.max_distance, dropout=self.dropout, remat=self.remat,
                 scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(depth=self.encoder_depth, **sizes)
    self.decoder = Decoder(self.vocab_size, depth=self.decoder_depth, **sizes)

  def encode(self, inputs: Array, input_mask: Array, train: bool = False) -> Array:
    """Encoder output [B, L, D] of input embeddings [B, L, D] with real tokens input_mask."""
    return self.encoder(inputs, input_mask.astype(bool), train)

  def forward(self, inputs: Array, input_mask: Array, targets: Array,
              train: bool = False) -> Array:
    """Teacher-forced logits [B, T, vocab] float32 from input embeddings and target ids [B, T].

    logits[:, i] predicts targets[:, i] from the inputs and targets[:, :i].
    """
    input_mask = input_mask.astype(bool)
    encoded = self.encode(inputs, input_mask, train)
    return self.decoder(self.embed(_shift_right(targets, self.bos_id)), encoded, input_mask,
                        train)

  def __call__(self, inputs: Array, targets: Array, train: bool = False) -> Array:
    """Logits [B, T, vocab] float32 for input ids [B, L] and target ids [B, T] (see forward)."""
    mask = coca.caption_mask(inputs, self.pad_id, self.eos_id)
    return self.forward(self.embed(inputs), mask, targets, train)

  def init_cache(self, encoded: Array, encoded_mask: Array, max_len: int) -> dict[str, Any]:
    """Decoding cache for up to max_len decoder inputs, from the encoder output [B, L, D].

    Holds, per decoder layer, 'self_key'/'self_value' [B, max_len, heads, head_dim] (zeros) and
    'cross_key'/'cross_value' [B, L, heads, head_dim] computed here once; plus 'encoded_mask'.
    The encoder output itself is not kept: decode_step cannot recompute anything from it.
    """
    return self.decoder.init_cache(encoded, encoded_mask, max_len)

  def decode_step(self, tokens: Array, position: Array | int,
                  cache: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
    """Feeds decoder input ids [B, T] at positions position.. (BOS at 0).

    Returns (logits [B, T, vocab] float32, updated cache); position + T <= max_len.
    """
    return self.decoder.decode_step(self.embed(tokens), position, cache)


class PrefixLM(_T5Text):
  """One T5 v1.1 stack over [inputs, BOS, targets] (PaliGemma / SimVLM-style prefix-LM).

  Attributes are _T5Text's, and `depth`, the layers of the single stack.
  """
  depth: int = 0

  def setup(self):
    self.token_embedder = _token_embedder(self.vocab_size, self.width, self.dtype,
                                          self.param_dtype)
    # Bidirectional buckets: input tokens attend forwards as well as backwards.
    _setup_generating_stack(self, _encoder_layer_class(self.remat, self.scan, self.depth),
                            bidirectional=True)

  def _logits(self, x: Array, train: bool) -> Array:
    return _project_logits(self.decoder_norm, self.final_dropout, self.logits, x, train)

  def forward(self, inputs: Array, input_mask: Array, targets: Array,
              train: bool = False) -> Array:
    """Teacher-forced logits [B, T, vocab] float32 of target ids [B, T] after input embeddings.

    inputs [B, L, D] may have padding anywhere (input_mask [B, L] marks the real ones);
    logits[:, i] predicts targets[:, i] from the real inputs and targets[:, :i].
    """
    input_mask = input_mask.astype(bool)
    length, num_targets = inputs.shape[1], targets.shape[1]
    x = jnp.concatenate([inputs.astype(self.dtype),
                         self.embed(_shift_right(targets, self.bos_id))], axis=1)
    x = layers.constrain(x, layers.ACT_SEQ)
    # Targets sit right after the last real input, whatever the padding.
    num_real = jnp.sum(input_mask, axis=1, dtype=jnp.int32)[:, None]
    positions = jnp.concatenate(
        [real_positions(input_mask), num_real + jnp.arange(num_targets)[None]], axis=1)
    bias = self.relpos_bias(positions, positions)
    total = length + num_targets
    index = jnp.arange(total)
    # A query may attend to inputs, and (if it is a target) to targets up to itself...
    allowed = (index[None, :] < length) | (index[None, :] <= index[:, None])
    # ... but only to real keys; every query sees itself, so no row is fully masked.
    key_real = jnp.concatenate([input_mask, jnp.ones((x.shape[0], num_targets), bool)], axis=1)
    mask = (key_real[:, None, None, :] & allowed[None, None]) | jnp.eye(total, dtype=bool)
    x = self.embed_dropout(x, deterministic=not train)
    if self.scan:
      x, _ = self.layers(x, bias, mask, None, None, train)
    else:
      for layer in self.layers:
        x, _ = layer(x, bias, mask, None, None, train)
    return self._logits(x[:, length:], train)

  def __call__(self, inputs: Array, targets: Array, train: bool = False) -> Array:
    """Logits [B, T, vocab] float32 for input ids [B, L] and target ids [B, T] (see forward)."""
    mask = coca.caption_mask(inputs, self.pad_id, self.eos_id)
    return self.forward(self.embed(inputs), mask, targets, train)

  def init_cache(self, inputs: Array, input_mask: Array, max_len: int) -> dict[str, Any]:
    """Prefill: runs the stack over input embeddings [B, L, D] once and keeps their K/V.

    Returns {'input_mask': [B, L], 'layers': [{'key', 'value'}: [B, L + max_len, heads,
    head_dim]]} whose first L slots hold the inputs' keys/values (the inputs never attend to
    the targets, so these equal the full forward's) and the rest room for max_len decoder
    inputs.
    """
    input_mask = input_mask.astype(bool)
    batch, length, _ = inputs.shape
    positions = real_positions(input_mask)
    bias = self.relpos_bias(positions, positions)
    mask = input_mask[:, None, None, :] | jnp.eye(length, dtype=bool)[None, None]
    empty = jnp.zeros((batch, length + max_len, self.num_heads, self.head_dim), self.dtype)
    x = inputs.astype(self.dtype)
    if self.scan:
      # Stacked [B, depth, slots, heads, head_dim]: the inputs' K/V, then the decoder's room.
      stacked = jnp.zeros((batch, self.depth, length, self.num_heads, self.head_dim),
                          self.dtype)
      _, head = self.layers(x, bias, mask, {"key": stacked, "value": stacked}, 0, False)
      room = jnp.zeros((batch, self.depth, max_len, self.num_heads, self.head_dim), self.dtype)
      return {"input_mask": input_mask,
              "layers": {name: jnp.concatenate([head[name], room], axis=2)
                         for name in ("key", "value")}}
    caches = []
    for layer in self.layers:
      # The inputs attend among themselves only, so the buffer's first L slots suffice.
      head = {"key": empty[:, :length], "value": empty[:, :length]}
      x, head = layer(x, bias, mask, head, 0, False)
      caches.append({name: jnp.concatenate([head[name], empty[:, length:]], axis=1)
                     for name in ("key", "value")})
    return {"input_mask": input_mask, "layers": caches}

  def decode_step(self, tokens: Array, position: Array | int,
                  cache: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
    """Feeds decoder input ids [B, T] at decoder positions position.. (BOS at 0).

    Returns (logits [B, T, vocab] float32, updated cache); position + T <= max_len.
    """
    input_mask = cache["input_mask"]
    length = input_mask.shape[1]
    if self.scan:  # stacked [B, depth, length + max_len, heads, head_dim]
      slots = cache["layers"]["key"].shape[2] - length
    else:
      slots = cache["layers"][0]["key"].shape[1] - length
    num_real = jnp.sum(input_mask, axis=1, dtype=jnp.int32)[:, None]
    step = position + jnp.arange(tokens.shape[1])  # decoder positions of these inputs
    key_positions = jnp.concatenate(
        [real_positions(input_mask), num_real + jnp.arange(slots)[None]], axis=1)
    bias = self.relpos_bias(num_real + step[None], key_positions)
    # Real inputs, and decoder slots up to each query (later slots hold zeros or stale K/V).
    target_ok = jnp.arange(slots)[None, :] <= step[:, None]  # [T, slots]
    mask = jnp.concatenate(
        [jnp.broadcast_to(input_mask[:, None, None, :],
                          (input_mask.shape[0], 1, tokens.shape[1], length)),
         jnp.broadcast_to(target_ok[None, None], (input_mask.shape[0], 1) + target_ok.shape)],
        axis=-1)
    x = self.embed(tokens)
    if self.scan:
      x, caches = self.layers(x, bias, mask, cache["layers"], length + position, False)
      return self._logits(x, False), {"input_mask": input_mask, "layers": caches}
    caches = []
    for layer, c in zip(self.layers, cache["layers"]):
      x, c = layer(x, bias, mask, c, length + position, False)
      caches.append(c)
    return self._logits(x, False), {"input_mask": input_mask, "layers": caches}
