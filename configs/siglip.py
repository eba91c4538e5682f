"""SigLIP (Zhai et al., 2023): dual encoder trained with the pairwise sigmoid loss.

Paper recipe (`scale=paper`): ViT-B/16 image tower with a MAP head at 224 px, a B-sized text
transformer over 64 tokens of a 32k sentencepiece vocabulary, global batch 32k, learnable
log-temperature initialised to log 10 and bias to -10, sigmoid loss chunked across devices.
Set config.tokenizer.path to the 32k sentencepiece model for real data. Optimizer: big_vision's
recipe, lr 1e-3 and weight decay 1e-4; big_vision's decay is already decoupled like vljax's
(not multiplied by the learning rate, see docs/optim.md), so both values are taken as they are.

Arguments (comma-separated k=v): scale=laptop|tiny|paper (default laptop: trains on the embedded
synthetic data on a 2-core CPU in minutes), variant=B/16 (image tower for scale=paper),
chunked=true|false (sigmoid ring vs all-gather).
"""
from vljax import configlib
from vljax import model_sizes


def get_config(arg=None):
  args = configlib.parse_arg(arg, scale="laptop", variant="B/16", chunked=True)
  c = configlib.base_train_config()
  c.objective = "two_towers"
  c.loss.kind = "sigmoid"
  c.loss.chunked = args.chunked
  c.model.temperature_init = 10.0
  c.model.bias_init = -10.0

  if args.scale == "paper":
    c.data.image_size = 224
    c.data.max_len = 64
    c.model.image = dict(variant=args.variant, posemb="learn", pool_type="map")
    c.model.text = dict(width=768, depth=12, mlp_dim=3072, num_heads=12, causal=False,
                        pool_type="last")
    c.model.embed_dim = 768
    c.batch_size = 32_768
    c.total_examples = 9_000_000_000
    c.optim.lr = 1e-3
    c.optim.wd = 1e-4
    c.optim.b2 = 0.95
    c.optim.warmup_examples = 20_000 * 32_768 // 4  # ~5k steps at 32k
    c.log_every_steps = 50
  else:  # the small sizes, for a laptop or for tests
    model_sizes.small_two_towers(c, args.scale, image_pool="map", text_pool="last",
                                 causal=False)
  return c
