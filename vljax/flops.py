"""Analytic training FLOPs of one example, accelerator peak FLOP/s, and MFU.

Model FLOPs utilisation (MFU) = training FLOPs of one example x examples per second per device
/ the device's peak FLOP/s. XLA's cost analysis (train.StepCost.flops) is no substitute: it
counts a loop body once (layers under lax.scan, the sigmoid ring), it counts the elementwise
work and the recomputation of rematerialised blocks, and it differs between backends. The count
here is the one PaLM (Chowdhery et al., 2022, appendix B) and MaxText use, from the config alone:

  * matmuls only, 2 FLOPs per multiply-add: patch embedding, q/k/v/out projections, attention
    scores (QK^T) and attention-weighted values (PV), MLPs (gated MLPs have 3 matrices),
    MAP heads and attentional poolers, cross-attention, projection heads, vocabulary logits.
    Norms, softmax, activations, dropout, residual adds, embedding lookups (token and relative
    position tables), the loss's elementwise terms and the optimizer update are not counted;
  * attention over the whole L x L matrix even where a causal mask hides half of it: the
    einsums compute all of it (as PaLM counts; no fused causal kernel skips the masked half);
  * training = 3 x forward (the backward pass computes the gradients of each matmul's input
    and weight: two matmuls of the forward's size), except for a frozen image tower
    (config.optim.freeze), which runs forward only (1 x): nothing upstream of it trains, so the
    step differentiates nothing through it (train.value_and_trainable_grad);
  * the batch-coupled contrastive logits (the B x B similarity matrix of the global batch B) are
    counted per example: one [B, embed_dim] x [embed_dim, B] matmul is B * B * embed_dim
    multiply-adds, so 2 * B * embed_dim forward FLOPs per example (x 3 in training). The sharded
    softmax loss computes both directions as separate b x B blocks and the chunked sigmoid loss
    recomputes its blocks in the backward pass; that extra work is hardware FLOPs, not model
    FLOPs;
  * no rematerialisation and no gradient-accumulation recompute (the cached-embedding method
    runs each micro-batch's forward twice): MFU counts the model's FLOPs, not the hardware's.

Frozen towers: a freeze regex that matches the string 'img/' locks the whole image side (ViT,
its pooling, projection or heads, LiT's '^img/'); one that matches 'img/encoder/' locks the ViT
(PaLI stage 1's '^img/encoder/'). These are the parts with nothing trainable upstream, so
forward-only is exact for them; a regex that locks only part of a tower (or the text side)
is not modelled and that part counts as trained.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections

from vljax.configlib import ConfigError
from vljax.models import encdec
from vljax.models import two_towers

FLOPS_PER_MULTIPLY_ADD = 2
TRAINED = 3  # forward + the two backward matmuls (input and weight gradients)
FORWARD_ONLY = 1
IMAGE_CHANNELS = 3  # the image batch field is [B, H, W, 3]
VIT_DEFAULT_PATCH = (16, 16)  # vit.VisionTransformer's defaults
VIT_DEFAULT_POOL = "map"
TEXT_DEFAULT_POOL = "last"  # text.TextTransformer's
COCA_DEFAULT_QUERIES = 256  # coca.CoCa.num_decoder_queries
# The freeze prefixes that lock a whole upstream part (see the module docstring).
IMAGE_SIDE = "img/"
IMAGE_ENCODER = "img/encoder/"


# ------------------------------------------------------------------ multiply-adds of the blocks


def _attention(q_len: int, kv_len: int, q_width: int, kv_width: int, inner: int,
               out_width: int) -> int:
  """Multiply-adds of one multi-head attention: q/k/v/out projections, QK^T and PV.

  `inner` is heads x head_dim (the q/k/v width); the heads split it, they do not multiply it.
  """
  projections = q_len * q_width * inner + 2 * kv_len * kv_width * inner + q_len * inner * out_width
  return projections + 2 * q_len * kv_len * inner


def _mlp(tokens: int, width: int, hidden: int, matrices: int = 2) -> int:
  """Multiply-adds of an MLP: 2 matrices (Dense-GELU-Dense) or 3 (gated: wi_0, wi_1, wo)."""
  return matrices * tokens * width * hidden


def _transformer_layer(length: int, width: int, mlp_dim: int) -> int:
  """A pre-LN self-attention + MLP block of layers.py (head width = width / heads)."""
  return _attention(length, length, width, width, width, width) + _mlp(length, width, mlp_dim)


def _map_head(keys: int, width: int, mlp_dim: int) -> int:
  """layers.MAPHead: one learned probe attends over `keys` tokens, then an MLP on it."""
  return _attention(1, keys, width, width, width, width) + _mlp(1, width, mlp_dim)


def _t5_layer(q_len: int, width: int, inner: int, mlp_dim: int, cross_len: int = 0) -> int:
  """An encdec layer: self-attention, optional cross-attention over cross_len, gated MLP."""
  macs = _attention(q_len, q_len, width, width, inner, width)
  if cross_len:
    macs += _attention(q_len, cross_len, width, width, inner, width)
  return macs + _mlp(q_len, width, mlp_dim, matrices=3)


# ------------------------------------------------------------------ towers


def _plain(node: Any) -> dict[str, Any]:
  """A config node (ConfigDict, FrozenConfigDict or dict) as a plain dict."""
  if node is None:
    return {}
  return node.to_dict() if hasattr(node, "to_dict") else dict(node)


def _sizes(kwargs: Mapping[str, Any], keys: tuple[str, ...], where: str,
           fix: str = "set it") -> list[int]:
  """kwargs[key] as ints, for each key; a missing one is a ConfigError naming `where`.key."""
  missing = [k for k in keys if k not in kwargs]
  if missing:
    raise ConfigError(f"{where}.{missing[0]} is missing; {fix}.")
  return [int(kwargs[k]) for k in keys]


def _tower_kwargs(node: Any, where: str) -> dict[str, Any]:
  """A tower config with its 'variant' expanded exactly as the models expand it."""
  try:
    return two_towers.tower_kwargs(_plain(node), None, None)
  except ValueError as e:  # an unknown variant name or patch size
    raise ConfigError(f"{where}.variant: {e}") from None


def _vit(node: Any, image_size: int, pool_type: str | None = None) -> tuple[int, int, int]:
  """(multiply-adds, patch tokens, width) of the ViT config `node` on one image.

  pool_type None = the config's own (two towers); CoCa and PaLI force 'none'.
  """
  kwargs = _tower_kwargs(node, "config.model.image")
  width, depth, mlp_dim = _sizes(kwargs, ("width", "depth", "mlp_dim"), "config.model.image",
                                 "set it or a variant such as 'B/16'")
  ph, pw = tuple(kwargs.get("patch_size", VIT_DEFAULT_PATCH))
  if image_size % ph or image_size % pw:
    raise ConfigError(f"config.data.image_size={image_size} is not a multiple of the patch size "
                      f"{ph}x{pw}; pick a multiple or change config.model.image.patch_size.")
  pool = pool_type or kwargs.get("pool_type", VIT_DEFAULT_POOL)
  patches = (image_size // ph) * (image_size // pw)
  macs = patches * (ph * pw * IMAGE_CHANNELS) * width  # the strided-conv patch embedding
  length = patches + (1 if pool == "tok" else 0)  # the class token joins the sequence
  macs += depth * _transformer_layer(length, width, mlp_dim)
  if pool == "map":
    macs += _map_head(patches, width, mlp_dim)
  return macs, patches, width


def _text_tower(node: Any, max_len: int) -> tuple[int, int]:
  """(multiply-adds, width) of a text.TextTransformer over max_len tokens."""
  kwargs = _tower_kwargs(node, "config.model.text")
  width, depth, mlp_dim = _sizes(kwargs, ("width", "depth", "mlp_dim"), "config.model.text",
                                 "set it or a variant such as 'B'")
  macs = depth * _transformer_layer(max_len, width, mlp_dim)
  if kwargs.get("pool_type", TEXT_DEFAULT_POOL) == "map":
    macs += _map_head(max_len, width, mlp_dim)
  return macs, width


# ------------------------------------------------------------------ families


def _two_towers(config: ml_collections.ConfigDict) -> dict[str, int]:
  embed_dim = int(config.model.embed_dim)
  image, _, image_width = _vit(config.model.image, int(config.data.image_size))
  text, text_width = _text_tower(config.model.text, int(config.data.max_len))
  return {"img/encoder": image, "img/head": image_width * embed_dim,
          "txt": text + text_width * embed_dim,
          "contrastive_logits": int(config.batch_size) * embed_dim}


def _coca(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, int]:
  embed_dim = int(config.model.embed_dim)
  queries = int(config.model.get("num_decoder_queries", COCA_DEFAULT_QUERIES))
  image, patches, iw = _vit(config.model.image, int(config.data.image_size), pool_type="none")
  text = _plain(config.model.text)
  width, mlp_dim, unimodal, multimodal = _sizes(
      text, ("width", "mlp_dim", "unimodal_depth", "multimodal_depth"), "config.model.text")
  length = int(config.data.max_len)
  # Unimodal layers see [BOS, caption, CLS]; the multimodal ones drop CLS and the last input.
  decoder = unimodal * _transformer_layer(length + 2, width, mlp_dim)
  decoder += width * embed_dim  # the CLS output's contrastive head
  cross = _attention(length, queries, width, iw, width, width)
  decoder += multimodal * (_transformer_layer(length, width, mlp_dim) + cross)
  decoder += length * width * vocab_size  # logits at every target position
  return {"img/encoder": image,
          "img/contrastive_pooler": _attention(1, patches, iw, iw, iw, iw),
          "img/head": iw * embed_dim,
          "img/caption_pooler": _attention(queries, patches, iw, iw, iw, iw),
          "txt": decoder,
          "contrastive_logits": int(config.batch_size) * embed_dim}


def _pali(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, int]:
  architecture = config.model.get("architecture", "encdec")
  text = encdec.text_kwargs(dict(_plain(config.model.text), vocab_size=vocab_size),
                            architecture)
  width, mlp_dim = int(text["width"]), int(text["mlp_dim"])
  inner = int(text["num_heads"]) * int(text["head_dim"])
  image, patches, image_width = _vit(config.model.image, int(config.data.image_size),
                                     pool_type="none")
  inputs = patches + int(config.tasks.prefix_len)  # [image tokens, prefix]
  targets = int(config.data.max_len)
  if architecture == "encdec":
    macs = int(text["encoder_depth"]) * _t5_layer(inputs, width, inner, mlp_dim)
    macs += int(text["decoder_depth"]) * _t5_layer(targets, width, inner, mlp_dim,
                                                   cross_len=inputs)
  else:  # prefix_lm: one stack over [inputs, BOS + targets]
    macs = int(text["depth"]) * _t5_layer(inputs + targets, width, inner, mlp_dim)
  macs += targets * width * vocab_size  # logits at the target positions only
  return {"img/encoder": image, "img/projection": patches * image_width * width, "txt": macs}


FAMILIES = ("two_towers", "coca", "pali")


def forward_flops_per_example(config: ml_collections.ConfigDict,
                              vocab_size: int) -> dict[str, float]:
  """Forward matmul FLOPs of one example, by part of the model.

  Keys are parameter-path prefixes ('img/encoder' = the ViT with any MAP head, 'img/head',
  'img/contrastive_pooler', 'img/caption_pooler', 'img/projection', 'txt' = the whole text
  side with its heads and logits) and 'contrastive_logits' (this example's share of the
  global batch's similarity matrix). The module docstring says what is counted.

  Raises:
    ConfigError: an unknown objective, variant or a size the model would reject.
  """
  if config.objective == "two_towers":
    macs = _two_towers(config)
  elif config.objective == "coca":
    macs = _coca(config, vocab_size)
  elif config.objective == "pali":
    macs = _pali(config, vocab_size)
  else:
    raise ConfigError(f"config.objective={config.objective!r} has no FLOP count; vljax.flops "
                      f"knows {list(FAMILIES)}.")
  return {part: float(FLOPS_PER_MULTIPLY_ADD * m) for part, m in macs.items()}


def _locks(config: ml_collections.ConfigDict, prefix: str) -> bool:
  """Whether a config.optim.freeze regex matches `prefix` (as optim.frozen_mask searches)."""
  return any(re.search(pattern, prefix) for pattern in (config.optim.get("freeze") or ()))


def train_flops_per_example(config: ml_collections.ConfigDict, vocab_size: int) -> float:
  """Matmul FLOPs of one training example (forward + backward) of `config`'s family.

  3 x the forward FLOPs (forward_flops_per_example) of every part, 1 x for a frozen image
  tower: everything under 'img/' when a config.optim.freeze regex matches 'img/', the ViT
  ('img/encoder') when one matches 'img/encoder/'. vocab_size is the tokenizer's (CoCa and
  PaLI compute logits over it at every target position).
  """
  forward = forward_flops_per_example(config, vocab_size)
  image_side, image_encoder = _locks(config, IMAGE_SIDE), _locks(config, IMAGE_ENCODER)

  def factor(part: str) -> int:
    if part.startswith(IMAGE_SIDE) and image_side:
      return FORWARD_ONLY
    if part == IMAGE_ENCODER.rstrip("/") and image_encoder:
      return FORWARD_ONLY
    return TRAINED

  return float(sum(factor(part) * flops for part, flops in forward.items()))


# ------------------------------------------------------------------ peak FLOP/s and MFU

# Dense peak FLOP/s of one JAX device, keyed by a substring of jax.devices()[0].device_kind
# (the longest key found in it wins, so "TPU v5 lite" is not taken for "TPU v5"). Columns:
# 'bfloat16' (bf16 inputs, float32 accumulation), and for NVIDIA GPUs 'tensorfloat32' (TF32
# tensor cores) and 'float32' (the CUDA cores: true float32). NVIDIA's datasheets print the
# tensor-core figures with 2:4 sparsity; these are half of them, the dense rate.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # Google Cloud TPU documentation, per chip; from v4 on one JAX device is one chip.
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},  # v5e: JAX's device_kind is "TPU v5 lite"
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5": {"bfloat16": 459e12},  # v5p: JAX's device_kind is "TPU v5"
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},  # v6e, Trillium
    "TPU v6e": {"bfloat16": 918e12},
    # NVIDIA A100 datasheet (SXM and PCIe alike).
    "A100": {"bfloat16": 312e12, "tensorfloat32": 156e12, "float32": 19.5e12},
    # NVIDIA H100 / H200 datasheets: SXM (also "NVIDIA H100 80GB HBM3", GH200), PCIe, NVL.
    "H100": {"bfloat16": 989e12, "tensorfloat32": 494.5e12, "float32": 67e12},
    "H100 PCIe": {"bfloat16": 756e12, "tensorfloat32": 378e12, "float32": 51e12},
    "H100 NVL": {"bfloat16": 835e12, "tensorfloat32": 417.5e12, "float32": 60e12},
    "H200": {"bfloat16": 989e12, "tensorfloat32": 494.5e12, "float32": 67e12},
    "H200 NVL": {"bfloat16": 835e12, "tensorfloat32": 417.5e12, "float32": 60e12},
}

# Device kinds that contain a key above but are another chip, with no figure here: the
# inference TPU v4i would otherwise be read as a TPU v4.
_OTHER_CHIPS = ("TPU v4 lite",)

# Which column a float32 run's matmuls reach, by jax_default_matmul_precision: the first
# column the device has. JAX's default (None) trades precision for speed: TF32 tensor cores on
# NVIDIA GPUs, one bfloat16 pass on TPUs. Multi-pass algorithms (TPU 'high'/'highest', the
# *_X3/_X6 presets) have no published rate, so they get None.
_FLOAT32_COLUMNS: dict[str | None, tuple[str, ...]] = {
    None: ("tensorfloat32", "bfloat16"),
    "default": ("tensorfloat32", "bfloat16"),
    "bfloat16": ("bfloat16",),
    "BF16_BF16_F32": ("bfloat16",),
    "tensorfloat32": ("tensorfloat32",),
    "high": ("tensorfloat32",),
    "TF32_TF32_F32": ("tensorfloat32",),
    "float32": ("float32",),
    "highest": ("float32",),
    "F32_F32_F32": ("float32",),
}

DTYPES = ("bfloat16", "float32")  # config.dtype's values


def _device_figures(device_kind: str) -> dict[str, float] | None:
  kind = device_kind.lower()
  if any(other.lower() in kind for other in _OTHER_CHIPS):
    return None
  keys = [key for key in PEAK_FLOPS if key.lower() in kind]
  return PEAK_FLOPS[max(keys, key=len)] if keys else None


def peak_flops(device_kind: str, dtype: str,
               matmul_precision: str | None = None) -> float | None:
  """Dense peak FLOP/s of one device for matmuls of a `dtype` run; None when unknown.

  Args:
    device_kind: jax.devices()[0].device_kind, e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3".
    dtype: config.dtype: 'bfloat16' or 'float32'.
    matmul_precision: jax.config.jax_default_matmul_precision (None, JAX's default, is what
      vljax runs with). Only float32 runs depend on it: at the default their matmuls run on
      TF32 tensor cores on NVIDIA GPUs and as one bfloat16 pass on TPUs, so that is their peak;
      'highest' / 'float32' asks for true float32 (the CUDA-core rate on GPUs, None on TPUs).

  Returns:
    FLOP/s, or None for a device (CPUs included) or precision without a figure here: the log
    then shows TFLOP/s without MFU.

  Raises:
    ConfigError: an unknown dtype.
  """
  if dtype not in DTYPES:
    raise ConfigError(f"config.dtype={dtype!r}; choose one of {list(DTYPES)}.")
  figures = _device_figures(device_kind)
  if figures is None:
    return None
  columns = ("bfloat16",) if dtype == "bfloat16" else _FLOAT32_COLUMNS.get(matmul_precision, ())
  for column in columns:
    if column in figures:
      return figures[column]
  return None


def mfu(flops_per_example: float, examples_per_s_per_device: float, peak: float) -> float:
  """Model FLOPs utilisation: the achieved FLOP/s of one device as a fraction of its peak."""
  if peak <= 0:
    raise ValueError(f"peak FLOP/s must be positive, got {peak}.")
  return flops_per_example * examples_per_s_per_device / peak
