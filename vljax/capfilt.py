"""CapFilt (BLIP's captioner + filter): bootstraps a noisy image-text source with a BLIP run.

  python -m vljax.capfilt --workdir=BLIP_RUN --source=SPEC --out=PREFIX \
      [--max_examples=N] [--threshold=0.5] [--top_p=0.9] [--num_shards=1] [--seed=0]

For every record of SPEC (any vljax source: jsonl:..., webdataset:..., synthetic, ...):

  captioner  the run's image-grounded decoder samples one synthetic caption (nucleus sampling,
             top_p 0.9 and temperature 1, as BLIP's captioner);
  filter     the run's ITM head scores the original caption(s) and the synthetic one against
             the image: p(match) = softmax(ITM logits)[match];
  keep       each pair whose p(match) > --threshold (BLIP's filter drops the texts its ITM
             head predicts as unmatched: 0.5).

The kept pairs are written as ArrayRecord shards PREFIX-0000i-of-0000N.arrayrecord (the image
bytes copied as they are, decoded images encoded as PNG), which `data.train` reads as
`arrayrecord:PREFIX-*.arrayrecord`; one record per kept pair. The counts (originals and
synthetic captions kept and dropped, bad records skipped) are printed and written to
PREFIX.capfilt.json. Images are preprocessed exactly as the run's evaluation does.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Sequence

import numpy as np

from vljax.data import convert
from vljax.data import formats
from vljax.data import pipeline
from vljax.data import preprocess
from vljax.data import sources


def _records(source: Any, indices: Sequence[int], opts: preprocess.ImageOptions,
             text_opts: preprocess.TextOptions) -> tuple[list[dict], list[np.ndarray], int]:
  """(usable records with their cleaned 'captions' list, their uint8 pixels, bad count)."""
  safe = formats.SafeSource(source)
  records, pixels, bad = [], [], 0
  for i in indices:
    record = safe[i]
    try:
      if "error" in record:
        raise preprocess.BadRecord(record["error"])
      captions = preprocess.captions_list(record.get("caption"), text_opts)
      pixels.append(pipeline.eval_pixels(record.get("image"), opts))
    except (preprocess.BadRecord, ValueError, OSError) as e:
      bad += 1
      logging.warning("CapFilt skipped record %s: %s", record.get("key", i), e)
      continue
    records.append(dict(record, captions=captions, key=str(record.get("key", i))))
  return records, pixels, bad


def capfilt(workdir: str, spec: str, out: str, *, max_examples: int = 0,
            threshold: float = 0.5, top_p: float = 0.9, num_shards: int = 1, seed: int = 0,
            batch_size: int = 256) -> dict[str, int]:
  """Runs CapFilt (module docstring); returns the counts."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from vljax import predict  # pylint: disable=g-import-not-at-top
  from vljax.evals import common  # pylint: disable=g-import-not-at-top

  predictor = predict.load(workdir)
  objective, params, config = predictor.objective, predictor.params, predictor.config
  if not (hasattr(objective, "step_fn") and hasattr(objective, "itm_match_probability")):
    raise ValueError(f"{workdir} is a {type(objective).__name__} run; CapFilt needs a "
                     "captioner and an ITM head (a BLIP run, configs/blip.py).")
  data = config.data
  opts = pipeline.eval_image_options(
      data.image_size, preprocess.image_options_from_config(data, data.image_size, train=False))
  text_opts = preprocess.text_options_from_config(data)
  source = sources.get_source(spec, "train", data.image_size, seed, data)
  n = len(source) if max_examples <= 0 else min(len(source), max_examples)
  options = predict.DecodeOptions(temperature=1.0, top_p=top_p, seed=seed)
  max_len = data.max_len

  embed_fn = jax.jit(objective.encode_image_tokens)
  match_fn = jax.jit(lambda p, tokens, image_tokens: objective.itm_match_probability(
      p, image_tokens, tokens))
  counts = dict(records=n, skipped=0, originals_kept=0, originals_dropped=0,
                synthetic_kept=0, synthetic_dropped=0, written=0)
  os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
  writers = [array_record_module.ArrayRecordWriter(
      f"{out}-{i:05d}-of-{num_shards:05d}.arrayrecord", "group_size:1")
             for i in range(num_shards)]
  try:
    for start in range(0, n, batch_size):
      records, pixels, bad = _records(source, range(start, min(n, start + batch_size)), opts,
                                      text_opts)
      counts["skipped"] += bad
      if not records:
        continue
      images = preprocess.normalize(np.stack(pixels), opts)
      synthetic = predictor.captions(images, dataclasses.replace(options, seed=seed + start))
      # Pairs: every original caption of each record, then its synthetic caption.
      owner, texts, is_synthetic = [], [], []
      for r, (record, caption) in enumerate(zip(records, synthetic)):
        for text in record["captions"]:
          owner.append(r), texts.append(text), is_synthetic.append(False)
        owner.append(r), texts.append(caption), is_synthetic.append(True)
      with jax.set_mesh(predictor.mesh), nn.logical_axis_rules(predictor.rules):
        image_tokens = np.asarray(common.embed_all(embed_fn, params, images, predictor.mesh,
                                                   batch_size))
        probs = np.asarray(common.embed_all(
            match_fn, params, (predictor.tokenizer.encode(texts, max_len),
                               image_tokens[np.asarray(owner)]), predictor.mesh, batch_size))
      for r, text, synth, p in zip(owner, texts, is_synthetic, probs):
        kind = "synthetic" if synth else "originals"
        if p > threshold:
          counts[f"{kind}_kept"] += 1
          record = records[r]
          writers[counts["written"] % num_shards].write(formats.serialize(convert.encodable(
              {"image": record["image"], "caption": text,
               "key": f"{record['key']}/{'synthetic' if synth else 'original'}"}, "PNG")))
          counts["written"] += 1
        else:
          counts[f"{kind}_dropped"] += 1
  finally:
    for writer in writers:
      writer.close()
  with open(f"{out}.capfilt.json", "w") as f:
    json.dump(dict(counts, workdir=workdir, source=spec, threshold=threshold, top_p=top_p,
                   seed=seed, shards=num_shards), f, indent=1)
  return counts


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a BLIP run (workdir or export)")
  parser.add_argument("--source", required=True, help="source spec, e.g. jsonl:/data/web.jsonl")
  parser.add_argument("--out", required=True, help="output prefix, e.g. /data/capfilt/train")
  parser.add_argument("--max_examples", type=int, default=0, help="0 = every record")
  parser.add_argument("--threshold", type=float, default=0.5)
  parser.add_argument("--top_p", type=float, default=0.9)
  parser.add_argument("--num_shards", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=256)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  counts = capfilt(args.workdir, args.source, args.out, max_examples=args.max_examples,
                   threshold=args.threshold, top_p=args.top_p, num_shards=args.num_shards,
                   seed=args.seed, batch_size=args.batch_size)
  print(f"CapFilt of {counts['records']} records ({counts['skipped']} bad, skipped): kept "
        f"{counts['originals_kept']} original and {counts['synthetic_kept']} synthetic "
        f"captions, dropped {counts['originals_dropped']} original and "
        f"{counts['synthetic_dropped']} synthetic; wrote {counts['written']} pairs to "
        f"{args.out}-*-of-{args.num_shards:05d}.arrayrecord (counts in "
        f"{args.out}.capfilt.json).")


if __name__ == "__main__":
  main(sys.argv[1:])
