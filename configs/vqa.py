"""VQA as classification over an answer vocabulary: fine-tuning a VLMo (or BEiT-3) run.

The Multiway transformer (mw/) and, for VLMo, its pooler start from the run `init=DIR` (a
workdir or export, with its tokenizer DIR/tokenizer.model); the question and the image go
through the fused mode, the pooled text [CLS] through a new head (cls_head/: Linear(W -> 2W) ->
LayerNorm -> GELU -> Linear(2W -> K), VLMo's and BEiT-3's VQA head) trained from scratch with
binary cross-entropy against VQAv2's soft scores min(1, 0.3 * count), summed over the K answers
and averaged over the questions (objective 'vqa_classifier'). The K answers are the
`num_answers` most common normalised training answers, counted before anything compiles and
kept in WORKDIR/answer_vocabulary.json (vljax.data.answer_vocabulary). Reports
eval/vqa_accuracy (the official VQAv2 accuracy of the argmax answers, every held-out question
counted) on config.data.eval_vqa against always answering the most common training answer
(vljax.evals.vqa_classifier). The architecture must be the one DIR was trained with: pass the
same `scale` as that run. configs/snli_ve.py's `finetune` builds the shared part.

Paper recipe (`scale=paper`), VLMo's task_finetune_vqa_base_image480 (unilm/vlmo config.py,
vlmo_utils.set_schedule) and BEiT-3's get_started_for_vqav2 (base) agree on: batch 128, 10
epochs with one epoch (10%) of linear warm-up, AdamW lr 3e-5 with betas (0.9, 0.98) and eps
1e-8, weight decay 0.01 lr-coupled (-> 0.01 * 3e-5 decoupled, docs/optim.md), the VQA head at
20x the learning rate (lr_mults) and so 20x the decay (wd_mults: PyTorch couples decay and
rate), the pooler at the base rate, K = 3129. VLMo decays linearly to 0; BEiT-3 (family=beit3)
follows a cosine to 1e-6. Data: VQAv2 train2014, scored on the whole of val2014 (paths relative
to the working directory, configs/blip_vqa.py's). Not transcribed: 480 px (the Multiway image
position embedding is not resampled, so 224 px), stochastic depth (VLMo 0.15, BEiT-3 0.1; none
here), RandAugment, training on train + val less a 1000-image minival (VLMo and BEiT-3 follow
ViLT there), and their vocabulary rule (answers with >= 9 votes over train + val, which gives
3129; here the 3129 most voted over the training source).

`scale=laptop` (default): the small VLMo model on synthetic?task=vqa, 300 steps (the SNLI-VE /
NLVR2 schedule, with the head at 20x the rate as above), scored on the 512 held-out questions;
its vocabulary is counted on a 20,000-question sample of the synthetic training stream (2**20
records), which has all 22 answers:

  python -m vljax.main --config=configs/vlmo.py --workdir=/tmp/vlmo_laptop
  python -m vljax.main --config=configs/vqa.py:init=/tmp/vlmo_laptop --workdir=/tmp/vqa_vlmo

Arguments (comma-separated k=v): init=DIR (required; or set config.init.path),
family=vlmo|beit3, scale=laptop|tiny|paper, num_answers=3129 (K), layer_decay=1.0 (as in
configs/snli_ve.py).
"""
import ml_collections

from vljax import configlib

NUM_ANSWERS = 3129  # VLMo's and BEiT-3's VQAv2 vocabulary size
# The synthetic training stream has 2**20 records and 22 answers: a sample finds them all.
SMALL_VOCABULARY_QUESTIONS = 20_000
# VLMo / BEiT-3 (base): the head trains at 20x the rate.
HEAD_LR_MULT = 20.0
PAPER_BATCH, PAPER_EPOCHS, PAPER_LR = 128, 10, 3e-5


def get_config(arg=None):
  snli_ve = configlib.sibling_config(__file__, "snli_ve.py")
  c, args = snli_ve.finetune("vqa", arg, families=snli_ve.MULTIWAY, num_answers=NUM_ANSWERS)
  if args.num_answers < 1:
    raise configlib.ConfigError(f"configs/vqa.py: num_answers={args.num_answers}; the answer "
                                f"vocabulary keeps the K >= 1 most common training answers "
                                f"(VLMo and BEiT-3: {NUM_ANSWERS}).")
  c.objective = "vqa_classifier"
  c.vqa = ml_collections.ConfigDict(dict(
      num_answers=args.num_answers,
      # The vocabulary, class id = position: filled in by the trainer before anything compiles
      # (vljax.objectives.vqa_classifier.prepare_run); given here, it is used as it is.
      answers=[],
      # Training records read to count it (a seeded sample; 0 = every record).
      vocabulary_questions=0))
  if args.scale == "paper":
    blip_vqa = configlib.sibling_config(__file__, "blip_vqa.py")
    c.data.train, c.data.eval_vqa = blip_vqa.PAPER_TRAIN, blip_vqa.PAPER_EVAL
    c.batch_size = PAPER_BATCH
    c.total_steps = None
    c.total_epochs = PAPER_EPOCHS
    c.optim.warmup_steps = None
    c.optim.warmup_epochs = 1
    c.optim.lr = PAPER_LR
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-8
    c.optim.wd = 0.01 * PAPER_LR  # the lr-coupled 0.01, converted
    if args.family == "vlmo":  # polynomial decay of power 1 to end_lr 0
      c.optim.schedule, c.optim.end_lr_frac = "linear", 0.0
    else:  # BEiT-3: cosine to min_lr 1e-6
      c.optim.schedule, c.optim.end_lr_frac = "cosine", 1e-6 / PAPER_LR
    # PyTorch's decay is coupled to the rate, so the head's 20x rate decays it 20x as much.
    c.optim.wd_mults = [["^cls_head/.*kernel$", HEAD_LR_MULT]] + list(c.optim.wd_mults)
    c.eval.every_steps = 2000
  else:
    c.vqa.vocabulary_questions = SMALL_VOCABULARY_QUESTIONS
  # The fresh head learns at 20x the encoder's rate at every scale (on the laptop: 0.773
  # held-out accuracy after 300 steps, 0.609 without; docs/multiway.md). First match wins: the
  # rule goes before layer_decay's, which leaves heads at 1.
  c.optim.lr_mults = [["^cls_head/", HEAD_LR_MULT]] + list(c.optim.lr_mults)
  return c
