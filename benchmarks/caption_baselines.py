"""CIDEr-D / BLEU-4 of trivial captioners on the synthetic held-out set, to read CoCa's against.

Scores, with the same references as the captioning evaluation (one caption per held-out image):
  - one fixed caption for every image ("a red circle in the center" by default),
  - the most frequent held-out caption for every image,
  - an oracle that names the image's colour and shape only ("a red circle"): what a model that
    recognises the class but says nothing about size or position would score.

Usage: python benchmarks/caption_baselines.py [--examples 512] [--caption "a red circle ..."]
"""
from __future__ import annotations

import argparse
import collections

from vljax.data import synthetic
from vljax.evals import captioning


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--examples", type=int, default=512)
  parser.add_argument("--caption", default="a red circle in the center")
  args = parser.parse_args()
  source = synthetic.SyntheticImageText("heldout", image_size=32, num_examples=args.examples)
  specs = [source.describe(i) for i in range(args.examples)]
  references = [[s.caption] for s in specs]
  frequent, count = collections.Counter(s.caption for s in specs).most_common(1)[0]
  rows = [(f"constant caption {args.caption!r}", [args.caption] * len(specs)),
          (f"most frequent held-out caption {frequent!r} ({count}x)", [frequent] * len(specs)),
          ("oracle colour + shape, 'a {colour} {shape}'",
           [f"a {s.color} {s.shape}" for s in specs])]
  print(f"{'captioner':70s} {'CIDEr-D':>8s} {'BLEU-4':>8s}")
  for name, candidates in rows:
    scores = captioning.compute_scores(references, candidates)
    print(f"{name:70s} {scores['cider']:8.3f} {scores['bleu4']:8.3f}")


if __name__ == "__main__":
  main()
