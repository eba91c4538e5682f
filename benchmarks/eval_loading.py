"""Eval-set loading speed: decoding threads, and memory of uint8 vs float32 storage.

Writes --num_images synthetic 500x375 JPEGs (an ImageNet-val-like size, quality 90) as a
webdataset shard, then loads the whole set with vljax.data.pipeline.load_eval_data at
--image_size, interleaving the thread counts over --rounds rounds, and prints the median
images/s per thread count with the speed-up over one thread. Also prints the bytes the set
takes in memory as uint8 (how vljax keeps it) against float32, and extrapolates both to
ImageNet-val (50,000 images).

Usage: python benchmarks/eval_loading.py [--num_images 1000] [--image_size 224]
                                         [--threads 1,2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from input_pipeline import write_shards  # noqa: E402  (the same synthetic JPEG shards)

from vljax.data import pipeline, sources  # noqa: E402
from vljax.data import tokenizer as tokenizer_lib  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=1000)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--threads", default="1,2")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  threads = [int(t) for t in args.threads.split(",")]
  tok = tokenizer_lib.get_tokenizer(None)
  print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
  with tempfile.TemporaryDirectory() as root:
    pattern = write_shards(root, args.num_images, args.num_images, 500, 375)
    source = sources.get_source(f"webdataset:{root}/{pattern.rpartition('/')[2]}", "heldout",
                                args.image_size, 0)
    times = {t: [] for t in threads}
    data = None
    for _ in range(args.rounds):
      for t in threads:  # interleaved, so machine noise hits every variant alike
        start = time.perf_counter()
        data = pipeline.load_eval_data(source, tok, image_size=args.image_size, max_len=16,
                                       normalize=False, num_threads=t)
        times[t].append(time.perf_counter() - start)
    n = len(data["image"])
    base = args.num_images / statistics.median(times[threads[0]])
    for t in threads:
      rate = args.num_images / statistics.median(times[t])
      print(f"{t} thread(s): {rate:7.1f} images/s (median of {args.rounds}), "
            f"x{rate / base:.2f} over {threads[0]}")
    uint8 = data["image"].nbytes
    print(f"{n} images at {args.image_size} px: uint8 {uint8 / 2**20:.1f} MiB, float32 "
          f"{4 * uint8 / 2**20:.1f} MiB; ImageNet-val (50,000): uint8 "
          f"{uint8 / n * 50_000 / 2**30:.1f} GiB, float32 {4 * uint8 / n * 50_000 / 2**30:.1f} GiB")
  print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
  main()
