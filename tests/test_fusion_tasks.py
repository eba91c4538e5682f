"""SNLI-VE and NLVR2 fine-tuning of the fusion family: synthetic data, two-image batches, the
classifier heads, loading an ALBEF checkpoint, training, the evaluator and the official formats.
"""
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vljax import configlib, init_weights, optim, sharding, train
from vljax.data import evalsets, formats, pipeline, sources, synthetic
from vljax.evals import classification
from vljax.objectives import make_objective

import train_helpers  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
# Phrase -> region, from the caption vocabulary.
REGION_OF = {p: r for r, ps in synthetic._REGION_PHRASES.items() for p in ps}  # pylint: disable=protected-access


def _named(tree):
  return {optim.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _finetune_config(task, init="/nonexistent", *overrides):
  config = configlib.load_config_file(
      os.path.join(ROOT, "configs", f"{task}.py:init={init},scale=tiny"))
  return configlib.apply_overrides(config, list(overrides))


# ------------------------------------------------------------------ synthetic data


def _entailment_of(text, spec):
  """SNLI-VE label of a synthetic hypothesis, re-derived from the words and the spec."""
  words = text.split()
  assert words[0] == "the"
  verb = min(i for i, w in enumerate(words) if w in ("is", "was"))
  subject, predicate = words[1:verb], " ".join(words[verb:])
  subject_true = all(w == spec.color if w in synthetic.COLOR_NAMES else
                     w == spec.shape if w in synthetic.SHAPES else w == "one" for w in subject)
  if predicate in synthetic.UNDECIDABLE_PREDICATES:
    return 1 if subject_true else 2
  value = predicate[len("is "):]
  if value in synthetic.COLOR_NAMES:
    holds = value == spec.color
  elif value.startswith("a "):
    holds = value[2:] == spec.shape
  elif value in SIZE_WORDS:
    holds = SIZE_WORDS[value] == spec.size
  else:
    holds = REGION_OF[value] == spec.region
  return 0 if subject_true and holds else 2


def _pair_truth(text, left, right):
  """NLVR2 label of a synthetic statement, re-derived from the words and the two specs."""
  def shows(spec, thing):
    return thing in (spec.color, f"a {spec.shape}")
  if text.startswith("both images show the same "):
    attr = text.rsplit(" ", 1)[1]
    return (left.color == right.color) if attr == "colour" else (left.shape == right.shape)
  if text.startswith("both images show "):
    thing = text[len("both images show "):]
    return shows(left, thing) and shows(right, thing)
  if text.startswith("exactly one image shows "):
    thing = text[len("exactly one image shows "):]
    return shows(left, thing) != shows(right, thing)
  first, second = text[len("the left image shows "):].split(" and the right image shows ")
  return shows(left, first) and shows(right, second)


def test_snli_ve_labels_balanced_and_entailed_by_the_image():
  source = synthetic.SyntheticImageText(task="snli_ve", num_examples=900, image_size=16)
  drawn = [source.visual_entailment(i) for i in range(900)]
  counts = np.bincount([label for _, label in drawn], minlength=3)
  assert np.all(np.abs(counts / 900 - 1 / 3) < 0.05), counts
  for i, (text, label) in enumerate(drawn):
    assert _entailment_of(text, source.describe(i)) == label, (i, text, source.describe(i))
  # Entailment and contradiction texts come from the same templates: the hypothesis alone
  # cannot tell them apart (the observable ones are about 2/3 entailment, 1/3 contradiction).
  observable = [label for text, label in drawn
                if not text.endswith(synthetic.UNDECIDABLE_PREDICATES)]
  assert 0.55 < np.mean(np.asarray(observable) == 0) < 0.75
  caption_source = synthetic.SyntheticImageText(num_examples=900, image_size=16)
  for i in (0, 5):
    example, plain = source[i], caption_source[i]
    assert (example["hypothesis"], int(example["label"])) == drawn[i]
    assert example["caption"] == plain["caption"]
    np.testing.assert_array_equal(example["image"], plain["image"])
    assert source.text_fields(i)["hypothesis"] == drawn[i][0]


def _digest(example):
  h = hashlib.sha256(example["image"].tobytes())
  for k in sorted(example):
    if k != "image":
      v = example[k]
      h.update(repr((k, v.item() if hasattr(v, "item") else v)).encode())
  return h.hexdigest()[:16]


# Digests of examples 0, 1, 7 at 16 px, written by the synthetic source before the
# classification tasks existed: adding them must not change any existing task's examples.
_GOLDEN = {
    ("caption", "train"): ["6196dc3c1cda8180", "7a20c477e0d55c5b", "5077cda91a054ba1"],
    ("caption", "heldout"): ["91ef9836e566256f", "4ee29fdfd5177540", "13f6def830d44802"],
    ("vqa", "train"): ["05424367ce3b5d65", "e656c687c3b5e44c", "9b5b52dd3be470e9"],
    ("vqa", "heldout"): ["7e6a5efd119e2ed8", "18228ef31ffe62bb", "01a4334e6feb3b09"],
}


@pytest.mark.parametrize("task,split", sorted(_GOLDEN))
def test_existing_tasks_unchanged(task, split):
  source = synthetic.SyntheticImageText(split=split, image_size=16, task=task)
  assert [_digest(source[i]) for i in (0, 1, 7)] == _GOLDEN[(task, split)]


def test_nlvr2_pairs_balanced_true_of_both_images_and_rendered_from_their_specs():
  source = synthetic.SyntheticImageText(task="nlvr2", num_examples=600, image_size=32)
  drawn = [source.pair_statement(i) for i in range(600)]
  labels = np.asarray([label for *_, label in drawn])
  assert abs(labels.mean() - 0.5) < 0.06
  for i, (left, right, text, label) in enumerate(drawn):
    assert int(_pair_truth(text, left, right)) == label, (i, text, left, right)
  # The text alone says nothing: each kind of statement is true about half the time.
  for kind in ("both images show the same", "both images show", "exactly one", "the left"):
    of_kind = [label for (_, _, text, label) in drawn if text.startswith(kind)]
    assert len(of_kind) > 60 and 0.35 < np.mean(of_kind) < 0.65, kind
  for i in (0, 3):
    example = source[i]
    left, right, text, label = drawn[i]
    assert (example["statement"], int(example["label"])) == (text, label)
    assert "caption" not in example and source.text_fields(i)["statement"] == text
    for image, spec in ((example["image"], left), (example["image2"], right)):
      centre = image[int(spec.cy), int(spec.cx)].astype(int)
      assert np.abs(centre - synthetic.COLORS[spec.color]).max() < 50, (i, spec)


def test_synthetic_task_specs():
  assert isinstance(sources.get_source("synthetic?task=nlvr2", "heldout", 16, 0),
                    synthetic.SyntheticImageText)
  with pytest.raises(configlib.ConfigError, match="snli_ve"):
    sources.get_source("synthetic?task=nlvr", "train", 16, 0)


# ------------------------------------------------------------------ two-image batches


def test_two_image_collation(tok):
  source = synthetic.SyntheticImageText(task="nlvr2", num_examples=8, image_size=16)
  it = pipeline.make_train_iterator(source, tok, batch_size=4, image_size=16, max_len=8,
                                    seed=0, normalize=False)
  batch = next(it)
  assert batch["image"].shape == batch["image2"].shape == (4, 16, 16, 3)
  assert batch["image"].dtype == batch["image2"].dtype == np.uint8
  assert batch["brightness"].shape == batch["brightness2"].shape == (4,)
  assert batch["brightness2"].dtype == np.float32
  records = [source[i] for i in range(8)]
  for row in range(4):
    match = [r for r in records if np.array_equal(r["image"], batch["image"][row])]
    assert len(match) == 1
    np.testing.assert_array_equal(batch["image2"][row], match[0]["image2"])
  # Normalised batches carry float images and no brightness fields.
  it = pipeline.make_train_iterator(source, tok, batch_size=4, image_size=16, max_len=8,
                                    seed=0)
  batch = next(it)
  assert batch["image2"].dtype == np.float32 and "brightness2" not in batch


# ------------------------------------------------------------------ the model


@pytest.fixture(scope="module", params=["albef", "vlmo"])
def nlvr2_model(request, tok):
  objective = make_objective(_finetune_config("nlvr2", f"/nonexistent,family={request.param}"),
                             tok)
  rng = np.random.default_rng(0)
  images = [jnp.asarray(rng.uniform(-1, 1, (3, 16, 16, 3)), jnp.float32) for _ in range(2)]
  tokens = jnp.asarray(rng.integers(3, 40, (3, 8)), jnp.int32)
  params = objective.model.init(jax.random.key(0), images[0], tokens, images[1])["params"]
  return request.param, objective, nn.unbox(params), images, tokens


def test_nlvr2_head_reads_the_two_fused_cls_states_side_by_side(nlvr2_model):
  family, objective, params, (a, b), tokens = nlvr2_model
  model = objective.model
  width = 32  # the tiny configs' width
  fused = lambda *imgs: model.apply({"params": params}, tokens, *imgs,
                                    method=model.fused_cls)
  pair, left, right = fused(a, b), fused(a), fused(b)
  assert pair.shape == (3, 2 * width) and left.shape == (3, width)
  np.testing.assert_allclose(pair[:, :width], left, atol=1e-5)
  np.testing.assert_allclose(pair[:, width:], right, atol=1e-5)
  same = fused(a, a)
  np.testing.assert_allclose(same[:, :width], same[:, width:], atol=1e-5)
  logits = objective.classify(params, a, tokens, b)
  assert logits.shape == (3, 2)
  assert np.abs(np.asarray(logits - objective.classify(params, b, tokens, a))).max() > 1e-4
  assert sorted(params) == sorted(ENCODERS[family] + ("cls_head",))
  assert params["cls_head"]["hidden"]["kernel"].shape == (2 * width, width)
  if family == "vlmo":  # the pooled text [CLS] of VLMo's fused mode, as its ITM head reads it
    states = model.apply({"params": params}, tokens, a, method=lambda m, t, i: m.mw.fused(
        m.mw.embed_image(i), t, False))
    pooled = np.tanh(np.asarray(states[:, 0]) @ params["pooler"]["kernel"] +
                     params["pooler"]["bias"])
    np.testing.assert_allclose(left, pooled, atol=1e-5)


# ------------------------------------------------------------------ loading and training


# The subtrees each family's classifier takes from its pre-training run.
ENCODERS = {"albef": ("img", "txt", "fusion"), "vlmo": ("mw", "pooler")}


@pytest.mark.parametrize("task,family", [("snli_ve", "albef"), ("nlvr2", "albef"),
                                         ("nlvr2", "vlmo")])
def test_finetuning_starts_from_the_pretrained_encoders_and_lowers_the_loss(
    task, family, tiny_exports, tok):
  workdir, source = tiny_exports(family)
  config = _finetune_config(task, f"{workdir},family={family}", "optim.warmup_steps=0",
                            "optim.lr=3e-3", "optim.schedule=constant")
  mesh = sharding.make_mesh({"data": 8})
  setup = train.build(config, tok, mesh, epoch_size=None)
  state = train.init_state(setup, seed=0)
  params, names = init_weights.load_initial_params(config.init, state.params,
                                                   log=lambda _: None)
  loaded, fresh = _named(params), _named(state.params)
  encoders = [n for n in loaded if n.split("/")[0] in ENCODERS[family]]
  assert sorted(names) == sorted(encoders) and len(encoders) > 20
  for name in encoders:
    np.testing.assert_array_equal(loaded[name], source[name], err_msg=name)
  # Source and target were initialised from different seeds: every random array changed.
  changed = [n for n in encoders if not np.array_equal(fresh[n], source[n])]
  assert set(changed) >= {n for n in encoders if n.endswith("kernel")}
  heads = [n for n in loaded if n.startswith("cls_head/")]
  assert len(heads) == 4
  for name in heads:
    np.testing.assert_array_equal(loaded[name], fresh[name])
  # The pre-training heads are not part of the fine-tuned model.
  assert sorted({n.split("/")[0] for n in loaded}) == sorted(ENCODERS[family] + ("cls_head",))

  # A few steps on one real batch of the task from the loaded weights.
  batch = train_helpers.first_batch(config, setup.objective, tok)
  assert set(batch) == set(setup.objective.batch_fields())
  losses, _, _ = train_helpers.repeat_step(config, setup, state.replace(params=params), batch,
                                        mesh, 6)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_config_needs_init():
  with pytest.raises(configlib.ConfigError, match="init=DIR"):
    configlib.load_config_file(os.path.join(ROOT, "configs", "nlvr2.py:scale=tiny"))
  config = _finetune_config("snli_ve", "/w")
  assert config.tokenizer.path == "/w/tokenizer.model"
  assert config.objective == "fusion_classifier" and config.task == "snli_ve"
  bad = _finetune_config("snli_ve", "/w", "task=vqa")
  with pytest.raises(configlib.ConfigError, match="config.task"):
    make_objective(bad, None)


# ------------------------------------------------------------------ the evaluator


class _FakeClassifier:
  """Predicts (token + [first pixel of each image > 0]) % num_classes."""
  task, label_names = "nlvr2", ("False", "True")

  def __init__(self, pair):
    self.pair = pair

  def classify(self, params, images, tokens, images2=None):
    del params
    score = tokens[:, 0] + (images[:, 0, 0, 0] > 0)
    if images2 is not None:
      score = score + (images2[:, 0, 0, 0] > 0)
    return jax.nn.one_hot(score % 2, 2)


@pytest.mark.parametrize("pair", [False, True])
def test_evaluator_counts_like_numpy(pair):
  n, rng = 13, np.random.default_rng(4)  # 13 = one full batch of 8 and a padded one of 5
  tokens = rng.integers(0, 2, n)
  bright = [rng.integers(0, 2, n) for _ in range(2)]
  images = [np.broadcast_to((b * 255).astype(np.uint8)[:, None, None, None],
                            (n, 4, 4, 3)).copy() for b in bright]
  labels = rng.integers(0, 2, n).astype(np.int32)
  data = {"image": images[0], "statement": [str(t) for t in tokens], "label": labels}
  predicted = tokens + bright[0]
  shuffled = tokens + np.roll(bright[0], -1)
  if pair:
    data["image2"] = images[1]
    predicted, shuffled = predicted + bright[1], shuffled + np.roll(bright[1], -1)
  evaluator = classification.ClassificationEvaluator(
      _FakeClassifier(pair), {"classification": data}, train_helpers.DigitTokens(), 4,
      sharding.make_mesh({"data": 8}), batch_size=8)
  metrics = evaluator(None)
  expect = lambda p: float(np.mean(p % 2 == labels))
  assert metrics["eval/nlvr2_accuracy"] == pytest.approx(expect(predicted))
  assert metrics["eval/nlvr2_accuracy_shuffled_images"] == pytest.approx(expect(shuffled))
  assert metrics["eval/nlvr2_examples"] == n
  assert metrics["eval/nlvr2_accuracy_majority_class"] == pytest.approx(
      max(np.mean(labels), 1 - np.mean(labels)))
  for k, name in enumerate(("False", "True")):
    assert metrics[f"eval/nlvr2_accuracy/{name}"] == pytest.approx(
        float(np.mean(predicted[labels == k] % 2 == k)))


def test_synthetic_eval_set_capped_sample(tok):
  data_config = ml_collections.ConfigDict(dict(
      eval="", eval_classification="synthetic?task=nlvr2", image_size=16, max_len=8, seed=0))
  sets = evalsets.load_eval_sets(data_config, tok, {"max_examples": {"classification": 20}})
  data = sets["classification"]
  assert data["image"].shape == data["image2"].shape == (20, 16, 16, 3)
  source = synthetic.SyntheticImageText("heldout", 16, task="nlvr2")
  i = int(data["record_index"][3])
  np.testing.assert_array_equal(data["image2"][3], source[i]["image2"])
  assert data["statement"][3] == source[i]["statement"]
  assert data["label"][3] == source[i]["label"]


# ------------------------------------------------------------------ official formats


def _png(path, value):
  with open(path, "wb") as f:
    f.write(formats.encode_image(np.full((8, 8, 3), value, np.uint8)))


def _jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def test_snli_ve_official_jsonl(tmp_path, tok):
  images = tmp_path / "flickr"
  images.mkdir()
  _png(images / "100.jpg", 10)
  _png(images / "200.jpg", 200)
  path = tmp_path / "snli_ve_dev.jsonl"
  _jsonl(path, [
      {"Flikr30kID": "100", "sentence2": "A dog runs.", "gold_label": "contradiction"},
      {"Flikr30kID": "200.jpg", "sentence2": "Two people.", "gold_label": "entailment"},
      {"Flikr30kID": "200", "sentence2": "Someone.", "gold_label": "-"},  # bad label
      {"Flikr30kID": "999", "sentence2": "Missing.", "gold_label": "neutral"},  # no image
      "{not json",
  ])
  spec = f"snli_ve:{path}?images={images}"
  source = sources.get_source(spec, "heldout", 8, 0)
  assert len(source) == 5
  record = source[1]
  assert (record["hypothesis"], record["label"]) == ("Two people.", 0)
  assert source[0]["label"] == 2
  safe = formats.SafeSource(source)
  errors = [safe[i].get("error") for i in range(5)]
  assert errors[:2] == [None, None] and all(errors[2:])
  assert "gold_label" in errors[2] and "999.jpg" in errors[3]
  data_config = ml_collections.ConfigDict(dict(eval="", eval_classification=spec,
                                               image_size=8, max_len=8, seed=0))
  data = evalsets.load_eval_sets(data_config, tok)["classification"]
  assert data["statement"] == ["A dog runs.", "Two people."] and data["skipped"] == 3
  assert list(data["label"]) == [2, 0] and "image2" not in data
  assert sources.check_config_sources(data_config, train=False)
  with pytest.raises(configlib.ConfigError, match=r"\?images=DIR"):
    sources.get_source(f"snli_ve:{path}", "heldout", 8, 0)
  _jsonl(tmp_path / "wrong.jsonl", [{"image": "a.jpg", "caption": "x"}])
  with pytest.raises(configlib.ConfigError, match="Flikr30kID"):
    sources.get_source(f"snli_ve:{tmp_path / 'wrong.jsonl'}?images={images}", "train", 8, 0)


def test_nlvr2_official_json_and_plain_jsonl(tmp_path, tok):
  images = tmp_path / "images"
  (images / "7").mkdir(parents=True)
  _png(images / "dev-850-0-img0.png", 30)
  _png(images / "dev-850-0-img1.png", 220)
  _png(images / "7" / "train-3-1-img0.png", 60)
  _png(images / "7" / "train-3-1-img1.png", 90)
  path = tmp_path / "dev.json"
  _jsonl(path, [
      {"identifier": "dev-850-0-0", "sentence": "One image has a dog.", "label": "True"},
      {"identifier": "train-3-1-2", "sentence": "No dogs.", "label": "False", "directory": 7},
      {"identifier": "dev-850-0-1", "sentence": "Maybe.", "label": "maybe"},  # bad label
  ])
  source = sources.get_source(f"nlvr2:{path}?images={images}", "heldout", 8, 0)
  first, second = source[0], source[1]
  assert (first["statement"], first["label"], second["label"]) == (
      "One image has a dog.", 1, 0)
  decoded = [formats.encode_image(np.full((8, 8, 3), v, np.uint8)) for v in (30, 220, 60)]
  assert (first["image"], first["image2"], second["image"]) == tuple(decoded)
  assert "label" in formats.SafeSource(source)[2]["error"]
  data_config = ml_collections.ConfigDict(dict(
      eval="", eval_classification=f"nlvr2:{path}?images={images}", image_size=8,
      max_len=8, seed=0))
  data = evalsets.load_eval_sets(data_config, tok)["classification"]
  assert data["image2"].shape == (2, 8, 8, 3) and data["skipped"] == 1
  assert data["image2"][0, 0, 0, 0] == 220 and data["image"][1, 0, 0, 0] == 60
  # The plain vljax jsonl: image paths relative to the file, the text, an integer label.
  plain = tmp_path / "pairs.jsonl"
  _jsonl(plain, [{"image": "images/dev-850-0-img0.png", "image2": "images/dev-850-0-img1.png",
                  "statement": "a statement", "label": 1},
                 {"image": "images/dev-850-0-img0.png", "hypothesis": "a hypothesis",
                  "label": 2}])
  source = sources.get_source(f"jsonl:{plain}", "train", 8, 0)
  assert source[0]["image2"] == decoded[1] and source[0]["statement"] == "a statement"
  assert "image2" not in source[1] and source[1]["hypothesis"] == "a hypothesis"
  it = pipeline.make_train_iterator(source, tok, batch_size=1, image_size=8, max_len=8,
                                    seed=0, normalize=False)
  assert {next(it)["image"].shape for _ in range(2)} == {(1, 8, 8, 3)}
