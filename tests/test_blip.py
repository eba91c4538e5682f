"""BLIP: real weight sharing in MED, the label-smoothed LM loss, a causal decoder, KV-cached
generation against full forward passes, special tokens outside the LM head, and the objective
through the one train step (momentum EMA, queues, alpha ramp, decreasing loss, data 2 x fsdp 2
equals one device)."""
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import configlib, sharding, train
from vljax.data import tokenizer as tokenizer_lib
from vljax.models import blip
from vljax.objectives import make_objective

from train_helpers import (assert_trees_close, greedy_by_full_passes, random_batches,
                           tiny_config)

MOMENTUM, ALPHA, RAMP = 0.995, 0.4, 2
BATCH, QUEUE, MAX_LEN = 16, 32, 8
STEPS = 5


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.get_tokenizer(None)


@pytest.fixture(scope="module")
def objective(tokenizer):
  return make_objective(tiny_config("blip"), tokenizer)


@pytest.fixture(scope="module")
def params(objective):
  images = jnp.zeros((2, 16, 16, 3), jnp.float32)
  tokens = jnp.ones((2, MAX_LEN), jnp.int32)
  # Jitted: compiling the init is faster than running it op by op.
  init = jax.jit(objective.init)
  return flax.core.meta.unbox(init(jax.random.key(0), {"image": images, "text": tokens}))


@pytest.fixture(scope="module")
def inputs(tokenizer):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  tokens = rng.integers(3, tokenizer.vocab_size, (4, MAX_LEN)).astype(np.int32)
  tokens[0, 5:] = [tokenizer.eos_id, tokenizer.pad_id, tokenizer.pad_id]
  tokens[1, 7] = tokenizer.eos_id
  return images, jnp.asarray(tokens)


@pytest.fixture(scope="module")
def outputs(objective):
  """Jitted (unimodal ztxt, ITM logits, LM logits) of (params, images, tokens)."""
  model = objective.model

  @jax.jit
  def run(params, images, tokens):
    image_tokens, _ = model.apply({"params": params}, images, method=blip.Blip.encode_image)
    _, ztxt = model.apply({"params": params}, tokens, method=blip.Blip.encode_text)
    itm = model.apply({"params": params}, image_tokens, tokens, method=blip.Blip.itm_logits)
    lm = model.apply({"params": params}, image_tokens, tokens, method=blip.Blip.lm_logits)
    return ztxt, itm, lm

  return run


def _paths(params):
  return set(flax.traverse_util.flatten_dict(params, sep="/"))


def _perturbed(params, prefix, seed=1):
  """params with every leaf under `prefix` moved by a random normal step of size 0.5."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  keys = [k for k in flat if k.startswith(prefix)]
  assert keys, prefix
  rng = np.random.default_rng(seed)
  for k in keys:
    flat[k] = flat[k] + 0.5 * jnp.asarray(rng.normal(size=flat[k].shape), flat[k].dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------- (a) sharing


def test_shared_weights_exist_once_in_the_tree(params, tokenizer):
  txt = params["txt"]
  assert set(txt) == {"embedding", "pos_embedding", "textblock_0", "norm"}
  assert set(txt["textblock_0"]) == {"enc_attn", "dec_attn", "cross_norm", "cross_attn",
                                     "mlp_norm", "mlp"}
  # One set of text weights: the parameter count is exactly one embedding table, one position
  # table, and per layer two self-attentions (encoder, decoder), one cross-attention, one MLP
  # and their LayerNorms, plus the final LayerNorm. A decoder with its own copy of anything
  # else would add to it.
  w, mlp, vocab = 32, 64, tokenizer.vocab_size
  wi = params["img"]["Transformer"]["encoder_norm"]["scale"].shape[0]
  attn = lambda kv: 2 * (w * w + w) + 2 * (kv * w + w)  # query, out; key, value
  layer = 2 * (attn(w) + 2 * w) + attn(wi) + 2 * w + (w * mlp + mlp + mlp * w + w) + 2 * w
  expected = (vocab + blip.NUM_SPECIAL) * w + (MAX_LEN + 1) * w + layer + 2 * w
  assert sum(x.size for x in jax.tree.leaves(txt)) == expected
  # Heads: one LM head (vocab_size ids), one ITM head, no other text-side weights.
  assert set(params) == {"img", "txt", "img_proj", "txt_proj", "itm_head", "lm_head", "temp"}
  # The momentum model holds the unimodal path only.
  momentum = _paths(blip.momentum_params(params))
  assert not any(s in p for p in momentum for s in ("dec_attn", "cross_", "_head"))
  assert any("enc_attn" in p for p in momentum) and any("mlp/" in p for p in momentum)


@pytest.mark.parametrize("prefix, text, itm, lm", [
    ("txt/textblock_0/mlp/", True, True, True),
    ("txt/embedding", True, True, True),
    ("txt/textblock_0/cross_attn/", False, True, True),
    ("txt/textblock_0/dec_attn/", False, False, True),
    ("txt/textblock_0/enc_attn/", True, True, False),
])
def test_a_change_to_a_weight_reaches_exactly_the_modes_that_share_it(
    prefix, text, itm, lm, params, inputs, outputs):
  images, tokens = inputs
  before = outputs(params, images, tokens)
  after = outputs(_perturbed(params, prefix), images, tokens)
  for name, changes, a, b in zip(("text", "itm", "lm"), (text, itm, lm), before, after):
    diff = float(jnp.max(jnp.abs(a - b)))
    if changes:
      assert diff > 1e-4, (prefix, name, diff)
    else:
      assert diff == 0.0, (prefix, name, diff)


# ----------------------------------------------------------------------------- (b) LM loss


def _numpy_lm_loss(logits, tokens, pad_id, eos_id, eps):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  total, count = 0.0, 0
  for b in range(tokens.shape[0]):
    for p in range(tokens.shape[1]):
      y = int(tokens[b, p])
      if y == pad_id:
        continue
      total += -(1 - eps) * logp[b, p, y] - eps * logp[b, p].mean()
      count += 1
      if y == eos_id:
        break
  return total / count


def test_lm_loss_label_smoothing_values_and_gradient(objective, tokenizer, inputs):
  _, tokens = inputs
  tokens = np.asarray(tokens)
  vocab = tokenizer.vocab_size
  logits = jnp.asarray(np.random.default_rng(1).normal(size=tokens.shape + (vocab,)) * 3,
                       jnp.float32)
  assert objective.label_smoothing == 0.1
  loss, _ = objective.lm_loss(logits, jnp.asarray(tokens))
  want = _numpy_lm_loss(logits, tokens, tokenizer.pad_id, tokenizer.eos_id, 0.1)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # Without smoothing the loss is larger on the target and smaller elsewhere: not the same.
  assert abs(_numpy_lm_loss(logits, tokens, tokenizer.pad_id, tokenizer.eos_id, 0.0)
             - want) > 1e-3
  # Gradient: (softmax - smoothed one-hot) / (number of scored tokens) at scored positions,
  # zero at pad and after EOS.
  grad = np.asarray(jax.grad(lambda x: objective.lm_loss(x, jnp.asarray(tokens))[0])(logits))
  scored = np.zeros(tokens.shape, bool)
  for b in range(tokens.shape[0]):
    for p in range(tokens.shape[1]):
      if tokens[b, p] == tokenizer.pad_id:
        continue
      scored[b, p] = True
      if tokens[b, p] == tokenizer.eos_id:
        break
  x = np.asarray(logits, np.float64)
  probs = np.exp(x - x.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  target = 0.9 * np.eye(vocab)[tokens] + 0.1 / vocab
  want_grad = (probs - target) * scored[..., None] / scored.sum()
  np.testing.assert_allclose(grad, want_grad, atol=1e-6)
  assert not scored[0, 6:].any() and scored[0, 5]  # EOS scored, pad not


# ----------------------------------------------------------------------------- (c) causality


def test_decoder_is_causal_and_encoder_is_not(params, inputs, outputs, tokenizer):
  images, tokens = inputs
  _, itm, lm = outputs(params, images, tokens)
  t = 3
  changed = tokens.at[:, t:].set((tokens[:, t:] + 7) % tokenizer.vocab_size)
  changed = jnp.where(changed < 3, 3, changed)
  _, itm2, lm2 = outputs(params, images, changed)
  # logits[:, p] sees [DEC] and tokens[:, :p]: positions 0..t are untouched by tokens t..
  np.testing.assert_array_equal(np.asarray(lm[:, :t + 1]), np.asarray(lm2[:, :t + 1]))
  assert float(jnp.max(jnp.abs(lm[:, t + 1:] - lm2[:, t + 1:]))) > 1e-4
  assert float(jnp.max(jnp.abs(itm - itm2))) > 1e-5  # bidirectional: [ENC] sees every token


# ----------------------------------------------------------------------------- (d) decoding


def test_generate_with_the_cache_equals_repeated_full_forward_passes(objective, params, inputs,
                                                                     tokenizer):
  images, _ = inputs
  model = objective.model
  pad, eos = tokenizer.pad_id, tokenizer.eos_id

  @jax.jit
  def full_logits(params, image_tokens, seq):
    return model.apply({"params": params}, image_tokens, seq, method=blip.Blip.lm_logits)

  def reference(params):
    image_tokens = objective.encode_image_tokens(params, images)
    full = lambda seq: full_logits(params, image_tokens, jnp.asarray(seq))
    return greedy_by_full_passes(full, images.shape[0], MAX_LEN, pad, eos)

  # Raise the EOS bias until some rows (not all) end before max_len, so that EOS and the
  # padding after it are exercised too.
  seen_eos_mid = False
  for shift in (0.0, 1.0, 2.0, 3.0, 4.0, 6.0):
    shifted = jax.tree.map(lambda x: x, params)
    shifted["lm_head"] = dict(params["lm_head"],
                              bias=params["lm_head"]["bias"].at[eos].add(shift))
    got = np.asarray(objective.generate(shifted, images, MAX_LEN))
    np.testing.assert_array_equal(got, reference(shifted), err_msg=f"eos shift {shift}")
    ended = (got == eos).any(1)
    seen_eos_mid |= bool(ended.any() and (got[:, -1] == pad).any())
  assert seen_eos_mid


# ----------------------------------------------------------------------------- (e) specials


def test_special_tokens_are_embedding_rows_the_lm_head_cannot_produce(objective, params,
                                                                      inputs, outputs,
                                                                      tokenizer):
  vocab = tokenizer.vocab_size
  ids = blip.special_ids(vocab)
  rows = params["txt"]["embedding"]["embedding"].shape[0]
  assert sorted(ids.values()) == list(range(vocab, vocab + 3)) and rows == vocab + 3
  assert all(vocab <= i < rows for i in ids.values())
  images, tokens = inputs
  _, _, lm = outputs(params, images, tokens)
  assert lm.shape == tokens.shape + (vocab,)
  assert params["lm_head"]["kernel"].shape[-1] == vocab
  generated = np.asarray(objective.generate(params, images, MAX_LEN))
  assert generated.max() < vocab and generated.min() >= 0


# ----------------------------------------------------------------------------- (f), (g) steps


def _train(config, tokenizer, mesh, batches):
  """(losses, metrics, final state, setup, host params before each step) of the train step."""
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  state = train.init_state(setup, config.seed)
  step = train.make_train_step(setup)
  losses, rows, history = [], [], []
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for batch in batches:
      history.append(jax.tree.map(np.asarray, state.params))
      state, m = step(state, sharding.global_batch_from_host(batch, mesh, setup.batch_shardings),
                      jax.random.key(1))
      rows.append({k: float(v) for k, v in m.items()})
      losses.append(rows[-1]["train/loss"])
  return losses, rows, state, setup, history


@pytest.fixture(scope="module")
def runs(tokenizer):
  """The same batch STEPS times (the loss must fall) at lr 3e-3, on one device and on data 2 x
  fsdp 2: (batch, {'one': ..., 'four': ...} of _train's results)."""
  config = tiny_config("blip", "optim.warmup_steps=0", "optim.lr=0.003")
  batch = random_batches(config, tokenizer, 1, seed=2)[0]
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  four = sharding.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
  return batch, {"one": _train(config, tokenizer, one, [batch] * STEPS),
                 "four": _train(config, tokenizer, four, [batch] * STEPS)}


def test_config_sizes():
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "blip.py")
  tiny = configlib.load_config_file(path + ":scale=tiny")
  assert (tiny.batch_size, tiny.loss.queue_size, tiny.data.max_len) == (BATCH, QUEUE, MAX_LEN)
  assert tiny.loss.alpha_ramp_steps == RAMP and tiny.total_steps == 4
  paper = configlib.load_config_file(path + ":scale=paper")
  assert paper.loss.queue_size == 57_600 and paper.batch_size == 2880
  assert paper.model.text.depth == 12 and paper.model.text.width == 768
  assert paper.model.embed_dim == 256 and paper.data.image_size == 224
  assert paper.model.image.variant == "B/16" and paper.optim.lr == 3e-4
  assert paper.optim.wd == pytest.approx(0.05 * 3e-4)
  assert paper.total_steps == 20 * (14_000_000 // 2880)
  assert paper.loss.alpha_ramp_steps == 2 * (14_000_000 // 2880)
  assert (paper.loss.momentum, paper.loss.alpha, paper.loss.label_smoothing,
          paper.model.temperature_init) == (0.995, 0.4, 0.1, 0.07)


def test_train_steps_decrease_the_loss_and_update_momentum_and_queues(runs):
  batch, results = runs
  losses, rows, state, setup, history = results["one"]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.3, losses
  for key in ("itc_loss", "itm_loss", "lm_loss", "temp", "scale", "itm_accuracy"):
    assert np.isfinite(rows[-1][f"train/{key}"]), key
  # alpha ramps over RAMP steps from the step counter in the extra state.
  np.testing.assert_allclose([r["train/alpha"] for r in rows],
                             [ALPHA * min(1, k / RAMP) for k in range(STEPS)], rtol=1e-6)
  extra = state.extra
  assert int(extra["step"]) == STEPS
  assert int(extra["queue_ptr"]) == (STEPS * BATCH) % QUEUE
  # The momentum copy: an EMA (MOMENTUM) of the unimodal subtree of the params AFTER each
  # update, starting from a copy of the initial params.
  subset = [blip.momentum_params(p) for p in history + [jax.tree.map(np.asarray, state.params)]]
  ema = [subset[0]]
  for params in subset[1:]:
    ema.append(jax.tree.map(lambda e, p: MOMENTUM * e + (1 - MOMENTUM) * p, ema[-1], params))
  assert _paths(extra["momentum"]) == _paths(ema[-1])
  for got, want in zip(jax.tree.leaves(extra["momentum"]), jax.tree.leaves(ema[-1])):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # Queues: step k wrote the momentum features of its batch under ema[k] (the momentum params
  # before its update) at rows [k BATCH mod QUEUE, + BATCH); the last two steps fill the queue.
  features = jax.jit(setup.objective.momentum_features)
  images = jnp.asarray(batch["image"], jnp.float32) * (2.0 / 255.0) - 1.0  # default range
  for k in (STEPS - 2, STEPS - 1):
    feats = features(ema[k], {"image": images, "text": jnp.asarray(batch["text"])})
    rows_k = slice((k * BATCH) % QUEUE, (k * BATCH) % QUEUE + BATCH)
    np.testing.assert_allclose(np.asarray(extra["image_queue"])[rows_k],
                               np.asarray(feats["image_feat_m"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(extra["text_queue"])[rows_k],
                               np.asarray(feats["text_feat_m"]), rtol=1e-4, atol=1e-5)


def test_alpha_ramps_from_zero(objective):
  assert objective.alpha_ramp_steps == RAMP
  assert float(objective.alpha(jnp.int32(0))) == 0.0
  assert float(objective.alpha(jnp.int32(1))) == pytest.approx(ALPHA / RAMP)
  assert float(objective.alpha(jnp.int32(RAMP + 3))) == pytest.approx(ALPHA)


def test_sharded_equals_single_device(runs):
  _, results = runs
  losses_1, _, state_1, _, _ = results["one"]
  losses_4, _, state_4, _, _ = results["four"]
  np.testing.assert_allclose(losses_4, losses_1, rtol=1e-4)
  assert losses_1[0] != losses_1[-1]
  assert assert_trees_close((state_4.params, state_4.extra), (state_1.params, state_1.extra),
                            rtol=2e-4, atol=2e-5) > 40
