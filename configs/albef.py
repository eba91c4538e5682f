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

alpha ramps linearly from 0 over the first epoch, as the paper's training script does
(`loss.alpha_ramp_steps`: one epoch of the 5.1M pairs at batch 512 is about 10k steps), and
weighs both the ITC and the MLM distillation. Differences from the paper (docs/fusion.md):
pre-LN layers, a learned [CLS] vector in place of a tokenizer id. Gradient accumulation is not
available (the objective keeps non-gradient state).

Arguments (comma-separated k=v): scale=laptop|tiny|paper (default laptop: trains on the
embedded synthetic data on a 2-core CPU in a few minutes), variant=B/16 (image encoder for
scale=paper).
"""
from vljax import configlib
from vljax import model_sizes

def get_config(arg=None):
  args = configlib.parse_arg(arg, scale="laptop", variant="B/16")
  c = configlib.base_train_config()
  c.objective = "albef"
  c.loss.alpha = 0.4  # weight of the momentum soft targets (ITC and MLM)
  c.loss.alpha_ramp_steps = 100  # alpha ramps from 0 over these steps (0 = constant)
  c.loss.mlm_distill = True  # MLM against (1 - alpha) one-hot + alpha momentum predictions
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
    c.loss.alpha_ramp_steps = 10_000  # one epoch: 5.1M pairs / 512
    c.batch_size = 512
    c.total_steps = 300_000
    c.optim.lr = 1e-4
    c.optim.wd = 0.02 * 1e-4  # the paper's lr-coupled 0.02, converted (docstring)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.warmup_steps = 1000
    c.optim.schedule = "cosine"
    c.log_every_steps = 50
    c.eval.itm_rerank_k = 256  # ALBEF's k_test for COCO (128 for Flickr30k)
  else:
    model_sizes.small_albef(c, args.scale)
    c.eval.itm_rerank_k = 16  # of the 512 held-out captions / images
  return c
