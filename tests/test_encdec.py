"""vljax.models.encdec: T5 v1.1 encoder-decoder and prefix-LM against a plain reference.

The reference below is written independently of the flax code: per example, padding is
dropped outright (instead of masked), attention weights are zeroed multiplicatively (instead
of masking logits), buckets come from a scalar float64 formula. It takes `xp` (numpy or jax.numpy) so that
the same code gives reference values (numpy) and reference gradients (jax.grad).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.configlib import ConfigError
from vljax.models import encdec

PAD, EOS, VOCAB = 0, 1, 23
BOS = VOCAB
# head_dim * num_heads (12) differs from width (16), as T5 v1.1 allows; small buckets so that
# short sequences reach the log-spaced buckets and the clipped last one.
SIZES = dict(vocab_size=VOCAB, width=16, num_heads=2, head_dim=6, mlp_dim=24, num_buckets=8,
             max_distance=12, pad_id=PAD, eos_id=EOS)
ENC_DEPTH = DEC_DEPTH = 2
DEPTH = 3  # prefix-LM layers

# Right-padded inputs: row 1 has ids after its EOS (not real), row 2 has no EOS at all.
INPUTS = np.array([
    [5, 6, 7, 8, 9, 1, 0, 0, 0, 0],
    [3, 4, 1, 9, 9, 0, 0, 0, 0, 0],
    [2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
], np.int32)
TARGETS = np.array([
    [12, 13, 14, 1, 0, 0, 0],
    [15, 16, 17, 18, 19, 20, 1],
    [4, 1, 0, 0, 0, 0, 0],
], np.int32)


# ---------------------------------------------------------------------------- the reference


def real_tokens(tokens):
  """Real tokens: non-pad, up to and including the first EOS (a plain loop)."""
  out = np.zeros(tokens.shape, bool)
  for b, row in enumerate(tokens):
    seen_eos = False
    for i, t in enumerate(row):
      out[b, i] = not seen_eos and t != PAD
      seen_eos = seen_eos or t == EOS
  return out


def bucket(rel, bidirectional, num_buckets, max_distance):
  """T5's bucket of one relative position (key - query), from the paper's definition."""
  half = num_buckets // 2 if bidirectional else num_buckets
  offset = half if bidirectional and rel > 0 else 0
  distance = abs(rel) if bidirectional else max(-rel, 0)
  exact = half // 2
  if distance < exact:
    return offset + distance
  log_part = math.floor(math.log(distance / exact) / math.log(max_distance / exact)
                        * (half - exact))
  return offset + min(half - 1, exact + log_part)


def rel_bias(table, query_pos, key_pos, bidirectional):
  idx = np.array([[bucket(k - q, bidirectional, SIZES["num_buckets"], SIZES["max_distance"])
                   for k in key_pos] for q in query_pos])
  return table[idx].transpose(2, 0, 1)  # [heads, Lq, Lk]


def rms(xp, x, scale):
  return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def gelu(xp, x):  # tanh approximation, as T5 v1.1
  return 0.5 * x * (1 + xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def attend(xp, p, xq, xkv, allowed, bias):
  """xq [Lq, D] attends to xkv [Lk, D]; row i to the keys where allowed[i] (numpy bool).

  Disallowed keys get zero weight by multiplying their exp() by 0 (the model masks logits).
  """
  q = xp.einsum("ld,dhk->hlk", xq, p["query"]["kernel"])
  k = xp.einsum("ld,dhk->hlk", xkv, p["key"]["kernel"])
  v = xp.einsum("ld,dhk->hlk", xkv, p["value"]["kernel"])
  s = xp.einsum("hid,hjd->hij", q, k)  # no 1/sqrt(d): T5
  if bias is not None:
    s = s + bias
  w = xp.exp(s - s.max(axis=-1, keepdims=True)) * allowed[None].astype(np.float32)
  o = xp.einsum("hij,hjd->ihd", w / w.sum(axis=-1, keepdims=True), v)
  return xp.einsum("lhd,hde->le", o, p["out"]["kernel"])


def mlp(xp, p, x):
  return (gelu(xp, x @ p["wi_0"]["kernel"]) * (x @ p["wi_1"]["kernel"])) @ p["wo"]["kernel"]


def self_attention_layer(xp, p, x, allowed, bias):
  x = x + attend(xp, p["attention"], rms(xp, x, p["pre_attention_norm"]["scale"]),
                 rms(xp, x, p["pre_attention_norm"]["scale"]), allowed, bias)
  return x + mlp(xp, p["mlp"], rms(xp, x, p["pre_mlp_norm"]["scale"]))


def ref_encdec(p, input_emb, input_real, targets, xp=np):
  """Logits [B, T, V]: per example, encode only the real inputs, decode [BOS, targets[:-1]]."""
  emb = p["token_embedder"]["embedding"]
  out = []
  for b in range(len(targets)):
    x = input_emb[b][np.nonzero(input_real[b])[0]]
    n = x.shape[0]
    enc = p["encoder"]
    bias = rel_bias(enc["relpos_bias"]["rel_embedding"], range(n), range(n), True)
    for i in range(ENC_DEPTH):
      x = self_attention_layer(xp, enc[f"layers_{i}"], x, np.ones((n, n), bool), bias)
    encoded = rms(xp, x, enc["encoder_norm"]["scale"])
    dec = p["decoder"]
    ids = np.array([BOS] + list(targets[b][:-1]))
    t = len(ids)
    y = emb[ids]
    bias = rel_bias(dec["relpos_bias"]["rel_embedding"], range(t), range(t), False)
    causal = np.tril(np.ones((t, t), bool))
    for i in range(DEC_DEPTH):
      lp = dec[f"layers_{i}"]
      h = rms(xp, y, lp["pre_self_attention_norm"]["scale"])
      y = y + attend(xp, lp["self_attention"], h, h, causal, bias)
      h = rms(xp, y, lp["pre_cross_attention_norm"]["scale"])
      y = y + attend(xp, lp["encoder_decoder_attention"], h, encoded, np.ones((t, n), bool),
                     None)
      y = y + mlp(xp, lp["mlp"], rms(xp, y, lp["pre_mlp_norm"]["scale"]))
    out.append(rms(xp, y, dec["decoder_norm"]["scale"]) @ dec["logits"]["kernel"])
  return xp.stack(out)


def ref_prefix_lm(p, input_emb, input_real, targets, xp=np):
  """Logits [B, T, V]: per example, one stack over [real inputs, BOS, targets[:-1]]."""
  emb = p["token_embedder"]["embedding"]
  out = []
  for b in range(len(targets)):
    inputs = input_emb[b][np.nonzero(input_real[b])[0]]
    n = inputs.shape[0]
    x = xp.concatenate([inputs, emb[np.array([BOS] + list(targets[b][:-1]))]], axis=0)
    s = x.shape[0]
    allowed = np.array([[j < n or j <= i for j in range(s)] for i in range(s)])
    bias = rel_bias(p["relpos_bias"]["rel_embedding"], range(s), range(s), True)
    for i in range(DEPTH):
      x = self_attention_layer(xp, p[f"layers_{i}"], x, allowed, bias)
    out.append(rms(xp, x[n:], p["decoder_norm"]["scale"]) @ p["logits"]["kernel"])
  return xp.stack(out)


def _perturbed(params, seed):
  """Init values times (1 + noise): norm scales no longer all ones, the scale of each kernel
  (T5's init, which keeps attention soft and the float32 error small) otherwise kept."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x * (1 + 0.3 * jax.random.normal(k, x.shape))
                                   for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def ed():
  model = encdec.EncoderDecoder(**SIZES, encoder_depth=ENC_DEPTH, decoder_depth=DEC_DEPTH)
  params = nn.meta.unbox(model.init(jax.random.key(0), INPUTS, TARGETS))["params"]
  return model, _perturbed(params, 1)


@pytest.fixture(scope="module")
def plm():
  model = encdec.PrefixLM(**SIZES, depth=DEPTH)
  params = nn.meta.unbox(model.init(jax.random.key(0), INPUTS, TARGETS))["params"]
  return model, _perturbed(params, 2)


def _apply(model, params, *args, **kwargs):
  return model.apply({"params": params}, *args, **kwargs)


# ---------------------------------------------------------------------------- buckets


def test_relative_position_bucket_hand_computed():
  # Bidirectional, 32 buckets, max_distance 128: 16 per direction, 8 exact, then
  # 8 + floor(log(d / 8) / log(16) * 8); keys after the query (rel > 0) are offset by 16.
  bidir = {0: 0, -1: 1, 1: 17, -7: 7, 7: 23, -8: 8, 8: 24, -16: 10, 16: 26, -20: 10,
           -64: 14, -127: 15, -128: 15, -1000: 15, 1000: 31}
  # Causal: 16 exact, then 16 + floor(log(d / 16) / log(8) * 16); keys after the query -> 0.
  causal = {5: 0, 0: 0, -1: 1, -15: 15, -16: 16, -32: 21, -64: 26, -100: 30, -127: 31,
            -128: 31, -500: 31}
  for table, bidirectional in ((bidir, True), (causal, False)):
    rel = np.array(list(table))
    got = encdec.relative_position_bucket(rel, bidirectional)
    np.testing.assert_array_equal(got, list(table.values()), err_msg=str(bidirectional))
  # The test sizes: 8 buckets, max_distance 12 (bidirectional: 4 per side, 2 exact):
  # 2 + floor(log(d / 2) / log(6) * 2): d=3 -> 2, d=5 -> 3, d=12 -> 4, clipped to 3.
  small = encdec.relative_position_bucket(np.array([-1, -3, -5, -12, 3, 5]), True, 8, 12)
  np.testing.assert_array_equal(small, [1, 2, 3, 3, 6, 7])
  # The scalar reference used below agrees with the implementation everywhere.
  rel = np.arange(-300, 301)
  for bidirectional in (True, False):
    for nb, md in ((32, 128), (8, 12)):
      np.testing.assert_array_equal(
          encdec.relative_position_bucket(rel, bidirectional, nb, md),
          [bucket(int(r), bidirectional, nb, md) for r in rel])


# ---------------------------------------------------------------------------- encoder-decoder


def _embedded(params, tokens):
  return np.asarray(params["token_embedder"]["embedding"])[tokens]


def test_encdec_matches_reference(ed):
  model, params = ed
  logits = _apply(model, params, INPUTS, TARGETS)
  assert logits.shape == (3, 7, VOCAB) and logits.dtype == jnp.float32
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)  # reference in float64
  expected = ref_encdec(p, _embedded(p, INPUTS), real_tokens(INPUTS), TARGETS)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_encdec_gradients_match_reference(ed):
  model, params = ed
  real = real_tokens(TARGETS)
  weights = jax.random.normal(jax.random.key(3), (3, 7, VOCAB)) * real[..., None]
  loss = lambda p: jnp.sum(_apply(model, p, INPUTS, TARGETS) * weights)
  ref_loss = lambda p: jnp.sum(ref_encdec(p, p["token_embedder"]["embedding"][INPUTS],
                                          real_tokens(INPUTS), TARGETS, xp=jnp) * weights)
  _assert_same_grads(jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(ref_loss))(params))


def _assert_same_grads(grads, ref_grads):
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    np.testing.assert_allclose(g, flat_ref[path], atol=1e-4, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
  # Every parameter gets a gradient (nothing is silently unused).
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads))


def _assert_real_equal(a, b, real):
  np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5)


@pytest.mark.parametrize("arch", ["encdec", "prefix_lm"])
def test_masking(arch, ed, plm):
  model, params = ed if arch == "encdec" else plm
  base = _apply(model, params, INPUTS, TARGETS)
  rng = np.random.default_rng(0)
  # Longer padding; after an EOS any ids are padding (a row without EOS is padded with PAD).
  real = np.pad(real_tokens(INPUTS), ((0, 0), (0, 4)))
  junk = rng.integers(2, VOCAB, real.shape)
  junk[~(INPUTS == EOS).any(axis=1)] = PAD
  inputs = np.where(real, np.pad(INPUTS, ((0, 0), (0, 4))), junk).astype(np.int32)
  np.testing.assert_array_equal(real_tokens(inputs), real)
  _assert_real_equal(_apply(model, params, inputs, TARGETS), base, real_tokens(TARGETS))
  # Padded target positions hold other ids.
  targets = np.where(real_tokens(TARGETS), TARGETS, rng.integers(2, VOCAB, TARGETS.shape))
  _assert_real_equal(_apply(model, params, INPUTS, targets.astype(np.int32)), base,
                     real_tokens(TARGETS))
  # A future target: logits[:, i] depends on targets[:, :i] only.
  changed = TARGETS.copy()
  changed[:, 2] = 7
  out = _apply(model, params, INPUTS, changed)
  np.testing.assert_allclose(out[:, :3], base[:, :3], atol=1e-6)
  assert not np.allclose(out[:2, 3], base[:2, 3], atol=1e-3)  # rows 0, 1: a real change
  # And a real input token does matter.
  other = INPUTS.copy()
  other[:, 0] = 20
  assert not np.allclose(_apply(model, params, other, TARGETS), base, atol=1e-3)


def _teacher_forced_steps(model, params, cache, chunk=1):
  """Feeds [BOS, TARGETS[:, :-1]] `chunk` tokens at a time through a jitted decode_step."""
  step = jax.jit(lambda c, t, pos: _apply(model, params, t, pos, c, method="decode_step"))
  dec_in = np.concatenate([np.full((3, 1), BOS, np.int32), TARGETS[:, :-1]], axis=1)
  out = []
  for pos in range(0, dec_in.shape[1], chunk):
    logits, cache = step(cache, dec_in[:, pos:pos + chunk], jnp.int32(pos))
    out.append(logits)
  return jnp.concatenate(out, axis=1)


def _encdec_cache(model, params, inputs, max_len=7):
  mask = real_tokens(inputs)
  encoded = _apply(model, params, _apply(model, params, inputs, method="embed"), mask,
                   method="encode")
  return _apply(model, params, encoded, mask, max_len, method="init_cache")


def test_encdec_cached_decoding_equals_full_forward(ed):
  model, params = ed
  full = _apply(model, params, INPUTS, TARGETS)
  cache = _encdec_cache(model, params, INPUTS, max_len=9)  # a longer buffer than needed
  for leaf in jax.tree.leaves(cache):
    assert leaf.shape[0] == 3
  np.testing.assert_allclose(_teacher_forced_steps(model, params, cache), full, atol=1e-5)
  # Several tokens per step give the same logits (a position-offset query block).
  np.testing.assert_allclose(_teacher_forced_steps(model, params, cache, chunk=3)[:, :7], full,
                             atol=1e-5)


def _kv_calls(fn):
  """Runs fn, recording (attention module name, input length) of every Attention.kv call."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, encdec.Attention) and context.method_name == "kv":
      calls.append((context.module.name, args[0].shape[1]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = fn()
  return out, calls


def test_encdec_cross_kv_are_computed_once(ed):
  model, params = ed
  cache, calls = _kv_calls(lambda: _encdec_cache(model, params, INPUTS))
  # init_cache: each decoder layer projects the encoder output once (the encoder's own
  # self-attention calls are the other entries).
  assert sum(name == "encoder_decoder_attention" for name, _ in calls) == DEC_DEPTH
  assert "encoded" not in cache and set(cache["layers"][0]) == {
      "self_key", "self_value", "cross_key", "cross_value"}
  bos = np.full((3, 1), BOS, np.int32)
  (logits, _), calls = _kv_calls(
      lambda: _apply(model, params, bos, 0, cache, method="decode_step"))
  # decode_step projects only the new token's self-attention K/V, never the encoder output.
  assert calls == [("self_attention", 1)] * DEC_DEPTH
  # The cached cross K/V are what decoding uses: a cache built from garbage encoder output but
  # holding the true cross K/V decodes exactly like the true one ...
  garbage = jax.random.normal(jax.random.key(5), (3, INPUTS.shape[1], SIZES["width"]))
  other = _apply(model, params, garbage, real_tokens(INPUTS), 7, method="init_cache")
  for true_layer, other_layer in zip(cache["layers"], other["layers"]):
    other_layer["cross_key"] = true_layer["cross_key"]
    other_layer["cross_value"] = true_layer["cross_value"]
  np.testing.assert_allclose(_teacher_forced_steps(model, params, other),
                             _apply(model, params, INPUTS, TARGETS), atol=1e-5)
  # ... and garbage cross K/V change the logits.
  broken = jax.tree.map(lambda x: x, cache)
  broken["layers"][0]["cross_value"] = 3.0 + cache["layers"][0]["cross_value"]
  broken_logits, _ = _apply(model, params, bos, 0, broken, method="decode_step")
  assert not np.allclose(broken_logits, logits, atol=1e-3)


# ---------------------------------------------------------------------------- prefix-LM


def test_prefix_lm_matches_reference(plm):
  model, params = plm
  logits = _apply(model, params, INPUTS, TARGETS)
  assert logits.shape == (3, 7, VOCAB) and logits.dtype == jnp.float32
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)  # reference in float64
  expected = ref_prefix_lm(p, _embedded(p, INPUTS), real_tokens(INPUTS), TARGETS)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def _padded_in_the_middle(emb, real, seed):
  """Inserts junk padding rows at random places among the input embeddings."""
  rng = np.random.default_rng(seed)
  rows, masks = [], []
  for b in range(len(emb)):
    e, m = list(emb[b]), list(real[b])
    for _ in range(5):
      at = int(rng.integers(0, len(e) + 1))
      e.insert(at, rng.normal(size=emb.shape[-1]).astype(np.float32))
      m.insert(at, False)
    rows.append(np.stack(e))
    masks.append(np.array(m))
  return np.stack(rows), np.stack(masks)


def test_prefix_lm_padding_in_the_middle_changes_nothing(plm):
  model, params = plm
  p = jax.tree.map(np.asarray, params)
  emb, real = _embedded(p, INPUTS), real_tokens(INPUTS)
  base = _apply(model, params, emb, real, TARGETS, method="forward")
  padded_emb, padded_real = _padded_in_the_middle(emb, real, 0)
  assert padded_emb.shape[1] == INPUTS.shape[1] + 5
  out = _apply(model, params, padded_emb, padded_real, TARGETS, method="forward")
  np.testing.assert_allclose(out, base, atol=1e-5)
  # The reference (which never sees padding) agrees, so this is the right invariance.
  np.testing.assert_allclose(out, ref_prefix_lm(p, emb, real, TARGETS), atol=1e-5, rtol=1e-5)
  # Cached decoding from the middle-padded prefill too.
  cache = _apply(model, params, padded_emb, padded_real, 7, method="init_cache")
  np.testing.assert_allclose(_teacher_forced_steps(model, params, cache), base, atol=1e-5)


def test_prefix_lm_gradients_match_reference(plm):
  model, params = plm
  real = real_tokens(TARGETS)
  weights = jax.random.normal(jax.random.key(4), (3, 7, VOCAB)) * real[..., None]
  loss = lambda p: jnp.sum(_apply(model, p, INPUTS, TARGETS) * weights)
  ref_loss = lambda p: jnp.sum(ref_prefix_lm(p, p["token_embedder"]["embedding"][INPUTS],
                                             real_tokens(INPUTS), TARGETS, xp=jnp) * weights)
  _assert_same_grads(jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(ref_loss))(params))


def test_prefix_lm_cached_decoding_and_prefill_once(plm):
  model, params = plm
  full = _apply(model, params, INPUTS, TARGETS)
  emb, real = _apply(model, params, INPUTS, method="embed"), real_tokens(INPUTS)
  cache, calls = _kv_calls(lambda: _apply(model, params, emb, real, 7, method="init_cache"))
  assert calls == [("attention", INPUTS.shape[1])] * DEPTH  # the prefill: inputs, once
  assert cache["layers"][0]["key"].shape == (3, INPUTS.shape[1] + 7, 2, 6)
  np.testing.assert_allclose(_teacher_forced_steps(model, params, cache), full, atol=1e-5)
  np.testing.assert_allclose(_teacher_forced_steps(model, params, cache, chunk=2)[:, :7], full,
                             atol=1e-5)
  bos = np.full((3, 1), BOS, np.int32)
  (logits, _), calls = _kv_calls(
      lambda: _apply(model, params, bos, 0, cache, method="decode_step"))
  assert calls == [("attention", 1)] * DEPTH  # a step projects its own token only
  # The prefilled input K/V are what decoding uses: a prefill of garbage inputs with the true
  # input slots swapped in decodes like the true one; garbage in those slots does not.
  length = INPUTS.shape[1]
  garbage = jax.random.normal(jax.random.key(6), emb.shape)
  other = _apply(model, params, garbage, real, 7, method="init_cache")
  for true_layer, other_layer in zip(cache["layers"], other["layers"]):
    for name in ("key", "value"):
      other_layer[name] = other_layer[name].at[:, :length].set(true_layer[name][:, :length])
  np.testing.assert_allclose(_teacher_forced_steps(model, params, other), full, atol=1e-5)
  broken = jax.tree.map(lambda x: x, cache)
  broken["layers"][0]["value"] = broken["layers"][0]["value"].at[:, :length].add(3.0)
  assert not np.allclose(_apply(model, params, bos, 0, broken, method="decode_step")[0], logits,
                         atol=1e-3)


# ---------------------------------------------------------------------------- sizes, config


def test_named_sizes_and_t5_base_parameter_count():
  assert encdec.SIZES["base"] == dict(width=768, num_heads=12, head_dim=64, mlp_dim=2048,
                                      encoder_depth=12, decoder_depth=12)
  assert encdec.SIZES["large"] == dict(width=1024, num_heads=16, head_dim=64, mlp_dim=2816,
                                       encoder_depth=24, decoder_depth=24)
  assert encdec.SIZES["xl"] == dict(width=2048, num_heads=32, head_dim=64, mlp_dim=5120,
                                    encoder_depth=24, decoder_depth=24)
  kwargs = encdec.text_kwargs(dict(variant="base", vocab_size=32128), "encdec")
  model = encdec.EncoderDecoder(**kwargs)
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
  # T5 v1.1 base, counted by hand: embedding and untied head 32128 x 768 each; per encoder
  # layer 4 attention + 3 MLP matrices + 2 norms; per decoder layer 8 + 3 + 3; per stack a
  # final norm and a 32 x 12 bias table. That is 247,577,856 (the published ~248M), plus
  # the BOS embedding row.
  enc_layer = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768
  dec_layer = 8 * 768 * 768 + 3 * 768 * 2048 + 3 * 768
  expected = 2 * 32128 * 768 + 12 * (enc_layer + dec_layer) + 2 * (768 + 32 * 12)
  assert expected == 247_577_856
  assert count == expected + 768


def test_text_kwargs_variants_and_errors():
  kw = encdec.text_kwargs(dict(variant="xl", vocab_size=100, mlp_dim=64), "encdec")
  assert kw == dict(encdec.SIZES["xl"], mlp_dim=64, vocab_size=100)
  kw = encdec.text_kwargs(dict(variant="base", vocab_size=100), "prefix_lm")
  assert kw["depth"] == 24 and "encoder_depth" not in kw
  with pytest.raises(ConfigError, match="model.text.variant"):
    encdec.text_kwargs(dict(variant="huge", vocab_size=100), "encdec")
  with pytest.raises(ConfigError, match="model.text.depth"):
    encdec.text_kwargs(dict(variant="base", vocab_size=100, depth=3), "encdec")
  with pytest.raises(ConfigError, match="model.text.vocab_size"):
    encdec.text_kwargs(dict(variant="base"), "encdec")
  with pytest.raises(ConfigError, match="model.architecture"):
    encdec.text_kwargs(dict(variant="base", vocab_size=100), "decoder_only")


def test_rms_norm():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 5 + 2
  norm = encdec.RMSNorm()
  v = norm.init(jax.random.key(1), x)
  scale = jnp.arange(8.0)
  y = norm.apply({"params": {"scale": scale}}, x)
  expected = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, expected * np.arange(8.0), rtol=1e-5)
  assert nn.meta.unbox(v)["params"]["scale"].shape == (8,)
  # bf16 input: statistics in float32, output in the compute dtype.
  y16 = encdec.RMSNorm(dtype=jnp.bfloat16).apply({"params": {"scale": scale}},
                                                  x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), expected * np.arange(8.0),
                             rtol=2e-2, atol=2e-2)


def test_dropout_only_in_training():
  # The prefix-LM here; tests/test_pali_model.py covers the encoder-decoder's dropout.
  model = encdec.PrefixLM(**dict(SIZES, dropout=0.3), depth=1)
  params = jax.jit(model.init)(jax.random.key(0), INPUTS, TARGETS)
  run = jax.jit(lambda key, train: model.apply(params, INPUTS, TARGETS, train=train,
                                               rngs={"dropout": key}), static_argnums=1)
  trained = run(jax.random.key(1), True)
  np.testing.assert_array_equal(trained, run(jax.random.key(1), True))
  assert not np.allclose(trained, run(jax.random.key(2), True))
  assert not np.allclose(trained, run(jax.random.key(1), False))
  np.testing.assert_array_equal(run(jax.random.key(1), False), run(jax.random.key(2), False))
