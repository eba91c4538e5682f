"""VQ-KD (BEiT v2, Peng et al., 2022): a visual tokenizer trained to reconstruct a teacher's
patch features from discrete codes.

  image -> encoder ViT (patch tokens) -> encode_task (Dense, tanh, Dense) -> l2norm
        -> quantiser (nearest of K unit codes; vljax.models.quantizer) -> codes [B, n]
  codes' vectors [B, h, w, d] -> decoder ViT with 1x1 patches -> decode_task (Dense, tanh,
        Dense) -> [B, n, teacher width], trained towards the teacher's patch features
        (cosine distance)
  image -> teacher ViT (frozen; a vljax SigLIP / CLIP image encoder, without its pooling head)
        -> patch tokens [B, n, teacher width]

The codebook is the parameter `codebook` [K, d] (unit rows); the objective sets it with the
norm-EMA rule after each step rather than by gradients (objectives.vqkd), so it is exported
and loaded with the rest: BEiT-3 reads a run's `encoder`, `encode_task` and `codebook`.

Parameter tree: encoder/ (VisionTransformer, pool 'none'), encode_task/{hidden, out},
codebook, decoder/ (VisionTransformer, 1x1 patches, pool 'none'), decode_task/{hidden, out},
teacher/ (VisionTransformer, pool 'none'). Without a decoder and a teacher (decoder=None,
teacher=None) the module is the tokenizer alone: encoder/, encode_task/ and codebook, the part
BEiT-3 loads and freezes (vljax.models.beit3).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import layers
from vljax.models import quantizer
from vljax.models import two_towers
from vljax.models import vit

Array = jax.Array
Dtype = Any


class TaskLayer(nn.Module):
  """Dense(width) -> tanh -> Dense(features): BEiT v2's encode / decode task layers."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = lambda n, axes, name: layers.DenseGeneral(
        (n,), axes, axes[1:], dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    hidden = jnp.tanh(dense(x.shape[-1], ("embed", "mlp"), "hidden")(x))
    return dense(self.features, ("mlp", None), "out")(hidden)


def teacher_width(teacher: Mapping[str, Any]) -> int:
  """The width of the teacher's patch features (its VisionTransformer kwargs, maybe a
  'variant'): what the decoder reconstructs."""
  return int(two_towers.tower_kwargs(teacher, None, None)["width"])


def _unit_rows(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
  return quantizer.l2_normalize(jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class VqKd(nn.Module):
  """The tokenizer, its decoder and the frozen teacher (module docstring).

  Attributes:
    encoder: VisionTransformer kwargs of the tokenizer's encoder (may hold 'variant').
    num_codes: K, the codebook size.
    code_dim: d, the width of a code.
    decoder: width, depth, mlp_dim, num_heads of the decoder (its patches are 1x1 codes);
      None: no decoder (tokenize only).
    teacher: VisionTransformer kwargs of the teacher (its run's image encoder); None: no
      teacher (tokenize only). The decoder reconstructs the teacher's features, so it needs one.
  """
  encoder: Mapping[str, Any]
  num_codes: int
  code_dim: int
  decoder: Mapping[str, Any] | None = None
  teacher: Mapping[str, Any] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def tokenize_only(self) -> bool:
    return self.decoder is None and self.teacher is None

  def setup(self):
    sizes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tower = lambda cfg, name, **kw: vit.VisionTransformer(**dict(
        two_towers.tower_kwargs(cfg, self.dtype, self.param_dtype), pool_type="none", **kw),
                                                            name=name)
    self.enc = tower(self.encoder, "encoder")
    self.encode_task = TaskLayer(self.code_dim, **sizes)
    self.codebook = self.param(
        "codebook", layers.partitioned(_unit_rows, (None, None)),
        (self.num_codes, self.code_dim), jnp.float32)
    if self.tokenize_only:
      return
    if self.decoder is None or self.teacher is None:
      raise ValueError("VqKd takes a decoder and a teacher together (the decoder reconstructs "
                       "the teacher's features) or neither (tokenize only).")
    self.dec = tower(dict(self.decoder, posemb="learn"), "decoder", patch_size=(1, 1))
    self.teach = tower(self.teacher, "teacher")
    self.decode_task = TaskLayer(teacher_width(self.teacher), **sizes)

  def encode(self, images: Array, train: bool = False) -> Array:
    """images [B, H, W, 3] -> unit vectors [B, n, code_dim] float32 (before quantisation)."""
    _, tokens = self.enc(images, train)
    return quantizer.l2_normalize(self.encode_task(tokens).astype(jnp.float32))

  def tokenize(self, images: Array) -> Array:
    """images [B, H, W, 3] -> codes [B, n] int32: the visual tokens (BEiT-3's targets)."""
    z = self.encode(images)
    codes = quantizer.nearest_codes(z.reshape(-1, self.code_dim), self.codebook)
    return codes.reshape(z.shape[:2])

  def decode(self, z_q: Array, train: bool = False) -> Array:
    """Quantised vectors [B, n, code_dim] (a square grid) -> [B, n, teacher width]."""
    batch, n, _ = z_q.shape
    side = int(round(n ** 0.5))
    if side * side != n:
      raise ValueError(f"VQ-KD decodes a square grid of codes; got {n} per image.")
    _, tokens = self.dec(z_q.reshape(batch, side, side, self.code_dim), train)
    return self.decode_task(tokens).astype(jnp.float32)

  def teacher_features(self, images: Array) -> Array:
    """The teacher's patch tokens [B, n, teacher width] float32 (no gradient)."""
    _, tokens = self.teach(images, False)
    return jax.lax.stop_gradient(tokens.astype(jnp.float32))

  def __call__(self, images: Array, train: bool = False) -> dict[str, Array]:
    """Every part once (what init uses): the reconstruction and the teacher's features, or
    the codes alone when the module tokenizes only."""
    if self.tokenize_only:
      return {"codes": self.tokenize(images)}
    z = self.encode(images, train)
    z_q, _, _ = quantizer.quantize(z.reshape(-1, self.code_dim), self.codebook)
    return {"reconstruction": self.decode(z_q.reshape(z.shape), train),
            "target": self.teacher_features(images)}
