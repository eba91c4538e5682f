"""CoCa (Yu et al., 2022): contrastive captioner, ITC + captioning from one forward pass.

Paper recipe (`scale=paper`, CoCa-Base): a ViT-B image encoder; the paper's CoCa-Base uses
patch 18 at 288 px (16x16 = 256 patch tokens), which is what `variant=B/18` at 288 px gives
here. Two attentional poolers: 1 query for the contrastive embedding, 256 for the decoder. Text
decoder of width 768 (12 heads, MLP 3072) with 12 unimodal and 12 multimodal layers. Captioning
and contrastive losses weighted 2:1 (softmax contrastive, learnable temperature), global batch
65,536, 64k sentencepiece vocabulary (set config.tokenizer.path), 64-token captions,
500k steps with 2% warmup. The paper trains with Adafactor (b1 0.9, b2 0.999, weight decay 0.01,
lr 8e-4); vljax uses AdamW with those betas and peak learning rate. The weight decay is a
conversion: the paper's lingvo/praxis implementation multiplies the 0.01 by the learning rate,
vljax's decay is not (docs/optim.md), so the equivalent is wd = 0.01 * 8e-4 = 8e-6 (a per-step
decay of 0.01 over 500k steps would erase the weights).

Arguments (comma-separated k=v): scale=laptop|tiny|paper (default laptop: trains on the
embedded synthetic data on a 2-core CPU in about five minutes), variant=B/18 (image encoder
for scale=paper), loss=softmax|sigmoid (contrastive term).
"""
from vljax import configlib
from vljax import model_sizes


def get_config(arg=None):
  args = configlib.parse_arg(arg, scale="laptop", variant="B/18", loss="softmax")
  c = configlib.base_train_config()
  c.objective = "coca"
  c.loss.kind = args.loss
  c.loss.chunked = True  # sigmoid only: ring vs all-gather
  c.loss.max_scale = 100.0
  c.loss.contrastive_weight = 1.0
  c.loss.captioning_weight = 2.0  # the paper's captioning:contrastive ratio of 2:1
  c.loss.label_smoothing = 0.0
  c.model.temperature_init = 1 / 0.07
  c.model.bias_init = -10.0 if args.loss == "sigmoid" else None
  c.model.num_decoder_queries = 256
  c.eval.decode_len = -1  # tokens generated for captioning evaluation; -1 = data.max_len

  if args.scale == "paper":
    c.data.image_size = 288
    c.data.max_len = 64
    c.model.image = dict(variant=args.variant, posemb="learn")
    c.model.text = dict(width=768, mlp_dim=3072, num_heads=12, unimodal_depth=12,
                        multimodal_depth=12)
    c.model.embed_dim = 768
    c.batch_size = 65_536
    c.total_steps = 500_000
    c.optim.lr = 8e-4
    c.optim.wd = 0.01 * 8e-4  # the paper's lr-coupled 0.01, converted (docstring)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.warmup_steps = 10_000
    c.optim.schedule = "linear"
    c.log_every_steps = 50
  else:  # the small sizes, for a laptop or for tests
    model_sizes.small_coca(c, args.scale)
  return c
