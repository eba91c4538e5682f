"""CapFilt: every original and synthetic caption is scored by the ITM head and kept exactly
when p(match) > threshold; the kept pairs are shards that the training sources read."""
import json

import jax
import numpy as np
import pytest

from vljax import capfilt, checkpoint, predict, train
from vljax.data import pipeline, preprocess, sources, tokenizer as tokenizer_lib

from train_helpers import tiny_config

N = 6


@pytest.fixture(scope="module")
def blip_export(tmp_path_factory):
  """An export of a freshly initialised tiny BLIP (its ITM probabilities spread around 0.5)."""
  workdir = str(tmp_path_factory.mktemp("blip"))
  config = tiny_config("blip")
  tokenizer = tokenizer_lib.get_tokenizer(None)
  mesh = __import__("vljax.sharding", fromlist=["x"]).make_mesh(
      {"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  state = train.init_state(setup, config.seed)
  return checkpoint.export_params(workdir, state.params, config.to_json(), tokenizer)


def _read(prefix):
  source = sources.get_source(f"arrayrecord:{prefix}-*.arrayrecord", "train", 16, 0)
  return [source[i] for i in range(len(source))]


def _match_probabilities(export, records):
  """p(match) of each written pair, recomputed with the model outside the command."""
  predictor = predict.load(export)
  opts = pipeline.eval_image_options(16, preprocess.image_options_from_config(
      predictor.config.data, 16, train=False))
  images = preprocess.normalize(np.stack([pipeline.eval_pixels(r["image"], opts)
                                          for r in records]), opts)
  tokens = predictor.objective.encode_image_tokens(predictor.params, images)
  texts = predictor.tokenizer.encode([r["caption"] for r in records], 8)
  return np.asarray(predictor.objective.itm_match_probability(predictor.params, tokens, texts))


def test_kept_pairs_are_exactly_those_above_the_threshold(blip_export, tmp_path):
  # Threshold 0 keeps every pair: one original and one synthetic caption per record.
  everything = capfilt.capfilt(blip_export, "synthetic", str(tmp_path / "all"),
                               max_examples=N, threshold=0.0, batch_size=4)
  assert everything["records"] == N and everything["skipped"] == 0
  assert everything["written"] == 2 * N
  records = _read(str(tmp_path / "all"))
  assert len(records) == 2 * N
  originals = sources.get_source("synthetic", "train", 16, 0)
  kinds = []
  for record in records:
    key, kind = record["key"].rsplit("/", 1)
    kinds.append(kind)
    if kind == "original":
      index = int(key.rsplit("/", 1)[1])
      assert originals[index]["key"] == key and record["caption"] == originals[index]["caption"]
  assert kinds.count("original") == kinds.count("synthetic") == N
  # At the median probability, exactly the pairs above it are kept, over 2 shards.
  p = _match_probabilities(blip_export, records)
  threshold = float(np.median(p))
  counts = capfilt.capfilt(blip_export, "synthetic", str(tmp_path / "half"), max_examples=N,
                           threshold=threshold, num_shards=2, batch_size=4)
  kept = {(r["key"], r["caption"]) for r, q in zip(records, p) if q > threshold}
  written = _read(str(tmp_path / "half"))
  assert {(r["key"], r["caption"]) for r in written} == kept
  assert counts["written"] == len(kept) == counts["originals_kept"] + counts["synthetic_kept"]
  assert counts["originals_dropped"] + counts["synthetic_dropped"] == 2 * N - len(kept)
  assert 0 < len(kept) < 2 * N
  summary = json.load(open(str(tmp_path / "half") + ".capfilt.json"))
  assert summary["written"] == len(kept) and summary["threshold"] == threshold
  # Threshold 1 keeps nothing.
  nothing = capfilt.capfilt(blip_export, "synthetic", str(tmp_path / "none"), max_examples=N,
                            threshold=1.0)
  assert nothing["written"] == 0
  assert nothing["originals_dropped"] == nothing["synthetic_dropped"] == N


def test_a_run_without_a_captioner_is_refused(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config("siglip")
  tokenizer = tokenizer_lib.get_tokenizer(None)
  mesh = __import__("vljax.sharding", fromlist=["x"]).make_mesh(
      {"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  export = checkpoint.export_params(workdir, train.init_state(setup, 0).params,
                                    config.to_json(), tokenizer)
  with pytest.raises(ValueError, match="CapFilt needs a captioner and an ITM head"):
    capfilt.capfilt(export, "synthetic", str(tmp_path / "x"), max_examples=2)
