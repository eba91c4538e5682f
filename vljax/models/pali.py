"""PaLI (Chen et al., 2022; PaLI-3, 2023): a ViT's image tokens feed a T5-style text model.

  image  -> ViT (pool_type 'none') -> patch tokens -> linear projection to the text width
  prefix -> shared token embedding
  [image tokens, prefix] -> encoder-decoder: encoder input, decoder predicts the targets
                         -> prefix-LM: the bidirectional part of one stack, targets follow

Parameter tree:
  img/encoder/...      VisionTransformer, at the two-tower image tower's path, so SigLIP image
                       towers load by name (their MAP head aside: PaLI keeps every patch token)
  img/projection       Dense(ViT width -> text width)
  txt/...              encdec.EncoderDecoder or encdec.PrefixLM

The prefix's real tokens are coca.caption_mask(prefix, pad_id, eos_id); image tokens are always
real. Targets are right-padded; the decoder's first input is BOS (= vocab_size).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import coca
from vljax.models import encdec
from vljax.models import layers
from vljax.models import two_towers
from vljax.models import vit

Array = jax.Array
Dtype = Any


class PaliImageEncoder(nn.Module):
  """ViT patch tokens ('encoder') projected to the text width ('projection'): [B, N, width]."""
  image: Mapping[str, Any]
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    kwargs = two_towers.tower_kwargs(self.image, self.dtype, self.param_dtype)
    kwargs["pool_type"] = "none"  # the text model attends to every patch token
    _, tokens = vit.VisionTransformer(**kwargs, name="encoder")(images, train)
    tokens = nn.Dense(
        self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="projection",
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", None)),
        bias_init=layers.partitioned(nn.initializers.zeros, (None,)))(tokens)
    return layers.constrain(tokens, layers.ACT_SEQ)


class PaLI(nn.Module):
  """Image encoder + T5-style text model (encoder-decoder or prefix-LM).

  Attributes:
    image: VisionTransformer kwargs (may hold 'variant', e.g. 'B/16'); pool_type is ignored.
    text: encdec.text_kwargs config: sizes or a 'variant' from encdec.SIZES, vocab_size, pad_id,
      eos_id, and optionally num_buckets, max_distance, dropout.
    architecture: 'encdec' (PaLI) or 'prefix_lm' (PaliGemma-style single stack).
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  architecture: str = "encdec"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    # Raises ConfigError for an unknown architecture, variant or text key.
    text = encdec.text_kwargs(self.text, self.architecture)
    text_cls = encdec.EncoderDecoder if self.architecture == "encdec" else encdec.PrefixLM
    self.txt = text_cls(**text, dtype=self.dtype, param_dtype=self.param_dtype)
    self.img = PaliImageEncoder(self.image, text["width"], dtype=self.dtype,
                                param_dtype=self.param_dtype)

  @property
  def bos_id(self) -> int:
    """The decoder's start token (the extra embedding row)."""
    return int(self.text["vocab_size"])

  def _inputs(self, images: Array, prefix: Array, train: bool) -> tuple[Array, Array]:
    """[image tokens, prefix embeddings] [B, N+P, D] and their real-token mask [B, N+P]."""
    image_tokens = self.img(images, train)
    x = jnp.concatenate([image_tokens, self.txt.embed(prefix).astype(image_tokens.dtype)],
                        axis=1)
    prefix_mask = coca.caption_mask(prefix, self.txt.pad_id, self.txt.eos_id)
    mask = jnp.concatenate([jnp.ones(image_tokens.shape[:2], bool), prefix_mask], axis=1)
    return layers.constrain(x, layers.ACT_SEQ), mask

  def __call__(self, images: Array, prefix: Array, targets: Array,
               train: bool = False) -> Array:
    """Teacher-forced logits [B, T, vocab] float32.

    Args:
      images: [B, H, W, 3] float.
      prefix: [B, P] int, right-padded (a task prompt or question).
      targets: [B, T] int, right-padded.
      train: enables dropout (pass rngs={'dropout': key}).

    Returns:
      logits where logits[:, i] predicts targets[:, i] from the image, the prefix and
      targets[:, :i] (decoder inputs [BOS, targets[:, :-1]]).
    """
    x, mask = self._inputs(images, prefix, train)
    return self.txt.forward(x, mask, targets, train)

  def encode(self, images: Array, prefix: Array, train: bool = False) -> tuple[Array, Array]:
    """What decoding conditions on, with its real-token mask [B, N+P] bool.

    encdec: the encoder output [B, N+P, D]; prefix_lm: the input embeddings [B, N+P, D] that
    the prefill runs the stack over.
    """
    x, mask = self._inputs(images, prefix, train)
    if self.architecture == "encdec":
      return self.txt.encode(x, mask, train), mask
    return x, mask

  def init_cache(self, images: Array, prefix: Array, max_len: int) -> dict[str, Any]:
    """Decoding cache for max_len decoder inputs: the image and prefix are processed once here
    (encoder + cross-attention K/V, or the prefix-LM prefill)."""
    encoded, mask = self.encode(images, prefix)
    return self.txt.init_cache(encoded, mask, max_len)

  def decode_step(self, tokens: Array, position: Array | int,
                  cache: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
    """Feeds decoder input ids [B, T] (BOS at position 0); returns (logits [B, T, vocab]
    float32, cache)."""
    return self.txt.decode_step(tokens, position, cache)

