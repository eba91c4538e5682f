"""Hugging Face `CLIPModel` directories (config.json + model.safetensors) -> vljax, and back.

A CLIPModel is OpenAI's CLIP ViT, the architecture open_clip's CLIP also has: class token,
pre_layrnorm (sic), pre-LN blocks, post_layernorm on the class token, bias-free projections, a
causal text transformer, quick or exact GELU, LayerNorm epsilon 1e-5. Its config is therefore
translated into open_clip's model config and built by vljax.interop.open_clip.run_config, so
both sources of one architecture get the same vljax options. What differs is only the names
(separate q/k/v projections with biases, as SiglipModel's encoder blocks: vljax.interop.hf) and
the text pooling rule:

HF pools the text at the first `eos_token_id` (at the largest id when eos_token_id is 2, the
legacy configs); vljax's CLIP text tower pools at the largest id. The two agree when EOS is the
vocabulary's largest id (OpenAI's 49407 of 49408) or eos_token_id is 2; any other EOS is
refused. HF's CLIP tokenizer files (merges.txt, vocab.json) are read and written by
vljax.data.clip_bpe.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from vljax.data import clip_bpe
from vljax.interop import hf, open_clip, siglip, torch_layout
from vljax.interop.tensors import InteropError, TensorFile, read_json
from vljax.interop.torch_layout import Entry, norm

PREPROCESSOR = "preprocessor_config.json"
# transformers' CLIPVisionConfig / CLIPTextConfig / CLIPConfig defaults for the keys read here.
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_ACTIVATIONS = ("quick_gelu", "gelu")  # vljax's 'quick_gelu' and exact 'gelu'
_LEGACY_EOS = 2  # HF pools at the largest id for configs with this eos_token_id


def _tower(config: dict, key: str, defaults: dict, path: str) -> dict[str, Any]:
  tower = hf.tower_config(config, key, defaults, path, _ACTIVATIONS, open_clip.LN_EPS,
                          "a CLIP ViT")
  if tower["hidden_size"] % tower["num_attention_heads"]:
    raise InteropError(f"{path}: {key}.hidden_size={tower['hidden_size']} does not divide "
                       f"into num_attention_heads={tower['num_attention_heads']}.")
  return tower


def _preprocess(directory: str) -> dict[str, Any]:
  """The image mean / std of the directory's preprocessor_config.json (OpenAI's without one)."""
  path = os.path.join(directory, PREPROCESSOR)
  if not os.path.isfile(path):
    return {}
  config = read_json(path, "unreadable")
  return {k: config[f"image_{k}"] for k in ("mean", "std") if f"image_{k}" in config}


def read_config(directory: str, config: dict) -> ml_collections.ConfigDict:
  """The vljax run config of the CLIPModel whose config.json is `config`, exactly."""
  path = os.path.join(directory, hf.CONFIG)
  v = _tower(config, "vision_config", _VISION_DEFAULTS, path)
  t = _tower(config, "text_config", _TEXT_DEFAULTS, path)
  if v["hidden_act"] != t["hidden_act"]:
    raise InteropError(f"{path}: vision_config.hidden_act={v['hidden_act']!r} but "
                       f"text_config.hidden_act={t['hidden_act']!r}; vljax's CLIP towers share "
                       f"one activation.")
  if v["num_channels"] != 3:
    raise InteropError(f"{path}: vision_config.num_channels={v['num_channels']}; vljax reads "
                       f"RGB images.")
  eos = t["eos_token_id"]
  if eos not in (_LEGACY_EOS, t["vocab_size"] - 1):
    raise InteropError(f"{path}: text_config.eos_token_id={eos}; HF pools the text at the first "
                       f"EOS and vljax at the largest id, the same only when EOS is the largest "
                       f"id ({t['vocab_size'] - 1}) or eos_token_id is 2.")
  model_cfg = {
      "embed_dim": config.get("projection_dim", 512),
      "vision_cfg": dict(image_size=v["image_size"], patch_size=v["patch_size"],
                         width=v["hidden_size"], layers=v["num_hidden_layers"],
                         head_width=v["hidden_size"] // v["num_attention_heads"],
                         mlp_ratio=v["intermediate_size"] / v["hidden_size"]),
      "text_cfg": dict(context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"],
                       width=t["hidden_size"], heads=t["num_attention_heads"],
                       layers=t["num_hidden_layers"],
                       mlp_ratio=t["intermediate_size"] / t["hidden_size"]),
      "quick_gelu": v["hidden_act"] == "quick_gelu",
  }
  run = open_clip.run_config(model_cfg, _preprocess(directory), False, path)
  for key, tower in (("vision_config", v), ("text_config", t)):
    built = run.model.image if key == "vision_config" else run.model.text
    if built["mlp_dim"] != tower["intermediate_size"]:
      raise InteropError(f"{path}: {key}.intermediate_size={tower['intermediate_size']} is not "
                         f"a whole multiple of hidden_size this import can express.")
  return run


def entries(config: ml_collections.ConfigDict) -> list[Entry]:
  """The tensors of the CLIPModel state dict, but for the class token and position embedding."""
  v, t, e = config.model.image, config.model.text, config.model.embed_dim
  p = v["patch_size"][0]
  tower = lambda c: siglip.Tower(c["width"], c["depth"], c["mlp_dim"], c["num_heads"])
  return [
      Entry("vision_model.embeddings.patch_embedding.weight", "img/embedding/kernel", "conv",
            (v["width"], 3, p, p)),
      *norm("vision_model.pre_layrnorm", "img/pre_norm", v["width"]),
      *hf.encoder_entries("vision_model.encoder", "img/Transformer", tower(v)),
      *norm("vision_model.post_layernorm", "img/Transformer/encoder_norm", v["width"]),
      Entry("visual_projection.weight", "img/head/kernel", "dense", (e, v["width"])),
      Entry("text_model.embeddings.token_embedding.weight", "txt/Embed_0/embedding", "copy",
            (t["vocab_size"], t["width"])),
      Entry("text_model.embeddings.position_embedding.weight", "txt/pos_embedding", "posemb",
            (config.data.max_len, t["width"])),
      *hf.encoder_entries("text_model.encoder", "txt/Encoder_0", tower(t)),
      *norm("text_model.final_layer_norm", "txt/Encoder_0/encoder_norm", t["width"]),
      Entry("text_projection.weight", "txt/head/kernel", "dense", (e, t["width"])),
      Entry("logit_scale", "t", "copy", ()),
  ]


def read(directory: str, config: dict
         ) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray], TensorFile, dict[str, str]]:
  """(vljax run config, big_vision-layout arrays, the weights file, bv name -> file name)."""
  run = read_config(directory, config)
  source = hf.read_weights(directory)
  arrays, names = torch_layout.to_big_vision(source, entries(run), {})
  open_clip.take_class_token(source, run, "vision_model.embeddings.class_embedding",
                             "vision_model.embeddings.position_embedding.weight", arrays, names)
  source.check_all_used("Hugging Face CLIPModel", ignore=hf.IGNORED_BUFFERS)
  return run, arrays, source, names



def write(directory: str, config: ml_collections.ConfigDict,
          clip_config: tuple[dict[str, Any], dict[str, Any]], bv: dict[str, np.ndarray],
          tokenizer: clip_bpe.ClipBpeTokenizer | None = None) -> str:
  """Writes a Hugging Face CLIPModel directory (config.json, model.safetensors,
  preprocessor_config.json with the image mean / std) from big_vision-layout arrays of a
  CLIP-shaped vljax model; `clip_config` is its checked open_clip (model_cfg, preprocess_cfg)
  (vljax.interop.open_clip.model_config). A CLIP BPE tokenizer goes along as HF's
  merges.txt and vocab.json."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  model_cfg, preprocess = clip_config
  tensors = torch_layout.to_torch(bv, entries(config))
  open_clip.put_class_token(bv, "vision_model.embeddings.class_embedding",
                            "vision_model.embeddings.position_embedding.weight", tensors)
  tensors["logit_scale"] = np.asarray(bv["t"], np.float32).reshape(())
  v, t = config.model.image, config.model.text
  act = v.get("activation", "gelu")

  def tower(c: dict) -> dict[str, Any]:
    return dict(hidden_size=c["width"], intermediate_size=c["mlp_dim"],
                num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"],
                hidden_act=act, layer_norm_eps=open_clip.LN_EPS, attention_dropout=0.0)
  vocab = t["vocab_size"]
  hf_config = {
      "architectures": ["CLIPModel"], "model_type": "clip", "dtype": "float32",
      "projection_dim": model_cfg["embed_dim"],
      "vision_config": dict(tower(v), model_type="clip_vision_model", num_channels=3,
                            image_size=config.data.image_size, patch_size=int(v["patch_size"][0])),
      # EOS the largest id: HF then pools where vljax does (module docstring).
      "text_config": dict(tower(t), model_type="clip_text_model", vocab_size=vocab,
                          max_position_embeddings=config.data.max_len, eos_token_id=vocab - 1,
                          bos_token_id=vocab - 2, pad_token_id=0),
  }
  os.makedirs(directory, exist_ok=True)
  st_numpy.save_file(tensors, os.path.join(directory, hf.WEIGHTS), metadata={"format": "pt"})
  for name, content in ((hf.CONFIG, hf_config),
                        (PREPROCESSOR, {"image_mean": preprocess["mean"],
                                        "image_std": preprocess["std"]})):
    with open(os.path.join(directory, name), "w") as f:
      json.dump(content, f, indent=2)
      f.write("\n")
  if tokenizer is not None:
    tokenizer.write_hf_files(directory)
  return os.path.abspath(directory)
