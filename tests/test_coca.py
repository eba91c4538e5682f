"""CoCa: masking/padding invariance, one-pass outputs, loss terms, gradients of both heads,
the checkpoint format, and decoding that projects the image context once."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import configlib, losses, sharding
from vljax.data import tokenizer as tokenizer_lib
from vljax.models import coca as coca_model
from vljax.models import layers
from vljax.objectives import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(*overrides, arg="scale=tiny"):
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"coca.py:{arg}"))
  # Longer captions than the tiny default, so that padding lengths can vary.
  return configlib.apply_overrides(config, ["data.max_len=20", *overrides])


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.get_tokenizer(None)


@pytest.fixture(scope="module")
def setup(tokenizer):
  config = _config()
  obj = make_objective(config, tokenizer)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  text = jnp.asarray(tokenizer.encode(["a red circle", "a large blue square on the left",
                                       "there is a cross", "a"], 12))
  params = nn.meta.unbox(obj.init(jax.random.key(1), {"image": images, "text": text}))
  return obj, params, images, text


def test_param_tree_has_both_poolers_and_decoupled_halves(setup):
  obj, params, _, _ = setup
  assert set(params) == {"img", "txt", "t"}
  assert params["img"]["contrastive_pooler"]["queries"].shape == (1, 32)
  assert params["img"]["caption_pooler"]["queries"].shape == (4, 32)
  assert "CrossAttention" not in params["txt"]["unimodal_0"]
  assert "CrossAttention" in params["txt"]["multimodal_0"]
  # The configurable number of layers per half.
  config = _config("model.text.unimodal_depth=2", "model.text.multimodal_depth=3")
  shapes = jax.eval_shape(make_objective(config, tokenizer_lib.get_tokenizer(None)).init,
                          jax.random.key(0), {"image": jnp.zeros((2, 16, 16, 3)),
                                              "text": jnp.zeros((2, 20), jnp.int32)})
  txt = nn.meta.unbox(shapes)["txt"]
  assert sorted(k for k in txt if "modal_" in k) == [
      "multimodal_0", "multimodal_1", "multimodal_2", "unimodal_0", "unimodal_1"]


# A CoCa built directly, whose text width differs from the context's (the image width), so
# that the cross-attention key/value projections' shapes tell the two apart.
TEXT_WIDTH, HEADS, CONTEXT_WIDTH, MLP, VOCAB, MAX_LEN, EMBED, QUERIES = 32, 4, 24, 64, 50, 8, 16, 3
MULTIMODAL = 2


@pytest.fixture(scope="module")
def small():
  model = coca_model.CoCa(
      image=dict(width=CONTEXT_WIDTH, depth=1, mlp_dim=48, num_heads=2, patch_size=(8, 8)),
      text=dict(vocab_size=VOCAB, width=TEXT_WIDTH, mlp_dim=MLP, num_heads=HEADS,
                unimodal_depth=1, multimodal_depth=MULTIMODAL, max_len=MAX_LEN),
      embed_dim=EMBED, num_decoder_queries=QUERIES)
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  # Ids >= 2 everywhere (no pad 0, no EOS 1): every position is real, so the cached decoder
  # (which does not mask padding) must reproduce the full forward at every position.
  text = jax.random.randint(jax.random.key(2), (3, MAX_LEN), 2, VOCAB)
  params = nn.meta.unbox(model.init(jax.random.key(1), images, text))["params"]
  return model, params, images, text


def _block_shapes(cross: bool) -> dict:
  d, h, hd = TEXT_WIDTH, HEADS, TEXT_WIDTH // HEADS
  attention = lambda kv_width: {
      "query": {"kernel": (d, h, hd), "bias": (h, hd)},
      "key": {"kernel": (kv_width, h, hd), "bias": (h, hd)},
      "value": {"kernel": (kv_width, h, hd), "bias": (h, hd)},
      "out": {"kernel": (h, hd, d), "bias": (d,)}}
  norm = {"scale": (d,), "bias": (d,)}
  block = {"LayerNorm_0": norm, "SelfAttention": attention(d), "LayerNorm_1": norm,
           "MlpBlock_0": {"Dense_0": {"kernel": (d, MLP), "bias": (MLP,)},
                          "Dense_1": {"kernel": (MLP, d), "bias": (d,)}}}
  if cross:
    block.update(LayerNorm_cross=norm, CrossAttention=attention(CONTEXT_WIDTH))
  return block


def test_text_decoder_param_tree_is_the_checkpoint_format(small):
  # Written from the architecture: existing CoCa checkpoints load by exactly these names and
  # shapes, whatever the decoding code does with them.
  _, params, _, _ = small
  d, norm = TEXT_WIDTH, {"scale": (TEXT_WIDTH,), "bias": (TEXT_WIDTH,)}
  expected = {
      "embedding": {"embedding": (VOCAB + 1, d)}, "pos_embedding": (1, MAX_LEN + 1, d),
      "cls": (1, 1, d), "unimodal_0": _block_shapes(False),
      **{f"multimodal_{i}": _block_shapes(True) for i in range(MULTIMODAL)},
      "cls_norm": norm, "head": {"kernel": (d, EMBED), "bias": (EMBED,)},
      "decoder_norm": norm, "logits_head": {"kernel": (d, VOCAB), "bias": (VOCAB,)}}
  assert jax.tree.map(lambda x: x.shape, params["txt"]) == expected


def _cross_kv_projections(fn):
  """Runs fn, recording (name, input shape) of every CrossAttention key/value projection."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, layers.DenseGeneral) and module.name in ("key", "value")
        and module.parent.name == "CrossAttention" and context.method_name == "__call__"):
      calls.append((module.name, args[0].shape))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = fn()
  return out, calls


def _teacher_forced_steps(model, params, cache, text):
  """Logits [B, L, V] of feeding [BOS, text[:, :-1]] one token per decode_step."""
  inputs = jnp.concatenate([jnp.full((len(text), 1), VOCAB), text[:, :-1]], axis=1)
  step = jax.jit(lambda c, t, p: model.apply({"params": params}, t, p, c,
                                             method="decode_step"))
  out = []
  for pos in range(inputs.shape[1]):
    logits, cache = step(cache, inputs[:, pos:pos + 1], jnp.int32(pos))
    out.append(logits)
  return jnp.concatenate(out, axis=1)


def test_decoding_projects_the_image_context_once(small):
  model, params, images, text = small
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
  batch = len(images)
  # The full forward projects the context in every multimodal layer (the probe sees it) ...
  _, calls = _cross_kv_projections(lambda: apply(images, text))
  once = sorted([("key", (batch, QUERIES, CONTEXT_WIDTH)),
                 ("value", (batch, QUERIES, CONTEXT_WIDTH))] * MULTIMODAL)
  assert sorted(calls) == once
  # ... init_cache does so once per layer and keeps the keys/values, not the context ...
  cache, calls = _cross_kv_projections(lambda: apply(images, MAX_LEN, method="init_cache"))
  assert sorted(calls) == once
  for layer in cache["multimodal"]:
    assert set(layer) == {"key", "value", "cross_key", "cross_value"}
    assert layer["cross_key"].shape == (batch, QUERIES, HEADS, TEXT_WIDTH // HEADS)
  for leaf in jax.tree.leaves(cache):
    assert leaf.shape[0] == batch  # beam search reorders rows
  # ... and a decoding step never projects it.
  bos = jnp.full((batch, 1), VOCAB, jnp.int32)
  (logits, _), calls = _cross_kv_projections(lambda: apply(bos, 0, cache, method="decode_step"))
  assert calls == [] and logits.shape == (batch, 1, VOCAB)


def test_decoding_uses_the_cached_cross_keys_values(small):
  model, params, images, text = small
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
  full = apply(images, text)["logits"]
  cache = apply(images, MAX_LEN, method="init_cache")
  np.testing.assert_allclose(_teacher_forced_steps(model, params, cache, text), full, atol=1e-5)
  # A cache built from other images decodes like the true one once it holds the true cross
  # keys/values: they are all that decoding knows of the image.
  garbage = 3.0 * jax.random.normal(jax.random.key(7), images.shape)
  other = apply(garbage, MAX_LEN, method="init_cache")
  assert not np.allclose(_teacher_forced_steps(model, params, other, text), full, atol=1e-3)
  for true_layer, other_layer in zip(cache["multimodal"], other["multimodal"]):
    other_layer["cross_key"] = true_layer["cross_key"]
    other_layer["cross_value"] = true_layer["cross_value"]
  np.testing.assert_allclose(_teacher_forced_steps(model, params, other, text), full, atol=1e-5)


def test_cached_cross_attention_block_takes_no_context():
  block = layers.DecoderBlock(MLP, HEADS, cross_attention=True)
  x = jax.random.normal(jax.random.key(0), (2, 3, TEXT_WIDTH))
  context = jax.random.normal(jax.random.key(1), (2, 5, CONTEXT_WIDTH))
  variables = block.init(jax.random.key(2), x, None, context)
  cache = block.apply(variables, 2, 4, TEXT_WIDTH, context, method="init_cache")
  with pytest.raises(ValueError, match="from its cache"):
    block.apply(variables, x[:, :1], None, context, cache=cache, position=0)
  with pytest.raises(ValueError, match="needs the context"):
    block.apply(variables, 2, 4, TEXT_WIDTH, method="init_cache")


def test_padding_length_and_contents_change_nothing(setup):
  obj, params, images, text = setup
  apply = lambda t: obj.model.apply({"params": params}, images, t)
  base = apply(text)
  real = np.asarray(coca_model.caption_mask(text, 0, 1))
  # Longer padding, filled with arbitrary ids after the EOS.
  rng = np.random.default_rng(0)
  longer = np.asarray(jnp.pad(text, ((0, 0), (0, 8))))
  junk = rng.integers(2, 200, longer.shape)
  longer = np.where(np.pad(real, ((0, 0), (0, 8))), longer, junk).astype(np.int32)
  other = apply(jnp.asarray(longer))
  # Shorter padding: cut to the longest caption.
  n = int(real.sum(1).max())
  shorter = apply(text[:, :n])
  np.testing.assert_allclose(other["ztxt"], base["ztxt"], atol=1e-5)
  np.testing.assert_allclose(shorter["ztxt"], base["ztxt"], atol=1e-5)
  for out in (other, shorter):
    length = out["logits"].shape[1]
    m = min(length, base["logits"].shape[1])
    sel = real[:, :m]
    np.testing.assert_allclose(np.asarray(out["logits"][:, :m])[sel],
                               np.asarray(base["logits"][:, :m])[sel], atol=1e-4)
  # The text embedding of embed_texts is the one of the joint pass; it does depend on content.
  np.testing.assert_allclose(obj.embed_texts(params, text), base["ztxt"], atol=1e-6)
  np.testing.assert_allclose(obj.embed_images(params, images), base["zimg"], atol=1e-6)
  assert not np.allclose(base["ztxt"][0], base["ztxt"][1])


def test_logits_are_causal(setup):
  obj, params, images, text = setup
  base = obj.model.apply({"params": params}, images, text)["logits"]
  changed = text.at[:, 5].set(7)
  out = obj.model.apply({"params": params}, images, changed)["logits"]
  # logits[:, i] predicts token i from tokens < i: positions <= 5 are unchanged.
  np.testing.assert_allclose(out[:, :6], base[:, :6], atol=1e-5)


def test_captioning_loss_worked_example():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
  targets = jnp.array([[0, 1, 2]])
  mask = jnp.array([[True, True, False]])
  loss, acc = losses.captioning_loss(logits, targets, mask)
  np.testing.assert_allclose(loss, (np.log(2) + -np.log(0.8)) / 2, rtol=1e-6)
  np.testing.assert_allclose(acc, 1.0)
  # Label smoothing eps: (1 - eps) * nll + eps * mean over the vocabulary of -log p.
  loss_s, _ = losses.captioning_loss(logits, targets, mask, 0.1)
  smooth = lambda p, t: 0.9 * -np.log(p[t]) + 0.1 * -np.mean(np.log(p))
  expected = (smooth(np.array([0.5, 0.25, 0.25]), 0) + smooth(np.array([0.1, 0.8, 0.1]), 1)) / 2
  np.testing.assert_allclose(loss_s, expected, rtol=1e-6)


def test_loss_is_the_weighted_sum_and_both_heads_get_gradients(setup, tokenizer):
  _, _, images, text = setup
  batch = {"image": images, "text": text}
  for weights in ((1.0, 2.0), (0.0, 1.0)):
    obj = make_objective(_config(f"loss.contrastive_weight={weights[0]}",
                                 f"loss.captioning_weight={weights[1]}"), tokenizer)
    params = nn.meta.unbox(obj.init(jax.random.key(1), batch))
    (loss, m), grads = jax.value_and_grad(obj.loss_fn, has_aux=True)(
        params, batch, jax.random.key(2))
    np.testing.assert_allclose(
        loss, weights[0] * m["contrastive_loss"] + weights[1] * m["captioning_loss"],
        rtol=1e-6)
    assert set(m) >= {"scale", "contrastive_loss", "captioning_loss", "token_accuracy"}
    for leaf in jax.tree.leaves(grads):
      assert np.all(np.isfinite(leaf))
    norm = lambda tree: float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
    # The captioning head, the decoder's cross-attention and the captioning pooler.
    assert norm(grads["txt"]["logits_head"]) > 0
    assert norm(grads["txt"]["multimodal_0"]["CrossAttention"]) > 0
    assert norm(grads["img"]["caption_pooler"]) > 0
    contrastive = (norm(grads["txt"]["head"]), norm(grads["txt"]["cls"]),
                   norm(grads["img"]["contrastive_pooler"]), norm(grads["t"]))
    if weights[0]:
      assert all(g > 0 for g in contrastive)
    else:  # a pure captioner: the contrastive heads get nothing
      assert all(g == 0 for g in contrastive)


def test_sigmoid_contrastive_term(setup, tokenizer):
  _, _, images, text = setup
  config = _config(arg="scale=tiny,loss=sigmoid")
  obj = make_objective(config, tokenizer)
  batch = {"image": images, "text": text}
  params = nn.meta.unbox(obj.init(jax.random.key(1), batch))
  assert "b" in params
  loss, m = obj.loss_fn(params, batch, jax.random.key(0))
  assert np.isfinite(loss) and "bias" in m and m["contrastive_loss"] > 0


def test_captioning_loss_is_normalised_over_the_global_batch(setup, tokenizer):
  obj, params, images, text = setup
  batch = {"image": jnp.tile(images, (2, 1, 1, 1)), "text": jnp.tile(text, (2, 1))}
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  dense = obj.loss_fn(params, batch, jax.random.key(0))[1]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
              for k, v in batch.items()}
    sharded = jax.jit(obj.loss_fn)(params, placed, jax.random.key(0))[1]
  # Rows hold 4, 8, 4 and 2 real tokens: a per-device mean would weigh them differently.
  for key in ("captioning_loss", "contrastive_loss", "token_accuracy"):
    np.testing.assert_allclose(sharded[key], dense[key], rtol=1e-5)


def test_paper_config_is_coca_base():
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "coca.py:scale=paper"))
  assert config.model.text.unimodal_depth == config.model.text.multimodal_depth == 12
  assert config.model.text.width == 768 and config.model.num_decoder_queries == 256
  assert (config.loss.contrastive_weight, config.loss.captioning_weight) == (1.0, 2.0)
  assert config.batch_size == 65_536 and config.data.image_size == 288
  assert config.model.image.variant == "B/18"


def test_predict_prints_captions_and_labels(tmp_path, capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vljax import evaluate, metrics, predict, train  # pylint: disable=g-import-not-at-top
  from vljax.data import synthetic  # pylint: disable=g-import-not-at-top
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "coca.py:scale=tiny"))
  configlib.apply_overrides(config, ["eval.every_steps=0", "eval.max_examples.retrieval=32",
                                     "tensorboard=false"])
  workdir = str(tmp_path / "run")
  final = train.run(config, workdir)
  # Captioning metrics are written during training and reproduced by vljax.evaluate.
  rows = [r for r in metrics.read_metrics(workdir) if "eval/cider" in r]
  assert len(rows) == 1 and rows[0]["step"] == 4 and "eval/bleu4" in rows[0]
  assert rows[0]["eval/cider"] >= 0 and 0 <= rows[0]["eval/bleu4"] <= 1
  assert "eval/zeroshot_top1" in rows[0]
  standalone = evaluate.evaluate(config, workdir)
  for key in ("eval/cider", "eval/bleu4"):
    assert standalone[key] == pytest.approx(final[key], abs=1e-9)
  source = synthetic.SyntheticImageText("heldout", image_size=64)
  paths = []
  for i in range(2):
    path = str(tmp_path / f"img{i}.png")
    Image.fromarray(np.asarray(source[i]["image"], np.uint8)).save(path)
    paths.append(path)
  predictor = predict.load(workdir)
  results = predictor.predict(paths, ["red circle", "blue square", "green cross"])
  assert [r["path"] for r in results] == paths
  for r in results:
    assert isinstance(r["caption"], str)
    assert len(r["labels"]) == 3
    assert abs(sum(p for _, p in r["labels"]) - 1.0) < 1e-4


def test_captioning_evaluator_groups_references_and_scores(tokenizer):
  from vljax import evals  # pylint: disable=g-import-not-at-top
  from vljax.evals import captioning  # pylint: disable=g-import-not-at-top
  captions = ["a red circle in the center", "a big red circle in the middle",
              "a small blue square on the left", "there is a blue square at the left side"]
  answers = ["a red circle in the middle", "a blue square on the left"]

  class Captioner:
    """Generates fixed answers: image i holds the value i in every pixel."""

    def generate(self, params, images, max_len):
      del params
      table = jnp.asarray(tokenizer.encode(answers, max_len))
      return table[images[:, 0, 0, 0].astype(jnp.int32)]

  images = np.stack([np.full((4, 4, 3), i, np.float32) for i in range(2)])
  sets = {"retrieval": {"image": images, "captions": captions,
                        "caption_image": np.array([0, 0, 1, 1])}}
  config = _config()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  evaluator = evals.build_evaluator(config, Captioner(), sets, tokenizer, mesh,
                                    sharding.DEFAULT_RULES)
  metrics = evaluator(None)
  expected = captioning.compute_scores([captions[:2], captions[2:]], answers)
  # The image-blind baseline: every image gets the most frequent caption (all tied: the first).
  constant = captioning.compute_scores([captions[:2], captions[2:]], [captions[0]] * 2)
  assert metrics == pytest.approx({"eval/cider": expected["cider"],
                                   "eval/bleu4": expected["bleu4"],
                                   "eval/captioning_examples": 2.0,
                                   "eval/cider_most_frequent_caption": constant["cider"]})
  assert evaluator.parts[0].last_captions == answers
