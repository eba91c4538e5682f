"""Writes the interop test fixtures: one small random SigLIP, as Hugging Face and big_vision see it.

Run with a side environment that has torch and transformers (never the core install):

    python3 -m venv /work/side_venv
    /work/side_venv/bin/pip install torch transformers safetensors numpy sentencepiece protobuf \
        open_clip_torch
    /work/side_venv/bin/python tools/make_interop_fixtures.py [--out tests/fixtures/interop]

Made with torch 2.14.1+cu130 (2.13.0+cpu wrote the same bytes), transformers 5.24.0,
open_clip_torch 3.3.0, safetensors 0.8.0, sentencepiece 0.2.3, numpy 2.4.6 (Python 3.11).
Rerunning it with those versions rewrites the same bytes.

What it writes under --out:
  hf_siglip/config.json,        a Hugging Face `SiglipModel` (save_pretrained), random weights
  hf_siglip/model.safetensors   from a fixed seed, every tensor (biases, LayerNorms, logit scale
                                and bias included) perturbed so that no mapping mistake hides
                                behind a zero or a one
  hf_siglip/spiece.model        a tiny sentencepiece model (SigLIP's ids: pad 0, eos 1, unk 2)
                                trained on the captions below; the big_vision checkpoint uses
                                it too
  big_vision_siglip.npz         the same weights under big_vision's names ('params/img/...',
                                'params/txt/...', 'params/t', 'params/b'), converted here from
                                the torch tensors with big_vision's layouts (flax kernels
                                [in, out], attention kernels [D, heads, head_dim], conv kernel
                                [h, w, in, out], posembs [1, n, D], t and b of shape [1])
  hf_siglip_fp16.bin            the same state dict in float16, written by torch.save (a
                                pytorch_model.bin), for the pickle-free torch reader
  torch_tensors.pt,             a torch.save'd dict of tensors of several dtypes, a strided
  torch_tensors.npz             view sharing its storage, a Parameter, a scalar; and the
                                values torch reads back from it
  open_clip/open_clip_config.json,      a small random open_clip CLIP ViT (exact GELU,
  open_clip/open_clip_model.safetensors  LayerNorm eps 1e-5, class token, ln_pre, causal text
                                tower pooled at the largest id) in the Hugging Face hub layout
  open_clip_reference.npz       its outputs: images, tokens, zimg, ztxt, logits, t, scale
  hf_clip/config.json,          a small random Hugging Face `CLIPModel` (quick GELU, EOS the
  hf_clip/model.safetensors     largest id) written by save_pretrained over the CLIP BPE
  hf_clip/merges.txt, vocab.json  vocabulary below (HF's tokenizer files for it); `--only
                                hf_clip` writes just this one and its reference
  hf_clip_reference.npz         its outputs: images, tokens, zimg, ztxt, logits, t, scale
  open_clip_siglip/...          a small random open_clip SigLIP (timm ViT with MAP pooling,
                                bidirectional text tower pooled at the last position, exact
                                GELU) over the hf_siglip vocabulary, in the hub layout
  open_clip_siglip_reference.npz  its outputs: images, tokens, zimg, ztxt, logits, t, scale, bias;
                                captions and caption_tokens: open_clip's SigLIP tokenization
                                (its canonicalize clean-up, then SiglipTokenizer) of them
  hf_siglip2/config.json,       a small random Hugging Face `Siglip2Model` (NaFlex: patches in,
  hf_siglip2/model.safetensors  a 4x4 position table resized to each image's grid) over the
                                hf_siglip vocabulary; `--only hf_siglip2` writes just this one
                                and its reference
  big_vision_siglip2.npz        the same weights as big_vision's NaFlex ViT names them: a Dense
                                patch kernel [p*p*3, D] and a position grid [4, 4, D]
  hf_siglip2_reference.npz      its outputs: a NaFlex batch (patches, spatial_shapes, mask) of
                                grids smaller, larger and of other aspect ratios than the table's,
                                and its zimg; square images (fixed_images, 32 and 48 px) and
                                their fixed_zimg[_48] through the same model; tokens, ztxt,
                                logits (NaFlex batch x tokens), t, scale, bias; image_sizes
                                (height, width, patch, max patches) and the target sizes
                                transformers' NaFlex processor resizes them to
  clip_bpe_merges.txt.gz        a CLIP BPE vocabulary (OpenAI's layout: a header line, then 300
                                merges learned here from a small corpus)
  clip_bpe_reference.npz        open_clip's SimpleTokenizer on tricky captions with it: captions,
                                ids (context 24), vocab_size, decoded (decode of encode)
  reference.npz                 the reference model's outputs on fixed inputs: images (NHWC, in
                                [-1, 1]), tokens (int32 [B, L], SigLIP style: EOS-padded), and
                                zimg, ztxt (L2-normalised embeddings), logits (logits_per_image),
                                t (the log-scale parameter), scale = exp(t), bias; captions and
                                hf_tokens: HF SiglipTokenizer's ids for tricky captions
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import sentencepiece as spm
import torch
import transformers

SEED = 0
IMAGE_SIZE, PATCH = 32, 8
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
MAX_LEN = 16

CORPUS = [
    "a photo of a cat", "a photo of a dog", "a red circle on a blue background",
    "two dogs playing in the snow", "a man riding a horse on the beach",
    "the quick brown fox jumps over the lazy dog", "an image of a small green square",
    "a picture of a yellow triangle", "people walking down a busy street at night",
    "a bowl of fruit on a wooden table", "a plane flying over the mountains",
    "Café au lait, naïve résumé", "numbers 0123456789 and symbols !?.,:;'\"-()",
] * 4
TRICKY_CAPTIONS = [
    "a photo of a cat", "  Leading and trailing spaces  ", "UPPER case Words",
    "punctuation, commas; and: colons!", "naïve café résumé", "",
    "a very long caption that goes on and on and will be truncated to the maximum length",
    "don't stop: e.g. x-ray", "tabs\tand\nnewlines", "\uff26\uff55\uff4c\uff4c width \ufb01ne",
    "emoji \U0001f642 and unknown \u00df",
]


def train_tokenizer(path: str) -> int:
  """Trains the tiny sentencepiece model; returns its number of pieces."""
  import io  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=160,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
      hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return spm.SentencePieceProcessor(model_file=path).get_piece_size()


def build_model(vocab_size: int) -> transformers.SiglipModel:
  torch.manual_seed(SEED)
  config = transformers.SiglipConfig(
      vision_config=dict(VISION, image_size=IMAGE_SIZE, patch_size=PATCH),
      text_config=dict(TEXT, vocab_size=vocab_size, max_position_embeddings=MAX_LEN,
                       projection_size=VISION["hidden_size"], pad_token_id=1, eos_token_id=1,
                       bos_token_id=None))
  model = transformers.SiglipModel(config).eval()
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  _perturb(model, SEED + 1)
  with torch.no_grad():
    model.logit_scale.fill_(float(np.log(10.0)) + 0.1)
    model.logit_bias.fill_(-2.5)
  return model


def _perturb(model: torch.nn.Module, seed: int) -> None:
  """Adds 0.05 N(0, 1) to every parameter (in name order), so that no mapping mistake hides
  behind a zero or a one."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in sorted(model.named_parameters()):
      p.add_(0.05 * torch.randn(p.shape, generator=generator))


def _attention(prefix: str, sd: dict, out: dict, dst: str, heads: int) -> None:
  """HF q/k/v/out projections -> flax MultiHeadDotProductAttention kernels and biases."""
  for hf, bv in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    w, b = sd[f"{prefix}.{hf}.weight"], sd[f"{prefix}.{hf}.bias"]
    d = w.shape[1]
    out[f"{dst}/{bv}/kernel"] = w.T.reshape(d, heads, -1)
    out[f"{dst}/{bv}/bias"] = b.reshape(heads, -1)
  w = sd[f"{prefix}.out_proj.weight"]
  out[f"{dst}/out/kernel"] = w.T.reshape(heads, -1, w.shape[0])
  out[f"{dst}/out/bias"] = sd[f"{prefix}.out_proj.bias"]


def _dense(sd: dict, src: str, out: dict, dst: str) -> None:
  out[f"{dst}/kernel"] = sd[f"{src}.weight"].T
  out[f"{dst}/bias"] = sd[f"{src}.bias"]


def _norm(sd: dict, src: str, out: dict, dst: str) -> None:
  out[f"{dst}/scale"] = sd[f"{src}.weight"]
  out[f"{dst}/bias"] = sd[f"{src}.bias"]


def _encoder(sd: dict, src: str, depth: int, heads: int, out: dict, dst: str) -> None:
  for i in range(depth):
    s, d = f"{src}.layers.{i}", f"{dst}/encoderblock_{i}"
    _norm(sd, f"{s}.layer_norm1", out, f"{d}/LayerNorm_0")
    _attention(f"{s}.self_attn", sd, out, f"{d}/MultiHeadDotProductAttention_0", heads)
    _norm(sd, f"{s}.layer_norm2", out, f"{d}/LayerNorm_1")
    _dense(sd, f"{s}.mlp.fc1", out, f"{d}/MlpBlock_0/Dense_0")
    _dense(sd, f"{s}.mlp.fc2", out, f"{d}/MlpBlock_0/Dense_1")


def to_big_vision(model: transformers.SiglipModel) -> dict[str, np.ndarray]:
  """The model's weights under big_vision's SigLIP names and layouts (a Siglip2Model's in those
  of big_vision's NaFlex ViT)."""
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  out: dict[str, np.ndarray] = {}
  v = "vision_model"
  patch = sd[f"{v}.embeddings.patch_embedding.weight"]
  table = sd[f"{v}.embeddings.position_embedding.weight"]
  if patch.ndim == 2:  # a Siglip2Model: naflex_vit.py's Dense kernel and position grid
    grid = int(round(table.shape[0] ** 0.5))
    out["img/embedding/kernel"] = patch.T
    out["img/pos_embedding"] = table.reshape(grid, grid, -1)
  else:
    out["img/embedding/kernel"] = patch.transpose(2, 3, 1, 0)
    out["img/pos_embedding"] = table[None]
  out["img/embedding/bias"] = sd[f"{v}.embeddings.patch_embedding.bias"]
  _encoder(sd, f"{v}.encoder", VISION["num_hidden_layers"], VISION["num_attention_heads"], out,
           "img/Transformer")
  _norm(sd, f"{v}.post_layernorm", out, "img/Transformer/encoder_norm")
  heads, h = VISION["num_attention_heads"], f"{v}.head"
  out["img/MAPHead_0/probe"] = sd[f"{h}.probe"]
  wq, wk, wv = np.split(sd[f"{h}.attention.in_proj_weight"], 3)
  bq, bk, bv = np.split(sd[f"{h}.attention.in_proj_bias"], 3)
  mha = {f"{h}.mha.q_proj.weight": wq, f"{h}.mha.q_proj.bias": bq,
         f"{h}.mha.k_proj.weight": wk, f"{h}.mha.k_proj.bias": bk,
         f"{h}.mha.v_proj.weight": wv, f"{h}.mha.v_proj.bias": bv,
         f"{h}.mha.out_proj.weight": sd[f"{h}.attention.out_proj.weight"],
         f"{h}.mha.out_proj.bias": sd[f"{h}.attention.out_proj.bias"]}
  _attention(f"{h}.mha", mha, out, "img/MAPHead_0/MultiHeadDotProductAttention_0", heads)
  _norm(sd, f"{h}.layernorm", out, "img/MAPHead_0/LayerNorm_0")
  _dense(sd, f"{h}.mlp.fc1", out, "img/MAPHead_0/MlpBlock_0/Dense_0")
  _dense(sd, f"{h}.mlp.fc2", out, "img/MAPHead_0/MlpBlock_0/Dense_1")

  t = "text_model"
  out["txt/Embed_0/embedding"] = sd[f"{t}.embeddings.token_embedding.weight"]
  out["txt/pos_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"][None]
  _encoder(sd, f"{t}.encoder", TEXT["num_hidden_layers"], TEXT["num_attention_heads"], out,
           "txt/Encoder_0")
  _norm(sd, f"{t}.final_layer_norm", out, "txt/Encoder_0/encoder_norm")
  _dense(sd, f"{t}.head", out, "txt/head")
  out["t"] = sd["logit_scale"].reshape(1)
  out["b"] = sd["logit_bias"].reshape(1)
  return {f"params/{k}": np.ascontiguousarray(x) for k, x in sorted(out.items())}


def reference_outputs(model: transformers.SiglipModel, vocab_size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(SEED)
  images = rng.uniform(-1, 1, (3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  tokens = np.ones((4, MAX_LEN), np.int32)  # SigLIP pads with EOS (id 1)
  for row, n in enumerate((3, 7, 15, MAX_LEN)):
    tokens[row, :n] = rng.integers(3, vocab_size, n)
  tokens[2, 15] = 1
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  t = model.logit_scale.detach().numpy().reshape(())
  return dict(images=images, tokens=tokens,
              zimg=out.image_embeds.numpy(), ztxt=out.text_embeds.numpy(),
              logits=out.logits_per_image.numpy(),
              t=t.astype(np.float32), scale=np.exp(t).astype(np.float32),
              bias=model.logit_bias.detach().numpy().reshape(()).astype(np.float32))


def tokenizer_reference(spiece: str) -> dict[str, np.ndarray]:
  tok = transformers.SiglipTokenizer(vocab_file=spiece)
  ids = tok(TRICKY_CAPTIONS, padding="max_length", truncation=True, max_length=MAX_LEN)
  return dict(captions=np.array(TRICKY_CAPTIONS), hf_tokens=np.array(ids["input_ids"], np.int32))


def torch_files(model: transformers.SiglipModel, out: str) -> None:
  """The torch.save fixtures: the model in float16, and a dict of assorted tensors."""
  state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
  torch.save(state, os.path.join(out, "hf_siglip_fp16.bin"))
  generator = torch.Generator().manual_seed(SEED + 2)
  shared = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {"f32": torch.randn(3, 4, generator=generator), "view": shared[1:, ::2],
             "shared": shared, "param": torch.nn.Parameter(torch.full((2,), 0.5)),
             "bf16": torch.randn(3, generator=generator).bfloat16(),
             "f16": torch.randn(2, generator=generator).half(), "i64": torch.arange(5),
             "scalar": torch.tensor(3.5),
             "nested": {"inner": torch.ones(2, 2, dtype=torch.float64)}}
  path = os.path.join(out, "torch_tensors.pt")
  torch.save(tensors, path)
  loaded = torch.load(path, weights_only=True)
  expected = {"nested.inner": loaded.pop("nested")["inner"]}
  expected.update(loaded)
  _save_npz(os.path.join(out, "torch_tensors.npz"),
            {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy()
             for k, v in expected.items()})


def _save_open_clip_hub(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict,
                        directory: str) -> None:
  """open_clip's Hugging Face hub layout: open_clip_model.safetensors, open_clip_config.json."""
  from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  st_torch.save_file(state, os.path.join(directory, "open_clip_model.safetensors"))
  with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
    f.write("\n")


def open_clip_files(out: str) -> None:
  """The open_clip CLIP fixture and its reference outputs."""
  import open_clip  # pylint: disable=g-import-not-at-top
  torch.manual_seed(SEED + 3)
  model_cfg = {"embed_dim": 24,
               "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": PATCH, "width": 32,
                              "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
               "text_cfg": {"context_length": MAX_LEN, "vocab_size": 101, "width": 32,
                            "heads": 2, "layers": 2, "mlp_ratio": 2.0}}
  model = open_clip.model.CLIP(**model_cfg).eval()
  _perturb(model, SEED + 4)
  with torch.no_grad():
    model.logit_scale.fill_(float(np.log(20.0)))
  _save_open_clip_hub(model, model_cfg, {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                          "std": list(open_clip.OPENAI_DATASET_STD)},
                      os.path.join(out, "open_clip"))
  rng = np.random.default_rng(SEED + 5)
  images = rng.uniform(-2, 2, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  tokens = np.zeros((3, MAX_LEN), np.int32)  # CLIP pads with 0; its EOT is the largest id
  for row, n in enumerate((4, 9, MAX_LEN)):
    tokens[row, :n] = rng.integers(1, 100, n)
  tokens[0, 4], tokens[1, 9] = 100, 100  # the last row has no EOT: the argmax still pools
  with torch.no_grad():
    zimg = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True)
    ztxt = model.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True)
    t = model.logit_scale.detach().numpy().reshape(()).astype(np.float32)
    logits = (model.logit_scale.exp() * zimg @ ztxt.T).numpy()
  _save_npz(os.path.join(out, "open_clip_reference.npz"),
            dict(images=images, tokens=tokens, zimg=zimg.numpy(), ztxt=ztxt.numpy(),
                 logits=logits, t=t, scale=np.exp(t).astype(np.float32)))


def hf_clip_files(out: str) -> None:
  """A small random Hugging Face CLIPModel (quick GELU, as OpenAI's) over the CLIP BPE
  vocabulary of clip_bpe_files (its merges.txt and vocab.json beside it), and its outputs."""
  from open_clip import tokenizer as oc_tok  # pylint: disable=g-import-not-at-top
  bpe = oc_tok.SimpleTokenizer(bpe_path=os.path.join(out, "clip_bpe_merges.txt.gz"))
  torch.manual_seed(SEED + 6)
  vocab = bpe.vocab_size
  config = transformers.CLIPConfig(
      vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         hidden_act="quick_gelu"),
      text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=MAX_LEN, hidden_act="quick_gelu",
                       pad_token_id=0, bos_token_id=vocab - 2, eos_token_id=vocab - 1),
      projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  _perturb(model, SEED + 7)
  with torch.no_grad():
    model.logit_scale.fill_(float(np.log(20.0)))
  directory = os.path.join(out, "hf_clip")
  model.save_pretrained(directory)
  # HF's CLIP tokenizer files: its names for the two special tokens, the same ids.
  pieces = {piece: i for piece, i in bpe.encoder.items()}
  pieces["<|startoftext|>"] = pieces.pop("<start_of_text>")
  pieces["<|endoftext|>"] = pieces.pop("<end_of_text>")
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(pieces, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    ranked = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in ranked) + "\n")
  rng = np.random.default_rng(SEED + 8)
  images = rng.uniform(-2, 2, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  tokens = np.zeros((3, MAX_LEN), np.int32)
  for row, n in enumerate((4, 9, MAX_LEN - 1)):
    tokens[row, :n] = rng.integers(1, vocab - 2, n)
    tokens[row, n] = vocab - 1  # EOS, the largest id: HF pools at it
  with torch.no_grad():
    out_ = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  t = model.logit_scale.detach().numpy().reshape(()).astype(np.float32)
  _save_npz(os.path.join(out, "hf_clip_reference.npz"),
            dict(images=images, tokens=tokens, zimg=out_.image_embeds.numpy(),
                 ztxt=out_.text_embeds.numpy(), logits=out_.logits_per_image.numpy(), t=t,
                 scale=np.exp(t).astype(np.float32)))


CLIP_BPE_CORPUS = CORPUS * 3 + [
    "a photograph of a photographer", "two cats and three dogs", "the cat's toy",
    "don't stop", "café au lait", "naïve résumé", "東京の猫", "3.5 inches", "rock & roll",
]
CLIP_BPE_CAPTIONS = [
    "A photo of a CAT", "  two   dogs\n\tplaying  ", "the cat's toy isn't here, they'll see",
    "rock &amp; roll &amp;amp; more", "\u2018curly quotes\u2019 and \u201cdouble\u201d",
    "caf\u00c3\u00a9 mojibake", "\uff21\uff22\uff23 fullwidth", "\ufb01ne ligature",
    "na\u00efve r\u00e9sum\u00e9", "\u6771\u4eac\u306e\u732b", "emoji \U0001f431\U0001f436",
    "3.5 inches, 42nd street", "x\u00b2 + \u2153", "!!!'s ??", "", "<end_of_text> inside",
    "a very long caption " + "that keeps going " * 12,
]


def _learn_bpe_merges(texts: list[str], count: int) -> list[tuple[str, str]]:
  """A plain BPE learner over open_clip's pre-tokenised, byte-encoded words (with '</w>')."""
  import collections  # pylint: disable=g-import-not-at-top
  from open_clip import tokenizer as oc_tok  # pylint: disable=g-import-not-at-top
  import regex  # pylint: disable=g-import-not-at-top
  pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                          regex.IGNORECASE)
  byte_encoder = oc_tok.bytes_to_unicode()
  words = collections.Counter()
  for text in texts:
    for word in regex.findall(pattern, oc_tok._clean_lower(text)):  # pylint: disable=protected-access
      chars = "".join(byte_encoder[b] for b in word.encode("utf-8"))
      words[tuple(chars[:-1]) + (chars[-1] + "</w>",)] += 1
  merges = []
  for _ in range(count):
    pairs = collections.Counter()
    for word, n in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = max(sorted(pairs), key=lambda p: pairs[p])
    merges.append(best)
    merged = collections.Counter()
    for word, n in words.items():
      out, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += n
    words = merged
  return merges


def clip_bpe_files(out: str) -> None:
  """A small CLIP BPE vocabulary (OpenAI's .txt.gz layout) and open_clip's ids for tricky
  captions with it."""
  import gzip  # pylint: disable=g-import-not-at-top
  from open_clip import tokenizer as oc_tok  # pylint: disable=g-import-not-at-top
  merges = _learn_bpe_merges(CLIP_BPE_CORPUS, 300)
  path = os.path.join(out, "clip_bpe_merges.txt.gz")
  with open(path, "wb") as raw:
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
      # No newline after the last merge: open_clip would read the empty last line as a merge
      # (an empty piece) in a file shorter than OpenAI's 48,894 merges.
      f.write(("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges)).encode("utf-8"))
  tok = oc_tok.SimpleTokenizer(bpe_path=path, context_length=24)
  _save_npz(os.path.join(out, "clip_bpe_reference.npz"),
            dict(captions=np.array(CLIP_BPE_CAPTIONS),
                 ids=tok(CLIP_BPE_CAPTIONS).numpy().astype(np.int32),
                 vocab_size=np.int32(tok.vocab_size),
                 decoded=np.array([tok.decode(tok.encode(c)) for c in CLIP_BPE_CAPTIONS])))


def open_clip_siglip_files(out: str, vocab_size: int) -> None:
  """A small random open_clip SigLIP (CustomTextCLIP: a timm ViT with MAP pooling, open_clip's
  bidirectional text tower pooled at the last position) in the hub layout, and its outputs.

  The model config names timm's `vit_base_patch16_siglip_224`, built here at a tiny size (the
  name's own head count, 12; width, depth, MLP, patch and image size passed to timm), which is
  what vljax reads: the sizes from the tensors, the heads from the name."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  tiny = dict(embed_dim=48, depth=2, num_heads=12, mlp_ratio=2.0, patch_size=PATCH,
              img_size=IMAGE_SIZE)
  model_cfg = {"embed_dim": 48, "init_logit_bias": -10, "custom_text": True,
               "vision_cfg": {"image_size": IMAGE_SIZE,
                              "timm_model_name": "vit_base_patch16_siglip_224",
                              "timm_model_pretrained": False, "timm_pool": "map",
                              "timm_proj": "none"},
               "text_cfg": {"context_length": MAX_LEN, "vocab_size": vocab_size, "width": 32,
                            "heads": 4, "layers": 2, "mlp_ratio": 2.0, "no_causal_mask": True,
                            "proj_bias": True, "pool_type": "last",
                            "norm_kwargs": {"eps": 1e-6}}}
  create = timm.create_model
  timm.create_model = lambda name, **kw: create(name, **dict(kw, **tiny))
  try:
    torch.manual_seed(SEED + 9)
    model = open_clip.model.CustomTextCLIP(
        embed_dim=48, vision_cfg=model_cfg["vision_cfg"], text_cfg=model_cfg["text_cfg"],
        init_logit_bias=-10).eval()
  finally:
    timm.create_model = create
  _perturb(model, SEED + 10)
  with torch.no_grad():
    model.logit_scale.fill_(float(np.log(10.0)))
    model.logit_bias.fill_(-3.0)
  _save_open_clip_hub(model, model_cfg, {"mean": [0.5] * 3, "std": [0.5] * 3},
                      os.path.join(out, "open_clip_siglip"))
  rng = np.random.default_rng(SEED + 11)
  images = rng.uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  tokens = np.ones((3, MAX_LEN), np.int32)  # SigLIP pads with EOS (id 1)
  for row, n in enumerate((3, 8, MAX_LEN)):
    tokens[row, :n] = rng.integers(3, vocab_size, n)
  with torch.no_grad():
    zimg = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True)
    ztxt = model.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True)
    logits = (model.logit_scale.exp() * zimg @ ztxt.T + model.logit_bias).numpy()
  t = model.logit_scale.detach().numpy().reshape(()).astype(np.float32)
  # open_clip's SigLIP tokenizer: its 'canonicalize' clean-up, then HF's SiglipTokenizer
  # (open_clip.tokenizer.HFTokenizer, whose hub files cannot be fetched here: the same steps).
  from open_clip import tokenizer as oc_tok  # pylint: disable=g-import-not-at-top
  hf_tok = transformers.SiglipTokenizer(vocab_file=os.path.join(out, "hf_siglip", "spiece.model"))
  captions = TRICKY_CAPTIONS + ["snake_case_words and html &amp; entities"]
  cleaned = [oc_tok._clean_canonicalize(c) for c in captions]  # pylint: disable=protected-access
  ids = hf_tok(cleaned, padding="max_length", truncation=True, max_length=MAX_LEN)["input_ids"]
  _save_npz(os.path.join(out, "open_clip_siglip_reference.npz"),
            dict(images=images, tokens=tokens, zimg=zimg.numpy(), ztxt=ztxt.numpy(),
                 logits=logits, t=t, scale=np.exp(t).astype(np.float32),
                 bias=model.logit_bias.detach().numpy().reshape(()).astype(np.float32),
                 captions=np.array(captions), caption_tokens=np.array(ids, np.int32)))


def hf_siglip2_files(out: str, vocab_size: int) -> None:
  """A small random Hugging Face Siglip2Model (NaFlex) and its outputs."""
  torch.manual_seed(SEED + 12)
  grid = IMAGE_SIZE // PATCH
  config = transformers.Siglip2Config(
      vision_config=dict(VISION, patch_size=PATCH, num_patches=grid * grid),
      text_config=dict(TEXT, vocab_size=vocab_size, max_position_embeddings=MAX_LEN,
                       projection_size=VISION["hidden_size"], pad_token_id=1, eos_token_id=1,
                       bos_token_id=None))
  model = transformers.Siglip2Model(config).eval()
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  _perturb(model, SEED + 13)
  with torch.no_grad():
    model.logit_scale.fill_(float(np.log(10.0)) - 0.2)
    model.logit_bias.fill_(-4.0)
  model.save_pretrained(os.path.join(out, "hf_siglip2"))
  _save_npz(os.path.join(out, "big_vision_siglip2.npz"), to_big_vision(model))
  rng = np.random.default_rng(SEED + 14)
  # Grids: the table's own, smaller, larger, and of other aspect ratios; 24 patches at most.
  shapes = np.array([[4, 4], [2, 6], [3, 5], [6, 4], [1, 1]], np.int32)
  max_patches = 24
  patches = np.zeros((len(shapes), max_patches, PATCH * PATCH * 3), np.float32)
  mask = np.zeros((len(shapes), max_patches), np.int32)
  for i, (rows, cols) in enumerate(shapes):
    patches[i, :rows * cols] = rng.uniform(-1, 1, (rows * cols, PATCH * PATCH * 3))
    mask[i, :rows * cols] = 1
  tokens = np.ones((3, MAX_LEN), np.int32)  # SigLIP pads with EOS (id 1)
  for row, n in enumerate((4, 9, MAX_LEN)):
    tokens[row, :n] = rng.integers(3, vocab_size, n)

  def naflex_zimg(pixel_patches, spatial_shapes, pixel_mask):
    return model.get_image_features(
        pixel_values=torch.from_numpy(pixel_patches),
        pixel_attention_mask=torch.from_numpy(pixel_mask),
        spatial_shapes=torch.from_numpy(spatial_shapes.astype(np.int64))).pooler_output

  def square_zimg(images):
    n, size = len(images), images.shape[1] // PATCH
    # Hugging Face's patch order: rows of patches, each patch's pixels (row, column, channel).
    flat = images.reshape(n, size, PATCH, size, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    flat = np.ascontiguousarray(flat.reshape(n, size * size, -1))
    z = naflex_zimg(flat, np.array([[size, size]] * n, np.int32),
                    np.ones((n, size * size), np.int32))
    return torch.nn.functional.normalize(z, dim=-1).numpy()

  images = rng.uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  images_48 = rng.uniform(-1, 1, (2, 48, 48, 3)).astype(np.float32)
  with torch.no_grad():
    out_all = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                    pixel_values=torch.from_numpy(patches),
                    pixel_attention_mask=torch.from_numpy(mask),
                    spatial_shapes=torch.from_numpy(shapes.astype(np.int64)))
    fixed, fixed_48 = square_zimg(images), square_zimg(images_48)
  t = model.logit_scale.detach().numpy().reshape(()).astype(np.float32)
  from transformers.models.siglip2 import image_processing_siglip2  # pylint: disable=g-import-not-at-top
  image_sizes = np.array([[480, 640, 16, 256], [640, 480, 16, 256], [100, 1000, 16, 256],
                          [224, 224, 16, 196], [37, 53, 8, 24], [5, 3000, 14, 1024],
                          [512, 512, 16, 1024], [1, 1, 16, 64]], np.int32)
  target_sizes = np.array([image_processing_siglip2.get_image_size_for_max_num_patches(
      int(h), int(w), int(p), int(n)) for h, w, p, n in image_sizes], np.int32)
  _save_npz(os.path.join(out, "hf_siglip2_reference.npz"),
            dict(patches=patches, spatial_shapes=shapes, mask=mask.astype(bool),
                 zimg=out_all.image_embeds.numpy(), tokens=tokens,
                 ztxt=out_all.text_embeds.numpy(), logits=out_all.logits_per_image.numpy(),
                 fixed_images=images, fixed_zimg=fixed, fixed_images_48=images_48,
                 fixed_zimg_48=fixed_48, image_sizes=image_sizes, target_sizes=target_sizes,
                 t=t, scale=np.exp(t).astype(np.float32),
                 bias=model.logit_bias.detach().numpy().reshape(()).astype(np.float32)))


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """np.savez with fixed zip timestamps, so a rerun writes the same bytes."""
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for name, value in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=(2020, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      with zf.open(info, "w") as f:
        np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), os.pardir,
                                                    "tests", "fixtures", "interop"))
  parser.add_argument("--only", choices=["hf_clip", "clip_bpe", "open_clip_siglip",
                                         "hf_siglip2"],
                      help="write only this fixture (the others stay as they are)")
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  if args.only in ("open_clip_siglip", "hf_siglip2"):
    vocab_size = spm.SentencePieceProcessor(
        model_file=os.path.join(out, "hf_siglip", "spiece.model")).get_piece_size()
    return {"open_clip_siglip": open_clip_siglip_files,
            "hf_siglip2": hf_siglip2_files}[args.only](out, vocab_size)
  if args.only:
    return {"hf_clip": hf_clip_files, "clip_bpe": clip_bpe_files}[args.only](out)
  hf_dir = os.path.join(out, "hf_siglip")
  os.makedirs(hf_dir, exist_ok=True)
  spiece = os.path.join(hf_dir, "spiece.model")
  vocab_size = train_tokenizer(spiece)
  model = build_model(vocab_size)
  model.save_pretrained(hf_dir)
  _save_npz(os.path.join(out, "big_vision_siglip.npz"), to_big_vision(model))
  torch_files(model, out)
  open_clip_files(out)
  clip_bpe_files(out)
  hf_clip_files(out)
  open_clip_siglip_files(out, vocab_size)
  hf_siglip2_files(out, vocab_size)
  _save_npz(os.path.join(out, "reference.npz"),
            {**reference_outputs(model, vocab_size), **tokenizer_reference(spiece)})
  with open(os.path.join(out, "versions.json"), "w") as f:
    import open_clip  # pylint: disable=g-import-not-at-top
    json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
               "open_clip_torch": open_clip.__version__,
               "numpy": np.__version__, "sentencepiece": spm.__version__}, f, indent=1)
    f.write("\n")
  for root, _, files in os.walk(out):
    for name in sorted(files):
      path = os.path.join(root, name)
      print(f"{os.path.getsize(path):>9,}  {os.path.relpath(path, out)}")


if __name__ == "__main__":
  main()
