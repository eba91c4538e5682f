"""VQ-KD (BEiT v2, Peng et al., 2022): a visual tokenizer distilled from a vljax image tower.

A ViT encoder maps each patch to a unit vector, a quantiser snaps it to the nearest of K unit
codes (the visual token), and a decoder reconstructs the teacher's patch features from the
codes (cosine distance). The teacher is the image encoder of the SigLIP (or CLIP) run
`teacher=DIR` (a workdir or export), without its pooling head, loaded by config.init and
frozen (no gradient, no optimizer state). The codebook follows BEiT v2's norm-EMA and restarts
codes that fall out of use (vljax.objectives.vqkd). Logs rec_loss, teacher_cosine,
codebook_usage, codebook_perplexity and dead_codes, and on the held-out images of
config.data.eval the codebook usage and teacher cosine (vljax.evals.tokenizer). BEiT-3 reads the
run's encoder and codebook.

The teacher's architecture must be the run's: pass the same `scale` (and `variant`) as that run
(configs/siglip.py); the images go through the teacher's run's preprocessing (size, range).

Paper recipe (`scale=paper`, BEiT v2's vqkd_encoder_base_decoder_3x768x12_clip): ViT-B/16 at
224 px encoder, 3 decoder layers of ViT-B width, 8192 codes of width 32, EMA decay 0.99,
commitment weight 1; batch 512 (64 x 8 GPUs), 100 epochs of ImageNet-1k, AdamW (0.9, 0.99), lr
5e-5 x 512 / 128 = 2e-4 after a 10-epoch warm-up, cosine to 1e-5, weight decay 1e-4
lr-coupled -> 1e-4 x 2e-4 decoupled (docs/optim.md), random resized crops of scale (0.08, 1).
BEiT v2's teacher is OpenAI's CLIP ViT-B/16 (its projected patch tokens); here a vljax run's
image encoder (its last-layer patch tokens), variant=B/16.

`scale=laptop` (default): the small SigLIP's ViT as encoder and teacher size, on the embedded
data (python -m vljax.main --config=configs/vqkd.py:teacher=/tmp/siglip --workdir=/tmp/vqkd
after python -m vljax.main --config=configs/siglip.py --workdir=/tmp/siglip).

Arguments (comma-separated k=v): teacher=DIR (required), scale=laptop|tiny|paper,
variant=B/16 (the teacher's and the encoder's at scale=paper).
"""
import os

from vljax import configlib
from vljax import model_sizes

PAPER_TRAIN = "tfds:imagenet2012:train"
PAPER_EVAL = "tfds:imagenet2012:validation"
PAPER_IMAGES = 1_281_167
PAPER_BATCH = 512


def get_config(arg=None):
  args = configlib.parse_arg(arg, teacher="", scale="laptop", variant="B/16")
  if not args.teacher:
    raise configlib.ConfigError(
        "configs/vqkd.py needs the teacher's run: --config=configs/vqkd.py:teacher=DIR, DIR a "
        "SigLIP or CLIP workdir or export (e.g. /tmp/siglip after python -m vljax.main "
        "--config=configs/siglip.py --workdir=/tmp/siglip).")
  teacher = configlib.sibling_config(__file__, "siglip.py").get_config(
      f"scale={args.scale},variant={args.variant}")
  c = configlib.base_train_config()
  c.objective = "vqkd"
  c.data = teacher.data  # the teacher's image size and preprocessing
  c.model.teacher = {k: v for k, v in teacher.model.image.items() if k != "pool_type"}
  c.loss.codebook_decay = 0.99  # BEiT v2's EMA decay of the codes
  c.loss.usage_decay = 0.9  # EMA decay of each code's share of the vectors
  c.loss.dead_below = 0.03  # a code under 3% of the uniform share 1/K restarts
  c.loss.commitment = 1.0  # BEiT v2's beta
  c.init.path = args.teacher
  c.init.mapping = [["^img/encoder/(?!MAPHead_0/)(.*)", "teacher/\\1"]]
  c.optim.freeze = ["^teacher/"]
  c.tokenizer.path = os.path.join(args.teacher, "tokenizer.model")  # unused: no text
  if args.scale == "paper":
    steps_per_epoch = PAPER_IMAGES // PAPER_BATCH
    c.model.encoder = dict(variant=args.variant, posemb="learn")
    c.model.decoder = dict(width=768, depth=3, mlp_dim=3072, num_heads=12)
    c.model.num_codes = 8192
    c.model.code_dim = 32
    c.data.train = PAPER_TRAIN
    c.data.eval = PAPER_EVAL
    c.data.augment.inception_crop = True
    c.data.augment.crop_scale = 0.08
    c.batch_size = PAPER_BATCH
    c.total_steps = 100 * steps_per_epoch
    c.optim.lr = 2e-4
    c.optim.b1, c.optim.b2 = 0.9, 0.99
    c.optim.wd = 1e-4 * 2e-4  # the lr-coupled 1e-4, converted
    c.optim.warmup_steps = 10 * steps_per_epoch
    c.optim.end_lr_frac = 1e-5 / 2e-4
    c.log_every_steps = 100
    c.eval.every_steps = 10 * steps_per_epoch
  else:
    model_sizes.small_vqkd(c, args.scale)
    c.data.train = c.data.eval = "synthetic"
  return c
