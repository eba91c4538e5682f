"""SNLI-VE (Xie et al., 2019) fine-tuning of an ALBEF run: an image and a hypothesis -> 3 classes.

The encoders (img/, txt/, fusion/) start from the ALBEF workdir or export `init=DIR` (with its
tokenizer, DIR/tokenizer.model); a new head (cls_head/: Linear(W) -> ReLU -> Linear(3), ALBEF's)
on the fused [CLS] trains from scratch with cross-entropy. Labels: 0 entailment, 1 neutral,
2 contradiction. The architecture must be the one DIR was trained with: pass the same `scale`
(and `variant`) as that run (configs/albef.py). Reports eval/snli_ve_accuracy on
config.data.eval_classification against the majority class and a shuffled-image reading
(vljax.evals.classification).

Paper recipe (`scale=paper`, ALBEF's configs/VE.yaml): 384 px images (the 256 px position
embedding is resampled), batch 256 (32 x 8 GPUs), 5 epochs of SNLI-VE train, AdamW lr 2e-5 with
cosine decay to 1e-6 and no warm-up, weight decay 0.02 lr-coupled -> 0.02 * 2e-5 decoupled
(configs/albef.py explains the conversion). ALBEF also distils from a momentum model during
fine-tuning (alpha 0.4); this objective does not (docs/fusion.md). Data at scale=paper: the
official snli_ve_{train,dev}.jsonl and the Flickr30k images, paths relative to the working
directory (override config.data.train / eval_classification).

`scale=laptop` (default): the ALBEF laptop model on synthetic?task=snli_ve, 300 steps
(python -m vljax.main --config=configs/snli_ve.py:init=/tmp/albef_laptop --workdir=/tmp/ve).

`family=vlmo` fine-tunes a VLMo run (configs/vlmo.py, the image-text stage) instead: its
Multiway transformer (mw/) in fused mode and its pooler start from DIR, the same head reads the
pooled text [CLS] (vljax.models.fusion_heads.MultiwayClassifier). At scale=paper it keeps
VLMo's 224 px and takes the task's ALBEF schedule above (VLMo's own fine-tuning recipes are not
transcribed).

`family=beit3` fine-tunes a BEiT-3 run (configs/beit3.py) the same way: its Multiway
transformer is VLMo's (mw/), BEiT-3 pre-trains no pooler, so pooler/ starts fresh with cls_head/.

`layer_decay=R` (family=vlmo or beit3; default 1, none) scales the learning rate of Multiway
block k of L by R ** (L - k) and of the embeddings by R ** (L + 1), heads unscaled (BEiT's
layer-wise decay; vljax.optim.layer_decay_lr_mults).

Arguments (comma-separated k=v): init=DIR (required; or set config.init.path),
scale=laptop|tiny|paper, variant=B/16 (ALBEF), family=albef|vlmo|beit3, layer_decay=1.0.
"""
import os

import ml_collections

from vljax import configlib
from vljax import model_sizes
from vljax import optim

# task -> (paper train source, paper eval source, paper batch, epochs, warm-up epochs)
PAPER = {
    "snli_ve": ("snli_ve:snli_ve_train.jsonl?images=flickr30k-images",
                "snli_ve:snli_ve_dev.jsonl?images=flickr30k-images", 256, 5, 0),
    # NLVR2's train images sit in numbered subfolders (the records' "directory").
    "nlvr2": ("nlvr2:train.json?images=images/train", "nlvr2:dev.json?images=dev", 128, 10, 1),
}


# The pre-training run each family fine-tunes from: its config and the subtrees the classifier
# takes from it (everything else of that run, ITC/ITM/MLM/MIM heads, is left behind).
FAMILIES = {"albef": ("albef.py", "^(img|txt|fusion)/"), "vlmo": ("vlmo.py", "^(mw|pooler)/"),
            "beit3": ("beit3.py", "^(mw)/")}
# The families of one Multiway transformer (vljax.models.fusion_heads.MultiwayClassifier).
MULTIWAY = ("vlmo", "beit3")
# The config.data key of a task's held-out set, where it is not eval_classification (the
# evaluator that reads the key scores the task).
HELDOUT_KEYS = {"vqa": "eval_vqa"}


def finetune(task: str, arg=None, families: tuple[str, ...] = tuple(FAMILIES), **extra_args):
  """(config, its parsed arguments) of fine-tuning a run of one of `families` (the first is the
  default) on `task`: what configs/snli_ve.py, nlvr2.py and vqa.py share. `extra_args` are the
  caller's own config arguments with their defaults. At scale=paper only the tasks in PAPER get
  their data and recipe here; the caller sets the others'."""
  args = configlib.parse_arg(arg, init="", scale="laptop", variant="B/16", family=families[0],
                             layer_decay=1.0, **extra_args)
  if args.family not in families:
    raise configlib.ConfigError(f"configs/{task}.py: family={args.family!r}; choose one of "
                                f"{', '.join(families)}.")
  pretraining, encoders = FAMILIES[args.family]
  if not args.init:
    raise configlib.ConfigError(
        f"configs/{task}.py needs the {args.family.upper()} run to start from: "
        f"--config=configs/{task}.py:init=DIR, DIR a workdir or export (e.g. "
        f"/tmp/{args.family}_laptop after python -m vljax.main --config=configs/{pretraining} "
        f"--workdir=/tmp/{args.family}_laptop).")
  if args.family in MULTIWAY:
    c = configlib.sibling_config(__file__, pretraining).get_config(f"scale={args.scale}")
    # The pre-training's settings name its heads (decay and freezing rules): none of them is
    # here.
    c.optim.freeze = []
    c.optim.wd_mults = configlib.base_train_config().optim.wd_mults
  else:
    c = configlib.sibling_config(__file__, pretraining).get_config(
        f"scale={args.scale},variant={args.variant}")
  c.objective = "fusion_classifier"
  c.task = task
  c.loss = ml_collections.ConfigDict()  # the task's loss has no settings, nor pre-training's
  c.init.path = args.init
  if args.family in MULTIWAY:
    # The fused mode runs the VL experts in the top blocks: their V and L experts (used by the
    # image-only and text-only modes) are not part of the classifier. Mapping rules see the
    # model's layout: unrolled, the top blocks are block_{depth - vl_depth} ..; scanned
    # (config.layers.scan), they are the stack `vlblock`.
    t = c.model.transformer
    top = "|".join(str(i) for i in range(t.depth - t.vl_depth, t.depth))
    encoders = f"^(?!mw/(?:vlblock|block_(?:{top}))/(?:ln|ffn)_[vl]/){encoders[1:]}"
  c.init.mapping = [[encoders, r"\1/"]]  # cls_head/ trains from scratch
  if args.layer_decay != 1.0:
    if args.family not in MULTIWAY:
      raise configlib.ConfigError(f"configs/{task}.py: layer_decay={args.layer_decay} is for "
                                  f"family={' or '.join(MULTIWAY)} (one stack of blocks).")
    t = c.model.transformer
    c.optim.lr_mults = optim.layer_decay_lr_mults(
        float(args.layer_decay), t.depth, r"^mw/block_{}/",
        r"^mw/(patch|img_cls|img_pos|img_mask_token|embedding|txt_cls|txt_pos)") + list(
            c.optim.lr_mults)
  c.tokenizer.path = os.path.join(args.init, "tokenizer.model")  # the run's own tokenizer
  c.data.eval = ""  # no zero-shot / retrieval: the task's held-out set only
  if args.scale != "paper":
    c.data.train = c.data[HELDOUT_KEYS.get(task, "eval_classification")] = (
        f"synthetic?task={task}")
    model_sizes.small_finetune(c, args.family, args.scale)
  elif task in PAPER:
    train, heldout, batch, epochs, warmup = PAPER[task]
    c.data.train, c.data.eval_classification = train, heldout
    if args.family == "albef":  # the Multiway families keep 224 px (positions not resampled)
      c.data.image_size = 384
    c.data.augment.inception_crop = True  # ALBEF: random resized crop, scale (0.5, 1)
    c.data.augment.crop_scale = 0.5
    c.batch_size = batch
    c.total_steps = None
    c.total_epochs = epochs
    c.optim.lr = 2e-5
    c.optim.wd = 0.02 * 2e-5  # the lr-coupled 0.02, converted (configs/albef.py)
    c.optim.end_lr_frac = 1e-6 / 2e-5  # cosine to ALBEF's min_lr
    c.optim.warmup_steps = None if warmup else 0
    c.optim.warmup_epochs = warmup or None
    c.eval.every_steps = 2000
  return c, args


def finetune_config(task: str, arg=None):
  """The fine-tuning config of `task` ('snli_ve' or 'nlvr2'); configs/nlvr2.py shares it."""
  return finetune(task, arg)[0]


def get_config(arg=None):
  return finetune_config("snli_ve", arg)
