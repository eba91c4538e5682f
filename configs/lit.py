"""LiT (Zhai et al., 2022): a pretrained image tower, locked, and a text tower trained to match it.

The image tower (everything under 'img/': the ViT, its pooling head and projection) is loaded
from a vljax workdir or export (`init=DIR` or --config.init.path=DIR) and locked: it gets no
optimizer state, no weight decay and no backward pass. The text tower and the temperature (and
bias) train from scratch. The architecture must be the one DIR was trained with: pass the same
`scale` (and `variant`) as that run. The paper's best setting locks a pretrained image tower and
trains the text tower with the contrastive loss; `loss=sigmoid` (the default here) is the
SigLIP paper's LiT variant, `loss=softmax` the original.

Arguments (comma-separated k=v): init=DIR (required; or set config.init.path), scale=laptop|
tiny|paper, variant=B/16, loss=sigmoid|softmax.
"""
import importlib.util
import os

from vljax import configlib


def _base(name: str, arg: str):
  """get_config of the sibling config file `name` (siglip or clip)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"vljax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  args = configlib.parse_arg(arg, init="", scale="laptop", variant="B/16", loss="sigmoid")
  if args.loss not in ("sigmoid", "softmax"):
    raise configlib.ConfigError(f"lit.py: loss={args.loss!r}; choose sigmoid or softmax.")
  c = _base("siglip" if args.loss == "sigmoid" else "clip",
            f"scale={args.scale},variant={args.variant}")
  c.init.path = args.init
  c.init.mapping = [["^img/", "img/"]]
  c.optim.freeze = ["^img/"]
  return c
