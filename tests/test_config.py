"""Config loading, overrides and validation: every mistake fails early with a readable message."""
import glob
import os
import subprocess
import sys

import pytest

from vljax import configlib, sharding, train

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
  config = configlib.load_config_file(f"{path}:{arg}" if arg else path)
  assert config.objective
  # The paper recipes describe the global batch of 32k on (say) 256 chips.
  devices = 256 if "paper" in arg else 8
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
    sharding.mesh_shape({"tensor": 2}, 8)
  config.total_steps = None
  with pytest.raises(configlib.ConfigError, match="exactly one of config.total_steps"):
    configlib.steps_for(config, "total", 96, None)


def test_cli_reports_config_errors_before_compiling(tmp_path):
  siglip = os.path.join(ROOT, "configs", "siglip.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for extra, expected in [("--config.optim.bogus=1", "Unknown config key 'config.optim.bogus'"),
                          ("--config.batch_size=7", "config.batch_size=7 does not divide")]:
    proc = subprocess.run(
        [sys.executable, "-m", "vljax.main", f"--config={siglip}:scale=tiny",
         f"--workdir={tmp_path}", extra],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


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
