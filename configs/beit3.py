"""BEiT-3 (Wang et al., 2023, "Image as a Foreign Language"): masked data modelling on images,
texts and image-text pairs with one Multiway transformer, predicting a VQ-KD tokenizer's codes.

One step (vljax.objectives.beit3) masks each batch of pairs three ways: image-only, block-wise
40% of the patches (predict their visual tokens); text-only, 15% of the tokens; fused, 50% of
the tokens and 40% of the patches (predict both). The visual tokens come from the VQ-KD run
`tokenizer=DIR` (a workdir or export of configs/vqkd.py): its encoder/, encode_task/ and
codebook are loaded under tokenizer/ by config.init and frozen (optim.freeze: no optimizer
state, no decay, no backward pass). The tokenizer's sizes (encoder, codebook) and pixel
normalisation are read from DIR/config.json; its image size and patch size must be this run's
(a mismatch is a ConfigError before compiling).

Paper recipe (`scale=paper`, BEiT-3 Base): 12 Multiway blocks of width 768, 12 heads, MLP 3072
(the released BEiT-3 Base's sizes), 224 px images at patch 16 (BEiT v2's tokenizer is ViT-B/16;
BEiT-3 giant uses patch 14), the top 3 blocks with the vision-language expert (paper, section
2.1: "the top three Multiway Transformer layers"). Masking (section 2.2): 15% of the tokens of
monomodal texts, 50% of the text tokens of image-text pairs, 40% of the image patches,
block-wise as in BEiT. Optimisation (section 3.1, stated for BEiT-3 giant; used here for
Base): 1M steps; a batch of 6144 samples = 2048 images + 2048 texts + 2048 image-text pairs,
here 2048 pairs seen in the three views; AdamW with b1 0.9, b2 0.98, eps 1e-6; cosine decay
from a peak lr of 1e-3 after 10k linear warm-up steps; weight decay 0.05 lr-coupled = 0.05 x
1e-3 decoupled (docs/optim.md). The tokenizer: configs/vqkd.py:scale=paper (BEiT v2's, 8192
codes). The paper does not give the pre-training text length; 64 here (an assumption).
Differences from the paper (docs/multiway.md): pairs only (the paper's monomodal images and
texts come from their own corpora), absolute position embeddings, no stochastic depth (paper:
0.1), BEiT's initialisation and the relative position bias not reproduced.

`scale=laptop` (default): VLMo's small Multiway stack (model_sizes.SMALL_VLMO) on the embedded
synthetic data, 600 steps on a 2-core CPU; it needs a laptop VQ-KD run:

  python -m vljax.main --config=configs/siglip.py --workdir=/tmp/siglip
  python -m vljax.main --config=configs/vqkd.py:teacher=/tmp/siglip --workdir=/tmp/vqkd
  python -m vljax.main --config=configs/beit3.py:tokenizer=/tmp/vqkd --workdir=/tmp/beit3

The run logs its masked-prediction losses and accuracies on the training batches
(image_mim_accuracy, text_mlm_accuracy, pair_mlm_accuracy, pair_mim_accuracy) and, every
config.eval.every_steps, the same accuracies on every pair of the held-out retrieval set under
fixed masks (eval/*_accuracy, eval/masked_modelling_pairs; vljax.evals.masked_modeling).

Without tokenizer=DIR the masked patches predict their normalised pixels instead (the
fallback the objective warns about; VLMo's image-stage targets), and the held-out evaluation
reports the text accuracies only.

Arguments (comma-separated k=v): tokenizer=DIR (a VQ-KD run; without it, pixel targets),
scale=laptop|tiny|paper.
"""
from vljax import configlib
from vljax import model_sizes

# A VQ-KD run's tokenizer parameters, under tokenizer/ here (its decoder and teacher are not
# loaded: BEiT-3 only tokenizes).
TOKENIZER_MAPPING = [["^(encoder/|encode_task/|codebook$)", "tokenizer/\\1"]]
PAPER_BATCH = 2048  # pairs: 6144 samples in three views


def tokenizer_from_run(directory: str) -> tuple[dict, dict]:
  """(config.model.tokenizer, the run's image preprocessing) from a VQ-KD run's config.json."""
  run = configlib.read_run_config(directory)
  if run.get("objective") != "vqkd":
    raise configlib.ConfigError(
        f"beit3.py: tokenizer={directory} is a {run.get('objective')!r} run, not a VQ-KD one; "
        f"pass a configs/vqkd.py workdir or export.")
  model, data = run["model"], run["data"]
  tokenizer = dict(encoder=model["encoder"], num_codes=model["num_codes"],
                   code_dim=model["code_dim"], image_size=data["image_size"])
  # The codes mean something only on images normalised as the tokenizer saw them in training;
  # the model reads the same normalised images.
  preprocessing = {k: data[k] for k in ("resize", "mean", "std")}
  return tokenizer, preprocessing


def get_config(arg=None):
  args = configlib.parse_arg(arg, tokenizer="", scale="laptop")
  c = configlib.base_train_config()
  c.objective = "beit3"
  if args.tokenizer:
    tokenizer, preprocessing = tokenizer_from_run(args.tokenizer)
    c.model.tokenizer = tokenizer
    c.data.update(preprocessing)
  c.loss.text_mlm_prob = 0.15  # monomodal texts
  c.loss.pair_mlm_prob = 0.5  # the texts of image-text pairs
  c.loss.mim_ratio = 0.4  # block-wise, both image views
  for term in ("image_mim", "text_mlm", "pair_mlm", "pair_mim"):
    c.loss[f"{term}_weight"] = 1.0

  if args.scale == "paper":
    c.data.image_size = 224
    c.data.max_len = 64
    c.model.transformer = dict(patch_size=16, width=768, depth=12, vl_depth=3, mlp_dim=3072,
                               num_heads=12)
    c.batch_size = PAPER_BATCH
    c.total_steps = 1_000_000
    c.optim.lr = 1e-3
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.wd = 0.05 * 1e-3  # the lr-coupled 0.05, converted
    c.optim.warmup_steps = 10_000
    c.optim.schedule = "cosine"
    c.log_every_steps = 100
    c.eval.every_steps = 10_000
  else:
    model_sizes.small_vlmo(c, args.scale)
    del c.model["embed_dim"]  # VLMo's ITC width: BEiT-3 has no contrastive head
  if args.tokenizer:
    c.init.path = args.tokenizer
    c.init.mapping = TOKENIZER_MAPPING
    c.optim.freeze = ["^tokenizer/"]
  return c
