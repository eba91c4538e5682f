"""CLIP (Radford et al., 2021): dual encoder trained with the softmax contrastive loss.

Paper recipe (`scale=paper`): ViT-B/16 image tower with a class token at 224 px, a causal text
transformer (width 512, 12 layers, 8 heads) pooled at the end-of-text token, 64 tokens of a 32k
vocabulary, global batch 32k, learnable temperature initialised to 1/0.07 and capped at 100, no
bias; Adam with beta2=0.98, eps=1e-6, weight decay 0.2, 2k warmup steps, cosine decay, 32 epochs
of 400M pairs. The paper's 0.2 is PyTorch AdamW's decay, which is multiplied by the learning
rate (a per-step decay of lr_t * 0.2); vljax's decay is not (docs/optim.md), so the equivalent
is wd = 0.2 * 5e-4 = 1e-4.

Arguments (comma-separated k=v): scale=laptop|tiny|paper (default laptop), variant=B/16.
"""
from vljax import configlib
from vljax import model_sizes


def get_config(arg=None):
  args = configlib.parse_arg(arg, scale="laptop", variant="B/16")
  c = configlib.base_train_config()
  c.objective = "two_towers"
  c.loss.kind = "softmax"
  c.loss.max_scale = 100.0  # the paper clips the learned logit scale at 100
  c.model.temperature_init = 1 / 0.07
  c.model.bias_init = None

  if args.scale == "paper":
    c.data.image_size = 224
    c.data.max_len = 64
    c.model.image = dict(variant=args.variant, posemb="learn", pool_type="tok")
    c.model.text = dict(width=512, depth=12, mlp_dim=2048, num_heads=8, causal=True,
                        pool_type="eos")
    c.model.embed_dim = 512
    c.batch_size = 32_768
    c.total_examples = 32 * 400_000_000
    c.optim.lr = 5e-4
    c.optim.wd = 0.2 * 5e-4  # the paper's lr-coupled 0.2, converted (docstring)
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.warmup_steps = 2000
  else:  # the small sizes, for a laptop or for tests
    model_sizes.small_two_towers(c, args.scale, image_pool="tok", text_pool="eos",
                                 causal=True)
  return c
