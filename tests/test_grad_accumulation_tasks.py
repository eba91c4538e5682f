"""config.grad_accum_steps=K for the fine-tuning classifiers (SNLI-VE, NLVR2, classifier VQA)
and BEiT-3 with its VQ-KD tokenizer: K micro-batches give the whole batch's losses, gradients
and parameters, and BEiT-3's random masks are drawn once for the whole batch. (The
pre-training configs, BEiT-3's pixel fallback among them: tests/test_train.py.)"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import configlib, sharding, train
from vljax.data import tokenizer as tokenizer_lib
from vljax.objectives import beit3, fusion_tasks

import train_helpers  # pylint: disable=g-bad-import-order

ROOT = train_helpers.ROOT
K = 4


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.get_tokenizer(None)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])


def _finetune_config(task, args, *overrides):
  """configs/TASK.py:init=/nonexistent,scale=tiny,ARGS (nothing is loaded: train_steps starts
  from the fresh initialisation)."""
  config = configlib.load_config_file(
      os.path.join(ROOT, "configs", f"{task}.py:init=/nonexistent,scale=tiny,{args}"))
  return configlib.apply_overrides(config, list(overrides))


def _task_batches(config, tokenizer, n):
  """n random batches with real targets: labels in range but for a few left out, all in one
  micro-batch (rows j, j + K, ... form micro-batch j), so a mean per micro-batch would weigh
  the labels differently from the whole batch's; VQA soft scores with some all-zero rows."""
  batches = train_helpers.random_batches(config, tokenizer, n, seed=7)
  rng = np.random.default_rng(7)
  for batch in batches:
    size = config.batch_size
    if "label" in batch:
      labels = rng.integers(0, len(fusion_tasks.TASKS[config.task][0]), size)
      labels[[0, K, 2 * K]] = -1  # left out of the loss and the accuracy
      batch["label"] = labels.astype(np.int32)
    else:
      scores = rng.choice([0.0, 0.3, 0.6, 0.9, 1.0], batch["answer_scores"].shape,
                          p=[0.8, 0.05, 0.05, 0.05, 0.05])
      scores[[1, 1 + K]] = 0.0  # no answer in the vocabulary
      batch["answer_scores"] = scores.astype(np.float32)
  return batches


@pytest.mark.parametrize("task,args", [
    ("snli_ve", "family=albef"),
    ("snli_ve", "family=vlmo"),  # the Multiway classifier
    ("nlvr2", "family=albef"),  # two images per example
    ("vqa", "family=beit3,num_answers=12"),  # soft-score BCE
])
def test_accumulated_steps_equal_the_whole_batch(task, args, tokenizer, mesh):
  config = _finetune_config(task, args)
  assert config.batch_size == 16  # K = 4 micro-batches of 4, one row per device each
  batches = _task_batches(config, tokenizer, 2)
  # One initialisation for both runs (compiling it twice would double the test's time).
  start = train.init_state(train.build(config, tokenizer, mesh, epoch_size=None), config.seed)
  accumulated = _finetune_config(task, args, f"grad_accum_steps={K}")
  losses_k, state_k, _ = train_helpers.train_steps(accumulated, tokenizer, mesh, batches,
                                                   jax.tree.map(jnp.copy, start))
  losses_1, state_1, _ = train_helpers.train_steps(config, tokenizer, mesh, batches, start)
  assert losses_1[0] != losses_1[1]  # the parameters really moved
  np.testing.assert_allclose(losses_k, losses_1, rtol=2e-5)
  assert train_helpers.assert_trees_close(state_k.params, state_1.params, rtol=2e-4,
                                          atol=2e-6) > 10


class _ShowsMasks(beit3.Beit3Objective):
  """BEiT-3 whose embeddings also carry the masks each example was embedded with, handed out
  as a metric (in the batch's row order, merged back from the micro-batches)."""

  def embed(self, params, batch, rng):
    seen = jax.tree.map(lambda x: x.astype(jnp.float32), batch["masks"])
    return {**super().embed(params, batch, rng), "seen": seen}

  def loss_from_embeddings(self, params, embeddings, rng):
    embeddings = dict(embeddings)
    seen = embeddings.pop("seen")
    loss, metrics = super().loss_from_embeddings(params, embeddings, rng)
    return loss, {**metrics, "seen": seen}


def test_beit3_masks_and_gradient_do_not_depend_on_accumulation(tokenizer, mesh, tmp_path):
  # With VQ-KD codes as targets (frozen, computed per micro-batch): the masks every example is
  # embedded with, every term's loss and accuracy, and the gradient are those of one pass.
  vqkd_dir, _ = train_helpers.export_tiny_run("vqkd", tokenizer, str(tmp_path),
                                              args="teacher=/unused")
  config = train_helpers.tiny_config("beit3", args=f"tokenizer={vqkd_dir}")
  setup = train.build(config, tokenizer, mesh, epoch_size=None,
                      objective=_ShowsMasks(config, tokenizer))
  objective = setup.objective
  params = train.init_state(setup, config.seed).params
  rng = jax.random.key(11)

  @jax.jit
  def loss_and_grads(params, batch):
    batch = train.model_inputs(batch, setup.batch_fields, setup.image_options)
    whole = train.value_and_trainable_grad(objective.loss_fn, params, setup.frozen, batch, rng)
    split = train.accumulated_value_and_grad(objective, params, setup.frozen, batch, rng, K,
                                             mesh)
    return whole, split, objective.masks(jax.random.split(rng)[0], batch)

  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    batch = train_helpers.random_batches(config, tokenizer, 1, seed=3)[0]
    placed = sharding.global_batch_from_host(batch, mesh, setup.batch_shardings)
    ((loss_1, metrics_1), grads_1), ((loss_k, metrics_k), grads_k), masks = loss_and_grads(
        params, placed)
  for name, mask in masks.items():  # the masks of loss_fn, in one batch or in K
    np.testing.assert_array_equal(metrics_1["seen"][name], np.asarray(mask, np.float32))
    np.testing.assert_array_equal(metrics_k["seen"][name], metrics_1["seen"][name])
  assert {f"{t}_accuracy" for t in beit3.TERMS} <= set(metrics_1)
  for name in metrics_1:
    if name != "seen":
      np.testing.assert_allclose(metrics_k[name], metrics_1[name], rtol=2e-5, err_msg=name)
  np.testing.assert_allclose(loss_k, loss_1, rtol=2e-5)
  assert train_helpers.assert_trees_close(grads_k, grads_1, rtol=2e-4, atol=1e-6) > 10
  # The frozen tokenizer gets no gradient in either.
  tokenizer_grads = [g for p, g in train_helpers.named_arrays(grads_k).items()
                     if p.startswith("tokenizer/")]
  assert tokenizer_grads and not any(np.any(g) for g in tokenizer_grads)
