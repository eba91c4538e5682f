"""VQA fine-tuning of a BLIP run (Li et al., 2022): an answer decoder generates the answer.

The model (vljax.models.blip.BlipVqa, objective vljax.objectives.blip_vqa): the image-grounded
text encoder reads the question ([ENC] first, cross-attention to the image) and an answer
decoder ([DEC] first, causal, cross-attention to the question states) generates the answer.
Both text stacks start from the BLIP run `init=DIR` (a workdir or export, with its tokenizer,
DIR/tokenizer.model): the question encoder from its text layers, the answer decoder from the
same layers with the decoder's self-attention, and the LM head from its LM head. They then
train apart, as BLIP's BLIP_VQA. The architecture must be the one DIR was trained with: pass
the same `scale` (and `variant`) as that run (configs/blip.py). Every distinct human answer of a
question is a target, weighted by the fraction of the humans who gave it (BLIP's loss; up to
config.vqa.answers_per_question of them). Reports eval/vqa_accuracy (the official VQAv2
accuracy of greedy answers) on config.data.eval_vqa against the best constant answer.

Paper recipe (`scale=paper`, BLIP's configs/vqa.yaml): 480 px images (the 224 px position
embedding is resampled), answers of at most 9 tokens with EOS
(BLIP generates 10 positions, the first its [DEC]), batch 256 (16 x 16 GPUs), 10 epochs,
AdamW lr 2e-5 with cosine decay to 0 and no warm-up, weight decay 0.05 lr-coupled -> 0.05 *
2e-5 decoupled (configs/blip.py explains the conversion). Data at scale=paper: VQAv2 train
(BLIP adds VQAv2 val and Visual Genome QA to it) scored on VQAv2 val, paths relative to the
working directory (override config.data.train / eval_vqa). BLIP answers with 3 beams (or ranks
a list of 3,128 candidate answers, its default); here answers are greedy. Questions are cut
at the pre-training's 30 tokens (the text position embeddings' length; BLIP cuts them at 35);
docs/fusion.md lists the differences.

`scale=laptop` (default): the BLIP laptop model on synthetic?task=vqa, 300 steps
(python -m vljax.main --config=configs/blip_vqa.py:init=/tmp/blip_laptop --workdir=/tmp/vqa).

Arguments (comma-separated k=v): init=DIR (required; or set config.init.path),
scale=laptop|tiny|paper, variant=B/16.
"""
import os

import ml_collections

from vljax import configlib
from vljax import model_sizes
from vljax.models import vit

PAPER_TRAIN = ("vqav2:v2_OpenEnded_mscoco_train2014_questions.json"
               "?annotations=v2_mscoco_train2014_annotations.json&images=train2014")
PAPER_EVAL = ("vqav2:v2_OpenEnded_mscoco_val2014_questions.json"
              "?annotations=v2_mscoco_val2014_annotations.json&images=val2014")
PAPER_BATCH = 256
PAPER_EPOCHS = 10


def init_mapping(image_width: int, text_width: int) -> list[list[str]]:
  """config.init.mapping from a BLIP run's parameters to BlipVqa's: img/ and lm_head/ as they
  are; txt/ to the question encoder txt/ and (but its enc_attn) to the answer decoder dec/,
  whose dec_attn only the decoder has. The decoder's cross-attention keys/values read question
  states of the text's width, so they are loaded only when the image had that width too."""
  decoder = ["txt/\\1", "dec/\\1"]
  rules = [["^txt/(textblock_\\d+/enc_attn/.*)", "txt/\\1"],
           ["^txt/(textblock_\\d+/dec_attn/.*)", "dec/\\1"]]
  if image_width != text_width:
    rules.append(["^txt/(textblock_\\d+/cross_attn/(key|value)/.*)", "txt/\\1"])
  return rules + [["^txt/(.*)", decoder], ["^(img|lm_head)/", "\\1/"]]


def get_config(arg=None):
  args = configlib.parse_arg(arg, init="", scale="laptop", variant="B/16")
  if not args.init:
    raise configlib.ConfigError(
        "configs/blip_vqa.py needs the BLIP run to start from: "
        "--config=configs/blip_vqa.py:init=DIR, DIR a BLIP workdir or export (e.g. "
        "/tmp/blip_laptop after python -m vljax.main --config=configs/blip.py "
        "--workdir=/tmp/blip_laptop).")
  c = configlib.sibling_config(__file__, "blip.py").get_config(
      f"scale={args.scale},variant={args.variant}")
  c.objective = "blip_vqa"
  c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1))  # BLIP's decoder loss
  c.model = ml_collections.ConfigDict(dict(image=c.model.image, text=c.model.text))
  c.vqa = ml_collections.ConfigDict(dict(
      # Tokens of an answer slot, EOS included (longer answers are cut).
      answer_len=9,
      # Distinct answers per question the loss sees, most frequent first (10: all of VQAv2's).
      answers_per_question=10))
  image = dict(c.model.image)
  image_width = image.get("width") or vit.decode_variant(image["variant"])["width"]
  c.init.path = args.init
  c.init.mapping = init_mapping(image_width, c.model.text["width"])
  c.tokenizer.path = os.path.join(args.init, "tokenizer.model")  # the run's own tokenizer
  c.data.eval = ""  # no zero-shot / retrieval / captioning: the VQA set only
  c.eval.itm_rerank_k = 0
  if args.scale == "paper":
    c.data.train, c.data.eval_vqa = PAPER_TRAIN, PAPER_EVAL
    c.data.image_size = 480
    c.batch_size = PAPER_BATCH
    c.total_steps = None
    c.total_epochs = PAPER_EPOCHS
    c.optim.lr = 2e-5
    c.optim.wd = 0.05 * 2e-5  # the lr-coupled 0.05, converted (configs/blip.py)
    c.optim.end_lr_frac = 0.0  # BLIP's min_lr 0
    c.optim.warmup_steps = 0
    c.eval.every_steps = 2000
  else:
    c.data.train = c.data.eval_vqa = "synthetic?task=vqa"
    model_sizes.small_blip_vqa(c, args.scale)
  c.eval.decode_len = c.vqa.answer_len
  return c
