"""LiT (Zhai et al., 2022): a pretrained image tower, locked, and a text tower trained to match it.

The image tower (everything under 'img/': the ViT, its pooling head and projection) is loaded
from a vljax workdir or export (`init=DIR` or --config.init.path=DIR) and locked: it gets no
optimizer state, no weight decay and no backward pass. The text tower and the temperature (and
bias) train from scratch. The architecture must be the one DIR was trained with: pass the same
`scale` (and `variant`) as that run. The paper's best setting locks a pretrained image tower and
trains the text tower with the contrastive loss; `loss=sigmoid` (the default here) is the
SigLIP paper's LiT variant, `loss=softmax` the original.

Arguments (comma-separated k=v): init=DIR (required; or set config.init.path), scale=laptop|
tiny|paper, variant=B/16, loss=sigmoid|softmax, imported=DIR.

imported=DIR starts from a checkpoint converted by `python -m vljax.interop import` (e.g. a
big_vision or Hugging Face SigLIP; docs/interop.md): the architecture (both towers, image
size, text length), the pixel range and the tokenizer are the import's, `scale` then only sets
the schedule and batch size, and init=DIR is implied.
"""
import os

from vljax import configlib


def _take_architecture(c, directory: str) -> None:
  """The model, image size, text length, pixel range, text casing (SigLIP 2 lowercases) and
  tokenizer of an imported export."""
  imported = configlib.read_run_config(directory)
  # The logit scale and bias train from scratch, initialised as the loss's recipe says.
  scalars = {k: c.model[k] for k in ("temperature_init", "bias_init")}
  c.model = dict(imported["model"], **scalars)
  for key in ("image_size", "max_len", "mean", "std"):
    c.data[key] = imported["data"][key]
  c.data.lowercase = imported["data"].get("lowercase", False)
  c.tokenizer.path = os.path.join(directory, "tokenizer.model")
  c.init.path = directory


def get_config(arg=None):
  args = configlib.parse_arg(arg, init="", scale="laptop", variant="B/16", loss="sigmoid",
                             imported="")
  if args.loss not in ("sigmoid", "softmax"):
    raise configlib.ConfigError(f"lit.py: loss={args.loss!r}; choose sigmoid or softmax.")
  base = "siglip.py" if args.loss == "sigmoid" else "clip.py"
  c = configlib.sibling_config(__file__, base).get_config(
      f"scale={args.scale},variant={args.variant}")
  c.init.path = args.init
  if args.imported:
    _take_architecture(c, args.imported)
  c.init.mapping = [["^img/", "img/"]]
  c.optim.freeze = ["^img/"]
  return c
