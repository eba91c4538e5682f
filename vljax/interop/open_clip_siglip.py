"""open_clip's SigLIP models (CustomTextCLIP: a timm ViT trunk, open_clip's text tower) -> vljax.

The image tower is timm's `vit_{size}_patch{p}_siglip_{res}` with MAP pooling and no
projection (`timm_pool: map`, `timm_proj: none`); the text tower is open_clip's TextTransformer,
bidirectional (`no_causal_mask`), pooled at the last position, with a biased linear projection
and LayerNorm epsilon 1e-6. That is big_vision's SigLIP (vljax.interop.siglip's spec) with one
difference: open_clip's port runs the exact GELU (torch's nn.GELU, in both towers and the MAP
head) where big_vision and Hugging Face run the tanh approximation, so the import sets
`activation='gelu'` and a model imported this way does not export to those formats (their
checkpoints would compute a slightly different function).

Sizes come from the tensors (width, depth, MLP width, patch size); the one size the tensors do
not hold, the image tower's head count, comes from the timm model name's size (base 12; large,
so400m, giantopt 16). timm's fused `attn.qkv` and the MAP head's fused `kv` projections are
split; the text tower's blocks are open_clip's CLIP blocks (vljax.interop.open_clip).
"""
from __future__ import annotations

import re
from typing import Any

import ml_collections
import numpy as np

from vljax.data import clip_bpe
from vljax.interop import open_clip, siglip, torch_layout
from vljax.interop.tensors import InteropError, TensorFile
from vljax.interop.torch_layout import Entry, mlp, norm

_TIMM_NAME = re.compile(r"^vit_(base|large|so400m|giantopt)_patch(\d+)_siglip_(\d+)$")
_TIMM_HEADS = {"base": 12, "large": 16, "so400m": 16, "giantopt": 16}
_VISION_FIXED = dict(timm_model_pretrained=False, timm_pool="map", timm_proj="none",
                     timm_proj_bias=False, timm_drop=0.0, timm_drop_path=None,
                     patch_dropout=0.0)
_TEXT_SIZES = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12,
                   mlp_ratio=4.0)
# The SigLIP text tower's settings; the tokenizer keys only say which tokenizer open_clip loads.
_TEXT_FIXED = dict(no_causal_mask=True, proj_bias=True, pool_type="last",
                   norm_kwargs={"eps": 1e-6}, ls_init_value=None, embed_cls=False,
                   final_ln_after_pool=False, proj_type="linear", output_tokens=False,
                   act_kwargs=None, hf_model_name=None, pad_id=0)
_TEXT_FREE = ("hf_tokenizer_name", "tokenizer_kwargs")
_TRUNK = "visual.trunk"
_POOL = f"{_TRUNK}.attn_pool"


# How open_clip cleans a caption before its SigLIP tokenizer (tokenizer_kwargs clean:
# 'canonicalize'); ImportedModel.tokenize applies canonicalize_text for imports marked so.
TEXT_NORMALIZATION = "open_clip_canonicalize"


def canonicalize_text(text: str) -> str:
  """open_clip's 'canonicalize' clean-up: basic_clean (ftfy, HTML), '_' as a space,
  punctuation deleted, lowercase, whitespace collapsed (then HF's SiglipTokenizer cleans the
  same way again, which changes nothing)."""
  return siglip.canonicalize_text(clip_bpe.basic_clean(text).replace("_", " "))


def is_siglip(model_cfg: dict[str, Any]) -> bool:
  return bool(model_cfg.get("vision_cfg", {}).get("timm_model_name"))


def _check(cfg: dict, fixed: dict, free: tuple[str, ...], where: str, path: str) -> None:
  for key, value in cfg.items():
    if key in free:
      continue
    if key not in fixed:
      raise InteropError(f"{path}: {where}.{key} is not supported in an open_clip SigLIP.")
    if value != fixed[key] and key != "patch_dropout":  # patch dropout: training only
      raise InteropError(f"{path}: {where}.{key}={value!r} is not supported (only "
                         f"{fixed[key]!r}).")


def spec(model_cfg: dict, source: TensorFile, path: str) -> siglip.SiglipSpec:
  """The SigLIP architecture of an open_clip SigLIP model config and its tensors."""
  v, t = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
  name = v.pop("timm_model_name")
  match = _TIMM_NAME.match(name)
  if not match:
    raise InteropError(f"{path}: vision_cfg.timm_model_name={name!r}; vljax reads timm's "
                       f"SigLIP ViTs with MAP pooling (vit_{{base,large,so400m,giantopt}}_"
                       f"patch{{P}}_siglip_{{RES}}).")
  image_size = v.pop("image_size", 224)
  _check(v, _VISION_FIXED, (), "vision_cfg", path)
  _check(t, _TEXT_FIXED, _TEXT_FREE + tuple(_TEXT_SIZES), "text_cfg", path)
  t = dict(_TEXT_SIZES, **{k: t[k] for k in _TEXT_SIZES if k in t})
  if not isinstance(image_size, int):
    raise InteropError(f"{path}: vision_cfg.image_size={image_size!r}; a square size only.")
  width, channels, patch, _ = source.shape(f"{_TRUNK}.patch_embed.proj.weight")
  if channels != 3:
    raise InteropError(f"{path}: the patch embedding takes {channels} channels, not RGB.")
  depth = 0
  while f"{_TRUNK}.blocks.{depth}.norm1.weight" in source:
    depth += 1
  heads = _TIMM_HEADS[match.group(1)]
  if width % heads:
    raise InteropError(f"{path}: image width {width} does not divide into the {heads} heads "
                       f"of a timm {match.group(1)} ViT.")
  if model_cfg["embed_dim"] != width:
    raise InteropError(f"{path}: embed_dim={model_cfg['embed_dim']} but the MAP head puts out "
                       f"{width} (timm_proj none: the image embedding is the head's output).")
  image = siglip.Tower(width, depth, source.shape(f"{_TRUNK}.blocks.0.mlp.fc1.weight")[0],
                       heads)
  text = siglip.Tower(t["width"], t["layers"], int(t["width"] * t["mlp_ratio"]), t["heads"])
  # open_clip's SigLIP tokenizer (HF's SiglipTokenizer) pads with EOS, id 1, as SigLIP does.
  return siglip.SiglipSpec(image=image, text=text, image_size=image_size, patch_size=patch,
                           vocab_size=t["vocab_size"], max_len=t["context_length"],
                           embed_dim=width, has_bias="logit_bias" in source)


def entries(s: siglip.SiglipSpec) -> list[Entry]:
  """The tensors of an open_clip SigLIP state dict (fused projections under stand-in names)."""
  v, t = s.image, s.text
  blocks = []
  for i in range(v.depth):
    h, b = f"{_TRUNK}.blocks.{i}", f"img/Transformer/encoderblock_{i}"
    blocks += (norm(f"{h}.norm1", f"{b}/LayerNorm_0", v.width)
               + torch_layout.attention(f"{h}.attn", f"{b}/MultiHeadDotProductAttention_0",
                                        v.width, v.num_heads, out="proj")
               + norm(f"{h}.norm2", f"{b}/LayerNorm_1", v.width)
               + mlp(f"{h}.mlp", f"{b}/MlpBlock_0", v.width, v.mlp_dim))
  text_tower = dict(width=t.width, num_heads=t.num_heads, depth=t.depth, mlp_dim=t.mlp_dim)
  return [
      Entry(f"{_TRUNK}.patch_embed.proj.weight", "img/embedding/kernel", "conv",
            (v.width, 3, s.patch_size, s.patch_size)),
      Entry(f"{_TRUNK}.patch_embed.proj.bias", "img/embedding/bias", "copy", (v.width,)),
      Entry(f"{_TRUNK}.pos_embed", "img/pos_embedding", "copy",
            (1, (s.image_size // s.patch_size) ** 2, v.width)),
      *blocks,
      *norm(f"{_TRUNK}.norm", "img/Transformer/encoder_norm", v.width),
      Entry(f"{_POOL}.latent", "img/MAPHead_0/probe", "copy", (1, 1, v.width)),
      *torch_layout.attention(_POOL, "img/MAPHead_0/MultiHeadDotProductAttention_0", v.width,
                              v.num_heads, out="proj"),
      *norm(f"{_POOL}.norm", "img/MAPHead_0/LayerNorm_0", v.width),
      *mlp(f"{_POOL}.mlp", "img/MAPHead_0/MlpBlock_0", v.width, v.mlp_dim),
      Entry("text.token_embedding.weight", "txt/Embed_0/embedding", "copy",
            (s.vocab_size, t.width)),
      Entry("text.positional_embedding", "txt/pos_embedding", "posemb", (s.max_len, t.width)),
      *open_clip.text_blocks("text.transformer", "txt/Encoder_0", text_tower),
      *norm("text.ln_final", "txt/Encoder_0/encoder_norm", t.width),
      Entry("text.text_projection.weight", "txt/head/kernel", "dense", (s.embed_dim, t.width)),
      Entry("text.text_projection.bias", "txt/head/bias", "copy", (s.embed_dim,)),
      Entry("logit_scale", "t", "copy", ()),
      *([Entry("logit_bias", "b", "copy", ())] if s.has_bias else []),
  ]


def read(model_cfg: dict, source: TensorFile, path: str
         ) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray], dict[str, str]]:
  """(vljax run config, big_vision-layout arrays, bv name -> file name) of an open_clip
  SigLIP whose model config is `model_cfg` and tensors `source`."""
  s = spec(model_cfg, source, path)
  packed = {}
  for i in range(s.image.depth):
    packed.update(torch_layout.unpack_fused(source, f"{_TRUNK}.blocks.{i}.attn", "qkv",
                                            ("q_proj", "k_proj", "v_proj"), s.image.width))
  packed.update(torch_layout.unpack_fused(source, _POOL, "kv", ("k_proj", "v_proj"),
                                          s.image.width))
  for i in range(s.text.depth):
    packed.update(torch_layout.unpack_in_proj(source, f"text.transformer.resblocks.{i}.attn",
                                              s.text.width))
  # The query of the MAP head is its own tensor: q.weight under the stand-in name q_proj.
  for suffix in ("weight", "bias"):
    shape = (s.image.width, s.image.width) if suffix == "weight" else (s.image.width,)
    packed[f"{_POOL}.q_proj.{suffix}"] = (source.take(f"{_POOL}.q.{suffix}", shape),
                                          f"{_POOL}.q.{suffix}")
  arrays, names = torch_layout.to_big_vision(source, entries(s), packed)
  config = siglip.run_config(s)
  for tower in ("image", "text"):  # open_clip's port: torch's exact GELU (module docstring)
    config.model[tower]["activation"] = "gelu"
  source.check_all_used("open_clip SigLIP")
  return config, arrays, names
