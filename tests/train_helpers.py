"""Helpers the train-step tests share: tiny configs, random batches of an objective's declared
fields, and a few steps of the one train step on a mesh."""
import os

import flax.linen as nn
import jax
import numpy as np

from vljax import checkpoint, configlib, optim, sharding, train
from vljax.objectives import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(name: str, *overrides: str, args: str = ""):
  """configs/NAME.py:scale=tiny[,ARGS] with `key=value` overrides."""
  arg = f"scale=tiny,{args}" if args else "scale=tiny"
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:{arg}"))
  return configlib.apply_overrides(config, list(overrides))


def named_arrays(tree):
  """{parameter path (optim.param_path): numpy array} of a pytree."""
  return {optim.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_batch(config, objective, seed=0):
  """One random batch of the fields `objective` declares (pixels uint8, ids in [3, 40))."""
  rng = np.random.default_rng(seed)
  fields = objective.batch_fields()
  brightness = {f.pixels_with for f in fields.values() if f.pixels_with}

  def draw(name, field):
    shape = (config.batch_size,) + tuple(field.shape)
    if field.dtype == np.uint8:
      return rng.integers(0, 256, shape, np.uint8)
    if name in brightness:
      return np.zeros(shape, np.float32)
    return rng.integers(3, 40, shape).astype(field.dtype)

  return {name: draw(name, f) for name, f in fields.items()}


def export_tiny_run(name, tokenizer, directory, seed=3, args=""):
  """(export directory, named_arrays of its params) of a freshly initialised
  configs/NAME.py:scale=tiny[,ARGS] model written to DIRECTORY/export with `tokenizer`: the
  pre-training run a fine-tuning test starts from."""
  config = tiny_config(name, args=args)
  objective = make_objective(config, tokenizer)
  params = nn.unbox(jax.jit(objective.init)(jax.random.key(seed),
                                            random_batch(config, objective)))
  return (checkpoint.export_params(directory, params, config.to_json(), tokenizer),
          named_arrays(params))


def random_batches(config, tokenizer, n, seed=0):
  """n random batches of the fields config's objective declares."""
  objective = make_objective(config, tokenizer)
  return [random_batch(config, objective, seed=seed * 1000 + i) for i in range(n)]


def train_steps(config, tokenizer, mesh, batches, state=None):
  """(losses, final state, setup) of the train step run over `batches` on `mesh`, from `state`
  (donated; default: a fresh init_state)."""
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  if state is None:
    state = train.init_state(setup, config.seed)
  step = train.make_train_step(setup, config.nan_policy)
  rng = jax.random.key(1)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for batch in batches:
      placed = sharding.global_batch_from_host(batch, mesh, setup.batch_shardings)
      state, m = step(state, placed, rng)
      losses.append(float(m["train/loss"]))
  return losses, state, setup


def assert_trees_close(got, want, rtol, atol):
  """Leaf by leaf (matched by path) equality of two pytrees to rtol / atol; returns how many
  leaves were compared. The attention key biases are skipped: softmax is invariant to a bias
  shared by all keys, so their gradient is identically zero and Adam turns rounding noise
  into +-lr steps there in any two layouts."""
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  compared = 0
  for path, a in jax.tree_util.tree_flatten_with_path(got)[0]:
    name = jax.tree_util.keystr(path)
    if "key" in name and "bias" in name:
      continue
    np.testing.assert_allclose(np.asarray(a), np.asarray(flat_want[path]), rtol=rtol,
                               atol=atol, err_msg=name)
    compared += 1
  return compared


def first_batch(config, objective, tokenizer, n=16):
  """The first batch of n examples of config.data.train, collated by `objective` (pixels
  uint8, as the trainer's pipeline sends them)."""
  from vljax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  source = sources.get_source(config.data.train, "train", config.data.image_size, 0)
  it = pipeline.make_train_iterator(
      source, tokenizer, batch_size=n, image_size=config.data.image_size,
      max_len=config.data.max_len, seed=0, normalize=False,
      fields_fn=objective.batch_from_examples)
  return {k: v for k, v in next(it).items() if not k.startswith("_")}


def repeat_step(config, setup, state, batch, mesh, n):
  """(losses, last metrics, final state) of n train steps on the one `batch` from `state`
  (donated)."""
  step = train.make_train_step(setup, config.nan_policy)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    placed = sharding.global_batch_from_host(batch, mesh, setup.batch_shardings)
    for _ in range(n):
      state, metrics = step(state, placed, jax.random.key(1))
      losses.append(float(metrics["train/loss"]))
  return losses, metrics, state


def greedy_by_full_passes(full_logits, rows, length, pad_id, eos_id):
  """Greedy decoding without a cache: full_logits(seq [rows, length]) -> [rows, length, V]
  teacher-forced logits; token p is the argmax of position p (pad never), pad after EOS."""
  seq = np.full((rows, length), pad_id, np.int32)
  done = np.zeros(rows, bool)
  for p in range(length):
    logits = np.array(full_logits(seq)[:, p])
    logits[:, pad_id] = -np.inf
    nxt = np.where(done, pad_id, logits.argmax(-1))
    seq[:, p] = nxt
    done |= nxt == eos_id
  return seq


def check_resume_is_bit_exact(config, root: str) -> None:
  """Trains `config` for 4 steps (checkpoints at 2 and 4), then again from its step-2
  checkpoint in a copy of the workdir: the steps after the resume log the same losses and
  the exports hold the same bits (train state beyond the params included: codebook EMAs,
  dead-code restarts, frozen networks)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from vljax import checkpoint, metrics  # pylint: disable=g-import-not-at-top
  configlib.apply_overrides(config, ["total_steps=4", "checkpoint.every_steps=2",
                                     "eval.every_steps=-1", "tensorboard=false"])
  straight, resumed = os.path.join(root, "straight"), os.path.join(root, "resumed")
  train.run(config, straight)
  shutil.copytree(straight, resumed)
  for gone in (os.path.join("checkpoints", "4"), "export"):
    shutil.rmtree(os.path.join(resumed, gone))
  train.run(config, resumed)

  def losses(workdir):
    return {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir)
            if "train/loss" in r}

  assert losses(straight) == losses(resumed) and sorted(losses(resumed)) == [1, 2, 3, 4]
  a, b = (named_arrays(checkpoint.load_exported_params(os.path.join(w, "export")))
          for w in (straight, resumed))
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


class DigitTokens:
  """A stand-in tokenizer that encodes the text '5' as [[5, 0, ...]]: an evaluator test picks
  each example's token."""

  def encode(self, texts, max_len):
    out = np.zeros((len(texts), max_len), np.int32)
    out[:, 0] = [int(t) for t in texts]
    return out
