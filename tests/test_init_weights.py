"""Starting from weights (config.init): source kinds, mapping rules, errors, posemb resampling.

A tiny SigLIP trained by nobody (seed 0) is the source; a fresh one (seed 1) on the 8-device
mesh is the target, so loaded leaves must also keep the target's sharding.
"""
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from vljax import checkpoint, configlib, init_weights, optim, sharding, train
from vljax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT_STEP = 7


def _config(*overrides):
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "siglip.py:scale=tiny"))
  return configlib.apply_overrides(config, list(overrides))


def _setup(config):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  return train.build(config, tokenizer_lib.get_tokenizer(None), mesh, epoch_size=None)


def _init(path, mapping=()):
  """A config.init."""
  return ml_collections.ConfigDict(dict(path=path, mapping=list(mapping)))


def _named(tree):
  return {optim.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The source params written three ways, and a fresh target model."""
  config = _config()
  setup = _setup(config)
  source = train.init_state(setup, seed=0)
  root = tmp_path_factory.mktemp("init")
  export_workdir, ckpt_workdir = str(root / "exported_run"), str(root / "checkpointed_run")
  checkpoint.export_params(export_workdir, source.params, config.to_json())
  ckpt = checkpoint.Checkpointer(ckpt_workdir, 1, 1, async_save=False)
  ckpt.save(CHECKPOINT_STEP, source, {})
  ckpt.close()
  fresh = train.init_state(setup, seed=1).params
  return dict(source=_named(source.params), fresh=fresh,
              paths={"checkpointed workdir": ckpt_workdir, "exported workdir": export_workdir,
                     "export dir": os.path.join(export_workdir, "export")},
              root=root)


def _load(init_cfg, params):
  messages = []
  loaded, names = init_weights.load_initial_params(init_cfg, params, log=messages.append)
  return _named(loaded), names, messages


@pytest.mark.parametrize("kind", ["checkpointed workdir", "exported workdir", "export dir"])
def test_lit_mapping_loads_the_image_tower_only(world, kind):
  fresh = _named(world["fresh"])
  loaded, names, messages = _load(_init(world["paths"][kind], mapping=[["^img/", "img/"]]),
                                  world["fresh"])
  img = sorted(n for n in fresh if n.startswith("img/"))
  assert names == img
  for name, leaf in loaded.items():
    expected = world["source"][name] if name.startswith("img/") else fresh[name]
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=name)
    assert leaf.sharding == fresh[name].sharding, name
    assert leaf.dtype == fresh[name].dtype and leaf.shape == fresh[name].shape
  # The seeds differ, so the test above really tells source from fresh values.
  assert sum(not np.array_equal(world["source"][n], fresh[n]) for n in img) > len(img) // 2
  assert sum(not np.array_equal(world["source"][n], fresh[n]) for n in fresh
             if n not in img) > 10
  if kind == "checkpointed workdir":
    assert any(f"step {CHECKPOINT_STEP}" in m and "checkpoints" in m for m in messages)
  else:
    assert any("export" in m for m in messages)


def test_empty_mapping_loads_everything(world):
  loaded, names, _ = _load(_init(world["paths"]["checkpointed workdir"], mapping=[]),
                           world["fresh"])
  assert names == sorted(world["source"])
  for name, leaf in loaded.items():
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(world["source"][name]))


def test_renaming_rule(world):
  # The tiny image and text encoders have identical blocks: load the image blocks as text ones.
  rule = ["^img/encoder/Transformer/", "txt/encoder/Encoder_0/"]
  fresh = _named(world["fresh"])
  loaded, names, _ = _load(_init(world["paths"]["export dir"], mapping=[rule]), world["fresh"])
  renamed = {n: "img/encoder/Transformer/" + n[len("txt/encoder/Encoder_0/"):]
             for n in fresh if n.startswith("txt/encoder/Encoder_0/")}
  assert names == sorted(renamed) and len(renamed) > 10
  for name, leaf in loaded.items():
    expected = world["source"][renamed[name]] if name in renamed else fresh[name]
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=name)


def test_a_rule_with_several_replacements_loads_one_source_into_each(world):
  # The image blocks start both the image blocks and the (same-shaped) text blocks.
  rule = ["^img/encoder/Transformer/", ["img/encoder/Transformer/", "txt/encoder/Encoder_0/"]]
  fresh = _named(world["fresh"])
  loaded, names, _ = _load(_init(world["paths"]["export dir"], mapping=[rule]), world["fresh"])
  image = {n: n for n in fresh if n.startswith("img/encoder/Transformer/")}
  text = {n: "img/encoder/Transformer/" + n[len("txt/encoder/Encoder_0/"):]
          for n in fresh if n.startswith("txt/encoder/Encoder_0/")}
  assert names == sorted({**image, **text}) and len(text) > 10
  for name, leaf in loaded.items():
    source = {**image, **text}.get(name)
    expected = world["source"][source] if source else fresh[name]
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=name)
  with pytest.raises(configlib.ConfigError, match="not a \\[regex, replacement\\] pair"):
    _load(_init(world["paths"]["export dir"], mapping=[["^img/", []]]), world["fresh"])


def test_target_that_does_not_exist(world):
  with pytest.raises(configlib.ConfigError,
                     match=r"img/head/bias to img/projection/bias, which is not a parameter"):
    _load(_init(world["paths"]["export dir"], mapping=[["^img/head/", "img/projection/"]]),
          world["fresh"])


def test_shape_mismatch_names_parameter_and_shapes(world):
  with pytest.raises(configlib.ConfigError, match=r"img/head/kernel \(loaded as "
                     r"img/encoder/embedding/kernel\) has shape \(32, 32\).*\(8, 8, 3, 32\)"):
    _load(_init(world["paths"]["export dir"],
                mapping=[["^img/head/kernel$", "img/encoder/embedding/kernel"]]),
          world["fresh"])
  # A text position embedding is a sequence, not a grid: a longer one is an error, not resampled.
  longer_text = train.init_state(_setup(_config("data.max_len=16")), seed=1).params
  with pytest.raises(configlib.ConfigError,
                     match=r"txt/encoder/pos_embedding has shape \(1, 8, 32\).*\(1, 16, 32\)"):
    _load(_init(world["paths"]["export dir"], mapping=[["^txt/", "txt/"]]), longer_text)


def test_bad_paths_and_rules(world):
  with pytest.raises(configlib.ConfigError, match="config.init.path is empty"):
    _load(_init(""), world["fresh"])
  empty = world["root"] / "empty"
  empty.mkdir()
  with pytest.raises(configlib.ConfigError,
                     match=r"config.init.path=.*empty.*checkpoints/<step>/state.*export/params"):
    _load(_init(str(empty)), world["fresh"])
  with pytest.raises(configlib.ConfigError, match="is not a directory"):
    _load(_init(str(world["root"] / "missing")), world["fresh"])
  with pytest.raises(configlib.ConfigError, match=r"rule '\^image/' matches no parameter"):
    _load(_init(world["paths"]["export dir"], mapping=[["^image/", "img/"]]), world["fresh"])
  with pytest.raises(configlib.ConfigError, match="not a \\[regex, replacement\\] pair"):
    _load(_init(world["paths"]["export dir"], mapping=["^img/"]), world["fresh"])


def _bilinear_reference(grid, new):
  """Half-pixel-centre bilinear upsampling of a [g, g, C] grid, edges clamped, in float64."""
  grid = np.asarray(grid, np.float64)
  g = grid.shape[0]
  coords = np.clip((np.arange(new) + 0.5) * g / new - 0.5, 0, g - 1)
  lo = np.floor(coords).astype(int)
  hi = np.minimum(lo + 1, g - 1)
  w = coords - lo
  rows = grid[lo] * (1 - w)[:, None, None] + grid[hi] * w[:, None, None]
  return rows[:, lo] * (1 - w)[None, :, None] + rows[:, hi] * w[None, :, None]


def test_position_embedding_resampled_for_a_larger_image(world):
  # 16 px at patch 8 is a 2x2 token grid; 32 px a 4x4 one.
  config = _config("data.image_size=32")
  setup = _setup(config)
  fresh = train.init_state(setup, seed=1).params
  loaded, names, messages = _load(_init(world["paths"]["export dir"]), fresh)
  assert names == sorted(world["source"])
  name = "img/encoder/pos_embedding"
  source = np.asarray(world["source"][name])
  assert source.shape == (1, 4, 32) and loaded[name].shape == (1, 16, 32)
  expected = _bilinear_reference(source.reshape(2, 2, 32), 4).reshape(1, 16, 32)
  np.testing.assert_allclose(np.asarray(loaded[name]), expected, rtol=1e-5, atol=1e-6)
  assert loaded[name].sharding == _named(fresh)[name].sharding
  assert any("2x2 to a 4x4" in m for m in messages)
  for other, leaf in loaded.items():
    if other != name:
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(world["source"][other]))

  # The resampled model runs on 32 px images.
  params = jax.tree_util.tree_unflatten(jax.tree.structure(fresh),
                                        [loaded[n] for n in _named(fresh)])
  images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    zimg = setup.objective.embed_images(params, images)
  assert zimg.shape == (8, config.model.embed_dim) and np.all(np.isfinite(zimg))


def test_resample_keeps_constants_and_shrinks():
  constant = np.full((1, 9, 5), 0.25, np.float32)
  np.testing.assert_allclose(init_weights.resample_posemb(constant, 49), 0.25, rtol=1e-6)
  np.testing.assert_allclose(init_weights.resample_posemb(constant, 4), 0.25, rtol=1e-6)
  # Upsampling 3x3 -> 7x7 matches the reference too (a non-integer factor).
  grid = np.random.default_rng(1).normal(size=(3, 3, 5)).astype(np.float32)
  np.testing.assert_allclose(
      init_weights.resample_posemb(grid.reshape(1, 9, 5), 49),
      _bilinear_reference(grid, 7).reshape(1, 49, 5), rtol=1e-5, atol=1e-6)
