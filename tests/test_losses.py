"""Tests for vljax.losses.contrastive: dense float64 references, sharded == dense, memory."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vljax import sharding
from vljax.losses import sigmoid_loss, softmax_loss

N, D = 64, 16
SCALE, BIAS = 7.5, -2.0
RTOL = 1e-5

LOSSES = {
    "softmax": lambda zi, zt, s, b: softmax_loss(zi, zt, s),
    "sigmoid_chunked": lambda zi, zt, s, b: sigmoid_loss(zi, zt, s, b, chunked=True),
    "sigmoid_all_gather": lambda zi, zt, s, b: sigmoid_loss(zi, zt, s, b, chunked=False),
}


# ---------------------------------------------------------------------------------------------
# Independent float64 references: value and gradients wrt (zimg, ztxt, scale, bias).
# ---------------------------------------------------------------------------------------------


def _softmax_rows(x):
  e = np.exp(x - x.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def ref_softmax(x, y, s, b):
  """CLIP loss and gradients; dL/dlogits = (softmax_rows - I + softmax_cols - I) / 2N."""
  del b
  n = x.shape[0]
  sim = x @ y.T
  logits = s * sim
  lse_rows = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  lse_cols = np.log(np.exp(logits - logits.max(0, keepdims=True)).sum(0)) + logits.max(0)
  pos = np.diag(logits)
  loss = (np.sum(lse_rows - pos) + np.sum(lse_cols - pos)) / (2 * n)
  eye = np.eye(n)
  g = (_softmax_rows(logits) - eye + _softmax_rows(logits.T).T - eye) / (2 * n)
  return loss, (s * g @ y, s * g.T @ x, np.sum(g * sim), 0.0)


def ref_sigmoid(x, y, s, b):
  """SigLIP loss and gradients; d/dl of -log sigmoid(z l) is -z sigmoid(-z l)."""
  n = x.shape[0]
  sim = x @ y.T
  z = 2 * np.eye(n) - 1
  zl = z * (s * sim + b)
  loss = np.sum(np.logaddexp(0.0, -zl)) / n  # -log sigmoid(t) = log(1 + e^-t)
  g = -z / (1 + np.exp(zl)) / n
  return loss, (s * g @ y, s * g.T @ x, np.sum(g * sim), np.sum(g))


REFS = {"softmax": ref_softmax, "sigmoid_chunked": ref_sigmoid, "sigmoid_all_gather": ref_sigmoid}


def _embeddings(n=N, d=D, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  # Correlated pairs, so the positives are not lost among the negatives.
  y = x + 0.8 * rng.normal(size=(n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  return x, y


def _close(actual, expected, rtol=RTOL):
  """Relative closeness, measured against the largest magnitude of the expected array."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  denom = max(np.max(np.abs(expected)), 1e-12)
  return np.max(np.abs(actual - expected)) / denom <= rtol


def _assert_matches_ref(name, value, grads, x, y):
  ref_value, ref_grads = REFS[name](x, y, SCALE, BIAS)
  assert _close(value, ref_value), (name, float(value), ref_value)
  for arg, got, want in zip(("zimg", "ztxt", "scale", "bias"), grads, ref_grads):
    if name == "softmax" and arg == "bias":
      continue
    assert _close(got, want), (name, arg, np.max(np.abs(np.asarray(got) - want)))


def _value_and_grads(fn):
  return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))


def _inputs(x, y):
  return (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.float32(SCALE),
          jnp.float32(BIAS))


# ---------------------------------------------------------------------------------------------
# Values and gradients.
# ---------------------------------------------------------------------------------------------


def test_references_agree_with_finite_differences():
  """The hand-written reference gradients are right (checked once, in float64)."""
  x, y = _embeddings(n=6, d=3, seed=1)
  for ref in (ref_softmax, ref_sigmoid):
    _, (gx, gy, gs, gb) = ref(x, y, SCALE, BIAS)
    eps = 1e-6
    for arr, grad in ((x, gx), (y, gy)):
      i, j = 2, 1
      up, down = arr.copy(), arr.copy()
      up[i, j] += eps
      down[i, j] -= eps
      args_up = (up, y) if arr is x else (x, up)
      args_down = (down, y) if arr is x else (x, down)
      fd = (ref(*args_up, SCALE, BIAS)[0] - ref(*args_down, SCALE, BIAS)[0]) / (2 * eps)
      assert abs(fd - grad[i, j]) < 1e-6
    fd_s = (ref(x, y, SCALE + eps, BIAS)[0] - ref(x, y, SCALE - eps, BIAS)[0]) / (2 * eps)
    fd_b = (ref(x, y, SCALE, BIAS + eps)[0] - ref(x, y, SCALE, BIAS - eps)[0]) / (2 * eps)
    assert abs(fd_s - gs) < 1e-6 and abs(fd_b - gb) < 1e-6


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unsharded_matches_reference(name):
  x, y = _embeddings()
  value, grads = _value_and_grads(LOSSES[name])(*_inputs(x, y))
  assert value.shape == () and value.dtype == jnp.float32
  _assert_matches_ref(name, value, grads, x, y)


# (mesh shape, axis names, axis type, under jit): every device count and both axis types, each
# eagerly and under jit somewhere, without compiling the full product.
MESHES = [
    ((1,), ("data",), AxisType.Explicit, False),
    ((2,), ("data",), AxisType.Auto, True),
    ((2,), ("data",), AxisType.Explicit, False),
    ((4,), ("data",), AxisType.Explicit, True),
    ((4,), ("fsdp",), AxisType.Auto, False),
    ((8,), ("data",), AxisType.Auto, False),
    ((8,), ("data",), AxisType.Explicit, True),
    ((2, 4), ("data", "fsdp"), AxisType.Auto, True),
    ((2, 4), ("data", "fsdp"), AxisType.Explicit, False),
]


@pytest.mark.parametrize("shape,names,axis_type,use_jit", MESHES,
                         ids=lambda v: getattr(v, "name", str(v)))
def test_sharded_matches_reference(shape, names, axis_type, use_jit):
  x, y = _embeddings()
  mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape),
                       devices=jax.devices()[:int(np.prod(shape))])
  # Feed inputs the way a caller would: already batch-sharded (jit) or as plain arrays (eager).
  args = _inputs(x, y)
  if use_jit:
    row = NamedSharding(mesh, P(names, None))
    args = (jax.device_put(args[0], row), jax.device_put(args[1], row)) + args[2:]

  def all_losses(*a):
    return {name: _value_and_grads(fn)(*a) for name, fn in LOSSES.items()}

  with jax.set_mesh(mesh):
    results = (jax.jit(all_losses) if use_jit else all_losses)(*args)
    # The path taken: a ring of ppermutes on a real batch mesh, the dense fallback on 1 device.
    jaxpr = str(jax.make_jaxpr(LOSSES["sigmoid_chunked"])(*args))
  sharded = np.prod(shape) > 1
  assert ("shard_map" in jaxpr and "ppermute" in jaxpr) == sharded
  for name, (value, grads) in results.items():
    assert value.shape == ()
    _assert_matches_ref(name, value, grads, x, y)


def test_ring_over_axis_tuple_uses_linearised_device_index():
  """ppermute/axis_index over ("data", "fsdp") number devices in P(("data", "fsdp")) order."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  axes = ("data", "fsdp")
  ring = [(j, (j + 1) % 8) for j in range(8)]

  def body(v):
    return jax.lax.ppermute(v, axes, ring), jax.lax.axis_index(axes)[None]

  with jax.set_mesh(mesh):
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P(axes)))
    shifted, index = jax.shard_map(body, in_specs=P(axes), out_specs=(P(axes), P(axes)))(x)
  np.testing.assert_array_equal(np.asarray(index), np.arange(8))
  np.testing.assert_array_equal(np.asarray(shifted), np.roll(np.arange(8.0), 1))


def _local_text_grad_only_sigmoid(zi, zt, s, b):
  """A deliberately WRONG sharded sigmoid loss: the classic trap.

  Every device all-gathers the text embeddings *without* gradient and puts its own live chunk
  back, then psums the loss. The value is right, but device k's text embeddings only get
  gradient from device k's image rows: the terms in other devices' logits are lost.
  """
  axes = ("data",)

  def local(zi, zt, s, b):
    k = jax.lax.axis_index(axes)
    bsz = zi.shape[0]
    zt_all = jax.lax.all_gather(jax.lax.stop_gradient(zt), axes, tiled=True)
    zt_all = jax.lax.dynamic_update_slice(zt_all, zt, (k * bsz, 0))
    logits = s * zi @ zt_all.T + b
    cols = jnp.arange(zt_all.shape[0])[None, :]
    rows = jnp.arange(bsz)[:, None] + k * bsz
    z = jnp.where(cols == rows, 1.0, -1.0)
    return jax.lax.psum(-jnp.sum(jax.nn.log_sigmoid(z * logits)), axes) / zt_all.shape[0]

  row = P(axes, None)
  return jax.shard_map(local, in_specs=(row, row, P(), P()), out_specs=P())(
      jax.sharding.reshard(zi, row), jax.sharding.reshard(zt, row), s, b)


def _text_grad_of_one_device_matches_dense(fn, mesh, x, y) -> bool:
  """Gradient wrt the text rows held by the last device equals the dense float64 gradient.

  The dense gradient of those rows sums contributions from image rows on every device.
  """
  with jax.set_mesh(mesh):
    grads = jax.jit(jax.grad(fn, argnums=1))(*_inputs(x, y))
  _, (_, ref_gy, _, _) = ref_sigmoid(x, y, SCALE, BIAS)
  rows = slice(N - N // mesh.size, N)
  return _close(np.asarray(grads)[rows], ref_gy[rows])


def test_cross_device_gradient_terms_are_included():
  x, y = _embeddings()
  mesh = jax.make_mesh((8,), ("data",))
  assert _text_grad_of_one_device_matches_dense(LOSSES["sigmoid_chunked"], mesh, x, y)
  assert _text_grad_of_one_device_matches_dense(LOSSES["sigmoid_all_gather"], mesh, x, y)
  # The same check fails for the trap, so it has teeth (its value alone would pass).
  with jax.set_mesh(mesh):
    wrong_value = _local_text_grad_only_sigmoid(*_inputs(x, y))
  assert _close(wrong_value, ref_sigmoid(x, y, SCALE, BIAS)[0])
  assert not _text_grad_of_one_device_matches_dense(_local_text_grad_only_sigmoid, mesh, x, y)


def test_inside_jitted_train_step_with_model_activations():
  """The trainer's setting: Auto mesh, a jitted step, embeddings computed from batch inputs."""
  rng = np.random.default_rng(3)
  params = {"img": jnp.asarray(rng.normal(size=(12, D)), jnp.float32),
            "txt": jnp.asarray(rng.normal(size=(10, D)), jnp.float32),
            "t": jnp.float32(np.log(10.0)), "b": jnp.float32(-10.0)}
  images = jnp.asarray(rng.normal(size=(N, 12)), jnp.float32)
  texts = jnp.asarray(rng.normal(size=(N, 10)), jnp.float32)

  def objective(p, images, texts, chunked):
    zi = images @ p["img"]
    zt = texts @ p["txt"]
    zi = zi / jnp.linalg.norm(zi, axis=-1, keepdims=True)
    zt = zt / jnp.linalg.norm(zt, axis=-1, keepdims=True)
    return sigmoid_loss(zi, zt, jnp.exp(p["t"]), p["b"], chunked=chunked)

  step = jax.jit(jax.value_and_grad(objective), static_argnums=3)
  dense_value, dense_grads = step(params, images, texts, True)  # no mesh: the dense path
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  with jax.set_mesh(mesh):
    batch = sharding.batch_sharding(mesh, 2)
    value, grads = step(params, jax.device_put(images, batch), jax.device_put(texts, batch), True)
  assert _close(value, dense_value)
  for key in params:
    assert _close(grads[key], dense_grads[key], rtol=1e-4), key


# ---------------------------------------------------------------------------------------------
# Memory: the chunked ring never holds more than a b x b block, forward or backward.
# ---------------------------------------------------------------------------------------------


def _temp_bytes(fn, mesh, n, d):
  emb = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    compiled = jax.jit(_value_and_grads(fn)).lower(emb, emb, scalar, scalar).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_needs_far_less_temporary_memory_than_all_gather():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  b, d = 512, 64
  chunked = _temp_bytes(LOSSES["sigmoid_chunked"], mesh, 8 * b, d)
  gathered = _temp_bytes(LOSSES["sigmoid_all_gather"], mesh, 8 * b, d)
  assert chunked * 4 <= gathered, (chunked, gathered)


# ---------------------------------------------------------------------------------------------
# Bad inputs fail early with readable messages.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [LOSSES["softmax"], LOSSES["sigmoid_chunked"]])
def test_bad_inputs_raise_value_error(loss):
  s, b = jnp.float32(SCALE), jnp.float32(BIAS)
  with pytest.raises(ValueError, match="same shape"):
    loss(jnp.ones((8, 4)), jnp.ones((6, 4)), s, b)
  with pytest.raises(ValueError, match="same shape"):
    loss(jnp.ones((8, 4)), jnp.ones((8, 3)), s, b)
  with pytest.raises(ValueError, match=r"\[N, d\]"):
    loss(jnp.ones((8,)), jnp.ones((8,)), s, b)
  with pytest.raises(ValueError, match="scalar"):
    loss(jnp.ones((8, 4)), jnp.ones((8, 4)), jnp.ones((2,)), b)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="divisible.*8"):
    jax.jit(loss)(jnp.ones((12, 4)), jnp.ones((12, 4)), s, b)
  mixed = jax.make_mesh((2, 4), ("data", "fsdp"),
                        axis_types=(AxisType.Explicit, AxisType.Auto))
  with jax.set_mesh(mixed), pytest.raises(ValueError, match="mix axis types"):
    loss(jnp.ones((8, 4)), jnp.ones((8, 4)), s, b)


def test_call_inside_shard_map_is_refused():
  """Inside shard_map the arrays are local shards; computing a 'global' loss would be wrong."""
  mesh = jax.make_mesh((4,), ("data",))
  row = P("data", None)

  def body(zi, zt):
    return sigmoid_loss(zi, zt, jnp.float32(1.0), jnp.float32(0.0))[None]

  with jax.set_mesh(mesh), pytest.raises(ValueError, match="Manual"):
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, row))
    jax.shard_map(body, in_specs=(row, row), out_specs=P("data"))(x, x)
