"""Scan over layers and remat policies: the unrolled model is the reference for the scanned one.

Every stack (ViT, text tower, CoCa's decoder halves, the T5 encoder / decoder / prefix-LM,
ALBEF's text encoder and fusion layers, the Multiway transformer of VLMo and BEiT-3) gives
the same outputs, gradients and cached decodes from the same weights in both layouts and under
every remat policy; the layouts convert both ways (also when config.init loads a run); the
trainer's step is unchanged; and remat lowers XLA's temporary memory.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vljax import checkpoint, configlib, decode, init_weights, optim, sharding, train
from vljax.configlib import ConfigError
from train_helpers import random_batch
from vljax.data import tokenizer as tokenizer_lib
from vljax.models import coca, fusion, multiway, pali, stacks, two_towers
from vljax.objectives import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD, EOS, VOCAB = 0, 1, 30
VIT = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(8, 8))
IMAGES = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
TOKENS = np.array([[5, 6, 7, 1, 0, 0], [8, 1, 0, 0, 0, 0], [9, 10, 11, 12, 13, 1]], np.int32)
# Scanned variants checked against the unrolled model without remat.
# (Each remat policy is run at least once in this file; compile time dominates, so few.)
VARIANTS = [dict(scan=True, remat="block_inputs")]


def _close(a, b, tol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol,
                                                       atol=tol), a, b)


def _init(model, *args):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), *args))["params"]


def _in_layout(params, scan):
  return stacks.stack_layers(params) if scan else params


def _check_same_model(make, args, loss_fn, variant):
  """`make(**layer_options)` unrolled (the reference) and in `variant` agree from one set of
  weights: the variant's own init has the converted tree's structure and shapes, and the
  forward outputs and the gradients match."""
  reference, other = make(scan=False, remat="none"), make(**variant)
  params = _init(reference, *args)
  converted = _in_layout(params, variant["scan"])
  shapes = jax.eval_shape(lambda: nn.meta.unbox(other.init(jax.random.key(1), *args)))
  assert (jax.tree.map(lambda x: x.shape, shapes["params"])
          == jax.tree.map(lambda x: x.shape, converted))
  _close(jax.jit(other.apply)({"params": converted}, *args),
         jax.jit(reference.apply)({"params": params}, *args))
  grad = lambda m: jax.jit(jax.grad(lambda p: loss_fn(m.apply({"params": p}, *args))))
  _close(grad(other)(converted), _in_layout(grad(reference)(params), variant["scan"]))
  return reference, other, params, converted


# ------------------------------------------------------------------ config and layouts

def test_layers_config_is_validated_naming_the_key():
  assert stacks.check_layers_config(None) == {"scan": False, "remat": "none"}
  assert stacks.check_layers_config({"scan": True, "remat": "dots"}) == {"scan": True,
                                                                         "remat": "dots"}
  with pytest.raises(ConfigError, match="config.layers.remat='everything'"):
    stacks.check_layers_config({"remat": "everything"})
  with pytest.raises(ConfigError, match="config.layers.scan"):
    stacks.check_layers_config({"scan": "yes"})
  with pytest.raises(ConfigError, match="config.layers has unknown keys"):
    stacks.check_layers_config({"unroll": 2})
  with pytest.raises(ConfigError, match="config.layers.attention='flash' is unknown"):
    stacks.check_layers_config({"attention": "flash"})
  base = configlib.base_train_config()
  assert dict(base.layers) == {"scan": False, "remat": "none", "attention": "xla"}
  for name in ("siglip", "coca", "pali"):  # the objective rejects it before compiling
    config = configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:scale=tiny"))
    config = configlib.apply_overrides(config, ["layers.remat=dot"])
    with pytest.raises(ConfigError, match="config.layers.remat"):
      make_objective(config, tokenizer_lib.get_tokenizer(None))


def test_layout_conversion_round_trip():
  tree = {"a": {"layers_0": {"k": np.full((2, 3), 0.)}, "layers_1": {"k": np.full((2, 3), 1.)},
                "wi_0": np.zeros(2), "norm": np.ones(3)},
          "encoderblock_0": {"b": np.zeros(4)}}
  stacked = stacks.stack_layers(tree)
  assert set(stacked["a"]) == {"layers", "wi_0", "norm"}  # wi_0 is no stack
  assert stacked["a"]["layers"]["k"].shape == (2, 2, 3)
  np.testing.assert_array_equal(stacked["a"]["layers"]["k"][1], 1.)
  assert stacked["encoderblock"]["b"].shape == (1, 4)
  _close(stacks.unstack_layers(stacked), tree)
  assert stacks.layout_of_paths(["a/layers_0/k"]) == "unrolled"
  assert stacks.layout_of_paths(["a/layers/k"]) == "scanned"
  assert stacks.layout_of_paths(["a/wi_0"]) is None


# ------------------------------------------------------------------ models

@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"scan={v['scan']}-{v['remat']}")
def test_two_towers_vit_and_text(variant):
  def make(**layer_options):
    return two_towers.TwoTowers(
        image=dict(VIT, pool_type="map", **layer_options),
        text=dict(vocab_size=VOCAB, width=16, depth=2, mlp_dim=32, num_heads=2, max_len=6,
                  causal=True, **layer_options), embed_dim=8, bias_init=-10.0)

  loss = lambda out: jnp.sum(out[0] @ out[1].T) + out[2]["scale"]
  _, _, _, converted = _check_same_model(make, (IMAGES, TOKENS), loss, variant)
  if variant["scan"]:
    boxed = jax.eval_shape(make(**variant).init, jax.random.key(0), IMAGES, TOKENS)
    spec = nn.get_partition_spec(boxed)["params"]
    block = spec["img"]["encoder"]["Transformer"]["encoderblock"]
    assert block["MlpBlock_0"]["Dense_0"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "mlp")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    shardings = sharding.logical_to_shardings(boxed, mesh, sharding.DEFAULT_RULES)
    kernel = shardings["params"]["txt"]["encoder"]["Encoder_0"]["encoderblock"]["MlpBlock_0"][
        "Dense_0"]["kernel"]
    # The depth axis is never sharded; the width keeps its FSDP sharding.
    assert kernel.spec[:2] == (None, "fsdp")
    assert converted["txt"]["encoder"]["Encoder_0"]["encoderblock"]["LayerNorm_0"][
        "scale"].shape == (2, 16)


def _coca(**layer_options):
  return coca.CoCa(
      image=dict(VIT, **layer_options),
      text=dict(vocab_size=VOCAB, width=16, mlp_dim=32, num_heads=2, unimodal_depth=2,
                multimodal_depth=2, max_len=6, pad_id=PAD, eos_id=EOS, **layer_options),
      embed_dim=8, num_decoder_queries=4)


def _decodes(model, params, init_args, max_len):
  """Greedy tokens and logits, and beam-search tokens, through the model's KV cache."""
  cache = model.apply({"params": params}, *init_args, method=model.init_cache)

  def step(c, token, position):
    logits, c = model.apply({"params": params}, token[:, None], position, c,
                            method=model.decode_step)
    return logits[:, 0], c

  start = jnp.full((init_args[0].shape[0],), VOCAB, jnp.int32)  # BOS
  tokens, logits = decode.greedy(step, cache, start, max_len, EOS, PAD, return_logits=True)
  beams, scores = decode.beam_search(step, cache, start, max_len, EOS, beam_size=2)
  return tokens, logits, beams, scores


def test_coca_forward_gradients_and_cached_decoding():
  variant = dict(scan=True, remat="dots")
  loss = lambda out: jnp.sum(out["logits"] ** 2) + jnp.sum(out["zimg"] @ out["ztxt"].T)
  reference, other, params, converted = _check_same_model(_coca, (IMAGES, TOKENS), loss,
                                                          variant)
  cache = other.apply({"params": converted}, IMAGES, 5, method=other.init_cache)
  # Stacked caches keep the batch leading (beam search repeats and gathers axis 0).
  assert all(leaf.shape[:2] == (3, 2) for leaf in jax.tree.leaves(cache))
  decoded = lambda m, p: jax.jit(lambda q: _decodes(m, q, (IMAGES, 5), 5))(p)
  _close(decoded(other, converted), decoded(reference, params), tol=1e-4)


def _pali(arch, **layer_options):
  depths = {"encdec": dict(encoder_depth=2, decoder_depth=2), "prefix_lm": dict(depth=2)}
  text = dict(vocab_size=VOCAB, width=16, num_heads=2, head_dim=8, mlp_dim=24, num_buckets=8,
              max_distance=16, pad_id=PAD, eos_id=EOS, **depths[arch], **layer_options)
  return pali.PaLI(image=dict(VIT, **layer_options), text=text, architecture=arch)


@pytest.mark.parametrize("arch,remat", [("encdec", "none"), ("prefix_lm", "dots")])
def test_pali_forward_gradients_and_cached_decoding(arch, remat):
  variant = dict(scan=True, remat=remat)
  prefix, targets = TOKENS[:, :4], TOKENS
  make = lambda **options: _pali(arch, **options)
  reference, other, params, converted = _check_same_model(
      make, (IMAGES, prefix, targets), lambda logits: jnp.sum(logits ** 2), variant)
  assert "layers" in (converted["txt"]["decoder"] if arch == "encdec" else converted["txt"])
  decoded = lambda m, p: jax.jit(lambda q: _decodes(m, q, (IMAGES, prefix, 5), 5))(p)
  _close(decoded(other, converted), decoded(reference, params), tol=1e-4)


def test_albef_text_and_fusion_layers():
  def make(**options):
    text = dict(vocab_size=VOCAB, width=16, mlp_dim=32, num_heads=2, text_depth=2,
                fusion_depth=2, max_len=6, pad_id=PAD, **options)
    return fusion.Albef(image=dict(VIT, **options), text=text, embed_dim=8)
  loss = lambda out: (jnp.mean(out["mlm"] ** 2) + jnp.mean(out["itm"] ** 2)
                      + jnp.sum(out["zimg"] @ out["ztxt"].T))
  _, _, _, converted = _check_same_model(make, (IMAGES, TOKENS), loss,
                                         dict(scan=True, remat="dots"))
  assert "fusionblock" in converted["fusion"] and "fusionblock_0" not in converted["fusion"]


def _multiway(vl_depth, **options):
  return multiway.Multiway(vocab_size=VOCAB, max_len=6, image_size=16, patch_size=8, width=16,
                           depth=3, mlp_dim=32, num_heads=2, vl_depth=vl_depth, **options)


def test_multiway_bottom_and_top_stacks():
  # Two scanned stacks (the top block has a VL expert); every mode, values and gradients.
  loss = lambda out: sum(jnp.mean(v ** 2) for v in jax.tree.leaves(out))
  _, _, params, converted = _check_same_model(lambda **o: _multiway(1, **o), (IMAGES, TOKENS),
                                              loss, dict(scan=True, remat="full"))
  assert {k: jax.tree.leaves(converted[k])[0].shape[0] for k in ("block", "vlblock")} == {
      "block": 2, "vlblock": 1}
  assert "ffn_vl" in converted["vlblock"] and "ffn_vl" not in converted["block"]
  _close(stacks.unstack_layers(converted), params, tol=0)
  assert stacks.layout_of_paths(["mw/vlblock/ln_vl/scale"]) == "scanned"
  assert stacks.layout_of_paths(["mw/block_2/ln_vl/scale"]) == "unrolled"


@pytest.mark.parametrize("vl_depth", [0, 3])
def test_multiway_with_one_kind_of_block_has_one_stack(vl_depth):
  shapes = lambda scan: jax.tree.map(lambda x: x.shape, jax.eval_shape(
      lambda: nn.meta.unbox(_multiway(vl_depth, scan=scan).init(jax.random.key(0), IMAGES,
                                                                TOKENS))["params"]))
  unrolled, scanned = shapes(False), shapes(True)
  assert {k for k in scanned if "block" in k} == {"vlblock" if vl_depth else "block"}
  zeros = jax.tree.map(np.zeros, unrolled, is_leaf=lambda x: isinstance(x, tuple))
  assert jax.tree.map(np.shape, stacks.stack_layers(zeros)) == scanned
  assert jax.tree.map(np.shape, stacks.unstack_layers(stacks.stack_layers(zeros))) == unrolled


def test_vqkd_scans_all_three_vits():
  # config.layers reaches VQ-KD's encoder, decoder and (frozen) teacher: one layout per model.
  config = _tiny("vqkd", "layers.scan=true", scale="tiny,teacher=/unused")
  objective = make_objective(config, tokenizer_lib.get_tokenizer(None))
  shapes = jax.eval_shape(lambda: objective.init(jax.random.key(0),
                                                 random_batch(config, objective)))
  names = [optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
  stacked = {n.split("/encoderblock/")[0] for n in names if "/encoderblock/" in n}
  assert stacked == {"encoder/Transformer", "decoder/Transformer", "teacher/Transformer"}
  assert not any("encoderblock_" in n for n in names)


def test_split_stack_needs_the_marked_blocks_last():
  tree = {"block_0": {"ffn_vl": np.zeros(2)}, "block_1": {"ffn_v": np.zeros(2)}}
  with pytest.raises(ValueError, match="not the last ones"):
    stacks.stack_layers(tree)


# ------------------------------------------------------------------ loading and training

def _tiny(name, *overrides, scale="tiny"):
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:scale={scale}"))
  return configlib.apply_overrides(config, list(overrides))


def _one_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])


def _named(tree):
  return {optim.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_init_weights_converts_between_layouts(tmp_path):
  tokenizer = tokenizer_lib.get_tokenizer(None)
  mesh = _one_device_mesh()
  runs = {}
  for scan in (False, True):
    config = _tiny("siglip", f"layers.scan={scan}")
    setup = train.build(config, tokenizer, mesh, epoch_size=None)
    params = train.init_state(setup, seed=int(scan)).params
    workdir = str(tmp_path / f"scan_{scan}")
    checkpoint.export_params(workdir, params, config.to_json())
    runs[scan] = (workdir, params)
  for source_scan, target_scan in ((False, True), (True, False)):
    source_dir, source_params = runs[source_scan]
    messages = []
    loaded, names = init_weights.load_initial_params(
        ml_collections.ConfigDict(dict(path=source_dir, mapping=[])), runs[target_scan][1],
        log=messages.append)
    assert any("converting them to this model's" in m for m in messages)
    expected = _named(_in_layout(stacks.unstack_layers(source_params), target_scan))
    assert sorted(names) == sorted(expected)
    _close(_named(loaded), expected, tol=0)


# VLMo's step (the Multiway stack, its stage's optimizer rules under scan) without remat: the
# Multiway model test above covers remat, and compiling it is what this test's time goes to.
@pytest.mark.parametrize("name,remat", [("siglip", "full"), ("coca", "full"), ("pali", "full"),
                                        ("vlmo", "none")])
def test_train_step_with_scan_and_remat_equals_default(name, remat):
  tokenizer = tokenizer_lib.get_tokenizer(None)
  mesh = _one_device_mesh()
  results = {}
  start = None
  for layers in ((False, "none"), (True, remat)):
    config = _tiny(name, f"layers.scan={layers[0]}", f"layers.remat={layers[1]}")
    setup = train.build(config, tokenizer, mesh, epoch_size=None)
    state = train.init_state(setup, config.seed)
    if start is None:  # a host copy: the step donates the state
      start = jax.tree.map(np.asarray, state.params)
      batch = random_batch(config, setup.objective)
    else:  # the same weights, stacked; a fresh optimizer state is the same zeros
      params = jax.tree.map(jnp.asarray, stacks.stack_layers(start))
      state = train.TrainState(step=state.step, params=params, opt_state=setup.tx.init(params),
                               extra=setup.init_extra_fn(params))
    step = train.make_train_step(setup)
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
      state, metrics = step(state, sharding.global_batch_from_host(batch, mesh),
                            jax.random.key(3))
    results[layers] = (float(metrics["train/loss"]), state.params)
  (loss_a, params_a), (loss_b, params_b) = results.values()
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  _close(params_b, stacks.stack_layers(params_a))


def test_remat_lowers_temporary_memory():
  tokenizer = tokenizer_lib.get_tokenizer(None)
  mesh = _one_device_mesh()
  temp = {}
  # Scanned: XLA's CPU memory analysis shows the same temporaries for unrolled remat and none
  # (docs/scale.md has the numbers), while a scanned stack saves one carry per layer.
  for remat in ("none", "full"):
    config = _tiny("siglip", "batch_size=64", "layers.scan=true", f"layers.remat={remat}",
                   scale="laptop")
    setup = train.build(config, tokenizer, mesh, epoch_size=None)
    temp[remat] = train.compile_step(setup, train.make_train_step(setup), 64)[1].temp_bytes
  print(f"siglip laptop, batch 64, 1 device: temp_bytes {temp}")
  assert temp["full"] < temp["none"]
