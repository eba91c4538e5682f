"""The two-tower objective: its loss is the contrastive loss of the model's embeddings."""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import configlib, losses
from vljax.data import tokenizer as tokenizer_lib
from vljax.objectives import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)  # one init per config for the whole module
def _setup(name):
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:scale=tiny"))
  objective = make_objective(config, tokenizer_lib.get_tokenizer(None))
  rng = np.random.default_rng(0)
  size, length = config.data.image_size, config.data.max_len
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (8, size, size, 3)), jnp.float32),
           "text": jnp.asarray(rng.integers(3, 30, (8, length)), jnp.int32)}
  params = objective.init(jax.random.key(0), batch)
  return config, objective, jax.tree.map(lambda x: getattr(x, "value", x), params,
                                         is_leaf=lambda x: hasattr(x, "value")), batch


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_loss_is_contrastive_loss_of_embeddings(name):
  config, objective, params, batch = _setup(name)
  loss, metrics = objective.loss_fn(params, batch, jax.random.key(1))
  zimg = objective.embed_images(params, batch["image"])
  ztxt = objective.embed_texts(params, batch["text"])
  if config.loss.kind == "sigmoid":
    expected = losses.sigmoid_loss(zimg, ztxt, 10.0, -10.0)
    assert float(metrics["bias"]) == pytest.approx(-10.0)
  else:
    expected = losses.softmax_loss(zimg, ztxt, 1 / 0.07)
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
  grads = jax.grad(lambda p: objective.loss_fn(p, batch, jax.random.key(1))[0])(params)
  for tower in ("img", "txt"):
    assert float(jnp.linalg.norm(grads[tower]["head"]["kernel"])) > 0, tower


def test_clip_caps_the_logit_scale_at_100():
  config, objective, params, batch = _setup("clip")
  params = dict(params, t=jnp.asarray(math.log(1000.0), jnp.float32))
  loss, metrics = objective.loss_fn(params, batch, jax.random.key(1))
  assert float(metrics["scale"]) == pytest.approx(100.0)
  zimg = objective.embed_images(params, batch["image"])
  ztxt = objective.embed_texts(params, batch["text"])
  assert float(loss) == pytest.approx(float(losses.softmax_loss(zimg, ztxt, 100.0)), rel=1e-5)
