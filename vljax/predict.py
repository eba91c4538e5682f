"""Captions (and zero-shot labels) for image files from a workdir's latest checkpoint.

python -m vljax.predict --workdir=DIR [--labels="red circle,blue square"] IMAGE...

Prints one block per image: the caption (objectives that generate, e.g. CoCa) and, given
--labels, the top classes through the contrastive heads (objectives with embed_images and
embed_texts, e.g. CoCa, CLIP, SigLIP). Decoding is greedy unless --beam_size > 1 or
--temperature > 0 (sampling, with --top_k / --top_p).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from vljax import main as main_lib

# --workdir is vljax.main's flag (one absl flag per name per process).
WORKDIR = main_lib.WORKDIR
LABELS = flags.DEFINE_list("labels", [], "Comma-separated class names for zero-shot labels.")
TEMPLATE = flags.DEFINE_string("template", "a photo of a {}.", "Prompt template for --labels.")
TOP = flags.DEFINE_integer("top", 3, "Number of classes to print per image.")
MAX_LEN = flags.DEFINE_integer("max_len", 0, "Caption length limit; 0 = config.data.max_len.")
BEAM_SIZE = flags.DEFINE_integer("beam_size", 1, "Beam search with this many beams if > 1.")
ALPHA = flags.DEFINE_float("alpha", 0.6, "Beam search length-penalty exponent.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sample with this temperature if > 0.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Sampling: keep the k most likely tokens (0 = all).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Sampling: nucleus mass.")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def load(workdir: str):
  """(config, tokenizer, objective, params, mesh, rules) of the latest checkpoint in workdir."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vljax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from vljax import sharding, train  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(ckpt_lib.read_config(workdir))
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  setup, tokenizer, _, state = train.load_latest(config, workdir, mesh)
  return config, tokenizer, setup.objective, state.params, mesh, setup.rules


def predict(workdir: str, paths: list[str], labels: list[str] | None = None) -> list[dict]:
  """Returns, per image path, {'path', 'caption' (if generative), 'labels' [(name, prob)]}."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vljax import decode  # pylint: disable=g-import-not-at-top
  from vljax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vljax.evals import common  # pylint: disable=g-import-not-at-top

  config, tokenizer, objective, params, mesh, rules = load(workdir)
  images = []
  for path in paths:
    with open(path, "rb") as f:
      images.append(pipeline.preprocess_image(f.read(), config.data.image_size))
  images = np.stack(images)
  results = [{"path": p} for p in paths]
  batch = max(len(paths), mesh.size)
  max_len = MAX_LEN.value if flags.FLAGS.is_parsed() and MAX_LEN.value else config.data.max_len
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if hasattr(objective, "generate"):
      fn = lambda p, x: objective.generate(p, x, max_len)
      if flags.FLAGS.is_parsed() and (BEAM_SIZE.value > 1 or TEMPERATURE.value > 0):
        fn = jax.jit(lambda p, x: _decode_other(objective, decode, p, x, max_len))
      tokens = np.asarray(common.embed_all(fn, params, images, mesh, batch))
      for r, row in zip(results, tokens):
        r["caption"] = tokenizer.decode(row)
    if labels and hasattr(objective, "embed_images"):
      zimg = common.embed_all(jax.jit(objective.embed_images), params, images, mesh, batch)
      prompts = tokenizer.encode([TEMPLATE.value.format(l) if flags.FLAGS.is_parsed() else
                                  f"a photo of a {l}." for l in labels], config.data.max_len)
      ztxt = common.embed_all(jax.jit(objective.embed_texts), params, prompts, mesh,
                              max(len(labels), mesh.size))
      # The learned contrastive logit scale where the model has one ('t' holds its log).
      scale = float(np.exp(params["t"])) if "t" in params else 100.0
      probs = np.asarray(jax.nn.softmax(scale * jnp.asarray(zimg) @ jnp.asarray(ztxt).T))
      top = TOP.value if flags.FLAGS.is_parsed() else 3
      for r, p in zip(results, probs):
        order = np.argsort(-p)[:top]
        r["labels"] = [(labels[i], float(p[i])) for i in order]
  return results


def _decode_other(objective, decode, params, images, max_len):
  """Beam search or sampling, per the flags."""
  state = objective.init_decode_state(params, images, max_len)
  start = objective.start_tokens(images.shape[0])
  step = objective.step_fn(params)
  if BEAM_SIZE.value > 1:
    seqs, _ = decode.beam_search(step, state, start, max_len, objective.eos_id,
                                 beam_size=BEAM_SIZE.value, alpha=ALPHA.value,
                                 pad_id=objective.pad_id)
    return seqs[:, 0]
  import jax  # pylint: disable=g-import-not-at-top
  return decode.sample(step, state, start, max_len, objective.eos_id,
                       jax.random.key(SEED.value), temperature=TEMPERATURE.value,
                       top_k=TOP_K.value, top_p=TOP_P.value, pad_id=objective.pad_id)


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # the checkpoint library logs every read at INFO
  paths = argv[1:]
  if not WORKDIR.value or not paths:
    raise app.UsageError("usage: python -m vljax.predict --workdir=DIR [--labels=a,b] IMAGE...")
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    print(f"No such image file(s): {', '.join(missing)}", file=sys.stderr)
    sys.exit(2)
  for r in predict(WORKDIR.value, paths, LABELS.value):
    print(r["path"])
    if "caption" in r:
      print(f"  caption: {r['caption']}")
    for name, p in r.get("labels", []):
      print(f"  {p:6.3f}  {name}")


if __name__ == "__main__":
  app.run(main)
