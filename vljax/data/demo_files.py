"""Writes the embedded synthetic data out as files in the formats researchers bring.

  python -m vljax.data.demo_files OUT [--train N] [--val N] [--per_class N] [--image_size S]

gives, with JPEG images and English captions:
  OUT/train/{00000..0000K}.tar   webdataset shards (KEY.jpg + KEY.txt), 1,024 records each
  OUT/val.jsonl, OUT/val/*.jpg   a retrieval set: {"image": "val/000000.jpg", "caption": ...}
  OUT/classes/CLASS/*.jpg        an ImageFolder for zero-shot classification (red_circle, ...)

so the real-data path (tokenizer training, conversion, training, evaluation, prediction, LiT)
can be tried end to end on a machine with nothing downloaded. The images are the synthetic
generator's, drawn at --image_size and saved as JPEG (quality 90), so decoding, resizing and
the file readers all do real work.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from typing import Sequence

import numpy as np
from PIL import Image

from vljax.data import synthetic

RECORDS_PER_SHARD = 1024


def _jpeg(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write(out: str, num_train: int = 4096, num_val: int = 256, per_class: int = 10,
          image_size: int = 64, seed: int = 0) -> dict[str, str]:
  """Writes the three sets; returns their source specs."""
  os.makedirs(out, exist_ok=True)
  train = synthetic.SyntheticImageText("train", image_size, num_examples=num_train, seed=seed)
  heldout = synthetic.SyntheticImageText("heldout", image_size,
                                         num_examples=num_val + per_class * 200, seed=seed)
  os.makedirs(os.path.join(out, "train"), exist_ok=True)
  num_shards = max(1, -(-num_train // RECORDS_PER_SHARD))
  for shard in range(num_shards):
    with tarfile.open(os.path.join(out, "train", f"{shard:05d}.tar"), "w") as tar:
      for i in range(shard * RECORDS_PER_SHARD, min(num_train, (shard + 1) * RECORDS_PER_SHARD)):
        example = train[i]
        _add(tar, f"{i:06d}.jpg", _jpeg(example["image"]))
        _add(tar, f"{i:06d}.txt", example["caption"].encode("utf-8"))

  os.makedirs(os.path.join(out, "val"), exist_ok=True)
  with open(os.path.join(out, "val.jsonl"), "w") as f:
    for i in range(num_val):
      example = heldout[i]
      name = f"val/{i:06d}.jpg"
      with open(os.path.join(out, name), "wb") as g:
        g.write(_jpeg(example["image"]))
      f.write(json.dumps({"image": name, "caption": example["caption"]}) + "\n")

  # Zero-shot: the next held-out examples, per_class of each class.
  counts = {name: 0 for name in synthetic.CLASS_NAMES}
  i = num_val
  while min(counts.values()) < per_class and i < len(heldout):
    example = heldout[i]
    name = synthetic.CLASS_NAMES[int(example["label"])]
    if counts[name] < per_class:
      folder = os.path.join(out, "classes", name.replace(" ", "_"))
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as g:
        g.write(_jpeg(example["image"]))
      counts[name] += 1
    i += 1
  last = num_shards - 1
  return {"train": f"webdataset:{out}/train/{{00000..{last:05d}}}.tar",
          "retrieval": f"jsonl:{out}/val.jsonl", "zeroshot": f"imagefolder:{out}/classes"}


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m vljax.data.demo_files",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("out")
  parser.add_argument("--train", type=int, default=4096, help="training records")
  parser.add_argument("--val", type=int, default=256, help="retrieval records")
  parser.add_argument("--per_class", type=int, default=10, help="zero-shot images per class")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  specs = write(args.out, args.train, args.val, args.per_class, args.image_size, args.seed)
  for name, spec in specs.items():
    print(f"{name:9s} {spec}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
