"""The PaLI family end to end: prefix -> target batches, the target-only loss, decoding, a tiny
run with captioning and VQA evaluation, resumption, standalone evaluation and prompts."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import configlib, evaluate, metrics, predict, sharding, train
from vljax.data import synthetic
from vljax.data import tokenizer as tokenizer_lib
from vljax.objectives import make_objective
from vljax.objectives import pali as pali_obj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(*overrides):
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "pali.py:scale=tiny"))
  return configlib.apply_overrides(config, list(overrides))


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.get_tokenizer(None, synthetic_vqa=True)


@pytest.fixture(scope="module")
def objective(tokenizer):
  return make_objective(tiny_config(), tokenizer)


@pytest.fixture(scope="module")
def params(objective):
  batch = {"image": jnp.zeros((2, 16, 16, 3)), "prefix": jnp.zeros((2, 12), jnp.int32),
           "targets": jnp.zeros((2, 8), jnp.int32)}
  return objective.init(jax.random.key(0), batch)


def test_most_frequent_answer_breaks_ties_by_first_occurrence():
  assert pali_obj.most_frequent_answer(["2", "two", "2", "3"]) == "2"
  assert pali_obj.most_frequent_answer(["red", "blue", "blue", "red"]) == "red"


def test_examples_become_prefix_target_pairs(objective, tokenizer):
  examples = [{"caption": "a small red circle", "label": 0},
              {"caption": "", "question": "what colour is the shape?",
               "answers": ["blue"] * 7 + ["green"] * 3, "label": -1}]
  batch = objective.batch_from_examples(examples)
  assert batch["prefix"].shape == (2, 12) and batch["targets"].shape == (2, 8)
  decoded = [tokenizer.decode(r) for r in batch["prefix"]]
  assert decoded == ["caption en", "answer en what colour is the shape?"]
  assert [tokenizer.decode(r) for r in batch["targets"]] == ["a small red circle", "blue"]


def test_loss_counts_real_target_tokens_of_the_whole_batch(objective, params, tokenizer):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  prefix = tokenizer.encode(["caption en", "answer en where is it?", "caption en"], 12)
  # Different real lengths: a per-example mean would weigh the tokens differently.
  targets = tokenizer.encode(["a large blue square at the top", "left", "a cross"], 8)
  batch = {"image": images, "prefix": prefix, "targets": targets}
  loss, m = objective.loss_fn(params, batch, jax.random.key(0))
  logits = np.asarray(objective.model.apply({"params": params}, images, prefix, targets),
                      np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  nll, count = 0.0, 0
  for b in range(3):
    for t in range(8):
      nll -= logp[b, t, targets[b, t]]
      count += 1
      if targets[b, t] == tokenizer.eos_id:  # the EOS is a target; nothing after it is
        break
  np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)
  assert float(m["target_tokens"]) == count
  # The prefix and the padding after EOS carry no loss: other padding ids change nothing.
  padded = targets.copy()
  padded[padded == tokenizer.pad_id] = 5
  loss_b, _ = objective.loss_fn(params, {**batch, "targets": padded}, jax.random.key(0))
  assert float(loss_b) == pytest.approx(float(loss), rel=1e-6)


def test_greedy_beam_and_sampling_decode_with_the_cache(objective, params, tokenizer):
  from vljax import decode  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  prefix = jnp.asarray(tokenizer.encode(["caption en", "answer en what shape is it?"], 12))
  tokens = objective.generate(params, images, 6, prefix)
  # Reference: greedy by running the full teacher-forced model on the prefix so far.
  want = np.full((2, 6), tokenizer.pad_id, np.int32)
  done = np.zeros(2, bool)
  for t in range(6):
    logits = objective.model.apply({"params": params}, images, prefix, jnp.asarray(want))
    logits = np.asarray(logits[:, t]).copy()
    logits[:, tokenizer.pad_id] = -np.inf
    nxt = np.where(done, tokenizer.pad_id, logits.argmax(-1))
    want[:, t] = nxt
    done |= nxt == tokenizer.eos_id
  np.testing.assert_array_equal(np.asarray(tokens), want)
  state = objective.init_decode_state(params, images, 6, prefix)
  start = objective.start_tokens(2)
  beams, _ = decode.beam_search(objective.step_fn(params), state, start, 6, objective.eos_id,
                                beam_size=3, pad_id=objective.pad_id)
  assert beams.shape[:2] == (2, 3)
  sampled = decode.sample(objective.step_fn(params), state, start, 6, objective.eos_id,
                          jax.random.key(0), temperature=1.0, pad_id=objective.pad_id)
  assert sampled.shape == (2, 6)


def test_paper_recipe_loads_a_siglip_image_encoder_without_its_head():
  config = configlib.load_config_file(
      os.path.join(ROOT, "configs", "pali.py:scale=paper,init=/runs/siglip"))
  assert config.optim.name == "adafactor" and config.optim.freeze == ["^img/encoder/"]
  import re  # pylint: disable=g-import-not-at-top
  (pattern, target), = config.init.mapping
  assert re.sub(pattern, target, "img/encoder/Transformer/encoderblock_0/x", count=1) == (
      "img/encoder/Transformer/encoderblock_0/x")
  assert not re.search(pattern, "img/encoder/MAPHead_0/probe")
  stage2 = configlib.load_config_file(os.path.join(ROOT, "configs",
                                                   "pali.py:scale=paper,stage=2,init=/r"))
  assert stage2.data.image_size == 812 and not stage2.optim.freeze


def test_tiny_run_trains_evaluates_resumes_and_answers(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config("eval.every_steps=0", "eval.max_examples.retrieval=48",
                       "eval.max_examples.vqa=48", "tensorboard=false")
  final = train.run(config, workdir)
  rows = metrics.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  for key in ("eval/cider", "eval/vqa_accuracy", "eval/vqa_accuracy_best_constant",
              "eval/cider_most_frequent_caption", "eval/vqa_accuracy/colour"):
    assert key in final, key
  assert final["eval/vqa_examples"] == 48 and final["eval/captioning_examples"] == 48
  assert 0.0 <= final["eval/vqa_accuracy"] <= 1.0
  # The run's tokenizer is the synthetic one that knows the questions.
  saved = tokenizer_lib.load_from_dir(workdir)
  assert saved.serialized_model == tokenizer_lib.get_tokenizer(
      None, synthetic_vqa=True).serialized_model
  # Standalone evaluation of the last checkpoint reproduces the in-training numbers.
  standalone = evaluate.evaluate(config, workdir)
  for key, value in standalone.items():
    assert value == pytest.approx(final[key], abs=1e-6), key
  # Resuming a finished run with more steps continues from step 4.
  longer = configlib.apply_overrides(tiny_config("eval.every_steps=-1", "tensorboard=false"),
                                     ["total_steps=6"])
  train.run(longer, workdir)
  assert [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r] == list(
      range(1, 7))
  # Prompts: the same image captioned and asked a question.
  image = tmp_path / "shape.png"
  source = synthetic.SyntheticImageText("heldout", image_size=16)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(source[0]["image"]).save(image)
  predictor = predict.load(workdir)
  caption = predictor.predict([str(image)])[0]["caption"]
  answer = predictor.predict([str(image)], prompt="answer en what colour is the shape?")[0]
  assert isinstance(caption, str) and isinstance(answer["caption"], str)


def test_vqa_evaluator_scores_decoded_answers_with_the_official_metric(tokenizer):
  from vljax import evals  # pylint: disable=g-import-not-at-top
  from vljax.evals import vqa  # pylint: disable=g-import-not-at-top
  answers = [["red"] * 10, ["2"] * 6 + ["3"] * 4, ["left"] * 2 + ["top left"] * 8]
  replies = ["red", "3", "left"]

  class Answerer:
    """Answers by image: image i holds the value i in every pixel; checks its prompts."""

    def vqa_prefix(self, question):
      return f"answer en {question}"

    def encode_prefixes(self, prefixes):
      return tokenizer.encode(prefixes, 12)

    def generate(self, params, images, max_len, prefix=None):
      del params
      assert prefix is not None and prefix.shape[1] == 12
      table = jnp.asarray(tokenizer.encode(replies, max_len))
      return table[images[:, 0, 0, 0].astype(jnp.int32)]

  images = np.stack([np.full((4, 4, 3), i, np.float32) for i in range(3)])
  sets = {"vqa": {"image": images, "question": ["what colour?", "how many?", "where?"],
                  "answers": answers, "answer_type": ["colour", "count", "position"]}}
  config = tiny_config()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  evaluator = evals.build_evaluator(config, Answerer(), sets, tokenizer, mesh,
                                    sharding.DEFAULT_RULES)
  metrics = evaluator(None)
  expected = vqa.vqa_accuracy(replies, answers, ["colour", "count", "position"])
  for key, value in expected.items():
    assert metrics[f"eval/{key}"] == pytest.approx(value), key
  # By hand: red 1.0; "3" given by 4 of 10 -> 1.0; "left" by 2 of 10 -> 0.6.
  assert metrics["eval/vqa_accuracy"] == pytest.approx((1.0 + 1.0 + 0.6) / 3)
  # The best constant among the common answers: "top left" (8 humans) scores 1 on one question.
  best = max(vqa.vqa_accuracy([a] * 3, answers)["vqa_accuracy"]
             for a in ("red", "2", "3", "left", "top left"))
  assert metrics["eval/vqa_accuracy_best_constant"] == pytest.approx(best)
  assert evaluator.parts[0].last_answers == replies
