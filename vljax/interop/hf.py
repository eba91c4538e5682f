"""Hugging Face `SiglipModel` and `Siglip2Model` directories (config.json + model.safetensors)
<-> vljax (`CLIPModel` directories are read by vljax.interop.hf_clip, with this module's blocks).

A Siglip2Model is SigLIP 2's NaFlex variant: it embeds flattened patches with a Linear
[D, p*p*C] (the conv kernel [p, p, C, D] of vljax's ViT, reshaped) and stores its position
table at a square grid (vision_config.num_patches) that it resizes to each image's grid
(vljax's ViT option posemb_grid). Everything else is a SiglipModel's, name for name.

Read with safetensors' numpy reader: no torch, no pickle (a directory with only
pytorch_model.bin is read by vljax.interop.torch_pickle, which executes nothing).
Tensor layouts (torch -> flax, vljax.interop.torch_layout):
Linear weights [out, in] are transposed; q/k/v projections [heads*head_dim, D] become
[D, heads, head_dim], the output projection [D, heads*head_dim] becomes [heads, head_dim, D];
the patch Conv2d [D, C, ph, pw] becomes [ph, pw, C, D]; position embeddings [n, D] gain a
leading 1; the MAP head's packed torch MultiheadAttention `in_proj_weight` [3D, D] splits into
query, key and value. Parameters are first put under big_vision's names (vljax.interop.siglip
maps those to vljax's).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vljax.interop import siglip, torch_layout, torch_pickle
from vljax.interop.torch_layout import Entry, attention, mlp, norm
from vljax.interop.tensors import InteropError, TensorFile, read_json, read_safetensors

WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"  # read when there is no model.safetensors, never unpickled
CONFIG = "config.json"
TOKENIZER = "spiece.model"
# SigLIP 2's sentencepiece model (Gemma's), when its directory has one.
SIGLIP2_TOKENIZER = "tokenizer.model"

# The defaults of transformers' SiglipVisionConfig / SiglipTextConfig for the keys read here.
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                        vision_use_head=True)
# Siglip2VisionConfig: num_patches (the stored grid, squared) instead of image_size.
_SIGLIP2_VISION_DEFAULTS = dict(
    {k: v for k, v in _VISION_DEFAULTS.items() if k != "image_size"}, num_patches=256)
_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, pad_token_id=1)
# flax's nn.gelu (approximate=True) is the tanh approximation; its LayerNorm epsilon is 1e-6.
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")
_LN_EPS = 1e-6
# Buffers some transformers versions save; they hold no weights.
IGNORED_BUFFERS = ("vision_model.embeddings.position_ids",
                   "text_model.embeddings.position_ids")

def encoder_entries(hf: str, bv: str, tower: siglip.Tower) -> list[Entry]:
  """The blocks of a transformers encoder (SigLIP's and CLIP's name them alike)."""
  out = []
  w = tower.width
  for i in range(tower.depth):
    h, b = f"{hf}.layers.{i}", f"{bv}/encoderblock_{i}"
    out += (norm(f"{h}.layer_norm1", f"{b}/LayerNorm_0", w)
            + attention(f"{h}.self_attn", f"{b}/MultiHeadDotProductAttention_0", w,
                         tower.num_heads)
            + norm(f"{h}.layer_norm2", f"{b}/LayerNorm_1", w)
            + mlp(f"{h}.mlp", f"{b}/MlpBlock_0", w, tower.mlp_dim))
  return out


# The MAP head's packed torch attention (split into stand-in q/k/v names, torch_layout).
_MAP_ATTENTION = "vision_model.head.attention"


def entries(spec: siglip.SiglipSpec, channels: int = 3) -> list[Entry]:
  """Every tensor of a SiglipModel (a Siglip2Model when spec.naflex_grid is set) of
  architecture `spec`."""
  v, t, p = spec.image, spec.text, spec.patch_size
  if spec.naflex_grid is None:
    grid = spec.image_size // p
    patch = Entry("vision_model.embeddings.patch_embedding.weight", "img/embedding/kernel",
                  "conv", (v.width, channels, p, p))
  else:
    grid = spec.naflex_grid
    patch = Entry("vision_model.embeddings.patch_embedding.weight", "img/embedding/kernel",
                  "patch_dense", (v.width, p * p * channels), channels)
  return [
      patch,
      Entry("vision_model.embeddings.patch_embedding.bias", "img/embedding/bias", "copy",
            (v.width,)),
      Entry("vision_model.embeddings.position_embedding.weight", "img/pos_embedding", "posemb",
            (grid * grid, v.width)),
      *encoder_entries("vision_model.encoder", "img/Transformer", v),
      *norm("vision_model.post_layernorm", "img/Transformer/encoder_norm", v.width),
      Entry("vision_model.head.probe", "img/MAPHead_0/probe", "copy", (1, 1, v.width)),
      *attention(_MAP_ATTENTION, "img/MAPHead_0/MultiHeadDotProductAttention_0", v.width,
                  v.num_heads),
      *norm("vision_model.head.layernorm", "img/MAPHead_0/LayerNorm_0", v.width),
      *mlp("vision_model.head.mlp", "img/MAPHead_0/MlpBlock_0", v.width, v.mlp_dim),
      Entry("text_model.embeddings.token_embedding.weight", "txt/Embed_0/embedding", "copy",
            (spec.vocab_size, t.width)),
      Entry("text_model.embeddings.position_embedding.weight", "txt/pos_embedding", "posemb",
            (spec.max_len, t.width)),
      *encoder_entries("text_model.encoder", "txt/Encoder_0", t),
      *norm("text_model.final_layer_norm", "txt/Encoder_0/encoder_norm", t.width),
      Entry("text_model.head.weight", "txt/head/kernel", "dense", (spec.embed_dim, t.width)),
      Entry("text_model.head.bias", "txt/head/bias", "copy", (spec.embed_dim,)),
      Entry("logit_scale", "t", "copy", (1,)),
      Entry("logit_bias", "b", "copy", (1,)),
  ]


MODEL_TYPES = ("siglip", "siglip2", "clip")


def read_model_config(directory: str) -> dict[str, Any]:
  """config.json of a Hugging Face model directory, whose model_type vljax reads."""
  if not os.path.isdir(directory):
    raise InteropError(f"{directory}: not a directory; --format=hf reads a Hugging Face model "
                       f"directory ({CONFIG} + {WEIGHTS}).")
  path = os.path.join(directory, CONFIG)
  config = read_json(path, f"no {CONFIG}; a Hugging Face model directory holds {CONFIG} and "
                          f"{WEIGHTS}.")
  kind = config.get("model_type")
  if kind not in MODEL_TYPES:
    raise InteropError(f"{path}: model_type {kind!r} is not supported; vljax.interop reads "
                       f"Hugging Face {' and '.join(repr(t) for t in MODEL_TYPES)} models "
                       f"(SigLIP 2 is not done yet).")
  return config


def read_weights(directory: str) -> TensorFile:
  """The directory's model.safetensors, or else its pytorch_model.bin (never unpickled)."""
  weights = os.path.join(directory, WEIGHTS)
  if not os.path.exists(weights) and os.path.exists(os.path.join(directory, TORCH_WEIGHTS)):
    return torch_pickle.read_torch(os.path.join(directory, TORCH_WEIGHTS))
  return read_safetensors(weights)


def tower_config(config: dict, key: str, defaults: dict, path: str,
                 activations: tuple[str, ...], eps: float, what: str) -> dict[str, Any]:
  """config[key] over transformers' `defaults`, checked to be a tower `what` can express: its
  hidden_act one of `activations`, its LayerNorm epsilon `eps` (SigLIP's, CLIP's)."""
  tower = dict(defaults, **config.get(key, {}))
  if tower["hidden_act"] not in activations:
    raise InteropError(f"{path}: {key}.hidden_act={tower['hidden_act']!r}; {what} uses "
                       f"{' or '.join(activations)}.")
  if tower["layer_norm_eps"] != eps:
    raise InteropError(f"{path}: {key}.layer_norm_eps={tower['layer_norm_eps']}; {what} uses "
                       f"{eps}.")
  return tower


def spec_from_config(directory: str, config: dict[str, Any]
                     ) -> tuple[siglip.SiglipSpec, int]:
  """The architecture of the SiglipModel or Siglip2Model in `directory`, whose config.json is
  `config` (read_model_config), and its number of image channels."""
  path = os.path.join(directory, CONFIG)
  kind = config["model_type"]
  if kind not in ("siglip", "siglip2"):
    raise InteropError(f"{path}: model_type {kind!r} is not a SiglipModel or Siglip2Model.")
  what = "vljax's SigLIP (the tanh-approximated GELU)"
  v = tower_config(config, "vision_config",
                   _VISION_DEFAULTS if kind == "siglip" else _SIGLIP2_VISION_DEFAULTS, path,
                   _TANH_GELU, _LN_EPS, what)
  t = tower_config(config, "text_config", _TEXT_DEFAULTS, path, _TANH_GELU, _LN_EPS, what)
  if not v["vision_use_head"]:
    raise InteropError(f"{path}: vision_config.vision_use_head is false; a SiglipModel without "
                       f"the MAP head is not supported.")
  projection = t.get("projection_size") or t["hidden_size"]
  if projection != v["hidden_size"]:
    raise InteropError(f"{path}: text_config.projection_size ({projection}) differs from the "
                       f"image width ({v['hidden_size']}); the image and text embeddings must "
                       f"have one size.")

  def tower(c):
    return siglip.Tower(c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"],
                        c["num_attention_heads"])

  naflex_grid, image_size = None, v.get("image_size")
  siglip2 = siglip.is_siglip2(t["vocab_size"], naflex=kind == "siglip2")
  if kind == "siglip2":
    naflex_grid = int(round(v["num_patches"] ** 0.5))
    if naflex_grid * naflex_grid != v["num_patches"]:
      raise InteropError(f"{path}: vision_config.num_patches={v['num_patches']} is not a "
                         f"square; a Siglip2Model stores its position table on a square grid.")
    # The square images vljax.predict and vljax.evaluate feed it: the table's own grid.
    image_size = naflex_grid * v["patch_size"]
  spec = siglip.SiglipSpec(
      image=tower(v), text=tower(t), image_size=image_size, patch_size=v["patch_size"],
      vocab_size=t["vocab_size"], max_len=t["max_position_embeddings"], embed_dim=projection,
      # SigLIP 2's text_config.pad_token_id is not what its tokenizer pads with.
      source_pad_id=siglip.SIGLIP2_PAD_ID if siglip2 else t["pad_token_id"],
      naflex_grid=naflex_grid, lowercase_text=siglip2)
  return spec, v["num_channels"]


def read(directory: str, config: dict[str, Any]
         ) -> tuple[siglip.SiglipSpec, dict[str, np.ndarray], TensorFile, dict[str, str]]:
  """(spec, big_vision-layout arrays, the weights file, big_vision name -> file tensor name) of
  the SiglipModel in `directory`, whose config.json is `config` (read_model_config)."""
  spec, channels = spec_from_config(directory, config)
  source = read_weights(directory)
  packed = torch_layout.unpack_in_proj(source, _MAP_ATTENTION, spec.image.width)
  bv, names = torch_layout.to_big_vision(source, entries(spec, channels), packed)
  what = "Hugging Face " + ("Siglip2Model" if spec.naflex_grid else "SiglipModel")
  source.check_all_used(what, ignore=IGNORED_BUFFERS)
  return spec, bv, source, names


def _config_json(spec: siglip.SiglipSpec) -> dict[str, Any]:
  def tower(t: siglip.Tower) -> dict[str, Any]:
    return dict(hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.depth,
                num_attention_heads=t.num_heads, hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=_LN_EPS, attention_dropout=0.0)
  kind = "siglip" if spec.naflex_grid is None else "siglip2"
  grid = (dict(image_size=spec.image_size) if spec.naflex_grid is None
          else dict(num_patches=spec.naflex_grid ** 2))
  return {
      "architectures": ["SiglipModel" if kind == "siglip" else "Siglip2Model"],
      "model_type": kind, "dtype": "float32",
      "vision_config": dict(tower(spec.image), model_type=f"{kind}_vision_model", **grid,
                            patch_size=spec.patch_size, num_channels=3, vision_use_head=True),
      "text_config": dict(tower(spec.text), model_type=f"{kind}_text_model",
                          vocab_size=spec.vocab_size, max_position_embeddings=spec.max_len,
                          projection_size=spec.embed_dim, pad_token_id=spec.source_pad_id,
                          eos_token_id=spec.eos_id, bos_token_id=None),
  }


def write(directory: str, spec: siglip.SiglipSpec, bv: dict[str, np.ndarray],
          tokenizer_proto: bytes | None = None) -> str:
  """Writes a Hugging Face SiglipModel (Siglip2Model when spec.naflex_grid is set) directory
  from big_vision-layout arrays."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  tensors = torch_layout.to_torch(bv, entries(spec))
  torch_layout.pack_in_proj(tensors, _MAP_ATTENTION)
  os.makedirs(directory, exist_ok=True)
  st_numpy.save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump(_config_json(spec), f, indent=2)
    f.write("\n")
  if tokenizer_proto is not None:
    name = SIGLIP2_TOKENIZER if spec.lowercase_text else TOKENIZER
    with open(os.path.join(directory, name), "wb") as f:
      f.write(tokenizer_proto)
  return os.path.abspath(directory)
