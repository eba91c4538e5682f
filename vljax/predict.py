"""Captions and zero-shot labels for image files, from a workdir's latest checkpoint or an export.

Library:
  predictor = vljax.predict.load(DIR)        # a workdir or an export directory
  predictor.predict(paths, labels=[...])     # [{'path', 'caption'?, 'labels'?}, ...]

Command line (a thin wrapper over the library):
  python -m vljax.predict --workdir=DIR [--labels="red circle,blue square"] IMAGE...
  python -m vljax.predict --workdir=DIR --prompt="answer en what colour is the shape?" IMAGE...

Images go through exactly the evaluation preprocessing of the run that is loaded (its
config.data: image size, resize mode, mean/std), and zero-shot labels use the run's prompt
templates (config.data.prompt_templates) averaged per class, and its learned logit scale, as
zero-shot evaluation does. Caption: objectives that generate (CoCa, PaLI); labels: objectives
with contrastive heads (SigLIP, CLIP, CoCa); a prompt (PaLI: "caption en", "answer en
{question}") conditions the generated text, for objectives that take one. Decoding is greedy unless beam_size > 1 or
temperature > 0 (sampling, with top_k / top_p).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

from absl import app, flags, logging

from vljax import main as main_lib

# --workdir is vljax.main's flag (one absl flag per name per process).
WORKDIR = main_lib.WORKDIR
LABELS = flags.DEFINE_list("labels", [], "Comma-separated class names for zero-shot labels.")
TEMPLATES = flags.DEFINE_list(
    "templates", [], "Prompt templates for --labels ('{}' = class name); default: the run's "
    "config.data.prompt_templates.")
TOP = flags.DEFINE_integer("top", 3, "Number of classes to print per image.")
MAX_LEN = flags.DEFINE_integer("max_len", 0, "Caption length limit; 0 = config.data.max_len.")
BEAM_SIZE = flags.DEFINE_integer("beam_size", 1, "Beam search with this many beams if > 1.")
ALPHA = flags.DEFINE_float("alpha", 0.6, "Beam search length-penalty exponent.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sample with this temperature if > 0.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Sampling: keep the k most likely tokens (0 = all).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Sampling: nucleus mass.")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
PROMPT = flags.DEFINE_string("prompt", "", "Text prompt the generated text follows (objectives "
                             "with prompts, e.g. PaLI: 'answer en what colour is the shape?').")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How captions are decoded: greedy by default."""
  max_len: int | None = None  # None = config.data.max_len
  beam_size: int = 1
  alpha: float = 0.6  # beam-search length-penalty exponent
  temperature: float = 0.0  # > 0: sampling
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0


class Predictor:
  """A loaded model with the evaluation preprocessing of the run it came from."""

  def __init__(self, config, tokenizer, objective, params, mesh, rules):
    self.config, self.tokenizer, self.objective = config, tokenizer, objective
    self.params, self.mesh, self.rules = params, mesh, rules
    # Jitted decoders by DecodeOptions (seed left out: the key is an argument), so repeated
    # calls (CapFilt's batches) reuse one compiled function instead of re-tracing it.
    self._decoders: dict[Any, Any] = {}

  def load_images(self, paths: Sequence[str]):
    """float32 [N, S, S, 3]: the files decoded and preprocessed as the run's evaluation does."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from vljax.data import pipeline, preprocess  # pylint: disable=g-import-not-at-top
    data = self.config.data
    options = pipeline.eval_image_options(
        data.image_size, preprocess.image_options_from_config(data, data.image_size,
                                                              train=False))
    pixels = []
    for path in paths:
      with open(path, "rb") as f:
        pixels.append(pipeline.eval_pixels(f.read(), options))
    return preprocess.normalize(np.stack(pixels), options)

  def _batched(self, fn, inputs, params=None):
    """fn(params, *inputs) over the whole of `inputs` (an array or a tuple of arrays with one
    row per example) in one batch sharded over the mesh; params default to the model's."""
    import jax  # pylint: disable=g-import-not-at-top
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    from vljax.evals import common  # pylint: disable=g-import-not-at-top
    rows = len(inputs[0] if isinstance(inputs, tuple) else inputs)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return common.embed_all(fn, self.params if params is None else params, inputs,
                              self.mesh, max(rows, self.mesh.size))

  def captions(self, images, options: DecodeOptions = DecodeOptions(),
               prompt: str | None = None) -> list[str]:
    """One generated text per preprocessed image (objectives with `generate`): a caption, or
    the text that follows `prompt` (objectives with prompts, which are given to every image)."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    objective = self.objective
    max_len = options.max_len or self.config.data.max_len
    if prompt and not hasattr(objective, "encode_prefixes"):
      raise ValueError(f"{type(objective).__name__} takes no text prompt.")

    inputs = images
    if prompt:
      inputs = (images, np.repeat(objective.encode_prefixes([prompt]), len(images), axis=0))
    key = jax.random.key(options.seed)
    tokens = np.asarray(self._batched(self._decoder(dataclasses.replace(options, seed=0),
                                                    max_len),
                                      inputs, params=(self.params, key)))
    return [self.tokenizer.decode(row) for row in tokens]

  def _decoder(self, options: DecodeOptions, max_len: int):
    """The jitted generate((params, key), images, *prefix) of these options (cached)."""
    import jax  # pylint: disable=g-import-not-at-top
    from vljax import decode  # pylint: disable=g-import-not-at-top
    if (options, max_len) in self._decoders:
      return self._decoders[(options, max_len)]
    objective = self.objective

    def generate(params_and_key, x, *prefix):
      params, key = params_and_key
      if options.beam_size <= 1 and options.temperature <= 0:
        return objective.generate(params, x, max_len, *prefix)
      state = objective.init_decode_state(params, x, max_len, *prefix)
      start = objective.start_tokens(x.shape[0])
      step = objective.step_fn(params)
      if options.beam_size > 1:
        seqs, _ = decode.beam_search(step, state, start, max_len, objective.eos_id,
                                     beam_size=options.beam_size, alpha=options.alpha,
                                     pad_id=objective.pad_id)
        return seqs[:, 0]
      return decode.sample(step, state, start, max_len, objective.eos_id, key,
                           temperature=options.temperature, top_k=options.top_k,
                           top_p=options.top_p, pad_id=objective.pad_id)

    self._decoders[(options, max_len)] = jax.jit(generate)
    return self._decoders[(options, max_len)]

  def label_probabilities(self, images, labels: Sequence[str],
                          templates: Sequence[str] | None = None):
    """[N, len(labels)] softmax over the classes of the run's contrastive logits.

    Class embeddings are the mean of the templates' prompt embeddings, re-normalised, as in
    zero-shot evaluation; the logits use the run's learned scale (sigmoid runs add their bias,
    which a softmax over classes ignores).
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from vljax.evals import zeroshot  # pylint: disable=g-import-not-at-top
    templates = list(templates or self.config.data.prompt_templates)
    prompts = [t.format(label) for label in labels for t in templates]
    tokens = self.tokenizer.encode(prompts, self.config.data.max_len)
    zimg = self._batched(jax.jit(self.objective.embed_images), images)
    zprompt = self._batched(jax.jit(self.objective.embed_texts), tokens)
    zcls = zeroshot.class_embeddings(jnp.asarray(zprompt), len(labels))
    scale = self.objective.logit_scalars(self.params)["scale"]
    return np.asarray(jax.nn.softmax(scale * jnp.asarray(zimg) @ zcls.T, axis=-1))

  def predict(self, paths: Sequence[str], labels: Sequence[str] | None = None, *,
              templates: Sequence[str] | None = None, top: int = 3,
              decode_options: DecodeOptions = DecodeOptions(),
              prompt: str | None = None) -> list[dict[str, Any]]:
    """Per image path: {'path', 'caption' (if generative; the text after `prompt` if one is
    given), 'labels' [(name, prob)] (if asked)}."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    images = self.load_images(paths)
    results = [{"path": p} for p in paths]
    if hasattr(self.objective, "generate"):
      for r, caption in zip(results, self.captions(images, decode_options, prompt)):
        r["caption"] = caption
    if labels:
      if not hasattr(self.objective, "embed_images"):
        raise ValueError(f"{type(self.objective).__name__} has no contrastive heads for labels.")
      probs = self.label_probabilities(images, labels, templates)
      for r, p in zip(results, probs):
        order = np.argsort(-p)[:top]
        r["labels"] = [(labels[i], float(p[i])) for i in order]
    return results


def load(directory: str) -> Predictor:
  """The latest checkpoint of a workdir, or the params of an export directory.

  Uses the run's own config.json and tokenizer.model. The mesh is the run's config.mesh when
  it fits the devices here, else all devices on the data axis.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vljax import configlib, sharding, train  # pylint: disable=g-import-not-at-top

  config = configlib.load_run_config(directory)
  try:
    sharding.mesh_shape(config.mesh, jax.device_count())
    mesh = sharding.make_mesh(config.mesh)
  except configlib.ConfigError:
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  setup, tokenizer, params, _ = train.load_for_inference(config, directory, mesh)
  return Predictor(config, tokenizer, setup.objective, params, mesh, setup.rules)


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # the checkpoint library logs every read at INFO
  paths = argv[1:]
  if not WORKDIR.value or not paths:
    raise app.UsageError("usage: python -m vljax.predict --workdir=DIR [--labels=a,b] IMAGE...")
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    print(f"No such image file(s): {', '.join(missing)}", file=sys.stderr)
    sys.exit(2)
  from vljax import configlib  # pylint: disable=g-import-not-at-top
  try:
    predictor = load(WORKDIR.value)
  except (configlib.ConfigError, FileNotFoundError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(2)
  options = DecodeOptions(max_len=MAX_LEN.value or None, beam_size=BEAM_SIZE.value,
                          alpha=ALPHA.value, temperature=TEMPERATURE.value, top_k=TOP_K.value,
                          top_p=TOP_P.value, seed=SEED.value)
  try:
    results = predictor.predict(paths, LABELS.value, templates=TEMPLATES.value or None,
                                top=TOP.value, decode_options=options,
                                prompt=PROMPT.value or None)
  except ValueError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(2)
  for r in results:
    print(r["path"])
    if "caption" in r:
      print(f"  {PROMPT.value or 'caption'}: {r['caption']}")
    for name, p in r.get("labels", []):
      print(f"  {p:6.3f}  {name}")


if __name__ == "__main__":
  app.run(main)
