"""Tests for vljax.losses.fusion (ALBEF/BLIP): float64 references, sharded == dense, statistics."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vljax.data.tokenizer import EOS_ID, PAD_ID
from vljax.losses import fusion, softmax_loss

N, D, Q = 32, 8, 64
TEMP, ALPHA = 0.1, 0.4
RTOL = 1e-5

# (mesh shape, axis names, axis type, under jit with batch-sharded inputs)
MESHES = [
    ((8,), ("data",), AxisType.Explicit, False),
    ((2, 4), ("data", "fsdp"), AxisType.Auto, True),
]
MESH_IDS = ["data8-explicit-eager", "data2xfsdp4-auto-jit"]


def _mesh(shape, names, axis_type):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape),
                       devices=jax.devices()[:int(np.prod(shape))])


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _close(actual, expected, rtol=RTOL):
  """Relative closeness, measured against the largest magnitude of the expected array."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  denom = max(np.max(np.abs(expected)), 1e-12)
  return np.max(np.abs(actual - expected)) / denom <= rtol


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x):
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# ITC with momentum distillation.
# ---------------------------------------------------------------------------------------------


def _itc_inputs(n=N, d=D, q=Q, seed=0):
  """Online features, momentum features near them (an EMA model is close), random queues."""
  rng = np.random.default_rng(seed)
  zi = _unit(rng.normal(size=(n, d)))
  zt = _unit(zi + 0.8 * rng.normal(size=(n, d)))
  zi_m = _unit(zi + 0.3 * rng.normal(size=(n, d)))
  zt_m = _unit(zt + 0.3 * rng.normal(size=(n, d)))
  qi = _unit(rng.normal(size=(q, d)))
  qt = _unit(rng.normal(size=(q, d)))
  return zi, zt, zi_m, zt_m, qi, qt


def ref_itc(zi, zt, zi_m, zt_m, qi, qt, t, a, t_targets=None):
  """ALBEF ITC-MoD in float64, and its gradients wrt (zi, zt, t).

  Each direction: logits = q K^T / t with K = [momentum batch ++ queue]; targets are constants
  (t_targets, default t, is their temperature), and rows of targets sum to 1, so
  dCE/dlogits = (softmax(logits) - targets) / n.
  """
  n = zi.shape[0]
  tc = min(max(t, 0.001), 0.5)
  tc_targets = tc if t_targets is None else min(max(t_targets, 0.001), 0.5)

  def direction(q, q_m, keys):
    sim = q @ keys.T
    logits = sim / tc
    one_hot = np.zeros_like(logits)
    one_hot[np.arange(n), np.arange(n)] = 1.0
    targets = a * _softmax(q_m @ keys.T / tc_targets) + (1 - a) * one_hot
    loss = -np.sum(targets * _log_softmax(logits)) / n
    g = (_softmax(logits) - targets) / n
    return loss, g @ keys / tc, -np.sum(g * sim) / tc**2

  li, gi, gti = direction(zi, zi_m, np.concatenate([zt_m, qt]))
  lt, gt, gtt = direction(zt, zt_m, np.concatenate([zi_m, qi]))
  return (li + lt) / 2, (gi / 2, gt / 2, (gti + gtt) / 2)


def _itc_value_and_grads(*args):
  """value and grads wrt (image_feat, text_feat, image_feat_m, text_feat_m, temp)."""
  return jax.value_and_grad(fusion.itc_mod_loss, argnums=(0, 1, 2, 3, 6))(*args)


def _itc_args(arrays, t=TEMP, a=ALPHA):
  return tuple(jnp.asarray(x, jnp.float32) for x in arrays) + (jnp.float32(t), jnp.float32(a))


def _assert_itc_matches_ref(value, grads, arrays, t=TEMP, a=ALPHA):
  ref_value, (gi, gt, gtemp) = ref_itc(*arrays, t, a)
  assert _close(value, ref_value), (float(value), ref_value)
  assert _close(grads[0], gi) and _close(grads[1], gt) and _close(grads[4], gtemp)
  # Momentum features are targets/keys only: no gradient reaches them.
  assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))


def test_itc_reference_agrees_with_finite_differences():
  arrays = _itc_inputs(n=5, d=3, q=5, seed=1)
  _, (gi, gt, gtemp) = ref_itc(*arrays, TEMP, ALPHA)
  eps = 1e-6
  for k, grad in ((0, gi), (1, gt)):
    up, down = [list(arrays) for _ in range(2)]
    up[k] = arrays[k].copy()
    down[k] = arrays[k].copy()
    up[k][2, 1] += eps
    down[k][2, 1] -= eps
    fd = (ref_itc(*up, TEMP, ALPHA)[0] - ref_itc(*down, TEMP, ALPHA)[0]) / (2 * eps)
    assert abs(fd - grad[2, 1]) < 1e-6
  # The targets are constants: their temperature stays put.
  fd = (ref_itc(*arrays, TEMP + eps, ALPHA, TEMP)[0]
        - ref_itc(*arrays, TEMP - eps, ALPHA, TEMP)[0]) / (2 * eps)
  assert abs(fd - gtemp) < 1e-5 * max(1.0, abs(gtemp))


def test_itc_dense_matches_reference():
  arrays = _itc_inputs()
  value, grads = _itc_value_and_grads(*_itc_args(arrays))
  assert value.shape == () and value.dtype == jnp.float32
  _assert_itc_matches_ref(value, grads, arrays)


@pytest.mark.parametrize("shape,names,axis_type,use_jit", MESHES, ids=MESH_IDS)
def test_itc_sharded_matches_reference(shape, names, axis_type, use_jit):
  arrays = _itc_inputs()
  mesh = _mesh(shape, names, axis_type)
  args = _itc_args(arrays)
  if use_jit:
    row = NamedSharding(mesh, P(names, None))
    args = tuple(jax.device_put(x, row) for x in args[:4]) + args[4:]
  with jax.set_mesh(mesh):
    value, grads = (jax.jit(_itc_value_and_grads) if use_jit else _itc_value_and_grads)(*args)
    jaxpr = str(jax.make_jaxpr(fusion.itc_mod_loss)(*args))
  assert "shard_map" in jaxpr and "all_gather" in jaxpr
  _assert_itc_matches_ref(value, grads, arrays)


def test_itc_alpha_zero_is_plain_cross_entropy():
  arrays = _itc_inputs(seed=2)
  zi, zt, zi_m, zt_m, qi, qt = arrays
  value = fusion.itc_mod_loss(*_itc_args(arrays, a=0.0))
  # One-hot targets: -log softmax at the positive column, from the formula directly.
  li = -np.mean(np.diag(_log_softmax(zi @ np.concatenate([zt_m, qt]).T / TEMP)))
  lt = -np.mean(np.diag(_log_softmax(zt @ np.concatenate([zi_m, qi]).T / TEMP)))
  assert _close(value, (li + lt) / 2)
  # ... so the momentum model only matters through the keys: with an empty queue and the
  # online features as their own keys it is the CLIP loss at scale 1/t.
  empty = jnp.zeros((0, D), jnp.float32)
  f = lambda x: jnp.asarray(x, jnp.float32)
  plain = fusion.itc_mod_loss(f(zi), f(zt), f(zi), f(zt), empty, empty, TEMP, 0.0)
  assert _close(plain, softmax_loss(f(zi), f(zt), 1 / TEMP))
  # With alpha > 0 the soft targets change the loss.
  assert not _close(fusion.itc_mod_loss(*_itc_args(arrays, a=ALPHA)), value, rtol=1e-3)


def test_temperature_is_clamped_with_identity_gradient():
  args = _itc_args(_itc_inputs(n=8, q=8))
  loss_t = lambda t: fusion.itc_mod_loss(*args[:6], t, args[7])
  for outside, bound in ((0.8, 0.5), (1e-4, 1e-3)):
    v_out, g_out = jax.value_and_grad(loss_t)(jnp.float32(outside))
    v_b, g_b = jax.value_and_grad(loss_t)(jnp.float32(bound))
    assert v_out == v_b and g_out == g_b and g_b != 0
  np.testing.assert_allclose(fusion.clamp_temperature(jnp.float32([2.0, 0.07, 0.0])),
                             [0.5, 0.07, 0.001])


def test_alpha_ramp():
  ramp = [float(fusion.alpha_ramp(s, 100)) for s in (0, 25, 50, 99, 100, 1000)]
  np.testing.assert_allclose(ramp, [0.0, 0.1, 0.2, 0.396, 0.4, 0.4], rtol=1e-6)
  assert float(jax.jit(fusion.alpha_ramp, static_argnums=1)(jnp.int32(10), 40)) == pytest.approx(
      0.1)
  assert float(fusion.alpha_ramp(3, 4, alpha=1.0)) == 0.75
  with pytest.raises(ValueError, match="steps_per_epoch"):
    fusion.alpha_ramp(0, 0)


# ---------------------------------------------------------------------------------------------
# Queue.
# ---------------------------------------------------------------------------------------------


def test_enqueue_matches_a_deque_over_wraparounds():
  q_size, n, d = 12, 4, 3
  queue = fusion.init_queue(jax.random.key(0), q_size, d)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(queue), axis=-1), 1.0, rtol=1e-6)
  # Reference: the last q_size rows, oldest first (the initial rows count as the oldest).
  ref = collections.deque([tuple(r) for r in np.asarray(queue)], maxlen=q_size)
  ptr = jnp.int32(0)
  step = jax.jit(fusion.enqueue)
  rng = np.random.default_rng(0)
  ptrs = []
  for _ in range(7):  # 7 batches of 4 into 12 slots: wraps around twice
    feats = rng.normal(size=(n, d)).astype(np.float32)
    queue, ptr = step(queue, ptr, jnp.asarray(feats))
    ref.extend(tuple(r) for r in feats)
    ptrs.append(int(ptr))
    # Storage order rotated to start at the pointer (the oldest slot) is the deque's order.
    np.testing.assert_array_equal(np.roll(np.asarray(queue), -int(ptr), axis=0), np.array(ref))
  assert ptrs == [4, 8, 0, 4, 8, 0, 4]
  assert queue.shape == (q_size, d) and ptr.dtype == jnp.int32


def test_enqueue_takes_the_global_batch_on_a_mesh():
  mesh = _mesh((8,), ("data",), AxisType.Auto)
  feats = jnp.arange(16 * 2, dtype=jnp.float32).reshape(16, 2)
  queue = jnp.zeros((48, 2), jnp.float32)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(feats, NamedSharding(mesh, P("data", None)))
    out, ptr = jax.jit(fusion.enqueue)(queue, jnp.int32(16), sharded)
  expected = np.zeros((48, 2), np.float32)
  expected[16:32] = np.asarray(feats)  # every device's rows, in global batch order
  np.testing.assert_array_equal(np.asarray(out), expected)
  assert int(ptr) == 32


def test_enqueue_rejects_queue_not_divisible_by_global_batch():
  with pytest.raises(ValueError, match=r"queue size \(10\).*multiple.*global batch size \(4\)"):
    fusion.enqueue(jnp.zeros((10, 3)), 0, jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="same d"):
    fusion.enqueue(jnp.zeros((8, 3)), 0, jnp.zeros((4, 2)))


# ---------------------------------------------------------------------------------------------
# ITM hard negatives, layout, loss.
# ---------------------------------------------------------------------------------------------


def ref_hard_negatives(key, zi, zt, t, zi_m=None, zt_m=None):
  """The documented sampler, row by row: Gumbel-max with per-(direction, row) keys."""
  k_i2t, k_t2i = jax.random.split(key)
  tc = min(max(t, 0.001), 0.5)

  def direction(k, queries, keys):
    n = queries.shape[0]
    logits = queries @ keys.T / tc
    out = np.empty(n, np.int64)
    for r in range(n):
      noise = np.asarray(jax.random.gumbel(jax.random.fold_in(k, r), (n,), jnp.float32))
      scores = logits[r] + noise
      scores[r] = -np.inf
      out[r] = np.argmax(scores)
    return out

  return (direction(k_i2t, zi, zt if zt_m is None else zt_m),
          direction(k_t2i, zt, zi if zi_m is None else zi_m))


def test_hard_negatives_follow_the_softmax_weights():
  n, t, num_keys = 6, 0.2, 20000
  rng = np.random.default_rng(3)
  zi = _unit(rng.normal(size=(n, 4)))
  # Pairs close enough that each row's positive has the top similarity.
  zt = _unit(zi + 0.2 * rng.normal(size=zi.shape))
  zi_m = _unit(zi + 0.1 * rng.normal(size=zi.shape))
  f = lambda x: jnp.asarray(x, jnp.float32)
  keys = jax.random.split(jax.random.key(7), num_keys)
  neg_t, neg_i = jax.jit(jax.vmap(
      lambda k: fusion.sample_hard_negatives(k, f(zi), f(zt), t, image_feat_m=f(zi_m))))(keys)
  neg_t, neg_i = np.asarray(neg_t), np.asarray(neg_i)
  for neg, sim in ((neg_t, zi @ zt.T), (neg_i, zt @ zi_m.T)):
    assert np.all(np.diag(sim) > sim.max(axis=1) - 1e-12)  # the positive is the top score
    assert not np.any(neg == np.arange(n))
    weights = _softmax(sim / t)
    np.fill_diagonal(weights, 0.0)  # ALBEF: weights.fill_diagonal_(0), multinomial renormalises
    weights /= weights.sum(axis=1, keepdims=True)
    freq = np.stack([np.bincount(neg[:, r], minlength=n) for r in range(n)]) / num_keys
    assert np.max(np.abs(freq - weights)) < 0.015, np.max(np.abs(freq - weights))


def test_hard_negatives_never_pick_a_dominant_positive():
  """Identical pairs at the smallest temperature: the positive holds ~all the softmax mass."""
  zi = _unit(np.random.default_rng(5).normal(size=(8, 4)))
  f = jnp.asarray(zi, jnp.float32)
  keys = jax.random.split(jax.random.key(1), 2000)
  neg_t, neg_i = jax.vmap(lambda k: fusion.sample_hard_negatives(k, f, f, 1e-3))(keys)
  assert not np.any(np.asarray(neg_t) == np.arange(8))
  assert not np.any(np.asarray(neg_i) == np.arange(8))


@pytest.mark.parametrize("shape,names,axis_type,use_jit", MESHES, ids=MESH_IDS)
def test_sharded_hard_negatives_equal_the_dense_reference(shape, names, axis_type, use_jit):
  zi, zt, zi_m, zt_m, _, _ = _itc_inputs(seed=6)
  mesh = _mesh(shape, names, axis_type)
  args = [jnp.asarray(x, jnp.float32) for x in (zi, zt, zi_m, zt_m)]
  if use_jit:
    args = [jax.device_put(x, NamedSharding(mesh, P(names, None))) for x in args]

  def sample(key, zi, zt, zi_m, zt_m):
    return fusion.sample_hard_negatives(key, zi, zt, TEMP, image_feat_m=zi_m, text_feat_m=zt_m)

  for seed in range(3):
    key = jax.random.key(seed)
    with jax.set_mesh(mesh):
      got = (jax.jit(sample) if use_jit else sample)(key, *args)
      if seed == 0:
        assert "shard_map" in str(jax.make_jaxpr(sample)(key, *args))
    want = ref_hard_negatives(key, zi, zt, TEMP, zi_m, zt_m)
    for g, w in zip(got, want):
      assert g.shape == (N,) and g.dtype == jnp.int32
      np.testing.assert_array_equal(np.asarray(g), w)
  # Without momentum keys the online features of the other side are the keys.
  key = jax.random.key(9)
  with jax.set_mesh(mesh):
    got = fusion.sample_hard_negatives(key, *args[:2], TEMP)
  for g, w in zip(got, ref_hard_negatives(key, zi, zt, TEMP)):
    np.testing.assert_array_equal(np.asarray(g), w)


def test_itm_layout_is_albefs_order():
  neg_text = jnp.array([1, 2, 3, 0])
  neg_image = jnp.array([3, 0, 1, 2])
  img, txt, lab = fusion.itm_layout(neg_text, neg_image)
  np.testing.assert_array_equal(img, [0, 1, 2, 3, 3, 0, 1, 2, 0, 1, 2, 3])
  np.testing.assert_array_equal(txt, [0, 1, 2, 3, 0, 1, 2, 3, 1, 2, 3, 0])
  np.testing.assert_array_equal(lab, [1] * 4 + [0] * 8)
  # Per-device blocks: ALBEF's order within each block of N / num_blocks examples.
  img, txt, lab = fusion.itm_layout(neg_text, neg_image, num_blocks=2)
  np.testing.assert_array_equal(img, [0, 1, 3, 0, 0, 1, 2, 3, 1, 2, 2, 3])
  np.testing.assert_array_equal(txt, [0, 1, 0, 1, 1, 2, 2, 3, 2, 3, 3, 0])
  np.testing.assert_array_equal(lab, [1, 1, 0, 0, 0, 0] * 2)
  with pytest.raises(ValueError, match="divide"):
    fusion.itm_layout(neg_text, neg_image, num_blocks=3)
  # A micro-batch (rows 1 and 5 of a batch of 8): its own rows, its negatives' rows.
  img, txt, lab = fusion.itm_layout(jnp.array([6, 0]), jnp.array([2, 7]), rows=jnp.array([1, 5]))
  np.testing.assert_array_equal(img, [1, 5, 2, 7, 1, 5])
  np.testing.assert_array_equal(txt, [1, 5, 1, 5, 6, 0])
  np.testing.assert_array_equal(lab, [1, 1, 0, 0, 0, 0])


def test_itm_loss_value_and_gradient():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(12, 2)) * 3
  _, _, labels = fusion.itm_layout(jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32))
  labels = np.asarray(labels)
  value, grad = jax.value_and_grad(fusion.itm_loss)(jnp.asarray(logits, jnp.float32),
                                                    jnp.asarray(labels))
  logp = _log_softmax(logits)
  assert _close(value, -np.mean(logp[np.arange(12), labels]))
  assert _close(grad, (_softmax(logits) - np.eye(2)[labels]) / 12)


# ---------------------------------------------------------------------------------------------
# MLM.
# ---------------------------------------------------------------------------------------------

VOCAB, MASK_ID, LOW = 1000, 3, 4


def _token_batch(b=512, length=64, seed=0):
  """Random texts: ids in [LOW, VOCAB), then EOS, then padding (vljax's layout)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(LOW, VOCAB, size=(b, length))
  lengths = rng.integers(1, length, size=b)
  cols = np.arange(length)[None, :]
  tokens = np.where(cols == lengths[:, None], EOS_ID, tokens)
  tokens = np.where(cols > lengths[:, None], PAD_ID, tokens)
  return jnp.asarray(tokens, jnp.int32)


def _mask(key, tokens):
  return fusion.mask_tokens(key, tokens, mask_id=MASK_ID, vocab_size=VOCAB, random_low=LOW,
                            special_ids=(PAD_ID, EOS_ID))


def test_mask_tokens_statistics_and_specials():
  tokens = _token_batch()
  inputs, labels = _mask(jax.random.key(0), tokens)
  tokens, inputs, labels = map(np.asarray, (tokens, inputs, labels))
  real = (tokens != PAD_ID) & (tokens != EOS_ID)
  chosen = labels != fusion.IGNORE
  assert real.sum() > 10000
  # Specials never chosen and never altered; unchosen tokens untouched.
  assert not np.any(chosen & ~real)
  np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
  np.testing.assert_array_equal(labels[chosen], tokens[chosen])
  assert abs(chosen.sum() / real.sum() - 0.15) < 0.01
  masked = chosen & (inputs == MASK_ID)
  kept = chosen & (inputs == tokens)  # includes the rare random draw of the original id
  randomised = chosen & ~masked & ~kept
  fractions = np.array([masked.sum(), randomised.sum(), kept.sum()]) / chosen.sum()
  np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.025)
  assert np.all((inputs[randomised] >= LOW) & (inputs[randomised] < VOCAB))


def test_mask_tokens_deterministic_per_key_and_sharding_independent():
  tokens = _token_batch(b=64, length=16, seed=1)
  a = _mask(jax.random.key(3), tokens)
  b = _mask(jax.random.key(3), tokens)
  c = _mask(jax.random.key(4), tokens)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert np.any(np.asarray(a[1]) != np.asarray(c[1]))
  mesh = _mesh((2, 4), ("data", "fsdp"), AxisType.Auto)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"), None)))
    d = jax.jit(_mask)(jax.random.key(3), sharded)
  for x, y in zip(a, d):
    np.testing.assert_array_equal(x, y)


def ref_mlm(logits, labels, soft=None, alpha=0.4):
  logp = _log_softmax(logits)
  rows = np.argwhere(labels >= 0)
  hard = -np.mean([logp[tuple(r)][labels[tuple(r)]] for r in rows])
  if soft is None:
    return hard
  distill = -np.mean([np.sum(soft[tuple(r)] * logp[tuple(r)]) for r in rows])
  return (1 - alpha) * hard + alpha * distill


def test_mlm_loss_matches_reference():
  rng = np.random.default_rng(9)
  b, length, v = 4, 10, 7
  logits = rng.normal(size=(b, length, v)) * 2
  labels = np.where(rng.random((b, length)) < 0.3, rng.integers(0, v, (b, length)), -1)
  soft = _softmax(rng.normal(size=(b, length, v)))
  f = lambda x: jnp.asarray(x, jnp.float32)
  assert _close(fusion.mlm_loss(f(logits), jnp.asarray(labels)), ref_mlm(logits, labels))
  value, grad = jax.value_and_grad(fusion.mlm_loss)(f(logits), jnp.asarray(labels), f(soft), 0.4)
  assert _close(value, ref_mlm(logits, labels, soft, 0.4))
  # d/dlogits at a chosen position: ((1-a)(p - onehot) + a(p - soft)) / count; 0 elsewhere.
  chosen = labels >= 0
  onehot = np.eye(v)[np.maximum(labels, 0)]
  p = _softmax(logits)
  want = (0.6 * (p - onehot) + 0.4 * (p - soft)) * chosen[..., None] / chosen.sum()
  assert _close(grad, want)
  # Nothing chosen: 0, not NaN.
  assert float(fusion.mlm_loss(f(logits), jnp.full((b, length), -1))) == 0.0
