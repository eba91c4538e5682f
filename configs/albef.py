"""ALBEF (Li et al., 2021): align before fuse, ITC with momentum distillation + ITM + MLM.

Paper recipe (`scale=paper`, the 4M-image pre-training): ViT-B/16 at 256 px (its [CLS] token
gives the image feature); a BERT-base-width text side (768 wide, 12 heads, MLP 3072) split into
6 text-encoder layers and 6 fusion layers (self-attention + cross-attention to the image);
ITC features of width 256 with a learnable temperature initialised to 0.07, momentum model
with EMA decay 0.995, feature queues of 65,536, distillation weight alpha 0.4, MLM masking
15% of the tokens; batch 512, 30 epochs (about 300k steps of the 5.1M pairs), AdamW at lr 1e-4
with 1k warmup steps and cosine decay, weight decay 0.02. The paper's 0.02 is PyTorch AdamW's
decay, multiplied by the learning rate; vljax's decay is not (docs/optim.md, configs/clip.py),
so the equivalent is wd = 0.02 * 1e-4 = 2e-6.

Differences from the paper in this slice (docs/fusion.md): pre-LN layers, a constant alpha (the
paper ramps it from 0 over the first epoch), hard-target MLM (no momentum distillation of MLM).
Gradient accumulation is not available (the objective keeps non-gradient state).

Arguments (comma-separated k=v): scale=laptop|tiny|paper (default laptop: trains on the
embedded synthetic data on a 2-core CPU in a few minutes), variant=B/16 (image encoder for
scale=paper).
"""
from vljax import configlib

# Small sizes for the embedded synthetic data, those of the small CoCa (vljax.model_sizes):
# 'tiny' compiles in seconds for tests; the queue holds two batches.
SMALL = {
    "laptop": dict(image_size=32, patch=8, width=128, depth=4, mlp_dim=512, heads=4,
                   text_depth=2, fusion_depth=2, max_len=24, embed_dim=128, batch_size=128,
                   queue_size=1024, total_steps=600, warmup_steps=60, lr=1e-3, log_every=50,
                   eval_every=300, ckpt_every=300),
    "tiny": dict(image_size=16, patch=8, width=32, depth=1, mlp_dim=64, heads=2, text_depth=1,
                 fusion_depth=1, max_len=8, embed_dim=32, batch_size=16, queue_size=32,
                 total_steps=4, warmup_steps=1, lr=1e-3, log_every=1, eval_every=-1,
                 ckpt_every=2),
}


def get_config(arg=None):
  args = configlib.parse_arg(arg, scale="laptop", variant="B/16")
  c = configlib.base_train_config()
  c.objective = "albef"
  c.loss.alpha = 0.4  # weight of the momentum soft targets (constant in this slice)
  c.loss.momentum = 0.995  # EMA decay of the momentum model
  c.loss.mlm_prob = 0.15
  c.model.temperature_init = 0.07

  if args.scale == "paper":
    c.data.image_size = 256
    c.data.max_len = 30  # ALBEF's max_words
    c.model.image = dict(variant=args.variant, posemb="learn")
    c.model.text = dict(width=768, mlp_dim=3072, num_heads=12, text_depth=6, fusion_depth=6)
    c.model.embed_dim = 256
    c.loss.queue_size = 65_536
    c.batch_size = 512
    c.total_steps = 300_000
    c.optim.lr = 1e-4
    c.optim.wd = 0.02 * 1e-4  # the paper's lr-coupled 0.02, converted (docstring)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.warmup_steps = 1000
    c.optim.schedule = "cosine"
    c.log_every_steps = 50
  else:
    if args.scale not in SMALL:
      raise configlib.ConfigError(f"scale={args.scale!r}; choose paper or one of "
                                  f"{', '.join(SMALL)}.")
    s = SMALL[args.scale]
    c.model.image = dict(width=s["width"], depth=s["depth"], mlp_dim=s["mlp_dim"],
                         num_heads=s["heads"], patch_size=(s["patch"], s["patch"]),
                         posemb="learn")
    c.model.text = dict(width=s["width"], mlp_dim=s["mlp_dim"], num_heads=s["heads"],
                        text_depth=s["text_depth"], fusion_depth=s["fusion_depth"])
    c.model.embed_dim = s["embed_dim"]
    c.loss.queue_size = s["queue_size"]
    c.data.image_size = s["image_size"]
    c.data.max_len = s["max_len"]
    c.batch_size = s["batch_size"]
    c.total_steps = s["total_steps"]
    c.optim.warmup_steps = s["warmup_steps"]
    c.optim.lr = s["lr"]
    c.log_every_steps = s["log_every"]
    c.eval.every_steps = s["eval_every"]
    c.eval.batch_size = 256
    c.checkpoint.every_steps = s["ckpt_every"]
  return c
