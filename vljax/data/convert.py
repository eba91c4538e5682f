"""Converts any vljax source to ArrayRecord shards.

  python -m vljax.data.convert SRC DST [--num_shards=N] [--max_examples=N]

SRC is a source spec (webdataset:GLOB, jsonl:PATH, csv:PATH, tfds:NAME[:split],
synthetic, ...); DST is a path prefix: shards are written as
DST-00000-of-0000N.arrayrecord and read back with `arrayrecord:DST-*.arrayrecord`.

Encoded images are copied byte for byte (no re-encoding); decoded images
(synthetic, tfds) are encoded as PNG (or --image_format=JPEG). Records that
cannot be read at all (missing file, no image member, non-UTF-8 caption) are
left out and counted; records whose image bytes are corrupt are copied as
they are, and the training pipeline skips them as it would have.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from array_record.python import array_record_module

from vljax.data import formats
from vljax.data import sources


def encodable(record: dict[str, Any], image_format: str) -> dict[str, Any]:
  """The record with its image as encoded bytes and its caption(s) as str (for serialize)."""
  image = record['image']
  if image is None:
    raise ValueError('no image')
  if not isinstance(image, (bytes, bytearray)):
    record = dict(record, image=formats.encode_image(image, image_format))
  caption = record.get('caption')
  if isinstance(caption, bytes):
    record = dict(record, caption=caption.decode('utf-8'))
  elif caption is not None and not isinstance(caption, str):
    record = dict(record, caption=[str(c) for c in caption])
  return record


def convert(spec: str, dst: str, num_shards: int = 1,
            max_examples: int | None = None, image_format: str = 'PNG',
            split: str = 'train', image_size: int = 224) -> dict[str, int]:
  """Writes `spec`'s records to `num_shards` ArrayRecord files; returns counts."""
  source = sources.get_source(spec, split, image_size, 0)
  n = len(source) if max_examples is None else min(len(source), max_examples)
  num_shards = max(1, min(num_shards, n))
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  safe = formats.SafeSource(source)
  written = skipped = 0
  for shard in range(num_shards):
    path = f'{dst}-{shard:05d}-of-{num_shards:05d}.arrayrecord'
    # group_size:1 keeps every record individually addressable (random access).
    writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
    try:
      for i in range(shard * n // num_shards, (shard + 1) * n // num_shards):
        record = safe[i]
        try:
          if 'error' in record:
            raise ValueError(record['error'])
          writer.write(formats.serialize(encodable(record, image_format)))
          written += 1
        except (ValueError, TypeError, UnicodeDecodeError) as e:
          skipped += 1
          logging.warning('Left out %s: %s', record.get('key', i), e)
    finally:
      writer.close()
  return {'written': written, 'skipped': skipped, 'shards': num_shards}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('src', help='source spec, e.g. webdataset:/data/{00000..00099}.tar')
  parser.add_argument('dst', help='output prefix, e.g. /data/ar/train')
  parser.add_argument('--num_shards', type=int, default=1)
  parser.add_argument('--max_examples', type=int, default=None)
  parser.add_argument('--image_format', default='PNG', choices=['PNG', 'JPEG'])
  parser.add_argument('--split', default='train', help="'train' or 'heldout'")
  parser.add_argument('--image_size', type=int, default=224,
                      help='side of synthetic images')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  counts = convert(args.src, args.dst, args.num_shards, args.max_examples,
                   args.image_format, args.split, args.image_size)
  print(f"Wrote {counts['written']} records to {counts['shards']} shard(s) "
        f"{args.dst}-*-of-{counts['shards']:05d}.arrayrecord; left out "
        f"{counts['skipped']}.")


if __name__ == '__main__':
  main(sys.argv[1:])
