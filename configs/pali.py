"""PaLI (Chen et al., 2022; PaLI-3, 2023): ViT patch tokens + a text prompt into a T5-style model.

Every task is prefix -> target (config.tasks): "caption en" -> a caption, "answer en {question}"
-> the most frequent human answer. Multitask training mixes caption and VQA sources with
per-source weights in config.data.train. `arch=prefix_lm` swaps the encoder-decoder for one
PaliGemma/SimVLM-style stack (full attention over image + prefix, causal over the target).

Paper recipe (`scale=paper`, PaLI-3): a SigLIP-pretrained ViT-G/14 image encoder (`variant=G/14`;
the So400m/14 of PaliGemma is `variant=So400m/14`) and a 3B UL2 encoder-decoder, the T5 v1.1 XL
shape (vljax.models.encdec.SIZES['xl']), trained with Adafactor (no first moment). The stages:
  stage=1  224 px, the image encoder loaded from a SigLIP run (`init=DIR`, a vljax workdir or
           export of configs/siglip.py at the same variant) and frozen; its MAP head is not
           loaded (PaLI uses every patch token).
  stage=2  the resolution increase (812 px) with everything trainable, starting from a stage-1
           run (`init=DIR`); the ViT position embeddings are resampled on load.
Batch size, learning rate, schedule and step counts of the paper's runs are not all published;
the values below are vljax's choices, stated as such. Set config.tokenizer.path (a sentencepiece
model, e.g. mT5's 250k or a 32k English one) for real data.

Arguments (comma-separated k=v): scale=laptop|tiny|paper (default laptop: captioning + VQA on the
embedded synthetic data on a 2-core CPU in minutes), arch=encdec|prefix_lm, variant=G/14 (image
encoder for scale=paper), stage=1|2 (scale=paper), init=DIR (weights to start from: for stage 1 a
SigLIP run whose image encoder is loaded and frozen; for stage 2 a stage-1 run).
"""
from vljax import configlib
from vljax import model_sizes

# The embedded data: half captions, half questions about the same kind of images.
SYNTHETIC_TRAIN = "0.5*synthetic|0.5*synthetic?task=vqa"
# A SigLIP image tower -> PaLI's: the ViT without its MAP pooling head.
SIGLIP_IMAGE_ENCODER = [["^img/encoder/(?!MAPHead_0/)", "img/encoder/"]]


def get_config(arg=None):
  args = configlib.parse_arg(arg, scale="laptop", arch="encdec", variant="G/14", stage=1,
                             init="")
  c = configlib.base_train_config()
  c.objective = "pali"
  c.model.architecture = args.arch
  c.tasks = dict(caption="caption en", vqa="answer en {question}", prefix_len=32)
  c.loss.label_smoothing = 0.0
  c.eval.decode_len = -1  # tokens generated for captioning / VQA evaluation; -1 = data.max_len
  c.init.path = args.init
  # The embedded data until config.data.train / eval / eval_vqa name real sources (e.g.
  # "0.5*webdataset:/data/cc/{00000..01242}.tar|0.5*vqav2:QUESTIONS?annotations=A&images=DIR").
  c.data.train = SYNTHETIC_TRAIN
  c.data.eval = "synthetic"  # captioning: CIDEr against the held-out captions
  c.data.eval_vqa = "synthetic?task=vqa"

  if args.scale == "paper":
    if args.stage not in (1, 2):
      raise configlib.ConfigError(f"pali.py: stage={args.stage}; choose 1 or 2.")
    c.data.image_size = 224 if args.stage == 1 else 812
    c.data.max_len = 64
    c.tasks.prefix_len = 64
    c.model.image = dict(variant=args.variant, posemb="learn")
    c.model.text = dict(variant="xl")  # the prefix-LM takes the encoder + decoder depth
    c.batch_size = 8192 if args.stage == 1 else 512
    c.total_steps = 200_000 if args.stage == 1 else 20_000
    c.optim.name = "adafactor"
    c.optim.lr = 1e-3 if args.stage == 1 else 1e-4
    c.optim.wd = 1e-5
    c.optim.warmup_steps = 2_000 if args.stage == 1 else 500
    c.optim.schedule = "rsqrt"
    c.log_every_steps = 50
    if args.stage == 1:
      c.init.mapping = SIGLIP_IMAGE_ENCODER
      c.optim.freeze = ["^img/encoder/"]
    else:
      c.init.mapping = []  # the whole stage-1 model; position embeddings are resampled
  else:
    model_sizes.small_pali(c, args.scale, args.arch)
    if args.init:  # start from a SigLIP run of the same scale, its image encoder frozen
      c.init.mapping = SIGLIP_IMAGE_ENCODER
      c.optim.freeze = ["^img/encoder/"]
  return c
