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
