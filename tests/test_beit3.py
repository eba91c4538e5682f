"""BEiT-3's masked data modelling: the VQ-KD tokenizer loaded and frozen (no optimizer state, one
forward and no backward in the compiled step), its codes as the MIM targets, the masking ratios
of the three views, the loss against numpy, training, the held-out evaluator and the config's
errors."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import checkpoint, configlib, init_weights, sharding, train
from vljax.data import tokenizer as tokenizer_lib
from vljax.losses import fusion as fusion_losses
from vljax.objectives import base, beit3, make_objective

import train_helpers  # pylint: disable=g-bad-import-order

ROOT = train_helpers.ROOT
TERMS = beit3.TERMS
_named = train_helpers.named_arrays


def _config(tokenizer_dir, *overrides):
  return train_helpers.tiny_config("beit3", *overrides, args=f"tokenizer={tokenizer_dir}")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.get_tokenizer(None)


@pytest.fixture(scope="module")
def vqkd_run(tmp_path_factory, tok):
  """A tiny VQ-KD run's params exported with its config: (directory, its objective, params)."""
  config = train_helpers.tiny_config("vqkd", args="teacher=/unused")
  objective = make_objective(config, tok)
  params = nn.meta.unbox(jax.jit(objective.init)(jax.random.key(3),
                                                 {"image": jnp.zeros((1, 16, 16, 3))}))
  directory = str(tmp_path_factory.mktemp("vqkd"))
  checkpoint.export_params(directory, params, config.to_json())
  return os.path.join(directory, "export"), objective, params


@pytest.fixture(scope="module")
def run(vqkd_run, tok):
  """The tiny BEiT-3 setup on one device (whole-step FLOPs), its state with the tokenizer
  loaded, a batch. A constant rate without warm-up, for the training test."""
  config = _config(vqkd_run[0], "optim.lr=3e-3", "optim.warmup_steps=0",
                   "optim.schedule=constant")
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  setup = train.build(config, tok, mesh, epoch_size=None)
  state = train.init_state(setup, seed=0)
  params, loaded = init_weights.load_initial_params(config.init, state.params,
                                                    log=lambda _: None)
  batch = train_helpers.first_batch(config, setup.objective, tok)
  model_batch = jax.tree.map(jnp.asarray, train.model_inputs(batch, setup.batch_fields,
                                                             setup.image_options))
  return dict(config=config, mesh=mesh, setup=setup, state=state.replace(params=params),
              loaded=loaded, batch=batch, model_batch=model_batch)


@pytest.fixture(scope="module")
def compiled(run):
  """(the compiled train step, its StepCost): compiled once for the FLOPs and training tests."""
  setup = run["setup"]
  return train.compile_step(setup, train.make_train_step(setup), run["config"].batch_size)


def test_tokenizer_is_loaded_frozen_and_its_codes_are_the_targets(run, vqkd_run):
  _, vqkd_objective, vqkd_params = vqkd_run
  setup, params = run["setup"], run["state"].params
  named, source = _named(params), _named(vqkd_params)
  want = sorted(n for n in named if n.startswith("tokenizer/"))
  assert run["loaded"] == want and len(want) > 10
  for name in want:
    np.testing.assert_array_equal(named[name], source[name[len("tokenizer/"):]])
  assert not any(n.startswith(("tokenizer/decoder", "tokenizer/teacher")) for n in named)
  # Exactly the tokenizer is frozen, and it has no optimizer state.
  assert {n for n, f in _named(setup.frozen).items() if f} == set(want)
  opt_paths = [jax.tree_util.keystr(p) for p, x in
               jax.tree_util.tree_flatten_with_path(run["state"].opt_state)[0]
               if np.size(x) > 1]
  assert opt_paths and not any("'tokenizer'" in p for p in opt_paths)
  # The targets: the VQ-KD run's own tokenize on the same (normalised) images.
  images = run["model_batch"]["image"]
  codes = np.asarray(jax.jit(setup.objective.visual_tokens)(params, run["model_batch"]))
  np.testing.assert_array_equal(codes, jax.jit(vqkd_objective.tokenize)(vqkd_params, images))
  assert codes.shape == (16, 4) and len(np.unique(codes)) > 1
  masks = jax.jit(setup.objective.masks)(jax.random.key(0), run["model_batch"])
  labels = setup.objective.labels(jnp.asarray(codes), masks)
  for term, patches in (("image_mim", "image_patches"), ("pair_mim", "pair_patches")):
    m = np.asarray(masks[patches])
    np.testing.assert_array_equal(np.asarray(labels[term]),
                                  np.where(m, codes, fusion_losses.IGNORE))


def test_scanned_run_loads_the_unrolled_tokenizer(vqkd_run, tok):
  # config.layers.scan scans the Multiway stack and the tokenizer's ViT alike (one layout per
  # model), so the unrolled VQ-KD export converts as a whole and loads stacked.
  from vljax.models import stacks  # pylint: disable=g-import-not-at-top
  config = _config(vqkd_run[0], "layers.scan=true")
  setup = train.build(config, tok, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
                      epoch_size=None)
  params = train.init_state(setup, seed=0).params
  assert {"block", "vlblock"} <= set(params["mw"])
  loaded, names = init_weights.load_initial_params(config.init, params, log=lambda _: None)
  expected = _named(stacks.stack_layers(jax.tree.map(np.asarray, vqkd_run[2])))
  expected = {n: v for n, v in expected.items() if n.startswith(("encoder/", "encode_task/",
                                                                 "codebook"))}
  assert names == sorted(f"tokenizer/{n}" for n in expected)
  assert any("/encoderblock/" in n for n in names)
  got = _named(loaded)
  for name, value in expected.items():
    np.testing.assert_array_equal(got[f"tokenizer/{name}"], value)


def test_masking_ratios_of_the_three_views(run, tok):
  objective = run["setup"].objective
  rng = np.random.default_rng(0)
  n, length = 512, run["config"].data.max_len
  lengths = rng.integers(1, length, n)  # real tokens, then EOS, then pad
  tokens = np.zeros((n, length), np.int32)
  for i, k in enumerate(lengths):
    tokens[i, :k] = rng.integers(3, tok.vocab_size, k)
    tokens[i, k] = tok.eos_id
  batch = {"text": jnp.asarray(tokens), "image": jnp.zeros((n, 16, 16, 3))}
  masks = jax.tree.map(np.asarray, jax.jit(objective.masks)(jax.random.key(1), batch))
  real = (tokens != tok.pad_id) & (tokens != tok.eos_id)
  for view, prob in (("text", 0.15), ("pair", 0.5)):
    chosen = masks[f"{view}_labels"] >= 0
    assert not np.any(chosen & ~real)  # pad and EOS never
    assert chosen[real].mean() == pytest.approx(prob, abs=0.03), view
    np.testing.assert_array_equal(masks[f"{view}_labels"][chosen], tokens[chosen])
    replaced = masks[f"{view}_tokens"][chosen] == tok.vocab_size  # the [MASK] id
    assert replaced.mean() == pytest.approx(0.8, abs=0.05), view
  for view in ("image", "pair"):  # round(0.4 * 4) = 2 of the 4 patches, every example
    np.testing.assert_array_equal(masks[f"{view}_patches"].sum(1), 2)
  assert not np.array_equal(masks["image_patches"], masks["pair_patches"])


def _cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  chosen = labels >= 0
  ce = -np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0]
  hits = logits.argmax(-1) == labels
  return ce[chosen].mean(), hits[chosen].mean()


def _loss_masks_logits(objective, params, batch, rng):
  """(loss_fn's (loss, metrics), its masks, the logits under them): the same masks from the
  same key; the logits in eval mode (the tiny model has no dropout)."""

  @jax.jit
  def run(params, batch, rng):
    masks = objective.masks(jax.random.split(rng)[0], batch)
    return objective.loss_fn(params, batch, rng), masks, objective.logits(params, batch, masks)

  return run(params, batch, rng)


def test_loss_is_the_cross_entropy_at_the_masked_positions(run, vqkd_run):
  objective, params, batch = run["setup"].objective, run["state"].params, run["model_batch"]
  (loss, metrics), masks, logits = _loss_masks_logits(objective, params, batch,
                                                      jax.random.key(7))
  codes = np.asarray(jax.jit(vqkd_run[1].tokenize)(vqkd_run[2], batch["image"]))
  labels = {"image_mim": np.where(masks["image_patches"], codes, -1),
            "pair_mim": np.where(masks["pair_patches"], codes, -1),
            "text_mlm": np.asarray(masks["text_labels"]),
            "pair_mlm": np.asarray(masks["pair_labels"])}
  total = 0.0
  for term in TERMS:
    assert np.sum(labels[term] >= 0) > 0, term
    ce, accuracy = _cross_entropy(logits[term], labels[term])
    assert float(metrics[f"{term}_loss"]) == pytest.approx(ce, rel=1e-5), term
    assert float(metrics[f"{term}_accuracy"]) == pytest.approx(accuracy, abs=1e-6), term
    total += ce
  assert float(loss) == pytest.approx(total, rel=1e-5)
  assert logits["image_mim"].shape == (16, 4, 16) and logits["text_mlm"].dtype == jnp.float32


def test_training_lowers_the_loss_and_leaves_the_tokenizer(run, compiled):
  setup, mesh = run["setup"], run["mesh"]
  state = jax.tree.map(jnp.copy, run["state"])  # the step donates it
  before = {n: v for n, v in _named(state.params).items() if n.startswith("tokenizer/")}
  with jax.set_mesh(mesh):
    batch = sharding.global_batch_from_host(run["batch"], mesh, setup.batch_shardings)
  losses = []
  for _ in range(8):
    state, metrics = compiled[0](state, batch, jax.random.key(1))
    losses.append(float(metrics["train/loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0, losses
  after = _named(state.params)
  for name, value in before.items():
    np.testing.assert_array_equal(after[name], value, err_msg=name)
  assert {f"train/{t}_accuracy" for t in TERMS} <= set(metrics)


class _TargetsInBatch(beit3.Beit3Objective):
  """The same objective with the visual tokens supplied as a batch field (no tokenizer run)."""

  def batch_fields(self):
    return {**super().batch_fields(),
            "visual_tokens": base.BatchField((self.grid[0] * self.grid[1],), np.int32)}

  def visual_tokens(self, params, batch):
    return batch["visual_tokens"]


def test_the_step_runs_the_tokenizer_forward_once_and_no_backward(run, compiled, tok):
  config, setup, mesh = run["config"], run["setup"], run["mesh"]
  step = compiled[1].flops
  fed_setup = train.build(config, tok, mesh, epoch_size=None,
                          objective=_TargetsInBatch(config, tok))
  fed = train.compile_step(fed_setup, train.make_train_step(fed_setup),
                           config.batch_size)[1].flops
  images = jax.ShapeDtypeStruct((config.batch_size, 16, 16, 3), jnp.float32)
  cost = jax.jit(lambda p, x: setup.objective.visual_tokens(p, {"image": x})).lower(
      setup.abstract_state.params, images).compile().cost_analysis()
  tokenizer = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  assert tokenizer > 0.02 * fed  # big enough for a second forward (or a backward) to show
  # One forward: step = fed + tokenizer. Three (one per image view) or a backward pass (about
  # twice the forward) would add >= 2 x tokenizer more. Measured at this size: step 75.135M =
  # fed 72.951M + tokenizer 2.184M exactly.
  assert fed + 0.5 * tokenizer < step < fed + 1.5 * tokenizer, (step, fed, tokenizer)


def test_pixel_fallback_without_a_tokenizer(tok, caplog):
  """No tokenizer=DIR: the MIM terms are the MSE of normalised pixels at the masked patches
  (checked against numpy), nothing is frozen, a warning names the fix, and it trains."""
  config = train_helpers.tiny_config("beit3")
  assert "tokenizer" not in config.model and not config.optim.freeze
  with caplog.at_level("WARNING"):
    objective = make_objective(config, tok)
  assert "tokenizer=DIR" in caplog.text
  assert objective.TERMS == ("text_mlm", "pair_mlm")  # what the held-out evaluation counts
  batch = train_helpers.first_batch(config, objective, tok)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  setup = train.build(config, tok, mesh, epoch_size=None, objective=objective)
  batch = jax.tree.map(jnp.asarray, train.model_inputs(batch, setup.batch_fields,
                                                       setup.image_options))
  params = train.init_state(setup, seed=0).params
  assert not any(n.startswith("tokenizer/") for n in _named(params))
  (loss, metrics), masks, logits = _loss_masks_logits(objective, params, batch,
                                                      jax.random.key(5))
  images = np.asarray(batch["image"], np.float64)  # [B, 16, 16, 3], patch 8: 2 x 2 patches
  b, p = images.shape[0], 8
  patches = images.reshape(b, 2, p, 2, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 4, -1)
  mean, var = patches.mean(-1, keepdims=True), patches.var(-1, keepdims=True)
  targets = (patches - mean) / np.sqrt(var + 1e-6)
  total = 0.0
  for term, key in (("image_mim", "image_patches"), ("pair_mim", "pair_patches")):
    mask = np.asarray(masks[key])
    err = ((np.asarray(logits[term], np.float64) - targets) ** 2).mean(-1)
    want = (err * mask).sum() / mask.sum()
    assert float(metrics[f"{term}_loss"]) == pytest.approx(want, rel=1e-4), term
    assert f"{term}_accuracy" not in metrics
    total += want
  total += float(metrics["text_mlm_loss"]) + float(metrics["pair_mlm_loss"])
  assert float(loss) == pytest.approx(total, rel=1e-4)


def test_config_errors(vqkd_run, tok):
  for override, key in (("model.transformer.patch_size=4", "patch_size"),
                        ("data.image_size=32", "image_size")):
    with pytest.raises(configlib.ConfigError, match=key) as mismatch:
      make_objective(_config(vqkd_run[0], override), tok)
    assert "\n" not in str(mismatch.value) and "--config." in str(mismatch.value)
  config = _config(vqkd_run[0])
  assert config.optim.freeze == ["^tokenizer/"] and config.init.path == vqkd_run[0]
  assert config.model.tokenizer.num_codes == 16  # from the VQ-KD run's config


def test_held_out_accuracies_score_every_pair_in_any_batch(run, tok):
  import copy  # pylint: disable=g-import-not-at-top
  from vljax import evals  # pylint: disable=g-import-not-at-top
  from vljax.evals import masked_modeling  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(run["config"])
  config.eval.batch_size = 8  # 13 pairs: a batch of 8, then 5 padded to 8
  setup, params, mesh = run["setup"], run["state"].params, run["mesh"]
  images = np.random.default_rng(3).integers(0, 256, (5, 16, 16, 3), np.uint8)
  captions = [f"a {c} {s}" for c in ("red", "blue", "green")
              for s in ("circle", "square", "star", "cross", "x")][:13]
  evaluator = evals.build_evaluator(config, setup.objective, {"retrieval": {
      "image": images, "captions": captions, "caption_image": np.arange(13) % 5}}, tok, mesh,
                                    setup.rules)
  metrics = evaluator(params)
  part, = [p for p in evaluator.parts if isinstance(p, masked_modeling.MaskedModellingEvaluator)]
  with jax.set_mesh(mesh):
    counts = part.pair_counts(params)  # [13, 2 x 4]: hits, masked positions, term by term
  assert counts.shape == (13, 8) and metrics["eval/masked_modelling_pairs"] == 13
  sums = counts.sum(0)
  for k, term in enumerate(TERMS):
    assert sums[2 * k + 1] > 0, term
    assert metrics[f"eval/{term}_accuracy"] == pytest.approx(sums[2 * k] / sums[2 * k + 1])
  np.testing.assert_array_equal(counts[:, [1, 7]], 2)  # 2 of 4 patches, both image views
  # Each pair's masks come from a constant key folded with its index, whatever its batch.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(beit3.EVAL_SEED), i))(
      jnp.arange(13))
  masks = jax.jit(setup.objective.example_masks)(
      keys, jnp.asarray(tok.encode(captions, config.data.max_len)))
  np.testing.assert_array_equal(counts[:, 3], (np.asarray(masks["text_labels"]) >= 0).sum(1))
  np.testing.assert_array_equal(counts[:, 5], (np.asarray(masks["pair_labels"]) >= 0).sum(1))


def test_resume_is_bit_exact(vqkd_run, tmp_path):
  """BEiT-3 with its frozen VQ-KD tokenizer resumes from a checkpoint to the same bits."""
  train_helpers.check_resume_is_bit_exact(_config(vqkd_run[0]), str(tmp_path))
