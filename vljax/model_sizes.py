"""Size presets shared by the config files: 'paper' recipes and small laptop/test variants."""
from __future__ import annotations

from vljax import configlib

# Small two-tower sizes for the embedded synthetic data. 'laptop' is what the README command
# trains on a 2-core CPU in a few minutes; 'tiny' compiles in seconds for tests.
SMALL_TWO_TOWERS = {
    "laptop": dict(image_size=32, patch=8, width=128, depth=4, mlp_dim=512, heads=4,
                   max_len=24, embed_dim=128, batch_size=128, total_steps=900,
                   warmup_steps=100, lr=1e-3, log_every=50, eval_every=450, ckpt_every=450),
    "tiny": dict(image_size=16, patch=8, width=32, depth=1, mlp_dim=64, heads=2, max_len=8,
                 embed_dim=32, batch_size=16, total_steps=4, warmup_steps=1, lr=1e-3,
                 log_every=1, eval_every=-1, ckpt_every=2),
}


def _preset(presets: dict[str, dict], scale: str) -> dict:
  """presets[scale], or a ConfigError naming the scales there are."""
  if scale not in presets:
    raise configlib.ConfigError(f"scale={scale!r}; choose paper or one of "
                                f"{', '.join(presets)}.")
  return presets[scale]


def _small_run(config, s: dict) -> None:
  """The data sizes, embedding width and schedule that every small preset sets alike."""
  config.data.image_size = s["image_size"]
  config.data.max_len = s["max_len"]
  if "embed_dim" in s:  # the contrastive families' embedding width
    config.model.embed_dim = s["embed_dim"]
  config.batch_size = s["batch_size"]
  config.total_steps = s["total_steps"]
  config.optim.warmup_steps = s["warmup_steps"]
  config.optim.lr = s["lr"]
  config.log_every_steps = s["log_every"]
  config.eval.every_steps = s["eval_every"]
  config.eval.batch_size = 256
  config.checkpoint.every_steps = s["ckpt_every"]


def small_two_towers(config, scale: str, image_pool: str, text_pool: str,
                     causal: bool) -> None:
  """Fills `config` (a base_train_config) with one of the SMALL_TWO_TOWERS sizes."""
  s = _preset(SMALL_TWO_TOWERS, scale)
  tower = dict(width=s["width"], depth=s["depth"], mlp_dim=s["mlp_dim"], num_heads=s["heads"])
  config.model.image = dict(tower, patch_size=(s["patch"], s["patch"]), posemb="learn",
                            pool_type=image_pool)
  config.model.text = dict(tower, causal=causal, pool_type=text_pool)
  _small_run(config, s)


# Small CoCa sizes: the same ViT as the small two towers, a decoder of unimodal + multimodal
# layers, and a captioning pooler with fewer queries than the paper's 256 (a 32 px image at
# patch 8 has 16 tokens). max_len 24 fits the longest synthetic caption (16 tokens + EOS).
SMALL_COCA = {
    "laptop": dict(image_size=32, patch=8, width=128, depth=4, mlp_dim=512, heads=4,
                   unimodal=2, multimodal=2, queries=16, max_len=24, embed_dim=128,
                   batch_size=128, total_steps=600, warmup_steps=60, lr=1e-3, log_every=50,
                   eval_every=300, ckpt_every=300),
    "tiny": dict(image_size=16, patch=8, width=32, depth=1, mlp_dim=64, heads=2, unimodal=1,
                 multimodal=1, queries=4, max_len=8, embed_dim=32, batch_size=16,
                 total_steps=4, warmup_steps=1, lr=1e-3, log_every=1, eval_every=-1,
                 ckpt_every=2),
}


def small_coca(config, scale: str) -> None:
  """Fills `config` (a base_train_config) with one of the SMALL_COCA sizes."""
  s = _preset(SMALL_COCA, scale)
  config.model.image = dict(width=s["width"], depth=s["depth"], mlp_dim=s["mlp_dim"],
                            num_heads=s["heads"], patch_size=(s["patch"], s["patch"]),
                            posemb="learn")
  config.model.text = dict(width=s["width"], mlp_dim=s["mlp_dim"], num_heads=s["heads"],
                           unimodal_depth=s["unimodal"], multimodal_depth=s["multimodal"])
  config.model.num_decoder_queries = s["queries"]
  _small_run(config, s)


# Small PaLI sizes: the small ViT, a T5-style text model of width 128 (2 + 2 layers, or one
# 4-layer prefix-LM stack), 16-token prompts and 24-token targets ('tiny' for tests).
SMALL_PALI = {
    "laptop": dict(image_size=32, patch=8, vit_width=128, vit_depth=4, vit_mlp=512,
                   vit_heads=4, width=128, heads=4, head_dim=32, mlp_dim=256, enc_depth=2,
                   dec_depth=2, prefix_len=16, max_len=24, batch_size=128, total_steps=800,
                   warmup_steps=80, lr=1e-3, log_every=50, eval_every=400, ckpt_every=400),
    "tiny": dict(image_size=16, patch=8, vit_width=32, vit_depth=1, vit_mlp=64, vit_heads=2,
                 width=32, heads=2, head_dim=16, mlp_dim=64, enc_depth=1, dec_depth=1,
                 prefix_len=12, max_len=8, batch_size=16, total_steps=4, warmup_steps=1,
                 lr=1e-3, log_every=1, eval_every=-1, ckpt_every=2),
}


def small_pali(config, scale: str, architecture: str) -> None:
  """Fills `config` (a base_train_config with config.tasks) with one of the SMALL_PALI sizes."""
  s = _preset(SMALL_PALI, scale)
  config.model.image = dict(width=s["vit_width"], depth=s["vit_depth"], mlp_dim=s["vit_mlp"],
                            num_heads=s["vit_heads"], patch_size=(s["patch"], s["patch"]),
                            posemb="learn")
  text = dict(width=s["width"], num_heads=s["heads"], head_dim=s["head_dim"],
              mlp_dim=s["mlp_dim"])
  if architecture == "prefix_lm":
    text.update(depth=s["enc_depth"] + s["dec_depth"])
  else:
    text.update(encoder_depth=s["enc_depth"], decoder_depth=s["dec_depth"])
  config.model.text = text
  config.tasks.prefix_len = s["prefix_len"]
  _small_run(config, s)


# Small ALBEF sizes: the small CoCa's ViT and width, a text encoder and fusion layers of that
# width; the feature queues hold eight ('laptop') or two ('tiny') batches.
SMALL_ALBEF = {
    "laptop": dict(image_size=32, patch=8, width=128, depth=4, mlp_dim=512, heads=4,
                   text_depth=2, fusion_depth=2, max_len=24, embed_dim=128, batch_size=128,
                   queue_size=1024, total_steps=600, warmup_steps=60, lr=1e-3, log_every=50,
                   eval_every=300, ckpt_every=300),
    "tiny": dict(image_size=16, patch=8, width=32, depth=1, mlp_dim=64, heads=2, text_depth=1,
                 fusion_depth=1, max_len=8, embed_dim=32, batch_size=16, queue_size=32,
                 total_steps=4, warmup_steps=1, lr=1e-3, log_every=1, eval_every=-1,
                 ckpt_every=2),
}


def small_albef(config, scale: str) -> None:
  """Fills `config` (a base_train_config) with one of the SMALL_ALBEF sizes."""
  s = _preset(SMALL_ALBEF, scale)
  config.model.image = dict(width=s["width"], depth=s["depth"], mlp_dim=s["mlp_dim"],
                            num_heads=s["heads"], patch_size=(s["patch"], s["patch"]),
                            posemb="learn")
  config.model.text = dict(width=s["width"], mlp_dim=s["mlp_dim"], num_heads=s["heads"],
                           text_depth=s["text_depth"], fusion_depth=s["fusion_depth"])
  config.loss.queue_size = s["queue_size"]
  _small_run(config, s)


# Small BLIP sizes: the small ALBEF's ViT and width, and one stack of text layers (run as the
# unimodal encoder, the image-grounded encoder and the decoder) as deep as ALBEF's text and
# fusion layers together. alpha ramps over the first tenth of the steps (BLIP: 2 of 20 epochs).
SMALL_BLIP = {
    "laptop": dict(image_size=32, patch=8, width=128, depth=4, mlp_dim=512, heads=4,
                   text_depth=4, max_len=24, embed_dim=128, batch_size=128, queue_size=1024,
                   alpha_ramp_steps=60, total_steps=600, warmup_steps=60, lr=1e-3,
                   log_every=50, eval_every=300, ckpt_every=300),
    "tiny": dict(image_size=16, patch=8, width=32, depth=1, mlp_dim=64, heads=2, text_depth=1,
                 max_len=8, embed_dim=32, batch_size=16, queue_size=32, alpha_ramp_steps=2,
                 total_steps=4, warmup_steps=1, lr=1e-3, log_every=1, eval_every=-1,
                 ckpt_every=2),
}


def small_blip(config, scale: str) -> None:
  """Fills `config` (a base_train_config) with one of the SMALL_BLIP sizes."""
  s = _preset(SMALL_BLIP, scale)
  config.model.image = dict(width=s["width"], depth=s["depth"], mlp_dim=s["mlp_dim"],
                            num_heads=s["heads"], patch_size=(s["patch"], s["patch"]),
                            posemb="learn")
  config.model.text = dict(width=s["width"], mlp_dim=s["mlp_dim"], num_heads=s["heads"],
                           depth=s["text_depth"])
  config.loss.queue_size = s["queue_size"]
  config.loss.alpha_ramp_steps = s["alpha_ramp_steps"]
  _small_run(config, s)


def _finetune(presets: dict[str, dict]) -> dict[str, dict]:
  """Fine-tuning sizes on a pre-training preset table: its architecture and data sizes, and on
  the laptop a shorter schedule (300 steps) at a lower rate."""
  return {"laptop": dict(presets["laptop"], total_steps=300, warmup_steps=30, lr=3e-4,
                         eval_every=150, ckpt_every=300),
          "tiny": dict(presets["tiny"])}


# Small VLMo sizes: one Multiway stack of the small ViT's width and depth whose top block has the
# vision-language expert (VLMo-Base: 12 blocks, the top 2 with it).
SMALL_VLMO = {
    "laptop": dict(image_size=32, patch=8, width=128, depth=4, vl_depth=1, mlp_dim=512,
                   heads=4, max_len=24, embed_dim=128, batch_size=128, total_steps=600,
                   warmup_steps=60, lr=1e-3, log_every=50, eval_every=300, ckpt_every=300),
    "tiny": dict(image_size=16, patch=8, width=32, depth=2, vl_depth=1, mlp_dim=64, heads=2,
                 max_len=8, embed_dim=32, batch_size=16, total_steps=4, warmup_steps=1,
                 lr=1e-3, log_every=1, eval_every=-1, ckpt_every=2),
}


def small_vlmo(config, scale: str) -> None:
  """Fills `config` (a base_train_config) with one of the SMALL_VLMO sizes."""
  s = _preset(SMALL_VLMO, scale)
  config.model.transformer = dict(patch_size=s["patch"], width=s["width"], depth=s["depth"],
                                  vl_depth=s["vl_depth"], mlp_dim=s["mlp_dim"],
                                  num_heads=s["heads"])
  _small_run(config, s)


# Fine-tuning the small BLIP models on VQA (configs/blip_vqa.py): the pre-training run's
# architecture and data sizes, a shorter schedule at a lower rate, answers of up to 5 tokens
# (the synthetic answers take 1 or 2, and EOS). The synthetic annotators agree, so one answer
# slot keeps every answer.
SMALL_BLIP_VQA = {
    "laptop": dict(_finetune(SMALL_BLIP)["laptop"], answer_len=5, answers_per_question=1),
    "tiny": dict(SMALL_BLIP["tiny"], answer_len=4, answers_per_question=2),
}


def small_blip_vqa(config, scale: str) -> None:
  """The schedule and answer sizes of SMALL_BLIP_VQA[scale] on a config that already has the
  SMALL_BLIP architecture of `scale` (configs/blip.py's)."""
  s = _preset(SMALL_BLIP_VQA, scale)
  config.vqa.answer_len = s["answer_len"]
  config.vqa.answers_per_question = s["answers_per_question"]
  _small_run(config, s)


# Small VQ-KD sizes: the encoder is the small SigLIP's ViT (the teacher's size and token grid),
# one decoder layer of the same width, a codebook of 256 codes of width 32 (BEiT v2: 8192 x 32;
# a laptop batch has 128 x 16 = 2,048 patch vectors), usage EMA over about ten steps.
SMALL_VQKD = {
    "laptop": dict(image_size=32, patch=8, width=128, depth=4, mlp_dim=512, heads=4,
                   decoder_depth=1, num_codes=256, code_dim=32, max_len=24, batch_size=128,
                   total_steps=600, warmup_steps=60, lr=1e-3, log_every=50, eval_every=300,
                   ckpt_every=300),
    "tiny": dict(image_size=16, patch=8, width=32, depth=1, mlp_dim=64, heads=2,
                 decoder_depth=1, num_codes=16, code_dim=8, max_len=8, batch_size=16,
                 total_steps=4, warmup_steps=1, lr=1e-3, log_every=1, eval_every=-1,
                 ckpt_every=2),
}


def small_vqkd(config, scale: str) -> None:
  """Fills `config` (a base_train_config) with one of the SMALL_VQKD sizes."""
  s = _preset(SMALL_VQKD, scale)
  layer = dict(width=s["width"], mlp_dim=s["mlp_dim"], num_heads=s["heads"])
  config.model.encoder = dict(layer, depth=s["depth"], patch_size=(s["patch"], s["patch"]),
                              posemb="learn")
  config.model.decoder = dict(layer, depth=s["decoder_depth"])
  config.model.num_codes = s["num_codes"]
  config.model.code_dim = s["code_dim"]
  _small_run(config, s)


# Fine-tuning the small ALBEF, VLMo or BEiT-3 models on SNLI-VE / NLVR2 / VQA
# (configs/snli_ve.py, nlvr2.py, vqa.py; family=albef|vlmo|beit3). BEiT-3's small sizes are
# VLMo's (configs/beit3.py).
SMALL_FINETUNE = {"albef": _finetune(SMALL_ALBEF), "vlmo": _finetune(SMALL_VLMO),
                  "beit3": _finetune(SMALL_VLMO)}


def small_finetune(config, family: str, scale: str) -> None:
  """The schedule of SMALL_FINETUNE[family][scale] on a config that already has that family's
  small architecture of `scale` (configs/albef.py's, vlmo.py's or beit3.py's)."""
  _small_run(config, _preset(SMALL_FINETUNE[family], scale))
