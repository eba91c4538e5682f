"""BLIP VQA fine-tuning: answer targets and weights, the weighted answer loss and its gradient
against a per-answer reference, the question's padding masked in the answer decoder, KV-cached
answers against full forward passes, starting from a BLIP run (both text stacks from one),
training, data 2 x fsdp 4 and accumulation equal to one device, and the VQA evaluator against
single-device answers."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vljax import checkpoint, configlib, evals, init_weights, optim, sharding, train
from vljax.data import evalsets
from vljax.data import tokenizer as tokenizer_lib
from vljax.evals import vqa
from vljax.models import blip
from vljax.objectives import blip_vqa, make_objective

import train_helpers  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.1  # BLIP's label smoothing, the config's


def _named(tree):
  return {optim.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _vqa_config(init, *overrides):
  config = configlib.load_config_file(
      os.path.join(ROOT, "configs", f"blip_vqa.py:init={init},scale=tiny"))
  return configlib.apply_overrides(config, list(overrides))


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.get_tokenizer(None)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 8})


def _export_blip(tok, mesh, directory, *overrides):
  config = train_helpers.tiny_config("blip", *overrides)
  setup = train.build(config, tok, mesh, epoch_size=None)
  params = train.init_state(setup, seed=3).params
  checkpoint.export_params(directory, params, config.to_json())
  return _named(params)


@pytest.fixture(scope="module")
def blip_run(tmp_path_factory, tok, mesh):
  """A tiny BLIP model's params exported to a workdir, and the params."""
  workdir = str(tmp_path_factory.mktemp("blip"))
  return workdir, _export_blip(tok, mesh, workdir)


@pytest.fixture(scope="module")
def started(blip_run, tok, mesh):
  """(config, setup, fresh state, params loaded from the BLIP run, loaded names)."""
  config = _vqa_config(blip_run[0])
  setup = train.build(config, tok, mesh, epoch_size=None)
  state = train.init_state(setup, seed=0)
  params, names = init_weights.load_initial_params(config.init, state.params,
                                                   log=lambda _: None)
  return config, setup, state, params, names


# ------------------------------------------------------------------ answers and batches


def test_answer_targets_are_the_most_frequent_answers_with_blip_weights():
  answers = ["b", "a", "b", "c", "a", "b", "d", "c", "c", "e"]  # b 3, c 3, a 2, d 1, e 1
  assert blip_vqa.answer_targets(answers, 3) == (["b", "c", "a"], [0.3, 0.3, 0.2])
  texts, weights = blip_vqa.answer_targets(answers, 7)
  assert texts == ["b", "c", "a", "d", "e", "", ""]
  assert weights == pytest.approx([0.3, 0.3, 0.2, 0.1, 0.1, 0.0, 0.0])
  assert sum(weights) == pytest.approx(1.0)
  assert blip_vqa.answer_targets(["yes"] * 10, 2) == (["yes", ""], [1.0, 0.0])
  for bad in ([], "yes"):
    with pytest.raises(ValueError, match="non-empty list of answers"):
      blip_vqa.answer_targets(bad, 2)


def test_batch_from_examples(started, tok):
  objective = started[1].objective
  examples = [{"question": "what colour is the shape?", "answers": ["red"] * 7 + ["blue"] * 3},
              {"question": "which shape is shown?", "answers": ["a", "b", "c"]}]
  batch = objective.batch_from_examples(examples)
  assert batch["question"].shape == (2, 8) and batch["answers"].shape == (2, 2, 4)
  np.testing.assert_array_equal(batch["question"],
                                tok.encode([e["question"] for e in examples], 8))
  np.testing.assert_array_equal(batch["answers"][0], tok.encode(["red", "blue"], 4))
  np.testing.assert_array_equal(batch["answers"][1], tok.encode(["a", "b"], 4))
  np.testing.assert_allclose(batch["answer_weights"], [[0.7, 0.3], [1 / 3, 1 / 3]])
  single = objective.batch_from_examples([{"question": "where?", "answers": ["top"] * 10}])
  assert (single["answers"][0, 1] == tok.pad_id).all()  # an empty slot has no tokens
  assert single["answer_weights"].tolist() == [[1.0, 0.0]]
  with pytest.raises(ValueError, match="example 1 of the batch has none"):
    objective.batch_from_examples([examples[0], {"caption": "a red circle"}])


# ------------------------------------------------------------------ the loss


@pytest.fixture(scope="module")
def inputs(tok):
  """Images, questions (with padding) and answers (with an empty slot) of 4 questions."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  questions = rng.integers(3, tok.vocab_size, (4, 8)).astype(np.int32)
  questions[0, 3:] = [tok.eos_id] + [tok.pad_id] * 4
  questions[2, 6:] = [tok.eos_id, tok.pad_id]
  answers = rng.integers(3, tok.vocab_size, (4, 2, 4)).astype(np.int32)
  answers[:, :, 2:] = [tok.eos_id, tok.pad_id]
  answers[1, 0, 1:] = [tok.eos_id, tok.pad_id, tok.pad_id]
  answers[3, 1] = tok.pad_id
  weights = np.asarray([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [1.0, 0.0]], np.float32)
  return {"image": images, "question": jnp.asarray(questions), "answers": jnp.asarray(answers),
          "answer_weights": jnp.asarray(weights)}


def _reference_loss(model, params, batch, tok):
  """BLIP's loss, one (question, answer) pair at a time: the answer decoder on the pair, the
  smoothed targets (1 - eps) one-hot + eps / V against every real answer token, summed,
  weighted, summed over the question's answers and averaged over the questions."""
  total = 0.0
  answers = np.asarray(batch["answers"])  # the loops below read the tokens as Python ints
  for b in range(batch["image"].shape[0]):
    states, valid = model.apply({"params": params}, batch["image"][b:b + 1],
                                batch["question"][b:b + 1], method=blip.BlipVqa.encode_question)
    for k in range(batch["answers"].shape[1]):
      answer = batch["answers"][b, k]
      logits = model.apply({"params": params}, states, valid, answer[None],
                           method=blip.BlipVqa.answer_logits)[0]
      logp = jax.nn.log_softmax(logits, axis=-1)
      vocab = logp.shape[-1]
      nll = 0.0
      for p in range(answer.shape[0]):
        token = int(answers[b, k, p])
        if token == tok.pad_id:
          break
        target = (1 - EPS) * jax.nn.one_hot(token, vocab) + EPS / vocab
        nll = nll - jnp.sum(target * logp[p])
        if token == tok.eos_id:
          break
      total = total + batch["answer_weights"][b, k] * nll
  return total / batch["image"].shape[0]


def test_loss_and_gradient_match_a_per_answer_reference(started, inputs, tok):
  _, setup, _, params, _ = started
  objective = setup.objective
  rng = jax.random.key(0)  # no dropout in the tiny model: the loss is deterministic
  # Jitted: op-by-op, the two gradients took most of a minute.
  loss_fn = jax.jit(lambda p, batch: objective.loss_fn(p, batch, rng)[0])
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, inputs)
  want, want_grads = jax.jit(jax.value_and_grad(
      lambda p: _reference_loss(objective.model, p, inputs, tok)))(params)
  assert float(loss) == pytest.approx(float(want), rel=1e-5)
  got, expected = _named(grads), _named(want_grads)
  assert sorted(got) == sorted(expected)
  for name in got:
    np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=2e-6, err_msg=name)
  # Weight 0 makes an answer irrelevant: changing its tokens changes nothing.
  changed = dict(inputs, answers=inputs["answers"].at[3, 1, 0].set(7))
  assert float(loss_fn(params, changed)) == pytest.approx(float(loss), rel=1e-6)


def test_question_padding_is_masked_in_the_answer_decoder(started, inputs):
  params, model = started[3], started[1].objective.model
  apply = lambda *a, method: model.apply({"params": params}, *a, method=method)
  states, valid = apply(inputs["image"], inputs["question"],
                        method=blip.BlipVqa.encode_question)
  assert valid[0].tolist() == [True] * 5 + [False] * 4  # [ENC], 3 tokens, EOS; 4 pads
  noise = jax.random.normal(jax.random.key(1), states.shape)
  scrambled = jnp.where(valid[..., None], states, noise)
  answers = inputs["answers"][:, 0]
  logits = apply(states, valid, answers, method=blip.BlipVqa.answer_logits)
  np.testing.assert_allclose(apply(scrambled, valid, answers, method=blip.BlipVqa.answer_logits),
                             logits, atol=1e-5)
  # Without the mask the padding states would be read.
  everything = jnp.ones_like(valid)
  assert np.abs(np.asarray(apply(scrambled, everything, answers,
                                 method=blip.BlipVqa.answer_logits) - logits)).max() > 1e-3
  # The cached decoder masks them too.
  caches = apply(scrambled, valid, 4, method=blip.BlipVqa.init_decode_cache)
  start = jnp.full((4, 1), blip.special_ids(model.text["vocab_size"])["dec"], jnp.int32)
  first, _ = apply(start, 0, caches, method=blip.BlipVqa.decode_step)
  np.testing.assert_allclose(first[:, 0], logits[:, 0], atol=1e-5)


def test_generate_with_the_cache_equals_repeated_full_forward_passes(started, inputs, tok):
  _, setup, _, params, _ = started
  objective, model = setup.objective, setup.objective.model
  pad, eos, length = tok.pad_id, tok.eos_id, 4
  images, questions = inputs["image"], inputs["question"]

  def reference(params):
    states, valid = model.apply({"params": params}, images, questions,
                                method=blip.BlipVqa.encode_question)
    full = lambda seq: model.apply({"params": params}, states, valid, jnp.asarray(seq),
                                   method=blip.BlipVqa.answer_logits)
    return train_helpers.greedy_by_full_passes(full, images.shape[0], length, pad, eos)

  seen_eos_mid = False
  for shift in (0.0, 2.0, 4.0, 6.0):
    shifted = dict(params, lm_head=dict(params["lm_head"],
                                        bias=params["lm_head"]["bias"].at[eos].add(shift)))
    got = np.asarray(objective.generate(shifted, images, length, questions))
    np.testing.assert_array_equal(got, reference(shifted), err_msg=f"eos shift {shift}")
    seen_eos_mid |= bool((got == eos).any() and (got[:, -1] == pad).any())
  assert seen_eos_mid
  with pytest.raises(ValueError, match="answers questions: give one"):
    objective.init_decode_state(params, images, length)


# ------------------------------------------------------------------ starting from BLIP


def test_both_text_stacks_start_from_the_blip_run(started, blip_run):
  _, _, state, params, names = started
  source, loaded, fresh = blip_run[1], _named(params), _named(state.params)
  assert sorted({n.split("/")[0] for n in loaded}) == ["dec", "img", "lm_head", "txt"]
  assert names == sorted(loaded)  # every parameter of the VQA model starts from the run
  for name in loaded:
    top, rest = name.split("/", 1)
    origin = "txt/" + rest if top == "dec" else name
    np.testing.assert_array_equal(loaded[name], source[origin], err_msg=name)
  assert not any("/enc_attn/" in n for n in loaded if n.startswith("dec/"))
  assert not any("/dec_attn/" in n for n in loaded if n.startswith("txt/"))
  assert any("/dec_attn/" in n for n in loaded if n.startswith("dec/"))
  # Fresh and source differ (other seed), so the checks above see the loading.
  kernels = [n for n in loaded if n.endswith("kernel")]
  assert all(not np.array_equal(fresh[n], loaded[n]) for n in kernels)


def test_a_wider_image_leaves_the_decoders_cross_attention_keys_values_fresh(
    tmp_path, tok, mesh):
  wider = ("model.image.width=64", "model.image.mlp_dim=128")
  source = _export_blip(tok, mesh, str(tmp_path), *wider)
  config = _vqa_config(str(tmp_path), *wider)
  # The config file picks the rules for the width it was given (an override comes later).
  config_file = configlib.sibling_config(os.path.join(ROOT, "configs", "x.py"), "blip_vqa.py")
  config.init.mapping = config_file.init_mapping(64, 32)
  setup = train.build(config, tok, mesh, epoch_size=None)
  state = train.init_state(setup, seed=0)
  params, names = init_weights.load_initial_params(config.init, state.params,
                                                   log=lambda _: None)
  skipped = sorted(set(_named(params)) - set(names))
  assert skipped and all(n.startswith("dec/") and "/cross_attn/" in n and
                         ("/key/" in n or "/value/" in n) for n in skipped)
  key = "txt/textblock_0/cross_attn/key/kernel"
  assert source[key].shape[0] == 64
  np.testing.assert_array_equal(_named(params)[key], source[key])


# ------------------------------------------------------------------ training


def test_finetuning_from_blip_lowers_the_loss(started, tok, mesh):
  config, setup, state, params, _ = started
  config = configlib.apply_overrides(config, ["optim.warmup_steps=0", "optim.lr=3e-3",
                                              "optim.schedule=constant"])
  setup = train.build(config, tok, mesh, epoch_size=None)
  batch = train_helpers.first_batch(config, setup.objective, tok)
  assert set(batch) == set(setup.objective.batch_fields())
  # A copy: the step donates its state, and the module's fixture keeps the loaded params.
  state = state.replace(params=jax.tree.map(jnp.copy, params))
  losses, metrics, _ = train_helpers.repeat_step(config, setup, state, batch, mesh, 6)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
  assert float(metrics["train/answer_weight"]) == pytest.approx(1.0)  # synthetic: one answer


def test_sharded_and_accumulated_steps_equal_one_device(blip_run, tok):
  config = _vqa_config(blip_run[0])
  batches = train_helpers.random_batches(config, tok, 3, seed=5)
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 2, "fsdp": 4})
  losses_1, state_1, _ = train_helpers.train_steps(config, tok, one, batches)
  losses_8, state_8, _ = train_helpers.train_steps(config, tok, eight, batches)
  accumulated = configlib.apply_overrides(config, ["grad_accum_steps=2"])
  losses_2, state_2, _ = train_helpers.train_steps(accumulated, tok, eight, batches)
  assert losses_1[0] != losses_1[-1]  # the parameters really moved
  for losses, state in ((losses_8, state_8), (losses_2, state_2)):
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    assert train_helpers.assert_trees_close(state.params, state_1.params, rtol=1e-4,
                                            atol=1e-6) > 50


# ------------------------------------------------------------------ evaluation and config


def test_vqa_evaluator_scores_every_question_as_single_device_answers(started, tok, mesh):
  config, setup, _, params, _ = started
  data_config = ml_collections.ConfigDict(dict(config.data.to_dict(), eval=""))
  sets = evalsets.load_eval_sets(data_config, tok, {"max_examples": {"vqa": 13}})
  assert set(sets) == {"vqa"}
  evaluator = evals.build_evaluator(config, setup.objective, sets, tok, mesh, setup.rules)
  metrics = evaluator(params)
  data = sets["vqa"]
  assert metrics["eval/vqa_examples"] == 13  # 13 = one batch of 8 and a padded one
  questions = setup.objective.encode_prefixes(data["question"])
  images = evals.common.image_prepare(data)(data["image"])
  tokens = setup.objective.generate(params, jnp.asarray(images), config.eval.decode_len,
                                    jnp.asarray(questions))
  answers = tok.decode_batch(np.asarray(tokens))
  want = vqa.vqa_accuracy(answers, data["answers"])["vqa_accuracy"]
  assert metrics["eval/vqa_accuracy"] == pytest.approx(want)
  assert "eval/vqa_accuracy_best_constant" in metrics


def test_config_errors(tok):
  with pytest.raises(configlib.ConfigError, match="init=DIR"):
    configlib.load_config_file(os.path.join(ROOT, "configs", "blip_vqa.py:scale=tiny"))
  config = _vqa_config("/w")
  assert config.tokenizer.path == "/w/tokenizer.model" and config.objective == "blip_vqa"
  assert config.eval.decode_len == config.vqa.answer_len
  for override, message in (("data.eval=synthetic", "config.data.eval"),
                            ("vqa.answer_len=9", "config.vqa.answer_len"),
                            ("vqa.answers_per_question=0", "answers_per_question")):
    with pytest.raises(configlib.ConfigError, match=message):
      make_objective(_vqa_config("/w", override), tok)
