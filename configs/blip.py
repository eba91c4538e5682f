"""BLIP (Li et al., 2022): bootstrapping language-image pre-training, ITC + ITM + LM on MED.

Paper recipe (`scale=paper`, the 14M-image pre-training with ViT-B): ViT-B/16 at 224 px (its
[CLS] token gives the image feature); MED, a BERT-base text side (12 layers, 768 wide, 12
heads, MLP 3072, dropout 0.1) run as the unimodal text encoder, the image-grounded text
encoder (cross-attention to the image in every layer, [ENC] first, ITM head) and the
image-grounded text decoder (causal, [DEC] first, LM head), the decoder sharing every weight
but its self-attention with the encoder; ITC features of width 256 with a learnable
temperature initialised to 0.07 (clamped to [0.001, 0.5]), a momentum model with EMA decay
0.995, feature queues of 57,600, distillation weight alpha 0.4 ramped from 0 over the first 2
epochs, one hard ITM negative per image and per text, LM with label smoothing 0.1; batch
2880, 20 epochs (about 97k steps of ~14M images at 4,861 steps an epoch), AdamW (0.9, 0.999)
at lr 3e-4 after a 3k-step warm-up, weight decay 0.05. The 0.05 is PyTorch AdamW's decay,
multiplied by the learning rate; vljax's decay is not (docs/optim.md, configs/albef.py), so the
equivalent is wd = 0.05 * 3e-4 = 1.5e-5. Captions are cut at 30 tokens (BLIP's max_length).
Retrieval re-ranks the ITC top 256 with the ITM head (BLIP's k_test for COCO).

Deliberate differences (docs/fusion.md, "BLIP"): pre-LN layers; the lr decays by a cosine to
BLIP's min_lr 1e-6 (BLIP's code decays it by 0.9 every epoch, the paper says 0.85); vljax's
defaults for gradient clipping (global norm 1; BLIP: none) and for which weights decay
(kernels; BLIP: all); the momentum model runs without dropout; no +1e-4 floor on the
hard-negative weights; greedy captions in evaluation (BLIP: 3 beams and a prompt). VQA fine-tunes a run with
configs/blip_vqa.py:init=WORKDIR. CapFilt (captioner/filter bootstrapping of a source) is the
command `python -m vljax.capfilt`.
Gradient accumulation is not available (the objective keeps non-gradient state).

Arguments (comma-separated k=v): scale=laptop|tiny|paper (default laptop: trains on the
embedded synthetic data on a 2-core CPU in about ten minutes), variant=B/16 (image encoder
for scale=paper).
"""
from vljax import configlib
from vljax import model_sizes

PAPER_IMAGES = 14_000_000  # BLIP's 14M pre-training set (images)
PAPER_BATCH = 2880
PAPER_EPOCHS = 20


def get_config(arg=None):
  args = configlib.parse_arg(arg, scale="laptop", variant="B/16")
  c = configlib.base_train_config()
  c.objective = "blip"
  c.loss.alpha = 0.4  # weight of the momentum soft targets, after the ramp
  c.loss.momentum = 0.995  # EMA decay of the momentum model
  c.loss.label_smoothing = 0.1  # of the LM loss
  c.model.temperature_init = 0.07

  if args.scale == "paper":
    steps_per_epoch = PAPER_IMAGES // PAPER_BATCH
    c.data.image_size = 224
    c.data.max_len = 30  # BLIP's max_length
    c.model.image = dict(variant=args.variant, posemb="learn")
    c.model.text = dict(width=768, mlp_dim=3072, num_heads=12, depth=12, dropout=0.1)
    c.model.embed_dim = 256
    c.loss.queue_size = 57_600
    c.loss.alpha_ramp_steps = 2 * steps_per_epoch  # BLIP ramps alpha over 2 epochs
    c.batch_size = PAPER_BATCH
    c.total_steps = PAPER_EPOCHS * steps_per_epoch
    c.optim.lr = 3e-4
    c.optim.wd = 0.05 * 3e-4  # the paper's lr-coupled 0.05, converted (docstring)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.warmup_steps = 3000
    c.optim.schedule = "cosine"
    c.optim.end_lr_frac = 1e-6 / 3e-4  # BLIP's min_lr
    c.log_every_steps = 50
    c.eval.itm_rerank_k = 256  # BLIP's k_test for COCO retrieval (128 for Flickr30k)
  else:
    model_sizes.small_blip(c, args.scale)
    c.eval.itm_rerank_k = 16  # of the 512 held-out captions / images
  return c
