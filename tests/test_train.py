"""The one train step and loop: sharded == single-device, every config end to end, resume."""
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import configlib, evaluate, metrics, sharding, train
from vljax.checkpoint import CheckpointError, load_exported_params
from vljax.data import tokenizer as tokenizer_lib
from train_helpers import assert_trees_close, random_batches, tiny_config, train_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every config that trains from scratch; lit.py (its own test below), snli_ve.py and nlvr2.py
# (test_fusion_tasks.py), blip_vqa.py (test_blip_vqa.py), vqa.py (test_vqa_classifier.py) and
# vqkd.py (test_vqkd.py) start from a trained run.
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("lit.py", "snli_ve.py", "nlvr2.py", "blip_vqa.py", "/vqa.py",
                                    "vqkd.py")))


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.get_tokenizer(None)


@pytest.mark.parametrize("name", CONFIGS)
def test_sharded_step_equals_single_device(name, tokenizer):
  config = tiny_config(name)
  batches = random_batches(config, tokenizer, 3)
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 2, "fsdp": 4})
  losses_1, state_1, _ = train_steps(config, tokenizer, one, batches)
  losses_8, state_8, setup_8 = train_steps(config, tokenizer, eight, batches)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  assert losses_1[0] != losses_1[-1]  # the parameters really moved
  assert assert_trees_close(state_8.params, state_1.params, rtol=1e-4, atol=1e-6) > 20

  # FSDP: weight matrices and their Adam moments are split over the fsdp axis, not replicated.
  sharded = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(state_8.params)[0]
             if "fsdp" in str(x.sharding.spec)]
  assert len(sharded) > len(jax.tree.leaves(state_8.params)) // 2
  _, kernel = sharded[0]
  assert kernel.addressable_shards[0].data.size * 4 == kernel.size
  moments = [x for x in jax.tree.leaves(state_8.opt_state)
             if hasattr(x, "sharding") and "fsdp" in str(x.sharding.spec)]
  assert len(moments) == 2 * len(sharded)  # mu and nu of every sharded parameter
  assert setup_8.state_shardings.params is not None


def test_nan_loss_stops_or_skips(tokenizer, monkeypatch, tmp_path):
  make_iterator = train.make_iterator

  def poisoned(config, source, tok, objective):
    inner = make_iterator(config, source, tok, objective)

    class Poisoned:
      count = 0

      def __next__(self):
        self.count += 1
        batch = next(inner)
        if self.count == 3:
          # uint8 pixels cannot be NaN; a NaN brightness delta makes the normalised image NaN.
          batch = dict(batch, brightness=np.full_like(batch["brightness"], np.nan))
        return batch

      def get_state(self):
        return inner.get_state()

      def set_state(self, state):
        inner.set_state(state)

    return Poisoned()

  monkeypatch.setattr(train, "make_iterator", poisoned)
  config = tiny_config("siglip", "eval.every_steps=-1", "total_steps=5")
  with pytest.raises(FloatingPointError, match="at step 3"):
    train.run(config, str(tmp_path / "stop"))
  saved = os.listdir(tmp_path / "stop" / "checkpoints")
  assert "2" in saved and "4" not in saved  # nothing after the bad step was saved

  config = tiny_config("siglip", "eval.every_steps=-1", "total_steps=5", "nan_policy=skip")
  train.run(config, str(tmp_path / "skip"))
  rows = metrics.read_metrics(str(tmp_path / "skip"))
  assert [r["train/finite"] for r in rows] == [1.0, 1.0, 0.0, 1.0, 1.0]
  assert all(np.isfinite(r["train/param_norm"]) for r in rows)


# The contrastive families' end-to-end run (PaLI's is in test_pali.py, ALBEF's in
# test_albef.py; BLIP's parameter tree has no contrastive 't'; BEiT-3 has no contrastive head:
# its training and held-out evaluation are in test_beit3.py).
@pytest.mark.parametrize("name", [n for n in CONFIGS
                                  if n not in ("pali", "albef", "blip", "beit3")])
def test_config_runs_end_to_end(name, tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(name, "eval.every_steps=0", "eval.max_examples.zeroshot=64",
                       "eval.max_examples.retrieval=64")
  final = train.run(config, workdir)
  rows = metrics.read_metrics(workdir)
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  for key in ("train/lr", "train/grad_norm", "train/scale", "perf/examples_per_s",
              "perf/examples_per_s_per_device", "perf/step_time_s"):
    assert key in train_rows[-1], key
  eval_rows = [r for r in rows if "eval/zeroshot_top1" in r]
  assert len(eval_rows) == 1 and eval_rows[0]["step"] == 4
  for key in ("eval/i2t_recall@1", "eval/t2i_recall@5", "eval/i2t_recall@10"):
    assert 0.0 <= eval_rows[0][key] <= 1.0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  # TensorBoard shows exactly the names metrics.jsonl has ('@' included).
  names = {k for r in rows for k in r if k != "step"}
  assert _event_tags(os.path.join(workdir, "tensorboard")) == names
  assert any("@" in n for n in names)
  assert final["eval/zeroshot_examples"] == 64 and final["eval/retrieval_images"] == 64
  assert (configlib.read_run_config(workdir)
          == configlib.read_run_config(os.path.join(workdir, "export"))
          == json.loads(config.to_json()))
  exported = load_exported_params(os.path.join(workdir, "export"))
  # The export holds the model's parameters (the two towers' and CoCa's; VLMo's one stack).
  assert set(exported) >= ({"mw", "img_proj", "txt_proj", "logit_scale"} if name == "vlmo"
                           else {"img", "txt", "t"})

  # Standalone evaluation of the same checkpoint reproduces the in-training numbers.
  standalone = evaluate.evaluate(config, workdir)
  for key, value in standalone.items():
    assert value == pytest.approx(final[key], abs=1e-6), key

  # A truncated checkpoint: a clear error naming it, and nothing is deleted or overwritten.
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  for folder, _, files in os.walk(state_dir):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(CheckpointError, match=r"checkpoints/4 could not be restored.*Nothing was "
                     r"deleted.*on_restore_error=previous"):
    train.run(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  if name != "siglip":
    return
  # Falling back: the broken checkpoint is moved aside (not deleted), training resumes from
  # step 2, and metrics.jsonl keeps one row per step.
  configlib.apply_overrides(config, ["checkpoint.on_restore_error=previous"])
  train.run(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  aside = os.listdir(os.path.join(workdir, "unrestorable_checkpoints"))
  assert len(aside) == 1 and aside[0].startswith("4-")
  steps = [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r]
  assert steps == [1, 2, 3, 4]


def _event_tags(logdir):
  """Scalar tags in TensorBoard event files, read as TFRecords without TensorBoard."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, the record, its crc
      tags.update(v.tag for v in event.summary.value)
  return tags


def _cli(workdir, *extra):
  return [sys.executable, "-m", "vljax.main",
          f"--config={os.path.join(ROOT, 'configs', 'siglip.py')}:scale=tiny",
          f"--workdir={workdir}", "--config.total_steps=60", "--config.checkpoint.every_steps=10",
          "--config.eval.every_steps=-1", "--config.tensorboard=false", *extra]


def _losses(workdir):
  by_step = {}
  for row in metrics.read_metrics(workdir):
    if "train/loss" in row:
      by_step[row["step"]] = row["train/loss"]  # a resumed run re-logs steps: keep the last
  return by_step


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  env = dict(os.environ)
  subprocess.run(_cli(straight), check=True, env=env, cwd=ROOT, capture_output=True,
                 timeout=300)

  proc = subprocess.Popen(_cli(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(killed, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    saved = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(
        ckpt_dir) else []
    if saved and max(saved) >= 20:
      break
    time.sleep(0.01)  # polling for the file system, not waiting for time to pass
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it was killed"
  killed_at = max(_losses(killed))
  assert killed_at < 60

  subprocess.run(_cli(killed), check=True, env=env, cwd=ROOT, capture_output=True,
                 timeout=300)
  # The manager keeps the last config.checkpoint.keep (3) checkpoints.
  assert sorted(os.listdir(ckpt_dir), key=int) == ["40", "50", "60"]
  a, b = _losses(straight), _losses(killed)
  assert sorted(a) == sorted(b) == list(range(1, 61))
  # The steps the resumed run repeated replaced the killed run's rows instead of doubling them.
  steps = [r["step"] for r in metrics.read_metrics(killed) if "train/loss" in r]
  assert steps == list(range(1, 61))
  for step in range(1, 61):
    assert b[step] == a[step], f"step {step}: resumed {b[step]} != uninterrupted {a[step]}"
  pa = load_exported_params(os.path.join(straight, "export"))
  pb = load_exported_params(os.path.join(killed, "export"))
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  # No periodic checkpoint before the end: the one after SIGTERM is the preemption save.
  command = _cli(workdir, "--config.total_steps=2000", "--config.checkpoint.every_steps=5000")
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and sum(1 for _ in open(path)) >= 5:
      break
    time.sleep(0.01)  # polling for the file system, not waiting for time to pass
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and 5 <= saved[0] < 2000, saved
  assert f"Stopped at step {saved[0]} on SIGTERM" in stderr
  assert not os.path.exists(os.path.join(workdir, "export"))  # the run is not finished
  # The console carries vljax's lines only, not the checkpoint library's INFO chatter.
  assert "orbax" not in stderr.lower() and "tensorboardx" not in stderr.lower()


def test_console_filter_knows_vljax_from_libraries_in_a_clone_named_vljax():
  from vljax import main as main_lib  # pylint: disable=g-import-not-at-top
  package = os.path.dirname(os.path.abspath(train.__file__))
  clone = os.path.dirname(package)  # e.g. /home/me/vljax, with .venv inside
  assert main_lib.is_own_source(train.__file__)
  assert main_lib.is_own_source(os.path.join(package, "data", "pipeline.py"))
  library = os.path.join(clone, ".venv", "lib", "python3.11", "site-packages", "orbax",
                         "checkpoint", "vljax", "manager.py")
  assert not main_lib.is_own_source(library)
  assert not main_lib.is_own_source(os.path.join(clone, "vljax_notes", "x.py"))


def test_value_and_trainable_grad_matches_the_full_gradient():
  params = {"img": {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3)},
            "txt": {"w": np.linspace(-1, 1, 6).reshape(3, 2)}, "t": np.asarray(0.5)}
  params = jax.tree.map(np.float32, params)
  x = np.float32([[1.0, -2.0]])

  def loss_fn(p, inputs):
    h = jax.numpy.tanh(inputs @ p["img"]["w"] + p["img"]["b"])
    return jax.numpy.sum((h @ p["txt"]["w"]) ** 2) * p["t"], {"h": h.sum()}

  frozen = {"img": {"w": True, "b": True}, "txt": {"w": False}, "t": False}
  (loss, aux), grads = train.value_and_trainable_grad(loss_fn, params, frozen, x)
  (ref_loss, _), ref = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
  assert float(loss) == pytest.approx(float(ref_loss)) and "h" in aux
  np.testing.assert_allclose(grads["txt"]["w"], ref["txt"]["w"], rtol=1e-6)
  np.testing.assert_allclose(grads["t"], ref["t"], rtol=1e-6)
  assert not np.any(grads["img"]["w"]) and not np.any(grads["img"]["b"])
  assert np.any(ref["img"]["w"])  # the frozen part does have a gradient in the full problem


def test_workdir_carries_its_config_and_tokenizer(tmp_path):
  from vljax import predict  # pylint: disable=g-import-not-at-top
  from vljax.data import demo_files, evalsets  # pylint: disable=g-import-not-at-top
  from vljax.evals import common  # pylint: disable=g-import-not-at-top
  specs = demo_files.write(str(tmp_path / "files"), num_train=64, num_val=12, per_class=2,
                           image_size=40)
  tok_path = str(tmp_path / "tok.model")
  with open(tokenizer_lib.train_synthetic_tokenizer(), "rb") as f, open(tok_path, "wb") as g:
    g.write(f.read())
  # Non-default evaluation preprocessing, which prediction must reproduce exactly.
  config = tiny_config("siglip", "eval.every_steps=0", f"data.train={specs['train']}",
                       f"data.eval_zeroshot={specs['zeroshot']}",
                       f"data.eval_retrieval={specs['retrieval']}", f"tokenizer.path={tok_path}",
                       "data.resize=crop", "data.mean=[0.5,0.4,0.3]", "data.std=[0.2,0.25,0.3]")
  workdir = str(tmp_path / "run")
  final = train.run(config, workdir)
  assert final["eval/zeroshot_examples"] == 40 and final["eval/zeroshot_classes"] == 20
  assert final["eval/retrieval_images"] == 12
  os.remove(tok_path)  # the workdir keeps its own copy

  rows = metrics.read_metrics(workdir)
  proc = subprocess.run([sys.executable, "-m", "vljax.evaluate", f"--workdir={workdir}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert metrics.read_metrics(workdir) == rows  # a re-evaluation is not a training row
  with open(os.path.join(workdir, "evaluations.jsonl")) as f:
    record = json.loads(f.readlines()[-1])
  assert record["checkpoint_step"] == 4
  assert record["sources"] == {"zeroshot": specs["zeroshot"], "retrieval": specs["retrieval"]}
  for key in ("eval/zeroshot_top1", "eval/i2t_recall@5", "eval/zeroshot_examples"):
    assert record[key] == pytest.approx(final[key], abs=1e-6), key

  # Another tokenizer for the same workdir is refused; the saved one is used without a path.
  other = configlib.apply_overrides(
      configlib.load_run_config(workdir),
      [f"tokenizer.path={tokenizer_lib.train_synthetic_tokenizer(str(tmp_path / 'c'), 200)}"])
  with pytest.raises(configlib.ConfigError, match="differs from the tokenizer this workdir"):
    train.run_tokenizer(other, workdir)

  # Prediction: the run's own eval preprocessing (crop + mean/std) and tokenizer.
  predictor = predict.load(workdir)
  zs = evalsets.zeroshot_set(config.data, specs["zeroshot"], predictor.tokenizer)
  folder = specs["zeroshot"].partition(":")[2]
  paths = [os.path.join(folder, rel) for rel in sorted(
      os.path.join(c, n) for c in os.listdir(folder) for n in os.listdir(os.path.join(folder, c)))]
  np.testing.assert_array_equal(predictor.load_images(paths[:3]),
                                common.image_prepare(zs)(zs["image"][:3]))
  results = predictor.predict(paths[:2], ["red circle", "blue square"])
  assert all(len(r["labels"]) == 2 for r in results)
  # An export directory loads the same way and predicts the same.
  exported = predict.load(os.path.join(workdir, "export"))
  assert exported.predict(paths[:2], ["red circle", "blue square"]) == results


def test_dry_run_writes_the_compiled_cost_and_trains_nothing(tmp_path):
  reports = {}
  for name, mesh in (("data", ("mesh.data=8", "mesh.fsdp=1")),
                     ("fsdp", ("mesh.data=1", "mesh.fsdp=8"))):
    workdir = str(tmp_path / name)
    config = tiny_config("siglip", *mesh)
    reports[name] = train.dry_run(config, workdir, vocab_size=1000)
    with open(os.path.join(workdir, "compile.json")) as f:
      assert json.load(f) == json.loads(json.dumps(reports[name]))
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  data, fsdp = reports["data"], reports["fsdp"]
  assert data["devices"] == 8 and data["per_device_batch"] == 2 and data["vocab_size"] == 1000
  assert data["parameters"] == fsdp["parameters"] > 1000 * 32  # the stand-in embedding counts
  assert data["flops"] > 0 and data["temp_bytes"] > 0
  # FSDP splits the parameters and Adam moments 8 ways: the step's arguments shrink (the small
  # replicated leaves and the batch shard keep it above exactly 1/8).
  assert fsdp["argument_bytes"] < 0.4 * data["argument_bytes"]


@pytest.mark.parametrize("options", [
    dict(),
    dict(mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28)),
    dict(brightness=0.2),
    dict(brightness=0.2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
], ids=["range", "mean_std", "brightness", "brightness_mean_std"])
def test_uint8_batches_normalised_on_device_equal_the_host_path(options):
  from vljax.data import preprocess  # pylint: disable=g-import-not-at-top
  opts = preprocess.ImageOptions(size=8, **options)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (6, 8, 8, 3), np.uint8)
  delta = (rng.uniform(-0.2, 0.2, 6) if opts.brightness else np.zeros(6)).astype(np.float32)
  host = preprocess.normalize(pixels, opts, delta)
  device = jax.jit(lambda p, d: train.normalize_on_device(p, d, opts))(pixels, delta)
  np.testing.assert_allclose(np.asarray(device), host, rtol=1e-6, atol=1e-6)


def test_training_batches_cross_to_the_device_as_uint8():
  config = tiny_config("siglip")
  tokenizer = tokenizer_lib.get_tokenizer(None)
  source = train.train_source(config)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  batch = next(train.make_iterator(config, source, tokenizer, setup.objective))
  assert batch["image"].dtype == np.uint8 and batch["brightness"].dtype == np.float32
  step = train.make_train_step(setup)
  compiled, cost = train.compile_step(setup, step, config.batch_size)
  # The compiled step takes uint8 pixels: its image argument is a quarter of float32's size.
  image_bytes = config.batch_size * config.data.image_size ** 2 * 3 // mesh.size
  placed = sharding.global_batch_from_host(
      {k: v for k, v in batch.items() if not k.startswith("_")}, mesh)
  assert placed["image"].dtype == np.uint8
  assert placed["image"].addressable_shards[0].data.nbytes == image_bytes
  assert cost.argument_bytes > 0
  state = train.init_state(setup, 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    _, m = compiled(state, placed, jax.random.key(0))
  assert np.isfinite(float(m["train/loss"]))


# ALBEF and BLIP keep non-gradient state (momentum model, queues): accumulation refuses them
# (below). VLMo's ITM hard negatives come from the whole batch (its gathered_loss). BEiT-3 and
# the fine-tuning configs: test_grad_accumulation_tasks.py.
@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in ("albef", "blip", "beit3")])
def test_gradient_accumulation_equals_the_whole_batch(name, tokenizer):
  # Several steps with 4 micro-batches of 4 give the parameters of the whole batch of 16 (to
  # fp32 rounding): the contrastive losses still see every negative of the batch, VLMo's hard
  # negatives and masks are drawn once for the whole batch (the tiny configs have no dropout).
  config = tiny_config(name)
  batches = random_batches(config, tokenizer, 3, seed=5)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
  # One initialisation for both runs (compiling it twice would add seconds to each case).
  start = train.init_state(train.build(config, tokenizer, mesh, epoch_size=None), config.seed)
  accumulated = configlib.apply_overrides(tiny_config(name), ["grad_accum_steps=4"])
  losses_4, state_4, _ = train_steps(accumulated, tokenizer, mesh, batches,
                                     jax.tree.map(jnp.copy, start))
  losses_1, state_1, _ = train_steps(config, tokenizer, mesh, batches, start)
  np.testing.assert_allclose(losses_4, losses_1, rtol=2e-5)
  assert assert_trees_close(state_4.params, state_1.params, rtol=2e-4, atol=2e-6) > 10


def test_gradient_accumulation_is_validated_before_compiling(tokenizer):
  config = tiny_config("siglip", "grad_accum_steps=3")
  with pytest.raises(configlib.ConfigError, match="grad_accum_steps=3 micro-batches"):
    train.validate(config, 8, 1)
  with pytest.raises(configlib.ConfigError,
                     match="grad_accum_steps=4: AlbefObjective updates state outside"):
    train.build(tiny_config("albef", "grad_accum_steps=4"), tokenizer,
                sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]), epoch_size=None)
  with pytest.raises(configlib.ConfigError, match="grad_accum_steps=0"):
    train.validate(tiny_config("siglip", "grad_accum_steps=0"), 8, 1)


def test_compilation_cache_serves_the_second_run(tmp_path):
  # Two processes compile the same step: the second loads it from config.compilation_cache.
  cache = tmp_path / "cache"
  seconds = []
  for i in range(2):
    workdir = tmp_path / f"run{i}"
    subprocess.run([sys.executable, "-m", "vljax.main",
                    f"--config={os.path.join(ROOT, 'configs', 'siglip.py')}:scale=tiny",
                    f"--workdir={workdir}", "--dry_run", "--dry_run_vocab_size=1000",
                    f"--config.compilation_cache={cache}"], check=True, capture_output=True)
    with open(workdir / "compile.json") as f:
      seconds.append(json.load(f)["compile_seconds"])
  assert any(p.name.startswith("jit_train_step") for p in cache.iterdir())
  assert seconds[1] < seconds[0]


def test_device_batches_run_ahead_but_report_the_state_of_the_last_batch_taken(tokenizer):
  config = tiny_config("siglip")
  source = train.train_source(config)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  batches = train.DeviceBatches(train.make_iterator(config, source, tokenizer, setup.objective),
                                mesh, setup.batch_shardings, ahead=2)
  for _ in range(3):
    next(batches)
    batches.fill()  # now two more batches are read and placed
  state = batches.get_state()
  fourth, extras = next(batches)
  assert "_skipped" in extras and not any(k.startswith("_") for k in fourth)
  # A fresh iterator resumed from that state yields exactly the fourth batch.
  resumed = train.make_iterator(config, source, tokenizer, setup.objective)
  resumed.set_state(state)
  again = next(resumed)
  for key, value in fourth.items():
    np.testing.assert_array_equal(np.asarray(value), again[key])
