"""SigLIP in vljax terms: the run config that reproduces it, and big_vision <-> vljax names.

Every converter goes through big_vision's flat layout ('img/...', 'txt/...', 't', 'b'; flax
kernels [in, out], attention kernels [D, heads, head_dim]), which differs from vljax's tree only
in names:

  big_vision                              vljax
  img/embedding/*                         img/encoder/embedding/*
  img/pos_embedding                       img/encoder/pos_embedding
  img/Transformer/...                     img/encoder/Transformer/...
  img/MAPHead_0/...                       img/encoder/MAPHead_0/...
  img/cls, img/pre_norm/* (CLIP)          img/encoder/cls, img/encoder/pre_norm/*
  img/head/*    (absent in SigLIP)        img/head/*    (vljax image_head='none' when absent)
  txt/Embed_0/embedding                   txt/encoder/embedding/embedding
  txt/pos_embedding                       txt/encoder/pos_embedding
  txt/Encoder_0/...                       txt/encoder/Encoder_0/...
  txt/head/*                              txt/head/*
  t [1], b [1]                            t [], b []
  .../MultiHeadDotProductAttention_0/...  .../MultiHeadAttention_0/...
"""
from __future__ import annotations

import dataclasses
import re
import string
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vljax import configlib
from vljax.interop.tensors import InteropError, TensorFile, check_shape

# (big_vision prefix, vljax prefix); the first that matches a name wins, in either direction.
PREFIXES = (
    ("img/embedding/", "img/encoder/embedding/"),
    ("img/pos_embedding", "img/encoder/pos_embedding"),
    ("img/Transformer/", "img/encoder/Transformer/"),
    ("img/MAPHead_0/", "img/encoder/MAPHead_0/"),
    ("img/cls", "img/encoder/cls"),
    ("img/pre_norm/", "img/encoder/pre_norm/"),  # not big_vision's: CLIP's ln_pre
    ("img/head/", "img/head/"),
    ("txt/Embed_0/embedding", "txt/encoder/embedding/embedding"),
    ("txt/pos_embedding", "txt/encoder/pos_embedding"),
    ("txt/Encoder_0/", "txt/encoder/Encoder_0/"),
    ("txt/head/", "txt/head/"),
)
SCALARS = ("t", "b")
_ATTENTION = ("MultiHeadDotProductAttention_0", "MultiHeadAttention_0")


def _rename(name: str, forward: bool) -> str | None:
  if name in SCALARS:
    return name
  src, dst = (0, 1) if forward else (1, 0)
  for pair in PREFIXES:
    if name.startswith(pair[src]):
      name = pair[dst] + name[len(pair[src]):]
      return name.replace(_ATTENTION[src], _ATTENTION[dst])
  return None


def vljax_name(bv_name: str) -> str | None:
  """The vljax parameter path of a big_vision name (None: not a SigLIP parameter)."""
  return _rename(bv_name, forward=True)


def big_vision_name(vljax_path: str) -> str | None:
  """The big_vision name of a vljax parameter path."""
  return _rename(vljax_path, forward=False)


@dataclasses.dataclass(frozen=True)
class Tower:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int


@dataclasses.dataclass(frozen=True)
class SiglipSpec:
  """What a SigLIP checkpoint's architecture is, whatever format it came in."""
  image: Tower
  text: Tower
  image_size: int
  patch_size: int
  vocab_size: int
  max_len: int
  embed_dim: int
  image_head: bool = False  # big_vision 'img/head' (SigLIP has none)
  text_head: bool = True
  has_bias: bool = True
  pad_id: int = 0  # the sentencepiece pad id (vljax's tokenizer pads with it)
  eos_id: int = 1
  source_pad_id: int = 1  # what the source pads with (SigLIP: EOS); vljax embeds pads as it
  # SigLIP 2 NaFlex: the side of the square grid its position table is stored at (resized to
  # each image's grid); None: a fixed-resolution model, its table at image_size / patch_size.
  naflex_grid: int | None = None
  lowercase_text: bool = False  # SigLIP 2 trained on lowercased text (config.data.lowercase)


def run_config(spec: SiglipSpec) -> ml_collections.ConfigDict:
  """A vljax two-tower sigmoid run config whose model is `spec`, exactly.

  The options that make it exact: image_head 'none' (the MAP head's output is the image
  embedding), text pool_type 'last_position' (the final position, whatever it holds), mask_pad
  False (padding is attended to) and embed_pad_as=source_pad_id (SigLIP pads with EOS).
  """
  c = configlib.base_train_config()
  c.objective = "two_towers"
  c.loss.kind = "sigmoid"
  c.loss.chunked = False
  c.model.image = dict(dataclasses.asdict(spec.image), patch_size=(spec.patch_size,) * 2,
                       posemb="learn", pool_type="map")
  if spec.naflex_grid is not None:
    c.model.image["posemb_grid"] = (spec.naflex_grid,) * 2
  c.model.text = dict(dataclasses.asdict(spec.text), causal=False, pool_type="last_position",
                      mask_pad=False, embed_pad_as=spec.source_pad_id,
                      vocab_size=spec.vocab_size, pad_id=spec.pad_id, eos_id=spec.eos_id)
  c.model.embed_dim = spec.embed_dim
  c.model.image_head = "dense" if spec.image_head else "none"
  c.model.text_head = "dense" if spec.text_head else "none"
  c.model.temperature_init = 10.0
  c.model.bias_init = -10.0 if spec.has_bias else None
  c.data.image_size = spec.image_size
  c.data.max_len = spec.max_len
  c.data.mean, c.data.std = [], []  # SigLIP's [-1, 1] pixels
  c.data.lowercase = spec.lowercase_text
  # A schedule, so that the config builds as a run (vljax.predict, vljax.evaluate); a run that
  # trains from the import sets its own.
  c.batch_size = 32
  c.total_steps = 1
  c.optim.warmup_steps = 0
  return c


def spec_from_config(config: ml_collections.ConfigDict, where: str) -> SiglipSpec:
  """The SigLIP architecture of a vljax two-tower run config, if it is one.

  Raises InteropError naming the first option that no SigLIP checkpoint can express.
  """
  m, image, text = config.model, dict(config.model.image), dict(config.model.text)
  wanted = {"objective": (config.objective, "two_towers"),
            "model.image.pool_type": (image.get("pool_type"), "map"),
            "model.image.posemb": (image.get("posemb", "learn"), "learn"),
            "model.image_head": (m.get("image_head", "dense"), "none"),
            "model.text_head": (m.get("text_head", "dense"), "dense"),
            "model.text.pool_type": (text.get("pool_type"), "last_position"),
            "model.text.mask_pad": (text.get("mask_pad", True), False),
            "model.text.causal": (text.get("causal", False), False),
            "model.image.patch_bias": (image.get("patch_bias", True), True),
            "model.image.pre_norm": (image.get("pre_norm", False), False)}
  for tower, name in ((image, "image"), (text, "text")):
    wanted[f"model.{name}.norm_eps"] = (tower.get("norm_eps", 1e-6), 1e-6)
    wanted[f"model.{name}.activation"] = (tower.get("activation", "gelu_tanh"), "gelu_tanh")
  for key, (have, want) in wanted.items():
    if have != want:
      raise InteropError(f"{where}: config.{key}={have!r}; a SigLIP checkpoint needs {want!r}.")
  if "variant" in image or "variant" in text or "vocab_size" not in text:
    raise InteropError(f"{where}: the config does not spell out the towers' sizes and "
                       f"vocabulary (models imported by vljax.interop do).")

  def tower(t):
    return Tower(t["width"], t["depth"], t["mlp_dim"], t["num_heads"])

  patch = tuple(image["patch_size"])
  if patch[0] != patch[1]:
    raise InteropError(f"{where}: patch size {patch} is not square.")
  grid = image.get("posemb_grid")
  if grid is not None and grid[0] != grid[1]:
    raise InteropError(f"{where}: config.model.image.posemb_grid={tuple(grid)}; SigLIP 2's "
                       f"NaFlex stores a square position table.")
  return SiglipSpec(
      image=tower(image), text=tower(text), image_size=config.data.image_size,
      patch_size=patch[0], vocab_size=text["vocab_size"], max_len=config.data.max_len,
      embed_dim=m.embed_dim, has_bias=m.get("bias_init") is not None,
      pad_id=text.get("pad_id", 0), eos_id=text.get("eos_id", 1),
      source_pad_id=text.get("embed_pad_as") if text.get("embed_pad_as") is not None
      else text.get("pad_id", 0), naflex_grid=None if grid is None else int(grid[0]),
      lowercase_text=bool(config.data.get("lowercase", False)))


def model(config: ml_collections.ConfigDict):
  """The TwoTowers of an imported run config (vocabulary and ids from config.model.text)."""
  from vljax.models import two_towers  # pylint: disable=g-import-not-at-top
  kwargs = config.model.to_dict()
  kwargs["text"] = dict(kwargs["text"], max_len=config.data.max_len)
  return two_towers.TwoTowers(**kwargs)


def param_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """vljax parameter path -> shape, for the model of `config`."""
  from vljax import optim  # pylint: disable=g-import-not-at-top
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
  tokens = jax.ShapeDtypeStruct((1, config.data.max_len), np.int32)
  shapes = jax.eval_shape(lambda i, t: model(config).init(jax.random.key(0), i, t), images,
                          tokens)
  params = nn.meta.unbox(shapes["params"])
  return {optim.param_path(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _nest(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def to_vljax(bv: dict[str, np.ndarray], config: ml_collections.ConfigDict,
             source: TensorFile, source_names: dict[str, str] | None = None) -> dict[str, Any]:
  """big_vision-layout arrays -> the vljax params tree of `config`'s model, every shape checked.

  `source_names` maps a big_vision name to the name the tensor has in `source` (the file being
  converted), so that errors name the file's own tensor; by default they are the same.
  """
  source_names = source_names or {}
  expected = param_shapes(config)
  flat = {}
  for name, value in bv.items():
    path = vljax_name(name)
    if path is None or path not in expected:
      raise source.error(source_names.get(name, name), "has no place in the vljax model "
                         "(unsupported architecture).")
    if name in SCALARS:
      value = np.asarray(value).reshape(expected[path])
    check_shape(source, source_names.get(name, name), value.shape, expected[path])
    flat[path] = np.asarray(value)
  missing = sorted(set(expected) - set(flat))
  if missing:
    name = big_vision_name(missing[0])
    raise source.error(source_names.get(name, name),
                       f"is missing (needed for vljax parameter {missing[0]}; "
                       f"{len(missing)} missing in all).")
  return _nest(flat)


def from_vljax(params: Any) -> dict[str, np.ndarray]:
  """A vljax SigLIP params tree -> big_vision-layout arrays (t and b of shape [1])."""
  from vljax import optim  # pylint: disable=g-import-not-at-top
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = optim.param_path(p)
    name = big_vision_name(path)
    if name is None:
      raise InteropError(f"vljax parameter {path} has no big_vision name.")
    value = np.asarray(x, np.float32)
    out[name] = value.reshape(1) if name in SCALARS else value
  return out


# Text clean-up of Hugging Face's SiglipTokenizer (after big_vision's zero-shot prompts):
# lowercase, delete ASCII punctuation, collapse whitespace, strip.
HF_TEXT = "siglip_hf"
# SigLIP 2 pads its text with Gemma's <pad>, id 0 (big_vision's SigLIP 2 demo: 'lower|tok(
# length=64, model="gemma", bos="no", eos="sticky")', whose pad value is 0; transformers'
# Siglip2Tokenizer pads with <pad> too), where SigLIP pads with EOS (1). Gemma's vocabulary
# has 256,000 pieces.
SIGLIP2_PAD_ID = 0
GEMMA_VOCAB_SIZE = 256_000


def is_siglip2(vocab_size: int, naflex: bool) -> bool:
  """Whether a checkpoint is SigLIP 2 (lowercased text, <pad> padding): a NaFlex model, or a
  fixed-resolution one over Gemma's vocabulary."""
  return naflex or vocab_size == GEMMA_VOCAB_SIZE
_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str) -> str:
  """A caption as Hugging Face's SiglipTokenizer cleans it before sentencepiece."""
  return re.sub(r"\s+", " ", text.lower().translate(_DELETE_PUNCTUATION)).strip()
