"""Config loading, overrides and validation: every mistake fails early with a readable message."""
import glob
import os
import subprocess
import sys

import pytest

from vljax import configlib, sharding, train
from vljax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def test_parse_arg_types_and_unknown_key():
  args = configlib.parse_arg("scale=tiny,chunked=false,steps=7", scale="laptop", chunked=True,
                             steps=1)
  assert (args.scale, args.chunked, args.steps) == ("tiny", False, 7)
  with pytest.raises(configlib.ConfigError, match="Unknown config argument 'sclae'.*scale"):
    configlib.parse_arg("sclae=tiny", scale="laptop")
  with pytest.raises(configlib.ConfigError, match="cannot read 'many' as int"):
    configlib.parse_arg("steps=many", steps=1)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("arg", ["", "scale=tiny", "scale=paper"])
def test_every_config_loads_and_validates(path, arg):
  # LiT and PaLI's paper recipe start from a trained run's image tower, the SNLI-VE / NLVR2
  # fine-tuning from an ALBEF run, VQA from a BLIP run (blip_vqa.py) or a VLMo run (vqa.py).
  if path.endswith(("lit.py", "snli_ve.py", "nlvr2.py", "blip_vqa.py", "/vqa.py")) or (
      path.endswith("pali.py") and "paper" in arg):
    arg = ",".join(a for a in (arg, "init=/runs/siglip") if a)
  if path.endswith("vqkd.py"):  # distils a SigLIP run's image encoder
    arg = ",".join(a for a in (arg, "teacher=/runs/siglip") if a)
  config = configlib.load_config_file(f"{path}:{arg}" if arg else path)
  assert config.objective
  # The paper recipes describe the global batch of 32k on (say) 256 chips; BLIP's batch of
  # 2880 splits over 64 (45 each), NLVR2's and VQA's fine-tuning batch of 128 too (2 each).
  small_batch = path.endswith(("blip.py", "nlvr2.py", "/vqa.py"))
  devices = (64 if small_batch else 256) if "paper" in arg else 8
  train.validate(config, devices, 1)


def test_default_is_small_and_paper_is_the_recipe():
  siglip = os.path.join(ROOT, "configs", "siglip.py")
  small = configlib.load_config_file(siglip)
  paper = configlib.load_config_file(siglip + ":scale=paper")
  assert small.data.image_size <= 64 and small.batch_size <= 512
  assert (paper.data.image_size, paper.data.max_len, paper.batch_size) == (224, 64, 32768)
  assert paper.model.image.variant == "B/16"
  assert (paper.model.temperature_init, paper.model.bias_init) == (10.0, -10.0)
  assert paper.loss.kind == "sigmoid"


def test_overrides_unknown_key_and_wrong_type():
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "siglip.py"))
  configlib.apply_overrides(config, ["optim.lr=0.5", "mesh.fsdp=2", "loss.chunked=false"])
  assert (config.optim.lr, config.mesh.fsdp, config.loss.chunked) == (0.5, 2, False)
  with pytest.raises(configlib.ConfigError, match=r"Unknown config key 'config.optim.lrr'.*"
                     r"Valid keys there: .*\blr\b"):
    configlib.apply_overrides(config, ["optim.lrr=1"])
  with pytest.raises(configlib.ConfigError, match=r"--config.batch_size: cannot read 'big'"):
    configlib.apply_overrides(config, ["batch_size=big"])


def test_impossible_settings_name_the_key_and_fix():
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "siglip.py"))
  configlib.apply_overrides(config, ["batch_size=100"])
  with pytest.raises(configlib.ConfigError, match=r"config.batch_size=100 .* 8 data-parallel "
                     r"devices.*--config.batch_size=96"):
    train.validate(config, 8, 1)
  configlib.apply_overrides(config, ["batch_size=96", "mesh.data=4", "mesh.fsdp=4"])
  with pytest.raises(ValueError, match=r"config.mesh=.* needs 16 devices but 8"):
    train.validate(config, 8, 1)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"model": 2}, 8)
  configlib.apply_overrides(config, ["mesh.data=-1", "mesh.fsdp=1", "layers.attention=cudnn"])
  with pytest.raises(configlib.ConfigError, match=r"layers.attention='cudnn' needs a GPU and "
                     r"config.dtype=bfloat16 \(here: cpu, float32\)"):
    train.validate(config, 8, 1)
  config.total_steps = None
  with pytest.raises(configlib.ConfigError, match="exactly one of config.total_steps"):
    configlib.steps_for(config, "total", 96, None)


def test_cli_reports_config_errors_before_compiling(tmp_path):
  siglip = os.path.join(ROOT, "configs", "siglip.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with open(tmp_path / "train.jsonl", "w") as f:
    f.write('{"image": "a.jpg", "caption": "a dog"}\n')
  cases = [
      (["--config.optim.bogus=1"], "Unknown config key 'config.optim.bogus'"),
      (["--config.batch_size=7"], "config.batch_size=7 does not divide"),
      (["--config.mesh.data=16"], "config.mesh={'data': 16, 'fsdp': 1, 'tensor': 1} needs 16 devices"),
      # Real captions with the synthetic tokenizer would fall apart into characters.
      ([f"--config.data.train=jsonl:{tmp_path}/train.jsonl"],
       "config.tokenizer.path is empty"),
      ([f"--config.data.eval_retrieval=jsonl:{tmp_path}/missing/val.jsonl",
        "--config.eval.every_steps=0"],
       f"config.data.eval_retrieval='jsonl:{tmp_path}/missing/val.jsonl'"),
      ([f"--config.data.train=jsonl:{tmp_path}/train.jsonl",
        f"--config.tokenizer.path={tokenizer_lib.train_synthetic_tokenizer()}"],
       f"config.data.train='jsonl:{tmp_path}/train.jsonl'"),  # its one image is missing
      (["--config.optim.freeze=['^img/']"], "config.init.path is empty"),
      ([f"--config.tokenizer.path={tmp_path}/none.model"],
       f"config.tokenizer.path='{tmp_path}/none.model': no such file"),
  ]
  for extra, expected in cases:
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "vljax.main", f"--config={siglip}:scale=tiny",
         f"--workdir={workdir}", *extra],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Config error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Compiled" not in proc.stderr
    assert not os.path.exists(workdir / "checkpoints")


def test_durations_in_steps_examples_or_epochs():
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "siglip.py"))
  config.total_steps = None
  config.total_examples = 1000
  assert configlib.steps_for(config, "total", global_batch=64, epoch_size=None) == 15
  config.total_examples = None
  config.total_epochs = 2.5
  assert configlib.steps_for(config, "total", global_batch=64, epoch_size=512) == 20
  with pytest.raises(configlib.ConfigError, match="finite dataset size"):
    configlib.steps_for(config, "total", global_batch=64, epoch_size=None)


def test_last_duration_on_the_command_line_wins():
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "siglip.py"))
  assert config.total_steps is not None
  notes = []
  configlib.apply_overrides(config, ["total_epochs=5", "optim.warmup_examples=640"], notes)
  assert (config.total_steps, config.total_examples, config.total_epochs) == (None, None, 5)
  assert (config.optim.warmup_steps, config.optim.warmup_examples) == (None, 640)
  assert configlib.steps_for(config, "total", 64, epoch_size=512) == 40
  assert configlib.steps_for(config.optim, "warmup", 64, epoch_size=512) == 10
  assert any("total_epochs=5 replaces config.total_steps" in n for n in notes)
  # Then steps again: the last one given wins.
  configlib.apply_overrides(config, ["total_steps=7"], notes)
  assert (config.total_steps, config.total_epochs) == (7, None)
  # Other keys ending in _steps are no durations with siblings.
  configlib.apply_overrides(config, ["log_every_steps=3", "eval.every_steps=5"], notes)
  assert config.total_steps == 7 and config.log_every_steps == 3


def test_run_config_reads_an_older_workdir_with_defaults(tmp_path):
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "siglip.py"))
  values = config.to_dict()
  del values["optim"]["wd_mults"]  # a workdir written before this key existed
  import json  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "config.json", "w") as f:
    json.dump(values, f)
  loaded = configlib.load_run_config(str(tmp_path))
  assert loaded.optim.wd_mults == configlib.base_train_config().optim.wd_mults
  assert loaded.model.image.width == config.model.image.width
  with pytest.raises(configlib.ConfigError, match="No config.json"):
    configlib.load_run_config(str(tmp_path / "nothing"))


def test_none_unsets_an_optional_value_and_a_literal_sets_it_again():
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "pali.py"))
  configlib.apply_overrides(config, ["optim.adafactor.clip_threshold=None",
                                     "optim.adafactor.momentum=0.9"])
  assert config.optim.adafactor.clip_threshold is None
  assert config.optim.adafactor.momentum == 0.9
  configlib.apply_overrides(config, ["optim.adafactor.momentum=None"])
  assert config.optim.adafactor.momentum is None
  configlib.apply_overrides(config, ["tokenizer.path=None"])  # a str stays the text it is
  assert config.tokenizer.path == "None"
