"""VLMo's Multiway transformer and objective: routing of each token through its modality's
expert with one shared attention, and the ITC / ITM / MLM losses against independent numpy
recomputations. (Sharded == single device, the end-to-end run with zero-shot and re-ranked
retrieval run with every config in test_train.py; resume is checked here.)"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import train
from vljax.data import tokenizer as tokenizer_lib
from vljax.models import multiway, vlmo
from vljax.objectives import make_objective

from train_helpers import check_resume_is_bit_exact, named_arrays, random_batches, tiny_config

W, HEADS, DEPTH, VL = 16, 2, 3, 1
MW = dict(vocab_size=40, max_len=6, image_size=16, patch_size=8, width=W, depth=DEPTH,
          mlp_dim=32, num_heads=HEADS, vl_depth=VL, pad_id=0)
IMAGES = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
TOKENS = np.array([[5, 6, 7, 1, 0, 0], [8, 1, 0, 0, 0, 0], [9, 10, 11, 12, 13, 1]], np.int32)


@pytest.fixture(scope="module")
def mw_params():
  model = multiway.Multiway(**MW)
  return nn.meta.unbox(model.init(jax.random.key(1), IMAGES, TOKENS))["params"]


def _perturbed(params, block, name):
  """params with every leaf of block_{block}/{name} shifted."""
  def shift(path, x):
    keys = [getattr(k, "key", None) for k in path]
    return x + 0.5 if keys[:2] == [f"block_{block}", name] else x
  return jax.tree_util.tree_map_with_path(shift, params)


def test_one_shared_attention_and_an_expert_per_modality(mw_params):
  for i in range(DEPTH):
    block = mw_params[f"block_{i}"]
    top = i >= DEPTH - VL
    assert set(block) == ({"LayerNorm_0", "MultiHeadAttention_0", "ln_v", "ffn_v", "ln_l",
                           "ffn_l", "gamma_1", "gamma_2"} | ({"ln_vl", "ffn_vl"} if top else set()))
    np.testing.assert_array_equal(block["gamma_1"], np.full(W, 0.1, np.float32))


def _modes(params):
  model = multiway.Multiway(**MW)
  out = model.apply({"params": params}, IMAGES, TOKENS)
  return {k: np.asarray(v) for k, v in out.items()}


def test_each_mode_uses_only_its_experts(mw_params):
  base = _modes(mw_params)
  changed = lambda block, name: {k: not np.allclose(v, base[k], atol=1e-6)
                                 for k, v in _modes(_perturbed(mw_params, block, name)).items()}
  top, bottom = DEPTH - 1, 0
  # image mode: V experts in every block; text mode: L experts; neither touches VL.
  assert changed(bottom, "ffn_v") == {"image": True, "text": False, "fused": True}
  assert changed(bottom, "ffn_l") == {"image": False, "text": True, "fused": True}
  assert changed(top, "ffn_v") == {"image": True, "text": False, "fused": False}
  assert changed(top, "ffn_l") == {"image": False, "text": True, "fused": False}
  assert changed(top, "ffn_vl") == {"image": False, "text": False, "fused": True}
  # The attention is shared by every mode.
  assert changed(bottom, "MultiHeadAttention_0") == {"image": True, "text": True, "fused": True}


def test_fused_routing_is_per_token_and_static(mw_params):
  # A bottom block on [text ++ image] equals, token by token, the text-route block on the text
  # positions and the image-route block on the image positions of the SAME sequence (the
  # attention sees the whole sequence either way): each token went through its own expert.
  block = multiway.MultiwayBlock(32, HEADS, with_vl=False)
  p = mw_params["block_0"]
  x = jax.random.normal(jax.random.key(2), (3, 7 + 5, W))
  mask = multiway.padding_mask(jnp.ones((3, 12), bool))
  run = lambda route: np.asarray(block.apply({"params": p}, x, mask, route, 7))
  fused, text, image = run("fused"), run("text"), run("image")
  is_text = (np.arange(12) < 7)[None, :, None]
  np.testing.assert_allclose(fused, np.where(is_text, text, image), rtol=1e-6, atol=1e-6)
  assert not np.allclose(text, image)


def test_padding_is_masked_in_text_and_fused_modes(mw_params):
  # Pad keys are masked out: a caption padded to 6 tokens gives its real positions and every
  # image position the states of the same caption without padding.
  model = multiway.Multiway(**MW)
  embeds = model.apply({"params": mw_params}, IMAGES[1:2], method=multiway.Multiway.embed_image)
  run = lambda method, *a: np.asarray(model.apply({"params": mw_params}, *a, method=method))
  padded, short = TOKENS[1:2], TOKENS[1:2, :2]  # [8, EOS, pad x 4] and [8, EOS]
  fused_padded = run(multiway.Multiway.fused, embeds, padded)
  fused_short = run(multiway.Multiway.fused, embeds, short)
  np.testing.assert_allclose(fused_padded[:, :3], fused_short[:, :3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fused_padded[:, 7:], fused_short[:, 3:], rtol=1e-5, atol=1e-5)
  text = lambda t: np.asarray(model.apply({"params": mw_params}, t,
                                          method=multiway.Multiway.text)[0])
  text_padded, text_short = text(padded), text(short)
  np.testing.assert_allclose(text_padded[:, :3], text_short[:, :3], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.get_tokenizer(None)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_losses_match_numpy(tokenizer):
  config = tiny_config("vlmo")
  objective = make_objective(config, tokenizer)
  batch = random_batches(config, tokenizer, 1, seed=3)[0]
  images = batch["image"].astype(np.float32) * (2.0 / 255.0) - 1.0
  params = nn.meta.unbox(objective.init(jax.random.key(0), {"image": images,
                                                            "text": batch["text"]}))
  rng = jax.random.key(4)
  _, m = objective.loss_fn(params, {"image": jnp.asarray(images),
                                    "text": jnp.asarray(batch["text"])}, rng)
  apply = lambda method, *a: np.asarray(objective.model.apply({"params": params}, *a,
                                                              method=method), np.float64)
  zimg, ztxt = apply(vlmo.Vlmo.encode_image, images), apply(vlmo.Vlmo.encode_text, batch["text"])
  scale = float(np.exp(params["logit_scale"]))
  logits = scale * zimg @ ztxt.T
  eye = np.arange(len(zimg))
  itc = -(_log_softmax(logits)[eye, eye].mean() + _log_softmax(logits.T)[eye, eye].mean()) / 2
  assert float(m["itc_loss"]) == pytest.approx(itc, rel=1e-5)
  assert float(m["scale"]) == pytest.approx(1 / 0.07, rel=1e-6)
  # MLM: the masked caption fused with its own image, CE at the chosen positions.
  masked, labels = map(np.asarray, objective.mlm_inputs(jax.random.split(rng, 3)[1],
                                                        jnp.asarray(batch["text"])))
  embeds = apply(vlmo.Vlmo.embed_image, images).astype(np.float32)
  mlm_logits = apply(vlmo.Vlmo.mlm_logits, embeds, masked)
  chosen = labels >= 0
  assert chosen.sum() > 0
  ce = -np.take_along_axis(_log_softmax(mlm_logits), np.maximum(labels, 0)[..., None], -1)
  assert float(m["mlm_loss"]) == pytest.approx(ce[..., 0][chosen].mean(), rel=1e-5)
  # ITM: the 3N pairs; positives are the batch's own pairs, the head sees the fused [CLS].
  assert 0.0 <= float(m["itm_accuracy"]) <= 1.0 and np.isfinite(float(m["itm_loss"]))
  scores = objective.itm_scores(params, jnp.asarray(embeds), jnp.asarray(batch["text"]))
  want = apply(vlmo.Vlmo.itm_logits, embeds, batch["text"])[:, 1]
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-5, atol=1e-6)


def test_loss_decreases(tokenizer):
  from vljax import sharding  # pylint: disable=g-import-not-at-top
  from train_helpers import train_steps  # pylint: disable=g-import-not-at-top
  config = tiny_config("vlmo", "optim.lr=0.003", "optim.warmup_steps=0")
  batch = random_batches(config, tokenizer, 1, seed=2)[0]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  losses, _, _ = train_steps(config, tokenizer, mesh, [batch] * 6)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("stage", ["image", "text"])
def test_unimodal_stages_accumulate_exactly(stage, tokenizer):
  """Four micro-batches give the whole batch's steps: the masks are drawn once for the whole
  batch and the masked-prediction means run over all of its masked positions (the image-text
  stage: tests/test_train.py)."""
  from vljax import sharding  # pylint: disable=g-import-not-at-top
  from train_helpers import assert_trees_close, train_steps  # pylint: disable=g-import-not-at-top
  overrides = [f"loss.stage={stage}", "optim.freeze=[]"]
  config = tiny_config("vlmo", *overrides)
  batches = random_batches(config, tokenizer, 2, seed=5)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
  start = train.init_state(train.build(config, tokenizer, mesh, epoch_size=None), config.seed)
  losses_4, state_4, _ = train_steps(tiny_config("vlmo", *overrides, "grad_accum_steps=4"),
                                     tokenizer, mesh, batches, jax.tree.map(jnp.copy, start))
  losses_1, state_1, _ = train_steps(config, tokenizer, mesh, batches, start)
  np.testing.assert_allclose(losses_4, losses_1, rtol=2e-5)
  assert assert_trees_close(state_4.params, state_1.params, rtol=2e-4, atol=2e-6) > 10


# ------------------------------------------------------------------ the unimodal stages

def test_blockwise_masks_have_the_ratio_and_come_in_blocks():
  from vljax.losses import masked_modeling as mm  # pylint: disable=g-import-not-at-top
  assert mm.num_masked_patches(196) == 78 and mm.num_masked_patches(16) == 6
  masks = np.asarray(jax.jit(jax.vmap(lambda k: mm.blockwise_patch_mask(k, (14, 14), 75)))(
      jax.random.split(jax.random.key(0), 300)))
  assert masks.shape == (300, 196) and np.all(masks.sum(1) == 75)  # BEiT: 75 of 196
  # Blocks, not scattered patches: few 4-connected components per mask.
  def components(mask):
    grid, seen, count = mask.reshape(14, 14), set(), 0
    for start in zip(*np.nonzero(grid)):
      if start in seen:
        continue
      count, stack = count + 1, [start]
      while stack:
        r, c = stack.pop()
        if (r, c) in seen or not (0 <= r < 14 and 0 <= c < 14) or not grid[r, c]:
          continue
        seen.add((r, c))
        stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return count
  assert np.mean([components(m) for m in masks[:50]]) < 8
  # Every position gets masked sometimes (blocks at uniform positions cover the corners least,
  # as BEiT's do: here 3% in a corner, 76% at the centre), and none always.
  freq = masks.mean(0)
  assert freq.min() > 0.01 and freq.max() < 0.9
  # A 4 x 4 grid (the laptop images) still gets exactly its 40%; the same key, the same mask.
  small = mm.blockwise_patch_mask(jax.random.key(3), (4, 4), 6)
  assert int(small.sum()) == 6
  np.testing.assert_array_equal(small, mm.blockwise_patch_mask(jax.random.key(3), (4, 4), 6))


def test_patch_targets_and_masked_loss_match_numpy():
  from vljax.losses import masked_modeling as mm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  want = np.zeros((2, 4, 8 * 8 * 3))
  for b in range(2):
    for i in range(2):
      for j in range(2):
        patch = images[b, 8 * i:8 * i + 8, 8 * j:8 * j + 8].reshape(-1).astype(np.float64)
        want[b, 2 * i + j] = (patch - patch.mean()) / np.sqrt(patch.var() + 1e-6)
  got = np.asarray(mm.patch_pixel_targets(jnp.asarray(images), 8))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  pred = rng.normal(size=want.shape)
  mask = np.array([[True, False, True, False], [False, False, False, True]])
  loss = float(mm.masked_patch_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(got),
                                    jnp.asarray(mask)))
  assert loss == pytest.approx(np.mean([((pred[b, n] - want[b, n]) ** 2).mean()
                                        for b, n in zip(*np.nonzero(mask))]), rel=1e-4)


@pytest.mark.parametrize("stage", ["image", "text", "image_text"])
def test_each_stage_decays_and_updates_only_what_it_trains(stage, tokenizer):
  # A parameter the stage's loss does not reach must not decay (wd_mults 0) or be frozen
  # (else the decoupled decay would shrink it all stage long); one it reaches must decay as
  # usual, except the attention and V experts the text stage freezes on purpose.
  import re  # pylint: disable=g-import-not-at-top
  from vljax import configlib, optim  # pylint: disable=g-import-not-at-top
  init = "" if stage == "image" else ",init=/some/run"
  config = configlib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                   f"vlmo.py:scale=tiny,stage={stage}{init}"))
  objective = make_objective(config, tokenizer)
  batch = random_batches(config, tokenizer, 1, seed=1)[0]
  images = jnp.asarray(batch["image"].astype(np.float32) * (2.0 / 255.0) - 1.0)
  model_batch = {"image": images, "text": jnp.asarray(batch["text"])}
  params = nn.meta.unbox(objective.init(jax.random.key(0), model_batch))
  grads = jax.grad(lambda p: objective.loss_fn(p, model_batch, jax.random.key(1))[0])(params)

  def decay(name):  # the first matching wd_mults rule, as vljax.optim applies them
    return next((m for rule, m in config.optim.wd_mults if re.search(rule, name)), 0.0)

  checked = 0
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = optim.param_path(path)
    if "key/bias" in name:
      continue  # softmax is invariant to a bias shared by every key: always a zero gradient
    frozen = any(re.search(rule, name) for rule in config.optim.freeze)
    reached = bool(np.any(np.asarray(g)))
    if not reached:
      assert frozen or decay(name) == 0.0, (stage, name)
    elif name.endswith("kernel"):
      on_purpose = stage == "text" and re.search(r"/(MultiHeadAttention_0|ffn_v)/", name)
      assert frozen == bool(on_purpose) and decay(name) == 1.0, (stage, name)
      checked += 1
  assert checked > 10


def test_resume_is_bit_exact(tmp_path):
  """VLMo (its ITM negatives mined from the batch's similarities) resumes from a checkpoint to
  the same bits as an uninterrupted run."""
  check_resume_is_bit_exact(tiny_config("vlmo"), str(tmp_path))


def test_scanned_fine_tuning_loads_an_unrolled_run_with_layer_decay(tmp_path, tokenizer):
  """NLVR2 on a scanned Multiway stack from an unrolled VLMo export: the layouts convert, the
  classifier's init mapping leaves out the top blocks' V / L experts in the scanned names too,
  and the layer-decay rules (written for unrolled blocks) build the optimizer."""
  from vljax import checkpoint, configlib, init_weights, optim, sharding  # pylint: disable=g-import-not-at-top
  from vljax.models import stacks  # pylint: disable=g-import-not-at-top
  config = tiny_config("vlmo")
  objective = make_objective(config, tokenizer)
  batch = random_batches(config, tokenizer, 1, seed=1)[0]
  images = jnp.asarray(batch["image"].astype(np.float32) * (2.0 / 255.0) - 1.0)
  source = nn.meta.unbox(jax.jit(objective.init)(
      jax.random.key(0), {"image": images, "text": jnp.asarray(batch["text"])}))
  checkpoint.export_params(str(tmp_path), source, config.to_json())
  finetune = configlib.load_config_file(os.path.join(
      os.path.dirname(__file__), "..", "configs",
      f"nlvr2.py:init={tmp_path / 'export'},family=vlmo,scale=tiny,layer_decay=0.5"))
  finetune = configlib.apply_overrides(finetune, ["layers.scan=true"])
  setup = train.build(finetune, tokenizer,
                      sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]), epoch_size=None)
  params = train.init_state(setup, seed=0).params
  _, names = init_weights.load_initial_params(finetune.init, params, log=lambda _: None)
  stacked = named_arrays(stacks.stack_layers(jax.tree.map(np.asarray, source)))
  assert "mw/vlblock/ffn_vl/Dense_0/kernel" in names and "mw/block/ffn_v/Dense_0/kernel" in names
  assert "mw/vlblock/ffn_v/Dense_0/kernel" in stacked  # in the source, not in the classifier
  assert not any(n.startswith(("mw/vlblock/ffn_v/", "mw/vlblock/ln_l/")) for n in names)
  assert all(n.startswith(("mw/", "pooler/")) for n in names)
  # Block k of the tiny depth-2 stack learns at 0.5 ** (2 - k): per layer along the depth axis.
  mults = optim._lr_multipliers(finetune.optim, params)  # pylint: disable=protected-access
  assert mults["mw/block/ffn_v/Dense_0/kernel"] == 0.25  # the one bottom block
  assert mults["mw/vlblock/ffn_vl/Dense_0/kernel"] == 0.5  # the one top block
