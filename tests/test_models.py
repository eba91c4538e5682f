"""Tests for vljax.models: layers, ViT, text transformer and the two-tower model."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vljax import sharding
from vljax.configlib import ConfigError
from vljax.models import layers
from vljax.models import text as text_lib
from vljax.models import two_towers
from vljax.models import vit

TINY_VIT = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=(8, 8))
TINY_TXT = dict(vocab_size=40, width=32, depth=2, mlp_dim=64, num_heads=4, max_len=16)


def _images(batch=2, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


# Real tokens (pad_id=0, eos_id=1), padded to length 8. Row 3 has no eos ('eos' pooling falls
# back to the last real token), row 4 has tokens after its eos, row 7 is all padding.
_TOKENS8 = np.array([
    [5, 7, 9, 11, 1, 0, 0, 0],
    [3, 1, 0, 0, 0, 0, 0, 0],
    [4, 6, 8, 10, 12, 14, 16, 1],
    [20, 21, 22, 0, 0, 0, 0, 0],
    [5, 1, 6, 7, 0, 0, 0, 0],
    [2, 3, 4, 5, 6, 7, 8, 9],
    [9, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
], np.int32)
_LAST = [4, 1, 7, 2, 3, 7, 1, 0]
_EOS = [4, 1, 7, 2, 1, 7, 1, 0]
_REAL_ROWS = slice(0, 7)  # Rows with at least one real token.


def _tiny_two_towers(bias_init=-10.0):
  return two_towers.TwoTowers(image=dict(TINY_VIT), text=dict(TINY_TXT, pool_type="map"),
                              embed_dim=16, temperature_init=10.0, bias_init=bias_init)


@pytest.fixture(scope="module")
def tt_params():
  """Unboxed params of _tiny_two_towers(); its towers' encoders serve the ViT/text tests too."""
  model = _tiny_two_towers()
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), _images(8), _TOKENS8))


@pytest.fixture(scope="module")
def text_params(tt_params):
  """TextTransformer(**TINY_TXT) params ('map' pooling: a superset of every pool type's)."""
  return {"params": tt_params["params"]["txt"]["encoder"]}


# ----------------------------------------------------------------------------- variants


def test_decode_variant_table():
  expected = {
      "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
      "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16),
      "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16), "G": (1664, 48, 8192, 16),
  }
  for name, (width, depth, mlp, heads) in expected.items():
    assert vit.decode_variant(name) == dict(width=width, depth=depth, mlp_dim=mlp,
                                            num_heads=heads)
  assert vit.decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                            patch_size=(16, 16))
  assert vit.decode_variant("So400m/14")["patch_size"] == (14, 14)
  assert "patch_size" not in vit.decode_variant("L")


def test_decode_variant_errors():
  with pytest.raises(ValueError, match="So400m"):  # The message lists the valid names.
    vit.decode_variant("X/16")
  with pytest.raises(ValueError, match="patch"):
    vit.decode_variant("B/x")


# ----------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
@pytest.mark.parametrize("pool_type", ["map", "tok", "gap", "none"])
def test_vit_shapes(pool_type, posemb):
  model = vit.VisionTransformer(**TINY_VIT, pool_type=pool_type, posemb=posemb)
  images = jax.ShapeDtypeStruct((3, 32, 48, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  pooled, tokens = jax.eval_shape(model.apply, variables, images)
  assert tokens.shape == (3, 4 * 6, 32)
  if pool_type == "none":
    assert pooled is None
  else:
    assert pooled.shape == (3, 32)
  assert ("pos_embedding" in variables["params"]) == (posemb == "learn")
  assert ("cls" in variables["params"]) == (pool_type == "tok")


def _sincos_reference(h, w, width, temperature=10_000.0):
  """Loop-by-loop formula: [sin(x w_i), cos(x w_i), sin(y w_i), cos(y w_i)]."""
  q = width // 4
  out = np.zeros((h * w, width))
  for yy in range(h):
    for xx in range(w):
      row = yy * w + xx
      for i in range(q):
        omega = temperature ** (-i / (q - 1))
        out[row, i] = math.sin(xx * omega)
        out[row, q + i] = math.cos(xx * omega)
        out[row, 2 * q + i] = math.sin(yy * omega)
        out[row, 3 * q + i] = math.cos(yy * omega)
  return out


def test_sincos2d_values():
  got = layers.posemb_sincos_2d(3, 5, 16)
  assert got.shape == (1, 15, 16)
  np.testing.assert_allclose(np.asarray(got[0]), _sincos_reference(3, 5, 16), atol=1e-6)
  with pytest.raises(ValueError, match="divisible by 4"):
    layers.posemb_sincos_2d(2, 2, 18)


def test_vit_bad_image_size():
  model = vit.VisionTransformer(**TINY_VIT)
  with pytest.raises(ValueError, match=r"30x32.*8x8"):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 32, 3)))


def test_vit_remat_and_dropout(tt_params):
  images = _images(4)
  # A one-block ViT (the test is about the block): drop the second block's params.
  params = dict(tt_params["params"]["img"]["encoder"])
  params["Transformer"] = {k: v for k, v in params["Transformer"].items()
                           if k != "encoderblock_1"}
  params = {"params": params}

  def loss_fn(remat):
    model = vit.VisionTransformer(**dict(TINY_VIT, depth=1), dropout=0.1, remat=remat)

    def loss(p, rng):
      pooled, tokens = model.apply(p, images, train=True, rngs={"dropout": rng})
      return jnp.sum(pooled ** 2) + jnp.mean(tokens ** 2)

    return jax.jit(jax.value_and_grad(loss))

  base, rematted = loss_fn(False), loss_fn(True)
  l0, g0 = base(params, jax.random.key(1))
  l1, g1 = rematted(params, jax.random.key(1))
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g0))
  l2, _ = base(params, jax.random.key(2))
  assert not np.allclose(l0, l2)  # Dropout is active when training.


# ----------------------------------------------------------------------------- text


@functools.partial(jax.jit, static_argnames="causal")
def _all_pools(params, tokens, causal=False):
  """{pool_type: pooled} for every pool type, plus 'seq', from one set of text params."""
  out = {}
  for pool_type in ["last", "eos", "first", "map", "none"]:
    model = text_lib.TextTransformer(**TINY_TXT, causal=causal, pool_type=pool_type)
    out[pool_type], out["seq"] = model.apply(params, tokens)
  return out


def test_text_padding_invariance_and_pooling(text_params):
  out8 = _all_pools(text_params, _TOKENS8)
  out12 = _all_pools(text_params, np.pad(_TOKENS8, ((0, 0), (0, 4))))
  for pool_type in ["last", "eos", "first", "map"]:
    np.testing.assert_allclose(out8[pool_type][_REAL_ROWS], out12[pool_type][_REAL_ROWS],
                               atol=1e-5, err_msg=pool_type)
    # A row of all padding gives finite outputs.
    assert np.all(np.isfinite(out8[pool_type])), pool_type
  assert out8["none"] is None
  real = _TOKENS8 != 0
  seq8, seq12 = np.asarray(out8["seq"]), np.asarray(out12["seq"])
  np.testing.assert_allclose(seq8[real], seq12[:, :8][real], atol=1e-5)
  assert np.all(np.isfinite(seq8))
  rows = np.arange(8)
  for pool_type, idx in [("last", _LAST), ("eos", _EOS), ("first", [0] * 8)]:
    np.testing.assert_allclose(out8[pool_type], seq8[rows, idx], atol=1e-6, err_msg=pool_type)


def test_text_causal(text_params):
  a = np.array([5, 6, 7, 8, 9, 10, 11, 12], np.int32)
  b = a.copy()
  b[5:] = [30, 31, 0]
  tokens = np.stack([a, b, np.zeros_like(a)])
  out = _all_pools(text_params, tokens, causal=True)
  seq = np.asarray(out["seq"])
  np.testing.assert_allclose(seq[0, :5], seq[1, :5], atol=1e-6)
  assert not np.allclose(seq[0, 5:], seq[1, 5:])
  for key in ["last", "eos", "first", "map", "seq"]:
    assert np.all(np.isfinite(out[key])), key  # Including the all-padding row.
  # Bidirectional attention, by contrast, sees the later tokens.
  seq = np.asarray(_all_pools(text_params, tokens[:, :7])["seq"])
  assert not np.allclose(seq[0, :5], seq[1, :5])


def test_text_all_padding_gradients_are_finite(text_params):
  model = text_lib.TextTransformer(**TINY_TXT, pool_type="map")
  tokens = _TOKENS8[-2:]

  def loss(p):
    pooled, seq = model.apply(p, tokens)
    return jnp.sum(pooled) + jnp.sum(seq)

  grads = jax.jit(jax.grad(loss))(text_params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_text_too_long():
  model = text_lib.TextTransformer(**TINY_TXT)
  with pytest.raises(ValueError, match="max_len"):
    model.init(jax.random.key(0), jnp.ones((1, 17), jnp.int32))


# ----------------------------------------------------------------------------- two towers


@pytest.fixture(scope="module")
def tt_outputs(tt_params):
  """(both towers, image only, text only) outputs of the tiny model, unsharded."""
  model = _tiny_two_towers()

  @jax.jit
  def run(params, images, tokens):
    return (model.apply(params, images, tokens), model.apply(params, images, None),
            model.apply(params, None, tokens))

  return run(tt_params, _images(8), _TOKENS8)


def test_two_towers_outputs(tt_params, tt_outputs):
  params = tt_params["params"]
  assert set(params) == {"img", "txt", "t", "b"}
  assert set(params["img"]) == {"encoder", "head"}
  assert set(params["txt"]) == {"encoder", "head"}
  (zimg, ztxt, out), (zimg1, ztxt1, _), (zimg2, ztxt2, _) = tt_outputs
  assert zimg.shape == (8, 16) and ztxt.shape == (8, 16)
  assert zimg.dtype == jnp.float32 and ztxt.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["scale"], 10.0, rtol=1e-6)
  np.testing.assert_allclose(params["t"], math.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(out["bias"], -10.0)
  assert out["img/pre_logits"].shape == (8, 32) and out["txt/pre_logits"].shape == (8, 32)
  assert not np.allclose(zimg, ztxt)  # Heads are not zero-initialised.
  # One tower at a time, with the same params.
  assert ztxt1 is None and zimg2 is None
  np.testing.assert_allclose(zimg1, zimg, atol=1e-6)
  np.testing.assert_allclose(ztxt2, ztxt, atol=1e-6)


def test_two_towers_without_bias_and_variant():
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  model = two_towers.TwoTowers(
      image=dict(variant="Ti/16", depth=1),
      text=dict(variant="Ti", depth=1, vocab_size=40, max_len=8),
      embed_dim=8, temperature_init=1 / 0.07, bias_init=None)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
  params = nn.meta.unbox(variables)["params"]
  assert set(params) == {"img", "txt", "t"}
  vit_params = params["img"]["encoder"]
  assert vit_params["embedding"]["kernel"].shape == (16, 16, 3, 192)
  assert "encoderblock_1" not in vit_params["Transformer"]  # Explicit depth=1 wins.
  assert params["txt"]["encoder"]["embedding"]["embedding"].shape == (40, 192)
  _, _, out = jax.eval_shape(model.apply, {"params": params}, images, tokens)
  assert "bias" not in out
  with pytest.raises(ValueError, match="patch"):
    two_towers.TwoTowers(image=dict(TINY_VIT), text=dict(TINY_TXT, variant="Ti/16"),
                         embed_dim=8).init(jax.random.key(0), None, jnp.ones((1, 4), jnp.int32))


def test_two_towers_logical_partitioning():
  model = _tiny_two_towers()
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
  specs = nn.get_partition_spec(abstract)
  shapes = nn.meta.unbox(abstract)
  flat_specs = jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, P) or x is None)
  flat_shapes = jax.tree_util.tree_leaves(shapes)
  assert len(flat_specs) == len(flat_shapes) > 50
  for (path, spec), shape in zip(flat_specs, flat_shapes):
    name = jax.tree_util.keystr(path)
    assert isinstance(spec, P), f"{name} has no logical partitioning metadata"
    assert len(spec) == len(shape.shape), f"{name}: {spec} vs {shape.shape}"
    for axis in spec:
      assert axis is None or axis in sharding.LOGICAL_AXES, f"{name}: {axis}"
  assert specs["params"]["t"] == P() and specs["params"]["b"] == P()


def test_two_towers_sharded_matches_unsharded(tt_params, tt_outputs):
  model = _tiny_two_towers()
  images, tokens = _images(8), _TOKENS8
  params = tt_params
  ref = tt_outputs[0]

  mesh = sharding.make_mesh({"data": -1})
  assert mesh.shape["data"] == 8
  rules = sharding.DEFAULT_RULES
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
  param_shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded_params = jax.device_put(params, param_shardings)
    images_s = jax.device_put(images, sharding.batch_sharding(mesh, 4))
    tokens_s = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
    got = jax.jit(model.apply)(sharded_params, images_s, tokens_s)
  assert len(got[0].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, ref)


def _attention_reference(q, k, v, mask, bias, scale):
  """Dense float64 attention: softmax(scale q k^T + bias, masked rows uniform) v."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if mask is not None:
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -1e30)
  logits = logits - logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_attention_equals_a_dense_reference_with_masks_and_bias(with_bias):
  rng = np.random.default_rng(0)
  b, lq, lk, h, d = 2, 5, 7, 3, 4
  q, k, v = (rng.normal(size=(b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
  mask = rng.random((b, 1, lq, lk)) < 0.7
  mask[0, 0, 2] = False  # a fully masked row: uniform over the keys, not NaN
  bias = rng.normal(size=(1, h, lq, lk)).astype(np.float32) if with_bias else None
  want = _attention_reference(q, k, v, mask, bias, 0.5)
  got = layers.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                      jnp.float32, bias=None if bias is None else jnp.asarray(bias), scale=0.5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got)[0, 2], np.broadcast_to(v[0].mean(0), (h, d)),
                             rtol=1e-5, atol=1e-6)
  # The explicit path (taken under attention dropout) computes the same thing: with an
  # identity "dropout" both paths agree, values and gradients.
  identity = lambda probs: probs

  def loss(qq, path):
    out = layers.attend(qq, jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), jnp.float32,
                        path, bias=None if bias is None else jnp.asarray(bias), scale=0.5)
    return jnp.sum(out ** 2)

  g_fused = jax.grad(loss)(jnp.asarray(q), None)
  g_explicit = jax.grad(loss)(jnp.asarray(q), identity)
  np.testing.assert_allclose(np.asarray(g_fused), np.asarray(g_explicit), rtol=1e-4, atol=1e-5)
  # bf16 inputs: logits and softmax still in float32, the result in bf16 close to float32's.
  got16 = layers.attend(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), jnp.asarray(mask),
                        jnp.bfloat16, scale=0.5,
                        bias=None if bias is None else jnp.asarray(bias))
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float32), want, atol=0.05)


@pytest.mark.parametrize("setting,backend,dtype,head_dim,bias,want", [
    ("auto", "gpu", jnp.bfloat16, 64, False, "cudnn"),
    ("auto", "gpu", jnp.float16, 128, False, "cudnn"),
    ("auto", "gpu", jnp.float32, 64, False, "xla"),   # cuDNN's kernel takes half precision
    ("auto", "gpu", jnp.bfloat16, 60, False, "xla"),  # head dim not a multiple of 8
    ("auto", "gpu", jnp.bfloat16, 256, False, "xla"),
    ("auto", "gpu", jnp.bfloat16, 64, True, "xla"),   # T5's position bias stays on XLA
    ("auto", "cpu", jnp.bfloat16, 64, False, "xla"),
    ("xla", "gpu", jnp.bfloat16, 64, False, "xla"),
    ("cudnn", "gpu", jnp.bfloat16, 64, False, "cudnn"),
])
def test_attention_implementation_choice(setting, backend, dtype, head_dim, bias, want):
  assert layers.fused_attention_implementation(setting, backend, dtype, head_dim, bias) == want


def test_cudnn_attention_where_it_does_not_apply_is_an_error_naming_why():
  with pytest.raises(ConfigError, match=r"layers.attention='cudnn'.*backend is cpu.*float32.*"
                                        r"position bias"):
    layers.fused_attention_implementation("cudnn", "cpu", jnp.float32, 64, True)


@pytest.mark.parametrize("x_shape, w_shape, n", [
    ((4, 6, 8), (8, 5), 1),          # Dense on [B, L, D]
    ((4, 6, 8), (8, 2, 3), 1),       # a query projection to [heads, head_dim]
    ((4, 6, 2, 3), (2, 3, 8), 2),    # the output projection from [heads, head_dim]
    ((5, 8), (8, 5), 1),             # already 2-D
])
def test_matmul_dot_general_is_dot_general(x_shape, w_shape, n):
  """The 2-D form of a layer's dot gives lax.dot_general's values and gradients."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
  dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
  cot = jnp.asarray(rng.normal(size=x_shape[:x.ndim - n] + w_shape[n:]), jnp.float32)

  def loss(dot):
    return lambda x, w: jnp.sum(dot(x, w, dims) * cot)

  got = layers.matmul_dot_general(x, w, dims)
  want = jax.lax.dot_general(x, w, dims)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for g, r in zip(jax.grad(loss(layers.matmul_dot_general), argnums=(0, 1))(x, w),
                  jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  # A contraction that is not a layer's (a batch dim) is passed to lax.dot_general as it is.
  batched = (((2,), (1,)), ((0,), (0,)))
  a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 2))
  np.testing.assert_array_equal(layers.matmul_dot_general(a, b, batched),
                                jax.lax.dot_general(a, b, batched))
