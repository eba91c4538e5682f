"""open_clip CLIP ViT checkpoints (state dict + model config) -> vljax, and back (`write`).

SRC is a directory in the Hugging Face hub layout of open_clip (open_clip_config.json with
{"model_cfg": ..., "preprocess_cfg": ...} and open_clip_model.safetensors or
open_clip_pytorch_model.bin), or a weights file (.safetensors, or .bin / .pt read by
vljax.interop.torch_pickle without executing the pickle) with the model config given apart
(--config: open_clip's model config JSON, e.g. model_configs/ViT-B-32.json, or the hub file).

Supported: the CLIP ViT of open_clip.model.CLIP (class token, ln_pre, pre-LN blocks, ln_post
on every token, token pooling, bias-free projection; causal text transformer pooled at the
largest token id), with exact or quick GELU. Not yet: timm or Hugging Face towers (open_clip's
SigLIP variants), attentional pooling, layer scale, other pooling types.

The vljax model gets CLIP's options: ViT patch_bias False, pre_norm True, pool_type 'tok';
text causal, pool_type 'argmax', mask_pad False; LayerNorm epsilon 1e-5; activation 'gelu' or
'quick_gelu'; bias-free 'linear' heads. CLIP adds its position embedding to the class token
too, vljax does not: the class token imports as class_embedding + positional_embedding[0]
(the same float32 sum CLIP computes), the patches keep positional_embedding[1:].
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from vljax import configlib
from vljax.interop import torch_layout, torch_pickle
from vljax.interop.tensors import InteropError, TensorFile, read_json, read_safetensors
from vljax.interop.torch_layout import Entry, attention, mlp, norm

CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# open_clip's own means/stds (on [0, 1] pixels), used when the config has no preprocess_cfg.
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
LN_EPS = 1e-5  # torch's LayerNorm default, which open_clip keeps

# open_clip's CLIPVisionCfg / CLIPTextCfg defaults for the keys that set sizes.
_VISION = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16,
               image_size=224)
_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0)
# Keys that may appear with these values only (their defaults; anything else is another
# architecture); keys in neither table are refused too.
_VISION_FIXED = dict(ls_init_value=None, attentional_pool=False, no_ln_pre=False,
                     pos_embed_type="learnable", final_ln_after_pool=False, pool_type="tok",
                     timm_model_name=None, output_tokens=False, patch_dropout=0.0,
                     act_kwargs=None, norm_kwargs=None, block_type=None, qk_norm=False)
_TEXT_FIXED = dict(ls_init_value=None, embed_cls=False, pad_id=0, no_causal_mask=False,
                   final_ln_after_pool=False, pool_type="argmax", proj_bias=False,
                   proj_type="linear", output_tokens=False, hf_model_name=None,
                   hf_tokenizer_name=None, tokenizer_kwargs=None, act_kwargs=None,
                   norm_kwargs=None, block_type=None, qk_norm=False)
_MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype",
               "init_logit_scale", "init_logit_bias", "custom_text"}


def _check_keys(cfg: dict, sizes: dict, fixed: dict, where: str, path: str) -> dict[str, Any]:
  for key, value in cfg.items():
    if key in sizes:
      continue
    if key not in fixed:
      raise InteropError(f"{path}: {where}.{key} is not supported (a CLIP ViT of "
                         f"open_clip.model.CLIP is; timm / Hugging Face towers are not yet).")
    if value != fixed[key] and key != "patch_dropout":  # patch dropout: training only
      raise InteropError(f"{path}: {where}.{key}={value!r} is not supported (only "
                         f"{fixed[key]!r}).")
  return dict(sizes, **{k: v for k, v in cfg.items() if k in sizes})


def read_config(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(model_cfg, preprocess_cfg) of an open_clip config file (hub layout or model config)."""
  config = read_json(path, "no such open_clip config file; give the model config with "
                          "--config (e.g. open_clip's model_configs/ViT-B-32.json).")
  model_cfg = config.get("model_cfg", config)
  unknown = sorted(set(model_cfg) - _MODEL_KEYS)
  if unknown or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
    raise InteropError(f"{path}: not an open_clip CLIP model config (keys {sorted(model_cfg)}"
                       f"; unsupported: {unknown}).")
  return model_cfg, config.get("preprocess_cfg", {})


def run_config(model_cfg: dict, preprocess: dict, has_bias: bool,
               path: str) -> ml_collections.ConfigDict:
  """The vljax run config of an open_clip CLIP model config, exactly."""
  v = _check_keys(model_cfg["vision_cfg"], _VISION, _VISION_FIXED, "vision_cfg", path)
  t = _check_keys(model_cfg["text_cfg"], _TEXT, _TEXT_FIXED, "text_cfg", path)
  if isinstance(v["image_size"], (list, tuple)) or isinstance(v["patch_size"], (list, tuple)):
    raise InteropError(f"{path}: non-square image or patch sizes are not supported.")
  activation = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
  common = dict(norm_eps=LN_EPS, activation=activation)
  c = configlib.base_train_config()
  c.objective = "two_towers"
  c.loss.kind = "sigmoid" if has_bias else "softmax"
  c.loss.chunked = False
  if not has_bias:
    c.loss.max_scale = 100.0
  c.model.image = dict(width=v["width"], depth=v["layers"],
                       mlp_dim=int(v["width"] * v["mlp_ratio"]),
                       num_heads=v["width"] // v["head_width"],
                       patch_size=(v["patch_size"],) * 2, posemb="learn", pool_type="tok",
                       patch_bias=False, pre_norm=True, **common)
  c.model.text = dict(width=t["width"], depth=t["layers"],
                      mlp_dim=int(t["width"] * t["mlp_ratio"]), num_heads=t["heads"],
                      causal=True, pool_type="argmax", mask_pad=False,
                      vocab_size=t["vocab_size"], pad_id=0, eos_id=t["vocab_size"] - 1,
                      **common)
  c.model.embed_dim = model_cfg["embed_dim"]
  c.model.image_head = c.model.text_head = "linear"
  c.model.temperature_init = 1 / 0.07
  c.model.bias_init = -10.0 if has_bias else None
  c.data.image_size = v["image_size"]
  c.data.max_len = t["context_length"]
  c.data.resize = "crop"
  c.data.mean = list(preprocess.get("mean", OPENAI_MEAN))
  c.data.std = list(preprocess.get("std", OPENAI_STD))
  c.batch_size = 32
  c.total_steps = 1
  c.optim.warmup_steps = 0
  return c


def text_blocks(torch_prefix: str, bv_prefix: str, tower: dict) -> list[Entry]:
  """open_clip's CLIP blocks (packed in_proj under stand-in names: torch_layout)."""
  out = []
  w, heads = tower["width"], tower["num_heads"]
  for i in range(tower["depth"]):
    h, b = f"{torch_prefix}.resblocks.{i}", f"{bv_prefix}/encoderblock_{i}"
    out += (norm(f"{h}.ln_1", f"{b}/LayerNorm_0", w)
            + attention(f"{h}.attn", f"{b}/MultiHeadDotProductAttention_0", w, heads)
            + norm(f"{h}.ln_2", f"{b}/LayerNorm_1", w)
            + mlp(f"{h}.mlp", f"{b}/MlpBlock_0", w, tower["mlp_dim"], ("c_fc", "c_proj")))
  return out


def entries(config: ml_collections.ConfigDict) -> list[Entry]:
  """The tensors of the CLIP state dict, but for the class token and position embedding."""
  v, t, e = config.model.image, config.model.text, config.model.embed_dim
  p = v["patch_size"][0]
  return [
      Entry("visual.conv1.weight", "img/embedding/kernel", "conv", (v["width"], 3, p, p)),
      *norm("visual.ln_pre", "img/pre_norm", v["width"]),
      *text_blocks("visual.transformer", "img/Transformer", v),
      *norm("visual.ln_post", "img/Transformer/encoder_norm", v["width"]),
      Entry("visual.proj", "img/head/kernel", "copy", (v["width"], e)),
      Entry("token_embedding.weight", "txt/Embed_0/embedding", "copy",
            (t["vocab_size"], t["width"])),
      Entry("positional_embedding", "txt/pos_embedding", "posemb",
            (config.data.max_len, t["width"])),
      *text_blocks("transformer", "txt/Encoder_0", t),
      *norm("ln_final", "txt/Encoder_0/encoder_norm", t["width"]),
      Entry("text_projection", "txt/head/kernel", "copy", (t["width"], e)),
      Entry("logit_scale", "t", "copy", ()),
  ]


def _files(src: str, config_path: str | None) -> tuple[str, str]:
  if os.path.isdir(src):
    found = [os.path.join(src, n) for n in WEIGHTS if os.path.isfile(os.path.join(src, n))]
    if not found:
      raise InteropError(f"{src}: no open_clip weights ({' or '.join(WEIGHTS)}).")
    return found[0], config_path or os.path.join(src, CONFIG)
  sibling = os.path.join(os.path.dirname(src), CONFIG)
  return src, config_path or sibling


def _read_weights(path: str) -> TensorFile:
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return torch_pickle.read_torch(path)


def read(src: str, config_path: str | None = None
         ) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray], TensorFile, dict[str, str]]:
  """(vljax run config, big_vision-layout arrays, the weights file, bv name -> file name)."""
  weights, config_path = _files(src, config_path)
  model_cfg, preprocess = read_config(config_path)
  source = _read_weights(weights)
  for wrapper in ("state_dict.", "module."):  # a training checkpoint, a DDP-wrapped model
    if source.arrays and all(k.startswith(wrapper) for k in source.arrays):
      source.arrays = {k[len(wrapper):]: v for k, v in source.arrays.items()}
      source.name_prefix += wrapper
  from vljax.interop import open_clip_siglip  # pylint: disable=g-import-not-at-top
  if open_clip_siglip.is_siglip(model_cfg):
    config, arrays, names = open_clip_siglip.read(model_cfg, source, config_path)
    # SigLIP's 0.5 / 0.5 is the [-1, 1] range siglip.run_config already sets (empty mean/std).
    half = [0.5] * 3
    mean, std = list(preprocess.get("mean", half)), list(preprocess.get("std", half))
    if (mean, std) != (half, half):
      config.data.mean, config.data.std = mean, std
    return config, arrays, source, names
  has_bias = "logit_bias" in source
  config = run_config(model_cfg, preprocess, has_bias, config_path)
  v, t = config.model.image, config.model.text
  packed = {}
  for prefix, tower in (("visual.transformer", v), ("transformer", t)):
    for i in range(tower["depth"]):
      packed.update(torch_layout.unpack_in_proj(source, f"{prefix}.resblocks.{i}.attn",
                                                tower["width"]))
  arrays, names = torch_layout.to_big_vision(source, entries(config), packed)
  take_class_token(source, config, "visual.class_embedding", "visual.positional_embedding",
                   arrays, names)
  if has_bias:
    arrays["b"], names["b"] = source.take("logit_bias"), "logit_bias"
  source.check_all_used("open_clip CLIP ViT", ignore=("attn_mask",))
  return config, arrays, source, names


def take_class_token(source: TensorFile, config: ml_collections.ConfigDict, cls_name: str,
                     pos_name: str, arrays: dict[str, np.ndarray], names: dict[str, str]) -> None:
  """CLIP's class embedding and position embedding as vljax's `img/cls` and
  `img/pos_embedding` (in place): CLIP adds position 0 to its class token, vljax keeps that
  float32 sum as the class token and the patches keep positions 1..n."""
  width = config.model.image["width"]
  grid = config.data.image_size // config.model.image["patch_size"][0]
  cls = source.take(cls_name, (width,))
  pos = source.take(pos_name, (grid * grid + 1, width))
  arrays["img/cls"] = (cls + pos[0])[None, None]
  arrays["img/pos_embedding"] = pos[1:][None]
  names.update({"img/cls": cls_name, "img/pos_embedding": pos_name})


# ------------------------------------------------------------------ vljax -> open_clip


def put_class_token(bv: dict[str, np.ndarray], cls_name: str, pos_name: str,
                    tensors: dict[str, np.ndarray]) -> None:
  """The inverse of take_class_token (in place on torch-named arrays): CLIP adds position 0 to
  its class token and vljax's class token already holds that sum, so it becomes the class
  embedding and position 0 is zero (the same sum)."""
  cls = np.asarray(bv["img/cls"], np.float32)
  width = cls.size
  tensors[cls_name] = cls.reshape(width)
  pos = np.asarray(bv["img/pos_embedding"], np.float32)[0]
  tensors[pos_name] = np.concatenate([np.zeros((1, width), np.float32), pos])


def model_config(config: ml_collections.ConfigDict, has_bias: bool,
                 where: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(model_cfg, preprocess_cfg) of open_clip's CLIP for a vljax run config, checked to be
  exact: the config open_clip's model maps back to (run_config) must be this one, else an
  InteropError names the first option that differs."""
  v, t, data = config.model.image, config.model.text, config.data
  patch = v["patch_size"]
  model_cfg = {
      "embed_dim": config.model.embed_dim,
      "vision_cfg": dict(image_size=data.image_size, patch_size=int(patch[0]), width=v["width"],
                         layers=v["depth"], head_width=v["width"] // v["num_heads"],
                         mlp_ratio=v["mlp_dim"] / v["width"]),
      "text_cfg": dict(context_length=data.max_len, vocab_size=t["vocab_size"],
                       width=t["width"], heads=t["num_heads"], layers=t["depth"],
                       mlp_ratio=t["mlp_dim"] / t["width"]),
  }
  if v.get("activation") == "quick_gelu":
    model_cfg["quick_gelu"] = True
  preprocess = {"mean": list(data.mean), "std": list(data.std)}
  back = run_config(model_cfg, preprocess, has_bias, where)
  for key in ("image", "text"):
    mine, clip = dict(config.model[key]), dict(back.model[key])
    for option in sorted(set(mine) | set(clip)):
      if key == "text" and option in ("pad_id", "eos_id"):
        continue  # the tokenizer's ids: open_clip's CLIP does not read them
      if _plain(mine.get(option)) != _plain(clip.get(option)):
        raise InteropError(f"{where}: model.{key}.{option}={mine.get(option)!r}; an open_clip "
                           f"CLIP ViT has {clip.get(option)!r}.")
  for key in ("embed_dim", "image_head", "text_head"):
    if config.model.get(key) != back.model.get(key):
      raise InteropError(f"{where}: model.{key}={config.model.get(key)!r}; an open_clip CLIP "
                         f"ViT has {back.model.get(key)!r}.")
  if list(patch) != [patch[0]] * 2:
    raise InteropError(f"{where}: non-square patches {tuple(patch)} are not supported.")
  return model_cfg, preprocess


def _plain(value: Any) -> Any:
  return list(value) if isinstance(value, (list, tuple)) else value


def write(directory: str, config: ml_collections.ConfigDict,
          clip_config: tuple[dict[str, Any], dict[str, Any]], bv: dict[str, np.ndarray],
          tokenizer_proto: bytes | None = None) -> str:
  """Writes an open_clip hub directory (open_clip_config.json, open_clip_model.safetensors)
  from big_vision-layout arrays of a CLIP-shaped vljax model, `clip_config` being its checked
  (model_cfg, preprocess_cfg) from model_config; the vljax tokenizer goes along as
  tokenizer.model (open_clip tokenizes with its own: give it this vocabulary's)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  model_cfg, preprocess = clip_config
  v, t = config.model.image, config.model.text
  tensors = torch_layout.to_torch(bv, entries(config))
  for prefix, tower in (("visual.transformer", v), ("transformer", t)):
    for i in range(tower["depth"]):
      torch_layout.pack_in_proj(tensors, f"{prefix}.resblocks.{i}.attn")
  put_class_token(bv, "visual.class_embedding", "visual.positional_embedding", tensors)
  tensors["logit_scale"] = np.asarray(bv["t"], np.float32).reshape(())
  if "b" in bv:
    tensors["logit_bias"] = np.asarray(bv["b"], np.float32).reshape(())
  os.makedirs(directory, exist_ok=True)
  st_numpy.save_file(tensors, os.path.join(directory, WEIGHTS[0]), metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, f, indent=2)
    f.write("\n")
  if tokenizer_proto is not None:
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
      f.write(tokenizer_proto)
  return os.path.abspath(directory)
