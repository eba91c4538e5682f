"""Classifier VQA (VLMo, BEiT-3): the answer vocabulary, the soft targets, the BCE loss and its
gradient, the evaluator, the config, and a tiny fine-tuning run that resumes with its
vocabulary."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import configlib, evaluate, init_weights, metrics, sharding, train
from vljax.data import answer_vocabulary, preprocess, synthetic
from vljax.evals import vqa, vqa_classifier
from vljax.objectives import make_objective, prepare_run
from vljax.objectives import vqa_classifier as objective_lib

import train_helpers  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(init="/nonexistent", *overrides, args=""):
  arg = f"init={init},scale=tiny" + (f",{args}" if args else "")
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"vqa.py:{arg}"))
  return configlib.apply_overrides(config, list(overrides))


def _random_params(config, objective, seed):
  """The objective's parameter tree filled with random numbers (shapes by eval_shape: nothing
  compiles)."""
  shapes = nn.unbox(jax.eval_shape(objective.init, jax.random.key(0),
                                   train_helpers.random_batch(config, objective)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), shapes)


# ------------------------------------------------------------------ the vocabulary


def test_vocabulary_votes_ties_cutoff_and_coverage():
  questions = [
      ["yes"] * 10,
      ["Yes."] * 6 + ["no"] * 4,          # normalised: 'yes' wins 6 to 4
      ["no"] * 7 + ["nope"] * 3,
      ["red"] * 5 + ["blue"] * 5,         # a tie within a question: the smaller string
      ["two"] * 4 + ["2"] * 3 + ["3"] * 3,  # 'two' -> '2': 7 votes of 10
      ["3"] * 6 + ["three"] * 4,          # '3' (10)
      ["."] * 10,                         # nothing survives normalisation: not counted
      ["purple"] * 10,
      ["green"] * 9 + ["blue"],
  ]
  assert answer_vocabulary.majority_answer(questions[1]) == "yes"
  assert answer_vocabulary.majority_answer(questions[3]) == "blue"
  assert answer_vocabulary.majority_answer(questions[6]) is None
  full = answer_vocabulary.build(questions, max_answers=100)
  # votes: yes 2, then one each, ties by the string.
  assert full.answers == ("yes", "2", "3", "blue", "green", "no", "purple")
  assert full.votes == (2, 1, 1, 1, 1, 1, 1)
  assert (full.questions, full.covered) == (8, 8)
  # K cuts after the ordering: the 3 first.
  cut = answer_vocabulary.build(questions, max_answers=3)
  assert cut.answers == ("yes", "2", "3") and cut.votes == (2, 1, 1)
  # Questions with no answer among the three ('no'/'nope', red/blue, purple, green/blue) are
  # out of the vocabulary: 4 of the 8 counted.
  assert (cut.questions, cut.covered) == (8, 4)
  assert answer_vocabulary.build(list(reversed(questions)), 3) == cut  # order-free
  with pytest.raises(ValueError, match="max_answers >= 1"):
    answer_vocabulary.build(questions, 0)


def test_soft_scores_against_a_hand_computation():
  index = {"2": 0, "3": 1, "4": 2, "5": 3, "yes": 4}
  answers = ["2", "two", "Two", "3", "three", "3", "3", "4", "5.", "five", "six"]
  # normalised counts: '2' 3, '3' 4, '4' 1, '5' 2, '6' 1 (not in the vocabulary).
  scores = answer_vocabulary.answer_scores(answers, index, 6)
  np.testing.assert_allclose(scores, [0.9, 1.0, 0.3, 0.6, 0.0, 0.0], rtol=1e-6)
  assert scores.dtype == np.float32
  # Out of the vocabulary: a zero target.
  assert not answer_vocabulary.answer_scores(["maybe"] * 10, index, 6).any()
  # With 10 human answers the score is the official accuracy of answering that answer.
  for count in range(11):
    humans = ["yes"] * count + ["no"] * (10 - count)
    want = vqa.question_accuracy("yes", humans)
    assert answer_vocabulary.answer_scores(humans, index, 6)[4] == pytest.approx(want, abs=1e-6)


def test_vocabulary_of_a_source_reads_texts_only(tmp_path):
  source = synthetic.SyntheticImageText("train", 16, num_examples=300, task="vqa")
  lists, skipped = answer_vocabulary.read_training_answers(source, 0, 0,
                                                           preprocess.TextOptions())
  assert skipped == 0 and len(lists) == 300
  assert lists[5] == [source.question(5)[1]] * synthetic.NUM_ANSWERS
  sample, _ = answer_vocabulary.read_training_answers(source, 100, 0, preprocess.TextOptions())
  assert len(sample) == 100
  vocabulary = answer_vocabulary.build(lists, 3129, source="synthetic?task=vqa")
  expected = {source.question(i)[1] for i in range(300)}
  assert set(vocabulary.answers) == expected and vocabulary.covered == 300
  assert answer_vocabulary.load(str(tmp_path)) is None
  answer_vocabulary.save(str(tmp_path), vocabulary)
  assert answer_vocabulary.load(str(tmp_path)) == vocabulary


# ------------------------------------------------------------------ the loss


def test_loss_and_gradient_against_a_reference_bce(tok):
  # Reference: BCE written out in numpy (logaddexp for stability), mean over B x K elements
  # times K (VLMo / BEiT-3), and its gradient sigmoid(x) - t over B.
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (5, 7)).astype(np.float32)
  targets = rng.choice([0.0, 0.3, 0.6, 0.9, 1.0], (5, 7)).astype(np.float32)
  targets[2] = 0.0  # a question out of the vocabulary
  elementwise = np.logaddexp(0, logits) - targets * logits
  want = elementwise.mean() * 7
  loss = lambda x: jnp.mean(objective_lib.soft_score_bce(x, targets))
  assert float(loss(logits)) == pytest.approx(want, rel=1e-5)
  sigmoid = 1 / (1 + np.exp(-logits.astype(np.float64)))
  np.testing.assert_allclose(jax.grad(loss)(logits), (sigmoid - targets) / 5, rtol=1e-4,
                             atol=1e-7)

  # Through the model: the objective's loss and parameter gradient equal a jax BCE written
  # from log-sigmoids on the same logits.
  config = _config("/nonexistent", "vqa.answers=['yes','no','2','red','blue']")
  objective = make_objective(config, tok)
  batch = train_helpers.random_batch(config, objective)
  batch["image"] = rng.uniform(-1, 1, batch["image"].shape).astype(np.float32)
  batch["answer_scores"] = rng.choice([0.0, 0.3, 1.0], batch["answer_scores"].shape).astype(
      np.float32)
  params = nn.unbox(jax.jit(objective.init)(jax.random.key(0), batch))

  def reference(p):
    x = objective.answer_logits(p, batch["image"], batch["text"])
    t = batch["answer_scores"]
    terms = t * jax.nn.log_sigmoid(x) + (1 - t) * jax.nn.log_sigmoid(-x)
    return -jnp.sum(terms) / x.shape[0]

  ours = lambda p: objective.loss_fn(p, batch, jax.random.key(1))[0]
  (got, got_grads), (want, want_grads) = jax.jit(
      lambda p: (jax.value_and_grad(ours)(p), jax.value_and_grad(reference)(p)))(params)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  train_helpers.assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ the evaluator


class _FakeAnswerer:
  """Answers vocabulary[(token + [first pixel > 0]) % K]."""
  answer_vocabulary = ("yes", "no", "2", "red")

  def answer_logits(self, params, images, tokens):
    del params
    pick = (tokens[:, 0] + (images[:, 0, 0, 0] > 0)) % len(self.answer_vocabulary)
    return jax.nn.one_hot(pick, len(self.answer_vocabulary))


def test_evaluator_scores_like_vqa_accuracy():
  n, rng = 13, np.random.default_rng(3)  # one full batch of 8 and a padded one of 5
  tokens = rng.integers(0, 4, n)
  bright = rng.integers(0, 2, n)
  images = np.broadcast_to((bright * 255).astype(np.uint8)[:, None, None, None],
                           (n, 4, 4, 3)).copy()
  pool = ["yes", "no", "2", "two", "red", "blue", "maybe"]
  answers = [list(rng.choice(pool, 10)) for _ in range(n)]
  answers[4] = ["maybe"] * 10  # out of the vocabulary: still scored (0)
  types = ["yes/no" if i % 2 else "other" for i in range(n)]
  data = {"image": images, "question": [str(t) for t in tokens], "answers": answers,
          "answer_type": types}
  evaluator = vqa_classifier.VqaClassifierEvaluator(
      _FakeAnswerer(), {"vqa": data}, train_helpers.DigitTokens(), 4,
      sharding.make_mesh({"data": 8}), batch_size=8)
  out = evaluator(None)
  vocab = _FakeAnswerer.answer_vocabulary
  predicted = [vocab[i] for i in (tokens + bright) % 4]
  shuffled = [vocab[i] for i in (tokens + np.roll(bright, -1)) % 4]
  want = vqa.vqa_accuracy(predicted, answers, types)
  for key, value in want.items():
    assert out[f"eval/{key}"] == pytest.approx(value), key
  assert out["eval/vqa_examples"] == n
  assert out["eval/vqa_accuracy_shuffled_images"] == pytest.approx(
      vqa.vqa_accuracy(shuffled, answers)["vqa_accuracy"])
  assert out["eval/vqa_accuracy_most_common_answer"] == pytest.approx(
      vqa.vqa_accuracy(["yes"] * n, answers)["vqa_accuracy"])
  in_vocab = np.mean([any(answer_vocabulary.normalized(a) in vocab for a in q) for q in answers])
  assert out["eval/vqa_in_vocabulary"] == pytest.approx(in_vocab) and in_vocab < 1


# ------------------------------------------------------------------ config


def test_config_errors_name_the_key():
  cases = [
      ("scale=tiny", "init=DIR"),
      ("init=/w,num_answers=0", "num_answers=0"),
      ("init=/w,family=albef", "family='albef'; choose one of vlmo, beit3"),
  ]
  for arg, expected in cases:
    with pytest.raises(configlib.ConfigError, match=expected) as error:
      configlib.load_config_file(os.path.join(ROOT, "configs", f"vqa.py:{arg}"))
    assert "\n" not in str(error.value)
  config = _config("/w", "vqa.num_answers=0")
  with pytest.raises(configlib.ConfigError, match=r"config.vqa.num_answers=0 must be >= 1"):
    make_objective(config, None)
  config = _config("/w")
  assert (config.objective, config.task, config.tokenizer.path) == ("vqa_classifier", "vqa",
                                                                    "/w/tokenizer.model")
  assert config.data.eval_vqa == config.data.train == "synthetic?task=vqa"
  assert not config.data.eval_classification and config.vqa.num_answers == 3129
  paper = configlib.load_config_file(os.path.join(ROOT, "configs", "vqa.py:init=/w,scale=paper"))
  assert (paper.batch_size, paper.total_epochs, paper.optim.warmup_epochs) == (128, 10, 1)
  assert (paper.optim.lr, paper.optim.schedule, paper.optim.b2) == (3e-5, "linear", 0.98)
  assert paper.optim.lr_mults[0] == ["^cls_head/", 20.0]


# ------------------------------------------------------------------ fine-tuning


@pytest.mark.parametrize("family", ["vlmo", "beit3"])
def test_finetuning_loads_the_encoders_and_lowers_the_loss(family, tiny_exports, tok, tmp_path):
  workdir, source = tiny_exports(family)
  config = _config(workdir, "optim.warmup_steps=0", "optim.lr=3e-3",
                   "optim.schedule=constant", "vqa.vocabulary_questions=2000",
                   args=f"family={family}")
  config = prepare_run(config, str(tmp_path), train.train_source(config))
  vocabulary = answer_vocabulary.load(str(tmp_path))
  assert tuple(config.vqa.answers) == vocabulary.answers and len(vocabulary.answers) == 22
  initial = _random_params(config, make_objective(config, tok), seed=0)
  params, names = init_weights.load_initial_params(config.init, initial, log=lambda _: None)
  loaded, fresh = train_helpers.named_arrays(params), train_helpers.named_arrays(initial)
  encoders = ("mw", "pooler") if family == "vlmo" else ("mw",)
  assert sorted(names) == sorted(n for n in loaded if n.split("/")[0] in encoders)
  for name in names:
    np.testing.assert_array_equal(loaded[name], source[name], err_msg=name)
  width = config.model.transformer.width
  heads = {n: loaded[n].shape for n in loaded if n.startswith("cls_head/")}
  assert heads == {"cls_head/hidden/kernel": (width, 2 * width),
                   "cls_head/hidden/bias": (2 * width,), "cls_head/norm/scale": (2 * width,),
                   "cls_head/norm/bias": (2 * width,), "cls_head/out/kernel": (2 * width, 22),
                   "cls_head/out/bias": (22,)}
  for name in heads:
    np.testing.assert_array_equal(loaded[name], fresh[name])
  assert sorted({n.split("/")[0] for n in loaded}) == ["cls_head", "mw", "pooler"]
  if family != "vlmo":  # the same classifier trains alike (VLMo's below and in the run test)
    return

  mesh = sharding.make_mesh({"data": 8})
  setup = train.build(config, tok, mesh, epoch_size=None)
  state = train.init_state(setup, seed=0)
  batch = train_helpers.first_batch(config, setup.objective, tok)
  assert set(batch) == set(setup.objective.batch_fields())
  assert batch["answer_scores"].shape == (16, 22)
  np.testing.assert_array_equal(batch["answer_scores"].max(-1), 1.0)  # annotators agree
  params, _ = init_weights.load_initial_params(config.init, state.params, log=lambda _: None)
  losses, last, _ = train_helpers.repeat_step(config, setup, state.replace(params=params),
                                              batch, mesh, 6)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
  assert float(last["train/in_vocabulary"]) == 1.0


def test_run_keeps_its_vocabulary_and_resumes_with_it(tiny_exports, tmp_path, monkeypatch):
  init, _ = tiny_exports("vlmo")
  workdir = str(tmp_path / "run")
  config = _config(init, "eval.every_steps=0", "eval.max_examples.vqa=40",
                   "vqa.vocabulary_questions=400")
  final = train.run(config, workdir)
  vocabulary = answer_vocabulary.load(workdir)
  assert vocabulary.questions == 400 and vocabulary.max_answers == 3129
  assert len(vocabulary.answers) == 22  # every synthetic answer
  assert final["eval/vqa_examples"] == 40
  for key in ("eval/vqa_accuracy", "eval/vqa_accuracy_most_common_answer",
              "eval/vqa_accuracy_shuffled_images", "eval/vqa_in_vocabulary"):
    assert 0.0 <= final[key] <= 1.0, key
  assert final["eval/vqa_in_vocabulary"] == 1.0
  # The run's config.json (and its export's) carries the vocabulary: the evaluation of the
  # workdir answers from it.
  run_config = configlib.load_run_config(workdir)
  assert tuple(run_config.vqa.answers) == vocabulary.answers
  assert tuple(configlib.load_run_config(os.path.join(workdir, "export")).vqa.answers) == (
      vocabulary.answers)
  standalone = evaluate.evaluate(run_config, workdir)
  assert standalone["eval/vqa_accuracy"] == pytest.approx(final["eval/vqa_accuracy"])

  # Resuming reads the file: counting again is not even attempted, and the same command (its
  # config has no answers) continues from the last checkpoint.
  def no_recount(*args, **kwargs):
    raise AssertionError("the vocabulary was counted again")
  monkeypatch.setattr(answer_vocabulary, "read_training_answers", no_recount)
  configlib.apply_overrides(config, ["total_steps=6"])
  train.run(config, workdir)
  steps = [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  # A different K for the same workdir is refused.
  configlib.apply_overrides(config, ["vqa.num_answers=5"])
  with pytest.raises(configlib.ConfigError, match=r"config.vqa.num_answers=5 differs.*3129"):
    train.run(config, workdir)
  with open(os.path.join(workdir, answer_vocabulary.FILENAME)) as f:
    assert json.load(f)["answers"] == list(vocabulary.answers)
