"""Input-pipeline throughput for the webdataset and ArrayRecord sources.

Writes tar shards of synthetic JPEGs (img2dataset layout) to a temporary
directory, converts them to ArrayRecord with vljax.data.convert, then times
`vljax.data.pipeline.make_train_iterator` (decode, resize, normalise,
tokenise, batch) for each source and worker count, and prints images/s in
total and per worker process. The last column compares with the train step
of the small default SigLIP (README.md: 0.20 s/step at batch 128, i.e. about
640 examples/s on the quiet 2-core reference machine; that model trains on
32 px images, hence the 32 px rows).

A second table sets the measured 224 px rate per process against what one accelerator consumes
at SigLIP B/16's paper recipe (224 px; analytic training FLOPs per example from vljax.flops,
dense bf16 peak, at --mfu of that peak): examples/s per chip and per host (4 chips on a TPU v4
host, 8 GPUs on an H100 host), and the decoding processes a host needs to keep up.

Usage: python benchmarks/input_pipeline.py [--num_images 512] [--workers 0,1,2]
                                            [--image_sizes 224,32] [--batches 30]
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from vljax import configlib
from vljax import flops
from vljax.data import convert
from vljax.data import pipeline
from vljax.data import sources
from vljax.data import tokenizer as tokenizer_lib

# README.md, "What the default run does, measured".
TRAIN_STEP_EXAMPLES_PER_S = 640.0
# (device kind as vljax.flops.PEAK_FLOPS knows it, accelerators per host)
ACCELERATORS = (('TPU v4', 4), ('NVIDIA H100 80GB HBM3', 8))


def write_shards(root: str, num_images: int, per_shard: int, width: int,
                 height: int) -> str:
  """img2dataset-style shards of smooth random JPEGs (quality 90)."""
  rng = np.random.default_rng(0)
  num_shards = (num_images + per_shard - 1) // per_shard
  for s in range(num_shards):
    with tarfile.open(os.path.join(root, f'{s:05d}.tar'), 'w') as tar:
      for j in range(min(per_shard, num_images - s * per_shard)):
        # Low-frequency content compresses like a photo, unlike white noise.
        small = rng.integers(0, 256, (height // 16, width // 16, 3), np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format='JPEG', quality=90)
        key = f'{s:05d}{j:04d}'
        for ext, data in (('jpg', buf.getvalue()),
                          ('txt', f'a photo of object number {j}'.encode())):
          info = tarfile.TarInfo(f'{key}.{ext}')
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return os.path.join(root, f'{{00000..{num_shards - 1:05d}}}.tar')


def measure(source, tok, image_size: int, workers: int, batch_size: int,
            batches: int) -> float:
  """Images/s of the whole pipeline after a warm-up batch."""
  it = pipeline.make_train_iterator(
      source, tok, batch_size=batch_size, image_size=image_size, max_len=16,
      seed=0, worker_count=workers)
  try:
    next(it)  # worker start-up and first fills are not throughput
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * batch_size / (time.perf_counter() - start)
  finally:
    if hasattr(it, 'close'):
      it.close()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--source_size', default='320x240', help='WxH of the stored JPEGs')
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--image_sizes', default='224,32')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--mfu', type=float, default=0.45,
                      help='assumed model FLOPs utilisation of the accelerators')
  args = parser.parse_args()
  width, height = (int(x) for x in args.source_size.split('x'))
  tok = tokenizer_lib.get_tokenizer(None)
  with tempfile.TemporaryDirectory() as root:
    os.makedirs(os.path.join(root, 'wds'))
    pattern = write_shards(os.path.join(root, 'wds'), args.num_images, 128, width, height)
    convert.convert(f'webdataset:{pattern}', os.path.join(root, 'ar', 'train'), num_shards=4)
    specs = {'webdataset': f'webdataset:{pattern}',
             'arrayrecord': f'arrayrecord:{root}/ar/train-*.arrayrecord'}
    print(f'{args.num_images} JPEGs of {width}x{height}, batch {args.batch_size}, '
          f'{os.cpu_count()} CPUs')
    print(f'| source | image px | worker processes | images/s | images/s per process '
          f'| vs train step ({TRAIN_STEP_EXAMPLES_PER_S:.0f} ex/s) |')
    print('|---|---|---|---|---|---|')
    per_process_224 = []
    for name, spec in specs.items():
      source = sources.get_source(spec, 'train', 224, 0)
      for size in (int(s) for s in args.image_sizes.split(',')):
        for workers in (int(w) for w in args.workers.split(',')):
          rate = measure(source, tok, size, workers, args.batch_size, args.batches)
          per = rate / max(workers, 1)
          label = f'{workers}' if workers else '0 (in-process, 2 threads)'
          print(f'| {name} | {size} | {label} | {rate:.0f} | {per:.0f} | '
                f'{rate / TRAIN_STEP_EXAMPLES_PER_S:.2f}x |', flush=True)
          if size == 224 and workers:
            per_process_224.append(per)
  if per_process_224:
    print_accelerator_demand(max(per_process_224), args.mfu)


def print_accelerator_demand(per_process: float, mfu: float) -> None:
  """What SigLIP B/16 at 224 px consumes per chip and host, against `per_process` images/s."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = configlib.load_config_file(os.path.join(root, 'configs', 'siglip.py:scale=paper'))
  config.dtype = 'bfloat16'
  per_example = flops.train_flops_per_example(config, 32_000)
  print(f'\nSigLIP B/16 at 224 px: {per_example / 1e9:.1f} GFLOP per training example; '
        f'decoding at {per_process:.0f} images/s per process (best 224 px row above); '
        f'accelerators at {mfu:.0%} MFU (bf16 peak)')
  print('| accelerator | examples/s per chip | chips per host | examples/s per host '
        '| decoding processes per host |')
  print('|---|---|---|---|---|')
  for kind, chips in ACCELERATORS:
    rate = flops.peak_flops(kind, 'bfloat16') * mfu / per_example
    host = rate * chips
    print(f'| {kind} | {rate:.0f} | {chips} | {host:.0f} | {host / per_process:.1f} |')


if __name__ == '__main__':
  main()
