"""Test setup: a CPU mesh of 8 fake devices, configured before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

from vljax.data import tokenizer as tokenizer_lib  # noqa: E402


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
  """The synthetic-caption tokenizer, trained once into a temporary cache for the data tests."""
  cache = str(tmp_path_factory.mktemp("tok"))
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_synthetic_tokenizer(cache))


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tok):
  """family -> (the export directory of a freshly initialised configs/FAMILY.py:scale=tiny
  model with the `tok` tokenizer, {parameter path: array}), made once a session: the
  pre-training runs the fine-tuning tests start from."""
  import train_helpers  # pylint: disable=g-import-not-at-top  (tests/ is on the path here)
  runs = {}

  def get(family):
    if family not in runs:
      runs[family] = train_helpers.export_tiny_run(
          family, tok, str(tmp_path_factory.mktemp(family)))
    return runs[family]

  return get
