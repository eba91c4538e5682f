"""ALBEF on the objective contract: momentum EMA and feature queues updated by the one train
step, hard ITM negatives, a decreasing loss, sharded == single device, an end-to-end run with
zero-shot and retrieval evaluation, and a bit-exact resume with the queues."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import checkpoint as ckpt_lib
from vljax import configlib, metrics, sharding, train
from vljax.data import tokenizer as tokenizer_lib
from vljax.models import fusion
from vljax.objectives import make_objective

from train_helpers import assert_trees_close, random_batches, tiny_config

MOMENTUM = 0.995
BATCH, QUEUE, EMBED = 16, 32, 32


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.get_tokenizer(None)


@pytest.fixture(scope="module")
def mesh1():
  return sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])


def _config(*overrides):
  return tiny_config("albef", "optim.warmup_steps=0", *overrides)


def _run(config, tokenizer, mesh, batches, state=None, setup=None):
  """(setup, final state, host params before each step, losses) of the train step."""
  if setup is None:
    setup = train.build(config, tokenizer, mesh, epoch_size=None)
  if state is None:
    state = train.init_state(setup, config.seed)
  step = train.make_train_step(setup)
  history, losses = [], []
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for batch in batches:
      history.append(jax.tree.map(np.asarray, state.params))
      state, m = step(state, sharding.global_batch_from_host(batch, mesh, setup.batch_shardings),
                      jax.random.key(1))
      losses.append(float(m["train/loss"]))
  return setup, state, history, losses


def _features(model, params, batch):
  """Unit-norm [CLS] features of a host batch, the model applied outside the train step."""
  images = batch["image"].astype(np.float32) * (2.0 / 255.0) - 1.0  # default normalisation
  _, zimg = model.apply({"params": params}, images, method=fusion.Albef.encode_image)
  _, _, ztxt = model.apply({"params": params}, batch["text"], method=fusion.Albef.encode_text)
  return np.asarray(zimg), np.asarray(ztxt)


def test_config_sizes():
  tiny = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                 "albef.py:scale=tiny"))
  assert tiny.batch_size == BATCH and tiny.loss.queue_size == QUEUE
  assert tiny.total_steps == 4 and tiny.model.embed_dim == EMBED
  paper = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                  "albef.py:scale=paper"))
  assert paper.loss.queue_size == 65_536 and paper.batch_size == 512
  assert paper.model.text.text_depth == paper.model.text.fusion_depth == 6
  assert paper.model.text.width == 768 and paper.model.embed_dim == 256
  assert paper.data.image_size == 256 and paper.model.image.variant == "B/16"
  assert paper.optim.wd == pytest.approx(0.02 * 1e-4)
  assert (paper.loss.momentum, paper.loss.alpha, paper.model.temperature_init) == (
      0.995, 0.4, 0.07)


def test_momentum_ema_and_queues_over_three_steps(tokenizer, mesh1):
  config = _config()
  batches = random_batches(config, tokenizer, 3, seed=1)
  setup, state, history, _ = _run(config, tokenizer, mesh1, batches)
  model = setup.objective.model
  fresh = train.init_state(setup, config.seed)
  # EMA of the params AFTER each update, starting from a copy of the initial params.
  after = history[1:] + [jax.tree.map(np.asarray, state.params)]
  ema = [jax.tree.map(np.asarray, history[0])]
  for params in after:
    ema.append(jax.tree.map(lambda e, p: MOMENTUM * e + (1 - MOMENTUM) * p, ema[-1], params))
  for got, want in zip(jax.tree.leaves(state.extra["momentum"]), jax.tree.leaves(ema[-1])):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # Queues: step k writes the momentum features (momentum params before step k) at rows
  # [16 k mod 32, +16); the third batch overwrites the first's rows.
  want_img = np.asarray(fresh.extra["image_queue"]).copy()
  want_txt = np.asarray(fresh.extra["text_queue"]).copy()
  for k, batch in enumerate(batches):
    zimg, ztxt = _features(model, ema[k], batch)
    rows = slice((k * BATCH) % QUEUE, (k * BATCH) % QUEUE + BATCH)
    want_img[rows], want_txt[rows] = zimg, ztxt
  np.testing.assert_allclose(np.asarray(state.extra["image_queue"]), want_img, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(state.extra["text_queue"]), want_txt, rtol=1e-4,
                             atol=1e-5)
  assert int(state.extra["queue_ptr"]) == (3 * BATCH) % QUEUE
  # The initial queues are random unit vectors, and the momentum copy starts at the params.
  np.testing.assert_allclose(np.linalg.norm(np.asarray(fresh.extra["image_queue"]), axis=1),
                             1.0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fresh.extra["momentum"]), jax.tree.leaves(fresh.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_itm_negatives_never_equal_the_positive(tokenizer):
  objective = make_objective(_config(), tokenizer)
  rng = np.random.default_rng(0)
  z = rng.normal(size=(BATCH, EMBED)).astype(np.float32)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  # Identical image and text features: the positive is by far the most similar pair at a low
  # temperature, yet it must never be drawn as a negative.
  for seed in range(20):
    image_idx, text_idx, labels = map(np.asarray, objective.itm_pairs(
        jax.random.key(seed), jnp.asarray(z), jnp.asarray(z), jnp.asarray(z), jnp.asarray(z),
        jnp.float32(0.01)))
    assert labels.shape == (3 * BATCH,) and labels.sum() == BATCH
    assert np.all(image_idx[labels == 1] == text_idx[labels == 1])
    assert np.all(image_idx[labels == 0] != text_idx[labels == 0])
    # ALBEF's order: positives, negative images for each text, negative texts for each image.
    np.testing.assert_array_equal(text_idx[BATCH:2 * BATCH], np.arange(BATCH))
    np.testing.assert_array_equal(image_idx[2 * BATCH:], np.arange(BATCH))


def _host_state(setup, config):
  state = train.init_state(setup, config.seed)
  return jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.extra)


def test_mlm_distills_the_momentum_predictions(tokenizer, mesh1):
  # A fresh state: the momentum model equals the online one and the tiny model has no
  # dropout, so the soft targets are the online predictions themselves and the distilled MLM
  # is 0.6 * cross-entropy + 0.4 * entropy of the predictions at the chosen positions.
  config = _config("loss.alpha_ramp_steps=0", "loss.alpha=0.4")
  objective = make_objective(config, tokenizer)
  setup = train.build(config, tokenizer, mesh1, epoch_size=None)
  params, extra = _host_state(setup, config)
  batch = random_batches(config, tokenizer, 1, seed=5)[0]
  images = batch["image"].astype(np.float32) * (2.0 / 255.0) - 1.0
  rng = jax.random.key(7)
  model_batch = {"image": jnp.asarray(images), "text": jnp.asarray(batch["text"])}
  _, (m, _) = objective.loss_with_extra(params, extra, model_batch, rng)
  masked, labels = map(np.asarray, objective.mlm_inputs(jax.random.split(rng, 3)[1],
                                                        jnp.asarray(batch["text"])))
  logits = np.asarray(objective.model.apply({"params": params}, images, masked)["mlm"],
                      np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  chosen = labels >= 0
  assert chosen.sum() > 0
  hard = -np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0][chosen].mean()
  entropy = -(np.exp(logp) * logp).sum(-1)[chosen].mean()
  assert float(m["mlm_loss"]) == pytest.approx(0.6 * hard + 0.4 * entropy, rel=1e-4)
  assert float(m["alpha"]) == pytest.approx(0.4)
  # Without distillation the same step scores the hard targets only.
  plain = make_objective(_config("loss.alpha_ramp_steps=0", "loss.mlm_distill=false"),
                         tokenizer)
  _, (m_plain, _) = plain.loss_with_extra(params, extra, model_batch, rng)
  assert float(m_plain["mlm_loss"]) == pytest.approx(hard, rel=1e-4)
  assert float(m_plain["itc_loss"]) == pytest.approx(float(m["itc_loss"]), rel=1e-6)


def test_itm_scores_are_the_match_logits_of_the_forward(tokenizer, mesh1):
  config = _config()
  objective = make_objective(config, tokenizer)
  setup = train.build(config, tokenizer, mesh1, epoch_size=None)
  params, _ = _host_state(setup, config)
  batch = random_batches(config, tokenizer, 1, seed=6)[0]
  images = batch["image"].astype(np.float32) * (2.0 / 255.0) - 1.0
  want = np.asarray(objective.model.apply({"params": params}, images, batch["text"])["itm"])
  tokens = objective.encode_image_tokens(params, images)
  got = objective.itm_scores(params, tokens, batch["text"])
  np.testing.assert_allclose(np.asarray(got), want[:, 1], rtol=1e-5, atol=1e-6)


def test_loss_is_finite_and_decreases(tokenizer, mesh1):
  config = _config("optim.lr=0.003")
  batch = random_batches(config, tokenizer, 1, seed=2)[0]
  _, state, _, losses = _run(config, tokenizer, mesh1, [batch] * 6)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.5, losses
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.extra))


def test_sharded_equals_single_device(tokenizer, mesh1):
  config = _config()
  batches = random_batches(config, tokenizer, 3, seed=3)
  _, state_1, _, losses_1 = _run(config, tokenizer, mesh1, batches)
  mesh4 = sharding.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
  _, state_4, _, losses_4 = _run(config, tokenizer, mesh4, batches)
  np.testing.assert_allclose(losses_4, losses_1, rtol=1e-4)
  assert assert_trees_close((state_4.params, state_4.extra), (state_1.params, state_1.extra),
                            rtol=1e-4, atol=1e-5) > 40


def test_runs_end_to_end_with_zeroshot_and_retrieval(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config("albef", "eval.every_steps=0", "eval.max_examples.zeroshot=64",
                       "eval.max_examples.retrieval=64", "tensorboard=false")
  final = train.run(config, workdir)
  rows = metrics.read_metrics(workdir)
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  for key in ("train/itc_loss", "train/itm_loss", "train/mlm_loss", "train/temp",
              "train/itm_accuracy"):
    assert np.isfinite(train_rows[-1][key]), key
  # alpha ramps from 0 over config.loss.alpha_ramp_steps (100 in the tiny config).
  np.testing.assert_allclose([r["train/alpha"] for r in train_rows],
                             [0.4 * s / 100 for s in range(4)], rtol=1e-6)
  eval_rows = [r for r in rows if "eval/zeroshot_top1" in r]
  assert len(eval_rows) == 1 and eval_rows[0]["step"] == 4
  # Retrieval: ITC-only recalls and the ITM re-ranked ones of the 16 ITC candidates.
  assert eval_rows[0]["eval/itm_rerank_k"] == 16
  for key in ("eval/zeroshot_top1", "eval/i2t_recall@1", "eval/t2i_recall@5",
              "eval/itc_i2t_recall@1", "eval/itc_t2i_recall@10", "eval/t2i_recall@10"):
    assert 0.0 <= eval_rows[0][key] <= 1.0, key
  assert final["eval/zeroshot_examples"] == 64 and final["eval/retrieval_images"] == 64


def test_resume_is_bit_exact_with_queues(tokenizer, tmp_path):
  config = _config()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
  batches = random_batches(config, tokenizer, 4, seed=4)
  _, straight, _, _ = _run(config, tokenizer, mesh, batches)
  setup, half, _, _ = _run(config, tokenizer, mesh, batches[:2])
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), 0, 2, async_save=False)
  checkpointer.save(2, half, {})
  restored = checkpointer.restore(setup.abstract_state)
  checkpointer.close()
  assert restored is not None and restored[0] == 2
  assert int(restored[1].extra["queue_ptr"]) == 0  # two batches of 16 filled the queue of 32
  _, resumed, _, _ = _run(config, tokenizer, mesh, batches[2:], state=restored[1], setup=setup)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
