"""vljax.models.pali: parameter tree, SigLIP-compatible image tower, bf16, cached greedy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import PartitionSpec as P

from vljax import decode, sharding
from vljax.configlib import ConfigError
from vljax.models import coca
from vljax.models import pali
from vljax.models import two_towers

PAD, EOS, VOCAB = 0, 1, 30
IMAGE = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8))  # 4 tokens at 16px
TEXT = dict(vocab_size=VOCAB, width=24, num_heads=2, head_dim=8, mlp_dim=32, num_buckets=8,
            max_distance=16, pad_id=PAD, eos_id=EOS)
DEPTHS = {"encdec": dict(encoder_depth=2, decoder_depth=2), "prefix_lm": dict(depth=3)}
MAX_LEN = 8

IMAGES = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
PREFIX = np.array([[5, 6, 1, 0, 0], [7, 1, 0, 0, 0], [8, 9, 10, 11, 1]], np.int32)
TARGETS = np.array([[12, 13, 1, 0, 0, 0], [14, 15, 16, 17, 1, 0], [18, 1, 0, 0, 0, 0]],
                   np.int32)


def _model(arch, dtype=jnp.float32, **text):
  return pali.PaLI(image=IMAGE, text=dict(TEXT, **DEPTHS[arch], **text), architecture=arch,
                   dtype=dtype)


@pytest.fixture(scope="module", params=["encdec", "prefix_lm"])
def setup(request):
  model = _model(request.param)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), IMAGES, PREFIX, TARGETS))
  return request.param, model, params


def _paths(tree):
  return {jax.tree_util.keystr(path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_param_tree(setup):
  arch, _, params = setup
  params = params["params"]
  assert set(params) == {"img", "txt"}
  assert set(params["img"]) == {"encoder", "projection"}
  assert params["img"]["projection"]["kernel"].shape == (32, 24)  # ViT width -> text width
  assert params["txt"]["token_embedder"]["embedding"].shape == (VOCAB + 1, 24)  # + BOS
  if arch == "encdec":
    assert set(params["txt"]) == {"token_embedder", "encoder", "decoder"}
    assert params["txt"]["decoder"]["logits"]["kernel"].shape == (24, VOCAB)
    assert "encoder_decoder_attention" in params["txt"]["decoder"]["layers_1"]
  else:
    assert set(params["txt"]) == {"token_embedder", "relpos_bias", "layers_0", "layers_1",
                                  "layers_2", "decoder_norm", "logits"}
  # No pooling head: PaLI attends to every patch token.
  assert "MAPHead_0" not in params["img"]["encoder"]


def test_image_encoder_params_match_the_two_tower_image_tower():
  towers = two_towers.TwoTowers(
      image=dict(IMAGE, pool_type="map"),
      text=dict(vocab_size=VOCAB, width=16, depth=1, mlp_dim=32, num_heads=2, max_len=8),
      embed_dim=16)
  tt = jax.eval_shape(towers.init, jax.random.key(0), IMAGES, jnp.zeros((3, 8), jnp.int32))
  tt_img = {k: v for k, v in nn.meta.unbox(tt)["params"]["img"]["encoder"].items()
            if k != "MAPHead_0"}
  model = _model("encdec")
  shapes = jax.eval_shape(model.init, jax.random.key(0), IMAGES, PREFIX, TARGETS)
  pali_img = nn.meta.unbox(shapes)["params"]["img"]["encoder"]
  assert _paths(pali_img) == _paths(tt_img)
  assert len(_paths(pali_img)) > 10


def test_logits_teacher_forcing_and_prefix_masking(setup):
  _, model, params = setup
  apply = jax.jit(lambda p, t: model.apply(params, IMAGES, p, t))
  logits = apply(PREFIX, TARGETS)
  assert logits.shape == (3, 6, VOCAB) and logits.dtype == jnp.float32
  # logits[:, i] sees targets[:, :i] only.
  changed = TARGETS.copy()
  changed[:, 1] = 20
  out = apply(PREFIX, changed)
  np.testing.assert_allclose(out[:, :2], logits[:, :2], atol=1e-5)
  assert not np.allclose(out[:, 2], logits[:, 2], atol=1e-3)
  # Prefix padding (anything after EOS, or PAD) is ignored; a real prefix token is not.
  junk = np.where(coca.caption_mask(PREFIX, PAD, EOS), PREFIX, 29).astype(np.int32)
  real = np.asarray(coca.caption_mask(TARGETS, PAD, EOS))
  np.testing.assert_allclose(np.asarray(apply(junk, TARGETS))[real], np.asarray(logits)[real],
                             atol=1e-5)
  other = PREFIX.copy()
  other[:, 0] = 21
  assert not np.allclose(apply(other, TARGETS), logits, atol=1e-3)
  # The image matters too.
  assert not np.allclose(model.apply(params, IMAGES[::-1], PREFIX, TARGETS)[0], logits[0],
                         atol=1e-3)


def test_encode_outputs(setup):
  arch, model, params = setup
  encoded, mask = model.apply(params, IMAGES, PREFIX, method="encode")
  assert encoded.shape == (3, 4 + 5, 24)  # 4 image tokens + 5 prefix positions
  expected = np.concatenate([np.ones((3, 4), bool), coca.caption_mask(PREFIX, PAD, EOS)], 1)
  np.testing.assert_array_equal(mask, expected)
  if arch == "prefix_lm":  # the input embeddings: prefix rows are the token embeddings
    table = params["params"]["txt"]["token_embedder"]["embedding"]
    np.testing.assert_allclose(encoded[:, 4:], table[PREFIX], atol=1e-6)


def test_bf16_compute_gives_float32_logits(setup):
  arch, _, params = setup
  model16 = _model(arch, dtype=jnp.bfloat16)
  logits16 = jax.jit(lambda: model16.apply(params, IMAGES, PREFIX, TARGETS))()
  logits32 = jax.jit(lambda: _model(arch).apply(params, IMAGES, PREFIX, TARGETS))()
  assert logits16.dtype == jnp.float32 and logits16.shape == logits32.shape
  assert np.all(np.isfinite(logits16))
  # bf16 rounding only: close to the float32 result, but not identical.
  scale = float(np.abs(logits32).max())
  assert float(np.abs(logits16 - logits32).max()) < 0.1 * scale
  assert not np.array_equal(logits16, logits32)
  # Cached decoding runs in bf16 too (caches in the compute dtype).
  cache = model16.apply(params, IMAGES, PREFIX, MAX_LEN, method="init_cache")
  assert all(x.dtype in (jnp.bfloat16, jnp.bool_) for x in jax.tree.leaves(cache))
  step, _ = model16.apply(params, np.full((3, 1), VOCAB, np.int32), 0, cache,
                          method="decode_step")
  assert step.dtype == jnp.float32 and step.shape == (3, 1, VOCAB)


def _greedy(model, params, cached):
  """Greedy decoding from BOS through a step function: cached, or full forwards per step."""
  bos = jnp.full((3,), model.bos_id, jnp.int32)
  if cached:
    cache = model.apply(params, IMAGES, PREFIX, MAX_LEN, method="init_cache")

    def step_fn(cache, tokens, position):
      logits, cache = model.apply(params, tokens[:, None], position, cache,
                                  method="decode_step")
      return logits[:, 0], cache
  else:
    # The token history: the input at position p > 0 is the output of step p - 1.
    cache = {"targets": jnp.zeros((3, MAX_LEN), jnp.int32)}

    def step_fn(cache, tokens, position):
      targets = cache["targets"]
      written = jax.lax.dynamic_update_slice(targets, tokens[:, None],
                                             (0, jnp.maximum(position - 1, 0)))
      targets = jnp.where(position > 0, written, targets)
      logits = model.apply(params, IMAGES, PREFIX, targets)
      return jax.lax.dynamic_index_in_dim(logits, position, 1, False), {"targets": targets}
  return decode.greedy(step_fn, cache, bos, MAX_LEN, EOS, PAD, return_logits=True)


def test_cached_greedy_equals_uncached_greedy(setup):
  _, model, params = setup
  params = jax.tree.map(lambda x: x, params)
  # Push the head away from EOS, so that rows decode several tokens before stopping.
  txt = params["params"]["txt"]
  head = txt["decoder"]["logits"] if "decoder" in txt else txt["logits"]
  head["kernel"] = head["kernel"].at[:, EOS].add(-0.3)
  tok_c, log_c = jax.jit(lambda p: _greedy(model, p, True))(params)
  tok_u, log_u = jax.jit(lambda p: _greedy(model, p, False))(params)
  np.testing.assert_array_equal(tok_c, tok_u)
  tok = np.asarray(tok_c)
  alive = np.cumsum(tok == EOS, axis=1) - (tok == EOS) == 0
  assert alive.sum() >= 6  # several decoded positions are compared
  np.testing.assert_allclose(np.asarray(log_c)[alive], np.asarray(log_u)[alive], atol=1e-5)
  # The greedy tokens are the argmax of the teacher-forced logits of the decoded sequence.
  forced = np.asarray(model.apply(params, IMAGES, PREFIX, tok_c))
  np.testing.assert_array_equal(np.argmax(forced, -1)[alive], tok[alive])


def test_dropout_through_call():
  model = pali.PaLI(image=dict(IMAGE, dropout=0.2),
                    text=dict(TEXT, **DEPTHS["encdec"], dropout=0.2), architecture="encdec")
  params = jax.jit(model.init)(jax.random.key(1), IMAGES, PREFIX, TARGETS)
  run = jax.jit(lambda key, train: model.apply(params, IMAGES, PREFIX, TARGETS, train=train,
                                               rngs={"dropout": key}), static_argnums=1)
  trained = run(jax.random.key(2), True)
  np.testing.assert_array_equal(trained, run(jax.random.key(2), True))
  assert not np.allclose(trained, run(jax.random.key(3), True))
  assert not np.allclose(trained, run(jax.random.key(2), False))


def test_logical_partitioning_and_sharded_run(setup):
  _, model, params = setup
  images, prefix, targets = (jnp.tile(x, (3, 1, 1, 1)[:x.ndim])[:8]
                             for x in (IMAGES, PREFIX, TARGETS))
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, prefix, targets)
  specs = jax.tree_util.tree_leaves_with_path(nn.get_partition_spec(abstract),
                                              is_leaf=lambda x: isinstance(x, P) or x is None)
  shapes = jax.tree.leaves(nn.meta.unbox(abstract))
  assert len(specs) == len(shapes)
  for (path, spec), shape in zip(specs, shapes):
    assert isinstance(spec, P) and len(spec) == len(shape.shape), jax.tree_util.keystr(path)
    assert all(a is None or a in sharding.LOGICAL_AXES for a in spec)
  ref_logits = model.apply(params, images, prefix, targets)
  bos = jnp.full((8, 1), model.bos_id, jnp.int32)
  ref_step = model.apply(params, bos, 0, model.apply(params, images, prefix, MAX_LEN,
                                                      method="init_cache"),
                         method="decode_step")[0]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  rules = sharding.DEFAULT_RULES
  param_shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    placed = jax.device_put(params, param_shardings)
    batch = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
             for x in (images, prefix, targets)]
    logits = jax.jit(model.apply)(placed, *batch)

    def first_step(p, images, prefix):
      cache = model.apply(p, images, prefix, MAX_LEN, method="init_cache")
      return model.apply(p, bos, 0, cache, method="decode_step")[0]
    step = jax.jit(first_step)(placed, *batch[:2])
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  np.testing.assert_allclose(step, ref_step, atol=1e-5)


def test_config_errors():
  with pytest.raises(ConfigError, match="model.architecture"):
    pali.PaLI(image=IMAGE, text=dict(TEXT, depth=2), architecture="decoder").init(
        jax.random.key(0), IMAGES, PREFIX, TARGETS)
  with pytest.raises(ConfigError, match="model.text.encoder_depth"):
    _model("prefix_lm", encoder_depth=2).init(jax.random.key(0), IMAGES, PREFIX, TARGETS)
