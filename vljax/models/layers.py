"""Shared transformer building blocks with logical-axis annotations.

Every parameter is created through `nn.with_logical_partitioning`, so that
`nn.get_partition_spec(jax.eval_shape(model.init, ...))` yields a PartitionSpec of logical names
for every leaf (see vljax.sharding.LOGICAL_AXES); activations between blocks are constrained to
('act_batch', 'act_len', 'act_embed'); the constraints are no-ops outside
`nn.logical_axis_rules` (or without a mesh).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax.configlib import ConfigError
from vljax.models import stacks

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# Logical names of activations between blocks.
ACT_SEQ = ("act_batch", "act_len", "act_embed")
ACT_HEADS = ("act_batch", "act_len", "act_heads", None)  # [B, L, heads, head_dim]


def partitioned(init_fn: Initializer, names: Sequence[str | None]) -> Initializer:
  """Wraps an initializer so that its parameter carries logical axis names."""
  return nn.with_logical_partitioning(init_fn, tuple(names))


def constrain(x: Array, names: Sequence[str | None]) -> Array:
  """Constrains an activation's sharding by logical names (no-op without rules)."""
  return nn.with_logical_constraint(x, tuple(names))


def scalar_param(module: nn.Module, name: str, value: float,
                 param_dtype: Dtype = jnp.float32) -> Array:
  """A learnable scalar initialised to `value`, with (empty) logical partitioning metadata."""
  init = partitioned(lambda _, shape, dtype: jnp.full(shape, value, dtype), ())
  return module.param(name, init, (), param_dtype)


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None,
               epsilon: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm whose scale and bias are annotated with the 'embed' axis."""
  return nn.LayerNorm(
      dtype=dtype, param_dtype=param_dtype, name=name, epsilon=epsilon,
      scale_init=partitioned(nn.initializers.ones, ("embed",)),
      bias_init=partitioned(nn.initializers.zeros, ("embed",)))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype: Dtype = jnp.float32) -> Array:
  """Fixed 2-D sin-cos position embedding, [1, h*w, width] (MoCo v3 / big_vision layout).

  Channels are [sin(x*omega), cos(x*omega), sin(y*omega), cos(y*omega)], each width/4 wide, with
  omega_i = temperature ** (-i / (width/4 - 1)); rows run over y then x (raster order).
  """
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {width}.")
  quarter = width // 4
  y, x = np.mgrid[:h, :w]
  omega = np.arange(quarter, dtype=np.float64) / max(quarter - 1, 1)
  omega = 1.0 / (temperature ** omega)
  y = np.einsum("m,d->md", y.reshape(-1).astype(np.float64), omega)
  x = np.einsum("m,d->md", x.reshape(-1).astype(np.float64), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None, :, :]


# The MLP nonlinearities: 'gelu_tanh' (flax's nn.gelu, the tanh approximation; big_vision,
# SigLIP), 'gelu' (exact, erf; open_clip's nn.GELU), 'quick_gelu' (x * sigmoid(1.702 x); OpenAI
# CLIP).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_tanh": nn.gelu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def matmul_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                       preferred_element_type=None) -> Array:
  """lax.dot_general for a layer's `x [..., in...] . kernel [in..., out...]`, computed as ONE
  2-D matmul [prod(...), prod(in)] x [prod(in), prod(out)] (reshapes of contiguous arrays,
  free), then reshaped back. Any other contraction goes to lax.dot_general as it is.

  Same products, same sums; only the shapes XLA is given change. Why: JAX's transpose of a
  dot whose lhs has several free dims gives XLA's CPU backend a kernel-gradient dot it lays out
  badly (a transposed copy of the cotangent and a slow strided matmul): a Dense on [B, L, D]
  trained 2.5x slower than the same Dense on [B * L, D] (docs/scale.md, "On the CPU").
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  if (lhs_batch or rhs_batch or lhs.ndim - n < 1 or preferred_element_type is not None
      or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(n))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  lead, out = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
  inner = int(np.prod(lhs.shape[lhs.ndim - n:]))
  y = jax.lax.dot(lhs.reshape(-1, inner), rhs.reshape(inner, -1), precision=precision)
  return y.reshape(lead + out)


class MlpBlock(nn.Module):
  """Transformer MLP: Dense(mlp_dim) -> activation (ACTIVATIONS) -> dropout -> Dense(width)."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    width = x.shape[-1]
    x = nn.Dense(
        self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="Dense_0",
        dot_general=matmul_dot_general,
        kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
        bias_init=partitioned(nn.initializers.normal(stddev=1e-6), ("mlp",)))(x)
    x = constrain(x, ("act_batch", "act_len", "act_mlp"))
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Unknown activation {self.activation!r}; valid: {list(ACTIVATIONS)}.")
    x = ACTIVATIONS[self.activation](x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
    x = nn.Dense(
        width, dtype=self.dtype, param_dtype=self.param_dtype, name="Dense_1",
        dot_general=matmul_dot_general,
        kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
        bias_init=partitioned(nn.initializers.normal(stddev=1e-6), ("embed",)))(x)
    return constrain(x, ACT_SEQ)


class DenseGeneral(nn.Module):
  """Dense layer contracting the last `in_ndim` input dims into `features` (any rank).

  flax's nn.DenseGeneral initialises a flattened kernel and unboxes it before reshaping, which
  under a mesh and logical rules constrains the 2-D value with the N-D names and fails; this
  version creates the kernel at its true shape (xavier fans over the contracted/output dims).
  """
  features: tuple[int, ...]
  kernel_names: tuple[str | None, ...]
  bias_names: tuple[str | None, ...]
  in_ndim: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.in_ndim:]
    in_axes = tuple(range(self.in_ndim))
    out_axes = tuple(range(self.in_ndim, self.in_ndim + len(self.features)))
    kernel_init = nn.initializers.xavier_uniform(in_axis=in_axes, out_axis=out_axes)
    kernel = self.param("kernel", partitioned(kernel_init, self.kernel_names),
                        in_shape + tuple(self.features), self.param_dtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros, self.bias_names),
                      tuple(self.features), self.param_dtype)
    contract_x = tuple(range(x.ndim - self.in_ndim, x.ndim))
    y = matmul_dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                           ((contract_x, in_axes), ((), ())))
    return y + bias.astype(self.dtype)


def _head_projection(name: str, num_heads: int, head_dim: int, dtype,
                     param_dtype) -> DenseGeneral:
  """A query/key/value projection [B, L, D] -> [B, L, heads, head_dim] named `name`.

  Created from an attention module's compact method, so the projection is its child.
  """
  return DenseGeneral((num_heads, head_dim), ("embed", "heads", "kv"), ("heads", "kv"),
                      dtype=dtype, param_dtype=param_dtype, name=name)


def _project_qkv(inputs_q: Array, inputs_kv: Array, num_heads: int, head_dim: int, dtype,
                 param_dtype) -> tuple[Array, Array, Array]:
  """Query/key/value projections to [B, L, heads, head_dim], named query/key/value."""
  proj = lambda name: _head_projection(name, num_heads, head_dim, dtype, param_dtype)
  return (constrain(proj("query")(inputs_q), ACT_HEADS),
          constrain(proj("key")(inputs_kv), ACT_HEADS),
          constrain(proj("value")(inputs_kv), ACT_HEADS))


def fused_attention_implementation(setting: str, backend: str, dtype, head_dim: int,
                                   has_bias: bool) -> str:
  """jax.nn.dot_product_attention's `implementation` for one attention: 'cudnn' or 'xla'.

  `setting` is config.layers.attention (vljax.models.stacks.ATTENTION_IMPLEMENTATIONS). cuDNN's
  kernel takes bf16 / fp16 inputs with a head dim that is a multiple of 8 up to 128, on a GPU;
  an additive bias (T5's relative positions) stays on XLA, whose bias gradient is exact. A mask
  is fine: JAX folds it into the kernel's bias input.

  Raises:
    ConfigError: 'cudnn' asked for where the kernel does not apply.
  """
  why_not = []
  if backend != "gpu":
    why_not.append(f"the backend is {backend}")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    why_not.append(f"the compute dtype is {jnp.dtype(dtype).name} (config.dtype=bfloat16 "
                   "runs it)")
  if head_dim % 8 or head_dim > 128:
    why_not.append(f"the head dim is {head_dim}")
  if has_bias:
    why_not.append("this attention adds a position bias")
  if setting == "cudnn" and why_not:
    raise ConfigError("config.layers.attention='cudnn', but cuDNN's fused attention does not "
                      f"apply: {'; '.join(why_not)}. Use 'auto' (cuDNN where it applies).")
  return "cudnn" if setting != "xla" and not why_not else "xla"


def attend(q: Array, k: Array, v: Array, mask: Array | None, dtype: Dtype,
           probs_dropout: Callable[[Array], Array] | None = None, bias: Array | None = None,
           scale: float | None = None) -> Array:
  """softmax(scale * q k^T + bias) v for q [B, Lq, H, d], k/v [B, Lk, H, d]; mask and bias
  broadcastable to [B, H, Lq, Lk] (mask True = may attend); scale defaults to 1/sqrt(d).
  Returns [B, Lq, H, d] in `dtype`.

  The logits and the softmax are float32 whatever `dtype` is (bf16 compute stays stable); a fully
  masked row becomes a uniform distribution (finite) rather than NaN. Without attention dropout
  this is jax.nn.dot_product_attention, through XLA's implementation or cuDNN's fused kernel
  as config.layers.attention says (fused_attention_implementation). `probs_dropout` (dropout
  on the attention probabilities, training only) needs the probabilities, so it takes the
  explicit path.
  """
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else float(scale)
  full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
  if probs_dropout is None:
    mask = None if mask is None else jnp.broadcast_to(mask, full)
    bias = None if bias is None else jnp.broadcast_to(bias.astype(jnp.float32), full)
    implementation = fused_attention_implementation(
        stacks.attention_implementation(), jax.default_backend(), q.dtype, q.shape[-1],
        bias is not None)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        implementation=implementation).astype(dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = probs_dropout(jax.nn.softmax(logits, axis=-1).astype(dtype))
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def dropout_fn(rate: float, train: bool) -> Callable[[Array], Array] | None:
  """Attention-probability dropout for `attend` inside a compact method (None: no dropout)."""
  if not (rate and train):
    return None
  return lambda probs: nn.Dropout(rate=rate)(probs, deterministic=False)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with logically named q/k/v/out projections.

  Attention to a fixed inputs_kv (a decoder's cross-attention context) can project it once:
  `project_keys_values` returns its keys and values, and later calls take them as
  `keys_values=` instead of inputs_kv, running only the query and output projections.

  Attributes:
    num_heads: number of heads; the input width must be divisible by it.
    qkv_features: total q/k/v width (defaults to the query width).
    out_features: output width (defaults to the query width).
    dropout: attention-probability dropout rate (train only).
  """
  num_heads: int
  qkv_features: int | None = None
  out_features: int | None = None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __call__(self, inputs_q: Array, inputs_kv: Array | None, mask: Array | None = None,
               train: bool = False, *,
               keys_values: tuple[Array, Array] | None = None) -> Array:
    """Attends from inputs_q [B, Lq, D] to inputs_kv [B, Lk, Dkv].

    Args:
      inputs_q: queries.
      inputs_kv: keys/values; None when keys_values is given.
      mask: optional boolean, broadcastable to [B, heads, Lq, Lk]; True = may attend.
      train: enables dropout.
      keys_values: (keys, values) [B, Lk, heads, head_dim] from project_keys_values, used
        instead of projecting inputs_kv.

    Returns:
      [B, Lq, out_features].
    """
    if (inputs_kv is None) == (keys_values is None):
      raise ValueError("Give MultiHeadAttention either inputs_kv or keys_values.")
    return self._attention(inputs_q, inputs_kv, keys_values, mask, train, None)

  def project_keys_values(self, inputs_kv: Array, query_width: int) -> tuple[Array, Array]:
    """(keys, values) [B, Lk, heads, head_dim] of inputs_kv [B, Lk, Dkv], as __call__ computes
    them for queries of width `query_width` (which sets the head size unless qkv_features)."""
    return self._attention(None, inputs_kv, None, None, False, query_width)

  @nn.compact
  def _attention(self, inputs_q: Array | None, inputs_kv: Array | None,
                 keys_values: tuple[Array, Array] | None, mask: Array | None, train: bool,
                 query_width: int | None) -> Array | tuple[Array, Array]:
    """The one compact method behind both entry points (flax allows one per module), so that
    both create the same children: query, key, value, out. Without inputs_q it returns the
    projected (keys, values) instead of attending."""
    query_width = query_width if inputs_q is None else inputs_q.shape[-1]
    features = self.qkv_features or query_width
    out_features = self.out_features or query_width
    if features % self.num_heads:
      raise ValueError(f"Attention width {features} is not divisible by "
                       f"num_heads={self.num_heads}.")
    head_dim = features // self.num_heads
    proj = lambda name: _head_projection(name, self.num_heads, head_dim, self.dtype,
                                         self.param_dtype)

    # The query is projected before the keys/values, as it always was: in self-attention
    # (inputs_q is inputs_kv) this order is the order in which the input's gradients add up,
    # so keeping it keeps training bit-for-bit what it was.
    q = None if inputs_q is None else constrain(proj("query")(inputs_q), ACT_HEADS)
    if keys_values is None:
      k = constrain(proj("key")(inputs_kv), ACT_HEADS)
      v = constrain(proj("value")(inputs_kv), ACT_HEADS)
    else:
      k, v = keys_values
    if q is None:
      return k, v

    x = constrain(attend(q, k, v, mask, self.dtype, dropout_fn(self.dropout, train)),
                  ACT_HEADS)

    return DenseGeneral((out_features,), ("heads", "kv", "embed"), ("embed",), in_ndim=2,
                        dtype=self.dtype, param_dtype=self.param_dtype, name="out")(x)


def _mlp_residual(block: nn.Module, x: Array, train: bool) -> Array:
  """x + Dropout(MLP(LayerNorm(x))): the second half of every pre-LN transformer block.

  Called from the block's compact __call__, so LayerNorm_1 and MlpBlock_0 are its children.
  A block may set `norm_eps` and `activation` (EncoderBlock does); others get the defaults.
  """
  y = layer_norm(block.dtype, block.param_dtype, name="LayerNorm_1",
                 epsilon=getattr(block, "norm_eps", 1e-6))(x)
  y = MlpBlock(block.mlp_dim, dropout=block.dropout, dtype=block.dtype,
               param_dtype=block.param_dtype, name="MlpBlock_0",
               activation=getattr(block, "activation", "gelu_tanh"))(y, train)
  y = nn.Dropout(rate=block.dropout)(y, deterministic=not train)
  return constrain(x + y, ACT_SEQ)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x)).

  norm_eps (LayerNorm epsilon) and activation (the MLP's, see ACTIVATIONS) default to
  big_vision's; open_clip's CLIP uses 1e-5 and 'gelu' (or 'quick_gelu').
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, train: bool = False) -> Array:
    x = constrain(x, ACT_SEQ)
    y = layer_norm(self.dtype, self.param_dtype, name="LayerNorm_0", epsilon=self.norm_eps)(x)
    y = MultiHeadAttention(
        self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadAttention_0")(y, y, mask, train)
    y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
    x = constrain(x + y, ACT_SEQ)

    return _mlp_residual(self, x, train)


class Encoder(nn.Module):
  """A stack of pre-LN blocks followed by a final LayerNorm ('encoder_norm').

  Attributes:
    depth: number of blocks, named encoderblock_0 ... encoderblock_{depth-1}, or with scan one
      scanned 'encoderblock' whose parameters have a leading depth axis.
    remat: remat policy name of each block (vljax.models.stacks.REMAT_NAMES); True is 'full',
      False 'none'.
    scan: run the blocks as one nn.scan (compiles once whatever the depth).
    norm_eps, activation: every LayerNorm's epsilon and the MLPs' activation (EncoderBlock).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, train: bool = False) -> Array:
    sizes = dict(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                 norm_eps=self.norm_eps, activation=self.activation)
    if self.scan:
      # Arguments (self, x, mask, train): `train` selects Python control flow, so it is static.
      block_cls = stacks.block_class(stacks.scan_step(EncoderBlock), self.remat, True, (3,))
      block_cls = stacks.scanned(block_cls, self.depth, in_axes=(nn.broadcast, nn.broadcast))
      x, _ = block_cls(self.mlp_dim, self.num_heads, **sizes, name="encoderblock")(
          x, mask, train)
    else:
      block_cls = stacks.block_class(EncoderBlock, self.remat, False, (3,))
      for i in range(self.depth):
        x = block_cls(self.mlp_dim, self.num_heads, **sizes, name=f"encoderblock_{i}")(
            x, mask, train)
    return layer_norm(self.dtype, self.param_dtype, name="encoder_norm",
                      epsilon=self.norm_eps)(x)


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends over the tokens, then LN + MLP.

  Returns [B, D] for tokens [B, L, D]; `mask` [B, L] (True = real token) excludes keys.
  """
  num_heads: int
  mlp_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6  # the LayerNorm's epsilon and the MLP's activation: big_vision's
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    batch, _, width = x.shape
    probe = self.param("probe",
                       partitioned(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, width), self.param_dtype)
    probe = jnp.tile(probe.astype(self.dtype), (batch, 1, 1))
    attn_mask = None if mask is None else mask[:, None, None, :]
    x = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="MultiHeadAttention_0")(probe, x, attn_mask)
    x = constrain(x, ACT_SEQ)
    y = layer_norm(self.dtype, self.param_dtype, name="LayerNorm_0", epsilon=self.norm_eps)(x)
    x = x + MlpBlock(self.mlp_dim or 4 * width, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="MlpBlock_0",
                     activation=self.activation)(y)
    return x[:, 0]


class KVCacheAttention(nn.Module):
  """Self-attention that can run over a whole sequence or step by step with a KV cache.

  Parameters are named like MultiHeadAttention's (query, key, value, out). Without a cache it
  attends over the given sequence under `mask`; with a cache ({'key', 'value'}: [B, S, H, hd])
  the T inputs are the tokens at positions position .. position+T-1: their keys and values are
  written into the cache and each attends to every cached position up to its own.
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, cache: dict[str, Array] | None = None,
               position: Array | None = None,
               train: bool = False) -> tuple[Array, dict[str, Array] | None]:
    """Returns (output [B, T, D], updated cache or None)."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Attention width {width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    head_dim = width // self.num_heads

    q, k, v = _project_qkv(x, x, self.num_heads, head_dim, self.dtype, self.param_dtype)
    if cache is not None:
      start = (0, position, 0, 0)
      k = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start)
      v = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), start)
      cache = {"key": k, "value": v}
      query_pos = position + jnp.arange(x.shape[1])
      # Cache slots past the current position hold zeros (or stale values): never attend there.
      mask = (jnp.arange(k.shape[1])[None, :] <= query_pos[:, None])[None, None]

    y = constrain(attend(q, k, v, mask, self.dtype, dropout_fn(self.dropout, train)),
                  ACT_HEADS)
    y = DenseGeneral((width,), ("heads", "kv", "embed"), ("embed",), in_ndim=2,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="out")(y)
    return y, cache


def init_kv_cache(batch: int, length: int, width: int, num_heads: int,
                  dtype: Dtype = jnp.float32) -> dict[str, Array]:
  """An empty KV cache for one KVCacheAttention layer."""
  shape = (batch, length, num_heads, width // num_heads)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


class DecoderBlock(nn.Module):
  """Pre-LN decoder block: causal self-attention (KV-cacheable), optional cross-attention, MLP.

  x + SelfAttn(LN(x)); [x + CrossAttn(LN(x), context)]; x + MLP(LN(x)).

  Its decoding cache (init_cache) holds the self-attention's 'key'/'value' [B, S, heads,
  head_dim] and, with cross-attention, 'cross_key'/'cross_value' [B, n, heads, head_dim]: the
  context's keys and values, projected once, so that decoding steps never project it again.
  """
  mlp_dim: int
  num_heads: int
  cross_attention: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __call__(self, x: Array, mask: Array | None = None, context: Array | None = None,
               cache: dict[str, Array] | None = None, position: Array | None = None,
               train: bool = False) -> tuple[Array, dict[str, Array] | None]:
    """Runs inputs x [B, T, D].

    Without a cache, over the whole sequence under `mask`, a cross-attention block attending to
    context [B, n, Dc]. With a cache (from init_cache), x are the tokens at positions
    position .. position+T-1 and a cross-attention block attends to the cache's keys/values
    of the context, so it takes no context.

    Returns:
      (output [B, T, D], updated cache or None).
    """
    return self._block(x, mask, context, cache, position, train, None)

  def init_cache(self, batch: int, length: int, width: int,
                 context: Array | None = None) -> dict[str, Array]:
    """A decoding cache for up to `length` inputs of width `width`.

    Empty self-attention keys/values and, for a cross-attention block, the keys/values of
    context [batch, n, Dc], computed here (the only projection of the context in decoding).
    """
    cache = init_kv_cache(batch, length, width, self.num_heads, self.dtype)
    if self.cross_attention:
      if context is None:
        raise ValueError("A cross-attention DecoderBlock's cache needs the context.")
      keys, values = self._block(None, None, context, None, None, False, width)
      cache.update(cross_key=keys, cross_value=values)
    return cache

  @nn.compact
  def _block(self, x: Array | None, mask: Array | None, context: Array | None,
             cache: dict[str, Array] | None, position: Array | None, train: bool,
             cross_kv_width: int | None) -> Any:
    """The one compact method behind __call__ and init_cache (flax allows one per module), so
    that both reach the same CrossAttention. Without x, returns only the cross-attention's
    (keys, values) of `context` for queries of width cross_kv_width."""

    def cross_attention(width):
      return MultiHeadAttention(self.num_heads, out_features=width, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="CrossAttention")

    if x is None:
      return cross_attention(cross_kv_width).project_keys_values(context, cross_kv_width)

    x = constrain(x, ACT_SEQ)
    y = layer_norm(self.dtype, self.param_dtype, name="LayerNorm_0")(x)
    self_cache = None if cache is None else {"key": cache["key"], "value": cache["value"]}
    y, self_cache = KVCacheAttention(self.num_heads, dropout=self.dropout, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name="SelfAttention")(
                                         y, mask, self_cache, position, train)
    y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
    x = constrain(x + y, ACT_SEQ)
    if self.cross_attention:
      y = layer_norm(self.dtype, self.param_dtype, name="LayerNorm_cross")(x)
      attend = cross_attention(x.shape[-1])
      if cache is None:
        if context is None:
          raise ValueError("A cross-attention DecoderBlock needs a context.")
        y = attend(y, context, None, train)
      else:
        # Decoding: the cache holds the context's keys/values; a context given here would be
        # projected again at every step, which is what the cache is there to avoid.
        if context is not None or "cross_key" not in cache:
          raise ValueError("A cached cross-attention DecoderBlock takes the context's keys/"
                           "values from its cache (init_cache(..., context)), not a context.")
        y = attend(y, None, None, train, keys_values=(cache["cross_key"], cache["cross_value"]))
      y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
      x = constrain(x + y, ACT_SEQ)
    if cache is not None:
      cache = {**cache, **self_cache}
    return _mlp_residual(self, x, train), cache


class AttentionalPooler(nn.Module):
  """CoCa's attentional pooler: `num_queries` learned queries attend over the tokens.

  A single multi-head attention layer (keys/values = LayerNorm'd input tokens) followed by a
  LayerNorm; returns [B, num_queries, width] for tokens [B, L, width].
  """
  num_queries: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, _, width = x.shape
    queries = self.param("queries",
                         partitioned(nn.initializers.normal(stddev=width ** -0.5),
                                     (None, "embed")),
                         (self.num_queries, width), self.param_dtype)
    queries = jnp.broadcast_to(queries.astype(self.dtype)[None], (batch, self.num_queries, width))
    queries = constrain(queries, ACT_SEQ)
    kv = layer_norm(self.dtype, self.param_dtype, name="LayerNorm_kv")(x)
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="MultiHeadAttention_0")(queries, kv)
    y = constrain(y, ACT_SEQ)
    return layer_norm(self.dtype, self.param_dtype, name="LayerNorm_out")(y)
