"""Interop: checkpoints from other libraries in and out of vljax, with logit parity.

Import (command line: `python -m vljax.interop import --format=hf|big_vision|open_clip SRC --out DIR`):
  import_checkpoint(fmt, src, out, tokenizer=None) writes a vljax export directory (params/,
  config.json, tokenizer.model) that config.init, vljax.predict and vljax.evaluate load like
  the export of a training run.
Use:
  model = vljax.interop.load(DIR)         # any two-tower export directory
  zimg = model.embed_images(images)       # float NHWC, preprocessed as the source expects
  ztxt = model.embed_texts(token_ids)     # int [B, L]
  logits = model.logits(zimg, ztxt)       # logit_scale * zimg @ ztxt.T + logit_bias
  ids = model.tokenize(["a photo of a cat"])

docs/interop.md lists the formats, the name mappings and the model options that make the
conversions exact.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from vljax.interop.tensors import InteropError

FORMATS = ("hf", "big_vision", "open_clip")
SOURCE_FILE = "interop_source.json"

EXPORT_FORMATS = ("hf", "big_vision", "open_clip")

__all__ = ["EXPORT_FORMATS", "FORMATS", "InteropError", "ImportedModel", "export_checkpoint",
           "import_checkpoint", "load"]


def _tokenizer(path: str | None):
  if not path:
    return None
  from vljax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  try:
    return tokenizer_lib.open_tokenizer(path)
  except FileNotFoundError:
    raise InteropError(f"{path}: no such tokenizer file (a sentencepiece .model, or for CLIP "
                       f"models a CLIP BPE vocabulary).") from None
  except (RuntimeError, ValueError) as e:  # sentencepiece's / the BPE reader's parse errors
    raise InteropError(f"{path}: not a tokenizer vljax reads ({e}).") from None


def import_checkpoint(fmt: str, src: str, out: str, tokenizer: str | None = None,
                      model_config: str | None = None) -> str:
  """Converts the checkpoint `src` of format `fmt` into a vljax export directory `out`.

  tokenizer: the checkpoint's tokenizer: a sentencepiece model for SigLIP (for --format=hf,
  SRC/spiece.model when not given; for SigLIP 2 SRC/tokenizer.model, Gemma's), CLIP's BPE vocabulary for CLIP models (open_clip's
  bpe_simple_vocab_16e6.txt.gz; a Hugging Face CLIPModel's SRC/merges.txt when not given).
  Without one the export still loads through `load` and config.init, but vljax.predict and
  vljax.evaluate need it. model_config: open_clip's model config JSON when SRC is a weights
  file without an open_clip_config.json beside it. Returns the export directory.
  """
  from vljax import checkpoint  # pylint: disable=g-import-not-at-top
  from vljax.data import clip_bpe  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from vljax.interop import big_vision, hf, hf_clip, open_clip, open_clip_siglip, siglip
  names, text, config = None, None, None
  hf_config = hf.read_model_config(src) if fmt == "hf" else None
  if hf_config is not None and hf_config["model_type"] == "clip":
    config, arrays, source, names = hf_clip.read(src, hf_config)
    spec = None
    tokenizer = tokenizer or clip_bpe.find_vocabulary(src)
  elif fmt == "hf":
    spec, arrays, source, names = hf.read(src, hf_config)
    # SigLIP 2 ships Gemma's tokenizer and lowercases (config.data.lowercase) instead of
    # SiglipTokenizer's clean-up.
    default = os.path.join(src, hf.SIGLIP2_TOKENIZER if spec.lowercase_text else hf.TOKENIZER)
    tokenizer = tokenizer or (default if os.path.isfile(default) else None)
    text = None if spec.lowercase_text else siglip.HF_TEXT
  elif fmt == "big_vision":
    spec, arrays, source = big_vision.read(src)
  elif fmt == "open_clip":
    config, arrays, source, names = open_clip.read(src, model_config)
    spec = None
    if config.model.text.get("pool_type") != "argmax":  # a SigLIP: open_clip canonicalizes
      text = open_clip_siglip.TEXT_NORMALIZATION
  else:
    raise InteropError(f"Unknown format {fmt!r}; choose one of {FORMATS}.")
  tok = _tokenizer(tokenizer)
  is_bpe = isinstance(tok, clip_bpe.ClipBpeTokenizer)
  # CLIP-shaped models (text pooled at the largest id) read CLIP's BPE, SigLIP ones sentencepiece.
  clip_shaped = config is not None and config.model.text.get("pool_type") == "argmax"
  if tok is not None and clip_shaped != is_bpe:
    raise InteropError(
        f"{tokenizer}: CLIP models (open_clip's, Hugging Face's CLIPModel) take CLIP's BPE "
        f"vocabulary (bpe_simple_vocab_16e6.txt.gz or merges.txt), SigLIP models a "
        f"sentencepiece .model; this is the other kind.")
  model_vocab = spec.vocab_size if spec is not None else config.model.text["vocab_size"]
  if tok is not None and tok.vocab_size != model_vocab:
    raise InteropError(f"{tokenizer}: the tokenizer has {tok.vocab_size} pieces but the "
                       f"model's vocabulary in {src} has {model_vocab}.")
  if tok is not None and not is_bpe:  # the model embeds the tokenizer's own pad / eos ids
    if spec is not None:
      spec = dataclasses.replace(spec, pad_id=tok.pad_id, eos_id=tok.eos_id)
    else:
      config.model.text["pad_id"], config.model.text["eos_id"] = tok.pad_id, tok.eos_id
  config = config or siglip.run_config(spec)
  params = siglip.to_vljax(arrays, config, source, names)
  path = checkpoint.write_export(out, params, config.to_json(indent=2), tok)
  with open(os.path.join(path, SOURCE_FILE), "w") as f:
    json.dump({"format": fmt, "source": os.path.abspath(src),
             "model_config": os.path.abspath(model_config) if model_config else None,
               "tokenizer": os.path.abspath(tokenizer) if tokenizer else None,
               "text_normalization": text}, f, indent=1)
  return path


def _export_dir(directory: str) -> str:
  """An export directory itself, or the export of a workdir."""
  inner = os.path.join(directory, "export")
  return inner if os.path.isdir(os.path.join(inner, "params")) else directory


def export_checkpoint(fmt: str, workdir: str, out: str) -> str:
  """Writes the two-tower export of `workdir` (a workdir or an export directory) as `fmt`.

  hf: a Hugging Face SiglipModel directory `out` (config.json, model.safetensors and the
  tokenizer as spiece.model), a Siglip2Model for a NaFlex model (config.model.image.posemb_grid;
  the tokenizer as tokenizer.model), or a CLIPModel directory for a CLIP-shaped model
  (class-token pooling; a CLIP BPE tokenizer as merges.txt and vocab.json); big_vision: a .npz
  file `out` with big_vision's 'params/...' names (a NaFlex model in its naflex_vit.py layout);
  open_clip: an open_clip hub directory `out` (open_clip_config.json,
  open_clip_model.safetensors, and the tokenizer as tokenizer.model). hf and big_vision take
  SigLIP-shaped models (vljax.interop.siglip.spec_from_config says which option does not fit
  otherwise), open_clip CLIP-shaped ones (vljax.interop.open_clip.model_config). Returns what
  was written.
  """
  from vljax import checkpoint, configlib  # pylint: disable=g-import-not-at-top
  from vljax.data import clip_bpe  # pylint: disable=g-import-not-at-top
  from vljax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from vljax.interop import big_vision, hf, hf_clip, open_clip, siglip
  from vljax.models import stacks  # pylint: disable=g-import-not-at-top
  if fmt not in EXPORT_FORMATS:
    raise InteropError(f"Unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}.")
  directory = _export_dir(workdir)
  config = configlib.load_run_config(directory)
  tok = tokenizer_lib.load_from_dir(directory)
  bpe = tok if isinstance(tok, clip_bpe.ClipBpeTokenizer) else None
  # A sentencepiece model travels as is; open_clip tokenizes CLIP's BPE with its own copy.
  proto = tok.serialized_model if tok is not None and bpe is None else None
  # The model's shape is checked (siglip.spec_from_config, open_clip.model_config) before
  # anything is read or written.
  has_bias = config.model.get("bias_init") is not None
  # A CLIP-shaped model (class-token pooling) leaves as a Hugging Face CLIPModel.
  hf_clip_model = fmt == "hf" and config.model.image.get("pool_type") == "tok"
  if fmt == "open_clip" or hf_clip_model:
    clip_config = open_clip.model_config(config, has_bias, directory)
    if hf_clip_model and has_bias:
      raise InteropError(f"{directory}: the model has a logit bias (sigmoid loss); a Hugging "
                         f"Face CLIPModel has none (export it as open_clip).")
  else:
    spec = siglip.spec_from_config(config, directory)
  params = stacks.to_layout(checkpoint.load_exported_params(directory), "unrolled")
  arrays = siglip.from_vljax(params)
  if fmt == "open_clip":
    return open_clip.write(out, config, clip_config, arrays, proto)
  if hf_clip_model:
    return hf_clip.write(out, config, clip_config, arrays, bpe)
  if fmt == "big_vision":
    return big_vision.write(out, arrays, spec.naflex_grid)
  if not spec.has_bias:
    raise InteropError(f"{directory}: the model has no logit bias (config.model.bias_init is "
                       f"None); a Hugging Face SiglipModel always has one.")
  return hf.write(out, spec, arrays, proto)


class ImportedModel:
  """A two-tower export directory, ready to embed: no training config needed.

  Attributes:
    config: the run config of the export (config.json).
    params: its parameters.
    tokenizer: its tokenizer (None when the export has none).
    logit_scale: the multiplier of the logits, exp(t).
    logit_bias: the logit bias b (0.0 for a model without one).
  """

  def __init__(self, directory: str):
    import jax  # pylint: disable=g-import-not-at-top
    from vljax import checkpoint, configlib  # pylint: disable=g-import-not-at-top
    from vljax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    from vljax.interop import siglip  # pylint: disable=g-import-not-at-top
    from vljax.objectives import contrastive  # pylint: disable=g-import-not-at-top
    from vljax.models import two_towers  # pylint: disable=g-import-not-at-top
    self.config = configlib.load_run_config(directory)
    if self.config.objective != "two_towers":
      raise InteropError(f"{directory}: objective {self.config.objective!r}; "
                         f"vljax.interop.load needs a two-tower model.")
    self.tokenizer = tokenizer_lib.load_from_dir(directory)
    if self.tokenizer is not None:
      self.model = two_towers.TwoTowers(**contrastive.model_kwargs(self.config, self.tokenizer))
    else:
      self.model = siglip.model(self.config)
    self.params = checkpoint.load_exported_params(directory)
    source = os.path.join(directory, SOURCE_FILE)
    self.source = {}
    if os.path.isfile(source):
      with open(source) as f:
        self.source = json.load(f)
    apply = lambda p, *xs: self.model.apply({"params": p}, *xs)
    self._embed_images = jax.jit(lambda p, x: apply(p, x, None)[0])
    self._embed_texts = jax.jit(lambda p, t: apply(p, None, t)[1])
    scalars = apply(self.params, None, None)[2]
    self.logit_scale = float(scalars["scale"])
    self.logit_bias = float(scalars.get("bias", 0.0))

  def embed_images(self, images) -> np.ndarray:
    """L2-normalised embeddings [N, D] of float images [N, H, W, C], preprocessed as the source
    model expects (SigLIP: [-1, 1]); for a NaFlex model (SigLIP 2's Siglip2Model) also of a
    NaFlex batch of images of any sizes (vljax.models.naflex.pack)."""
    if isinstance(images, dict):
      return np.asarray(self._embed_images(self.params, {
          "patches": np.asarray(images["patches"], np.float32),
          "spatial_shapes": np.asarray(images["spatial_shapes"], np.int32),
          "mask": np.asarray(images["mask"], bool)}))
    return np.asarray(self._embed_images(self.params, np.asarray(images, np.float32)))

  def embed_texts(self, token_ids) -> np.ndarray:
    """L2-normalised embeddings [N, D] of int token ids [N, L] (L <= config.data.max_len)."""
    return np.asarray(self._embed_texts(self.params, np.asarray(token_ids, np.int32)))

  def logits(self, zimg, ztxt) -> np.ndarray:
    """[N_images, N_texts]: logit_scale * zimg @ ztxt.T + logit_bias."""
    return (self.logit_scale * np.asarray(zimg) @ np.asarray(ztxt).T
            + self.logit_bias).astype(np.float32)

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [N, config.data.max_len]: the ids as the source library's tokenizer gives them
    (SigLIP: text, EOS, then EOS as padding; from Hugging Face, after its SiglipTokenizer's
    clean-up: lowercase, no ASCII punctuation, collapsed whitespace; from open_clip's SigLIP,
    after its 'canonicalize' clean-up). SigLIP 2 (config.data.lowercase): lowercased, EOS,
    then Gemma's <pad> (0), as big_vision; not transformers' Siglip2Tokenizer's left padding
    (docs/interop.md)."""
    from vljax.interop import open_clip_siglip, siglip  # pylint: disable=g-import-not-at-top
    if self.tokenizer is None:
      raise InteropError("This export has no tokenizer.model; import it with --tokenizer.")
    normalize = {siglip.HF_TEXT: siglip.canonicalize_text,
                 open_clip_siglip.TEXT_NORMALIZATION: open_clip_siglip.canonicalize_text}.get(
                     self.source.get("text_normalization"), lambda t: t)
    lower = self.config.data.get("lowercase", False)  # SigLIP 2's imports
    texts = [normalize(t.lower() if lower else t) for t in texts]
    ids = self.tokenizer.encode(texts, self.config.data.max_len)
    pad_as = self.config.model.text.get("embed_pad_as")
    if pad_as is not None:
      ids = np.where(ids == self.tokenizer.pad_id, pad_as, ids).astype(np.int32)
    return ids


def load(directory: str) -> ImportedModel:
  """The two-tower model of an export directory (from `import_checkpoint` or a training run)."""
  return ImportedModel(directory)
