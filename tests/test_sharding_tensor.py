"""The `tensor` mesh axis: tensor-parallel training equals one device, it leaves the default
(tensor=1) layout as it was, and a parameter dimension that does not divide its mesh axes is a
ConfigError naming the parameter before anything compiles."""
from __future__ import annotations

import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vljax import configlib, sharding, train
from vljax.configlib import ConfigError
from train_helpers import random_batches, train_steps
from vljax.objectives import make_objective
from vljax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# DEFAULT_RULES as they were before the tensor axis (kept here, not imported, so that the
# comparison below cannot drift with the module).
RULES_BEFORE_TENSOR = (
    ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
    ("patch", None), ("layers", None), ("act_batch", ("data", "fsdp")), ("act_len", None),
    ("act_embed", None), ("act_mlp", None), ("act_heads", None))


def tiny_config(name: str, **mesh: int):
  """configs/NAME.py:scale=tiny on the mesh `mesh` (set directly: config.mesh may not list
  every axis as a key)."""
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:scale=tiny"))
  if mesh:
    with config.unlocked():
      config.mesh = dict(mesh)
  return config


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.get_tokenizer(None)


def _flat(tree) -> dict[str, jax.Array]:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("name", ["siglip", "coca"])
def test_tensor_parallel_steps_equal_single_device(name, tokenizer):
  config = tiny_config(name)
  batches = random_batches(config, tokenizer, 3)
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  losses_1, state_1, _ = train_steps(config, tokenizer, one, batches)
  losses_t, state_t, setup = train_steps(config, tokenizer, mesh, batches)
  np.testing.assert_allclose(losses_t, losses_1, rtol=1e-4)
  assert losses_1[0] != losses_1[-1]  # the parameters really moved
  flat_1, flat_t = _flat(state_1.params), _flat(state_t.params)
  assert flat_1.keys() == flat_t.keys()
  for key, a in flat_t.items():
    if "key" in key and "bias" in key:
      continue  # zero gradient: Adam turns rounding noise into +-lr steps (tests/test_train.py)
    np.testing.assert_allclose(np.asarray(a), np.asarray(flat_1[key]), rtol=1e-4, atol=1e-6,
                               err_msg=key)

  # Weights really are split over `tensor`: the MLP's first kernel [embed=32, mlp=64] is split
  # 2 x 2 over (fsdp, tensor), the query projection [embed, heads=2, kv] over heads.
  mlp = [x for k, x in flat_t.items() if k.endswith("['MlpBlock_0']['Dense_0']['kernel']")]
  query = [x for k, x in flat_t.items() if k.endswith("['query']['kernel']")]
  assert mlp and query
  for kernel in mlp:
    assert kernel.shape == (32, 64)
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (16, 32)
  for kernel in query:
    assert kernel.shape == (32, 2, 16)
    assert kernel.sharding.spec == P("fsdp", "tensor", None)
    assert kernel.addressable_shards[0].data.shape == (16, 1, 16)
  on_tensor = [x for x in flat_t.values() if "tensor" in str(x.sharding.spec)]
  assert len(on_tensor) > len(flat_t) // 3
  # The Adam moments follow their parameters onto `tensor`.
  moments = [x for x in jax.tree.leaves(state_t.opt_state)
             if hasattr(x, "sharding") and "tensor" in str(x.sharding.spec)]
  assert len(moments) == 2 * len(on_tensor)
  # The batch is split over data and fsdp only: a tensor group sees the same examples.
  for s in setup.batch_shardings.values():
    assert s.spec[0] == sharding.BATCH_AXES and "tensor" not in str(s.spec)


def test_default_rules_give_the_layout_of_before(tokenizer):
  # With tensor=1 (the default) every parameter is placed exactly as before the tensor axis:
  # the specs agree once the size-1 axis is dropped, and the shardings are equivalent (the
  # same devices hold the same slices), on a mesh over the same devices in the same order.
  new_mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  assert dict(new_mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  old_mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  np.testing.assert_array_equal(new_mesh.devices[..., 0], old_mesh.devices)
  for name in ("siglip", "coca"):
    config = tiny_config(name)
    objective = make_objective(config, tokenizer)
    dummy = train.batch_dummy(objective.batch_fields(), 8)
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in dummy.items()}
    with jax.set_mesh(new_mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      boxed = jax.eval_shape(lambda r: objective.init(r, zeros), jax.random.key(0))
    new = _flat(sharding.logical_to_shardings(boxed, new_mesh, sharding.DEFAULT_RULES))
    old = _flat(sharding.logical_to_shardings(boxed, old_mesh, RULES_BEFORE_TENSOR))
    shapes = _flat(nn.meta.unbox(boxed))
    assert new.keys() == old.keys() and len(new) > 20
    moved = 0
    for key, s in new.items():
      stripped = tuple(None if a == "tensor" else a for a in s.spec)
      assert stripped == tuple(old[key].spec) + (None,) * (len(stripped) - len(old[key].spec)), key
      assert s.is_equivalent_to(old[key], len(shapes[key].shape)), key
      moved += "tensor" in str(s.spec)
    assert moved > 0  # the rules did name `tensor`; it is the size-1 axis that places nothing
  assert sharding.batch_sharding(new_mesh, 2).is_equivalent_to(
      NamedSharding(old_mesh, P(("data", "fsdp"), None)), 2)


def test_heads_that_do_not_divide_tensor_are_named_before_compiling(tokenizer, monkeypatch):
  # Tiny siglip has 2 heads: mesh.tensor=8 cannot split them. The error names a parameter, its
  # shape, the logical and mesh axes, and the fix; it comes from build, before any jit.
  config = tiny_config("siglip", data=1, fsdp=1, tensor=8)
  assert train.validate(config, 8, 1) == {"data": 1, "fsdp": 1, "tensor": 8}
  mesh = sharding.make_mesh(config.mesh)

  def no_compiling(*args, **kwargs):
    raise AssertionError("compiled before the sharding was checked")

  with monkeypatch.context() as m:
    m.setattr(jax, "jit", no_compiling)
    with pytest.raises(ConfigError) as error:
      train.build(config, tokenizer, mesh, epoch_size=None)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("config.mesh.tensor=8: parameter 'img/")
  assert "of shape (" in message and "'heads' of size 2" in message
  assert "mesh axes ('tensor',) of size 8" in message
  assert "Choose a config.mesh.tensor that divides 2 heads" in message
  assert "config.sharding.rules to replicate 'heads'" in message

  # The fix the message gives works: rules that replicate heads build, and the MLP (64 wide)
  # is still split 8 ways over tensor.
  rules = [[k, None if k in ("heads", "act_heads") else (list(v) if isinstance(v, tuple) else v)]
           for k, v in sharding.DEFAULT_RULES]
  with config.unlocked():
    config.sharding.rules = rules
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  specs = {k: s.spec for k, s in _flat(setup.state_shardings.params).items()}
  assert all("tensor" not in str(s) for k, s in specs.items() if "['query']" in k)
  assert any(s == P("fsdp", "tensor") for k, s in specs.items() if "Dense_0']['kernel" in k)


def _boxed(names: tuple[str | None, ...], shape: tuple[int, ...]):
  return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


def test_uneven_dimensions_raise_except_the_token_embedding_vocab(caplog):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  rules = sharding.DEFAULT_RULES
  # A model width that does not divide fsdp: named with its config key.
  tree = {"img": {"head": {"kernel": _boxed(("embed", None), (30, 8))}}}
  with pytest.raises(ConfigError, match=r"config.mesh.fsdp=4: parameter 'img/head/kernel' of "
                     r"shape \(30, 8\) has logical axis 'embed' of size 30.*mesh axes "
                     r"\('fsdp',\) of size 4.*replicate 'embed'"):
    sharding.logical_to_shardings(tree, mesh, rules)
  # A rule over two axes names both keys and their product.
  with pytest.raises(ConfigError, match=r"config.mesh.fsdp=4, config.mesh.tensor=2: .*size 12.*"
                     r"of size 8.*product over \('fsdp', 'tensor'\) divides 12"):
    sharding.logical_to_shardings({"w": _boxed(("embed",), (12,))}, mesh,
                                  (("embed", ("fsdp", "tensor")),))
  # The logits head's vocabulary gets no allowance ...
  head = {"txt": {"logits_head": {"kernel": _boxed(("embed", "vocab"), (32, 257))}}}
  with pytest.raises(ConfigError, match=r"'txt/logits_head/kernel' .* 'vocab' of size 257.*"
                     r"divides 257 vocabulary entries"):
    sharding.logical_to_shardings(head, mesh, rules)
  # ... but a token-embedding table's vocab + BOS rows are replicated over tensor, with a
  # warning naming it, and stay split over fsdp along embed.
  table = {"txt": {"embedding": {"embedding": _boxed(("vocab", "embed"), (257, 32))},
                   "token_embedder": {"embedding": _boxed(("vocab", "embed"), (256, 32))}}}
  with caplog.at_level(logging.WARNING):
    out = sharding.logical_to_shardings(table, mesh, rules)
  assert out["txt"]["embedding"]["embedding"].spec == P(None, "fsdp")
  assert out["txt"]["token_embedder"]["embedding"].spec == P("tensor", "fsdp")  # divides
  assert "'txt/embedding/embedding' (257, 32)" in caplog.text
  assert "token_embedder" not in caplog.text
  # With no allowance the same table is an error.
  with pytest.raises(ConfigError, match="txt/embedding/embedding"):
    sharding.logical_to_shardings(table, mesh, rules, replicate_uneven=())


def test_mesh_tensor_axis_and_the_batch():
  assert sharding.mesh_shape({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8)["data"] == 2
  assert sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": -1}, 8)["tensor"] == 8
  with pytest.raises(ConfigError, match="need a multiple of 3 devices"):
    sharding.mesh_shape({"data": -1, "tensor": 3}, 8)
  mesh = sharding.make_mesh({"data": -1, "tensor": 4})
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.shape["data"] == 2
  # The batch divides data x fsdp, not tensor: 2 examples fit a data=2, tensor=4 mesh ...
  config = tiny_config("siglip", data=-1, fsdp=1, tensor=4)
  with config.unlocked():
    config.batch_size = 2
  assert train.validate(config, 8, 1)["tensor"] == 4
  # ... and 3 do not, whatever tensor is.
  with config.unlocked():
    config.batch_size = 3
  with pytest.raises(ConfigError, match=r"batch_size=3 does not divide over the 2 data-parallel"):
    train.validate(config, 8, 1)
