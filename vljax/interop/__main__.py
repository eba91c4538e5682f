"""Checkpoints of other libraries in and out of vljax (docs/interop.md).

  python -m vljax.interop import --format=hf|big_vision|open_clip SRC --out DIR \
      [--tokenizer FILE] [--config OPEN_CLIP_MODEL_CONFIG]
  python -m vljax.interop export --format=hf|big_vision|open_clip WORKDIR --out DIR_OR_NPZ
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from vljax import interop


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m vljax.interop", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="another library's checkpoint -> a vljax export")
  imp.add_argument("--format", required=True, choices=interop.FORMATS,
                   help="hf: a Hugging Face SiglipModel, Siglip2Model (NaFlex) or CLIPModel "
                   "directory; big_vision: a SigLIP / SigLIP 2 .npz (NaFlex too); open_clip: a CLIP ViT or a SigLIP (hub directory, or weights "
                   "file)")
  imp.add_argument("src", help="the checkpoint (a directory for hf, a .npz for big_vision, a "
                   "directory or .safetensors/.bin/.pt for open_clip)")
  imp.add_argument("--out", required=True, help="the export directory to write")
  imp.add_argument("--tokenizer", default=None,
                   help="the checkpoint's tokenizer: SigLIP's sentencepiece .model (hf: "
                   "SRC/spiece.model if absent, SRC/tokenizer.model for a Siglip2Model), CLIP's BPE vocabulary (.txt.gz or merges.txt; "
                   "hf: SRC/merges.txt if absent)")
  imp.add_argument("--config", default=None,
                   help="open_clip: the model config JSON (default: open_clip_config.json "
                   "beside the weights)")
  exp = commands.add_parser("export", help="a vljax workdir or export -> another library")
  exp.add_argument("--format", required=True, choices=interop.EXPORT_FORMATS,
                   help="hf: a Hugging Face SiglipModel (SigLIP-shaped; Siglip2Model for a "
                   "NaFlex model) or CLIPModel (CLIP-shaped) directory; big_vision: a SigLIP "
                   ".npz; open_clip: a CLIP-shaped "
                   "model's hub directory")
  exp.add_argument("workdir", help="a vljax workdir (its export/) or export directory")
  exp.add_argument("--out", required=True,
                   help="the directory (hf, open_clip) or .npz (big_vision)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "import":
      path = interop.import_checkpoint(args.format, args.src, args.out, args.tokenizer,
                                       args.config)
    else:
      path = interop.export_checkpoint(args.format, args.workdir, args.out)
  except (interop.InteropError, FileNotFoundError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  if args.command == "import":
    print(f"Wrote the vljax export {path} (load it with vljax.interop.load, config.init.path, "
          f"or python -m vljax.predict --workdir={path}).")
  else:
    print(f"Wrote {path} ({args.format}).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
