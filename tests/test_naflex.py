"""SigLIP 2's NaFlex: images of any size as padded patches; Hugging Face Siglip2Model and
big_vision NaFlex checkpoints in and out.

The fixtures (tests/fixtures/interop, written by tools/make_interop_fixtures.py with
transformers in a side environment) are a small random Siglip2Model, the same weights in big_vision's
NaFlex layout, and the model's outputs on a NaFlex batch of several grids and on square images;
nothing here needs torch.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import configlib, interop
from vljax.interop import hf, tensors
from vljax.models import naflex
from vljax.models import vit

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "interop")
SIGLIP2_DIR = os.path.join(FIXTURES, "hf_siglip2")
BV_SIGLIP2 = os.path.join(FIXTURES, "big_vision_siglip2.npz")
SPIECE = os.path.join(FIXTURES, "hf_siglip", "spiece.model")
TOL = 1e-5
NAFLEX_KEYS = ("patches", "spatial_shapes", "mask")


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(FIXTURES, "hf_siglip2_reference.npz")) as f:
    return dict(f)


@pytest.fixture(scope="module")
def imports(tmp_path_factory):
  """Both fixtures imported once: {'hf': export dir, 'big_vision': export dir}."""
  root = tmp_path_factory.mktemp("siglip2")
  return {"hf": interop.import_checkpoint("hf", SIGLIP2_DIR, str(root / "hf"), tokenizer=SPIECE),
          "big_vision": interop.import_checkpoint("big_vision", BV_SIGLIP2, str(root / "bv"),
                                                  tokenizer=SPIECE)}


@pytest.fixture(scope="module")
def imported(imports):
  return imports["hf"]


@pytest.fixture(scope="module")
def model(imported):
  return interop.load(imported)


@pytest.mark.parametrize("table_grid", [(4, 4), (3, 5)])
def test_resize_posemb_equals_jax_image_resize(table_grid):
  """Values and gradients against jax.image.resize (bilinear, antialiased) of each grid."""
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(table_grid[0] * table_grid[1], 6)), jnp.float32)
  shapes = [(4, 4), (6, 3), (2, 7), (1, 1), (8, 8), (3, 5)]
  length = 64
  got = naflex.resize_posemb(table, table_grid, jnp.array(shapes), length)
  cotangent = jnp.asarray(rng.normal(size=got.shape), jnp.float32)

  def resized(t, h, w):
    return jax.image.resize(t.reshape(*table_grid, -1), (h, w, t.shape[-1]), "linear",
                            antialias=True).reshape(h * w, -1)

  for i, (h, w) in enumerate(shapes):
    np.testing.assert_allclose(got[i, :h * w], resized(table, h, w), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[i, h * w:], 0.0)  # padding rows: no position

  def reference(t):
    return sum(jnp.sum(resized(t, h, w) * cotangent[i, :h * w])
               for i, (h, w) in enumerate(shapes))

  grad = jax.grad(lambda t: jnp.sum(naflex.resize_posemb(
      t, table_grid, jnp.array(shapes), length) * cotangent))(table)
  np.testing.assert_allclose(grad, jax.grad(reference)(table), rtol=0, atol=1e-5)


def test_grid_for_max_patches_matches_transformers(ref):
  for (h, w, patch, limit), target in zip(ref["image_sizes"], ref["target_sizes"]):
    grid = naflex.grid_for_max_patches(int(h), int(w), int(patch), int(limit))
    assert tuple(int(s) * int(patch) for s in grid) == tuple(target), (h, w, patch, limit)
    assert grid[0] * grid[1] <= limit


@pytest.mark.parametrize("fmt", ["hf", "big_vision"])
def test_siglip2_import_matches_the_reference_model(imports, ref, fmt):
  """A NaFlex batch (grids smaller, larger and of other aspect ratios than the table's, with
  padding) and square images at the table's grid and above give the reference's embeddings."""
  model = interop.load(imports[fmt])
  zimg = model.embed_images({k: ref[k] for k in NAFLEX_KEYS})
  ztxt = model.embed_texts(ref["tokens"])
  np.testing.assert_allclose(zimg, ref["zimg"], rtol=0, atol=TOL)
  np.testing.assert_allclose(ztxt, ref["ztxt"], rtol=0, atol=TOL)
  np.testing.assert_allclose(model.logits(zimg, ztxt), ref["logits"], rtol=0, atol=TOL)
  np.testing.assert_allclose(model.logit_scale, ref["scale"], rtol=1e-6)
  np.testing.assert_allclose(model.logit_bias, ref["bias"], rtol=1e-6)
  for images, expected in (("fixed_images", "fixed_zimg"), ("fixed_images_48", "fixed_zimg_48")):
    np.testing.assert_allclose(model.embed_images(ref[images]), ref[expected], rtol=0, atol=TOL)
  image = model.config.model.image
  assert tuple(image["posemb_grid"]) == (4, 4) and model.config.data.image_size == 32


def test_naflex_batch_is_the_image_path_and_ignores_its_padding(model, ref):
  images = ref["fixed_images_48"]
  patches = naflex.patchify(images, 8)
  n = patches.shape[1]
  padded = np.concatenate([patches, np.random.default_rng(1).normal(
      size=(len(images), 5, patches.shape[-1])).astype(np.float32)], axis=1)
  batch = {"patches": padded, "spatial_shapes": np.array([[6, 6]] * len(images), np.int32),
           "mask": np.arange(n + 5)[None].repeat(len(images), 0) < n}
  np.testing.assert_allclose(model.embed_images(batch), model.embed_images(images), rtol=0,
                             atol=1e-6)
  batch["patches"] = np.where(batch["mask"][..., None], padded, 100.0)
  np.testing.assert_allclose(model.embed_images(batch), model.embed_images(images), rtol=0,
                             atol=1e-6)


def test_pack_resizes_each_image_to_its_grid():
  rng = np.random.default_rng(2)
  images = [rng.uniform(-1, 1, size).astype(np.float32) for size in
            ((37, 53, 3), (16, 16, 3), (9, 70, 3))]
  batch = naflex.pack(images, patch=8, max_patches=24)
  assert batch["patches"].shape == (3, 24, 8 * 8 * 3)
  for i, image in enumerate(images):
    rows, cols = naflex.grid_for_max_patches(image.shape[0], image.shape[1], 8, 24)
    assert tuple(batch["spatial_shapes"][i]) == (rows, cols)
    assert batch["mask"][i].sum() == rows * cols and batch["mask"][i, :rows * cols].all()
    resized = jax.image.resize(image, (rows * 8, cols * 8, 3), "linear", antialias=True)
    np.testing.assert_allclose(batch["patches"][i, :rows * cols],
                               naflex.patchify(np.asarray(resized)[None], 8)[0], atol=1e-6)
    assert not batch["patches"][i, rows * cols:].any()


def test_export_writes_the_siglip2_model_back_bit_exactly(imported, tmp_path):
  out = interop.export_checkpoint("hf", imported, str(tmp_path / "hf"))
  config = json.loads(open(os.path.join(out, hf.CONFIG)).read())
  assert (config["model_type"], config["vision_config"]["num_patches"]) == ("siglip2", 16)
  written = tensors.read_safetensors(os.path.join(out, hf.WEIGHTS)).arrays
  source = tensors.read_safetensors(os.path.join(SIGLIP2_DIR, hf.WEIGHTS)).arrays
  assert sorted(written) == sorted(source)
  for name, value in source.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)
  # The tokenizer travels as the Siglip2Model's tokenizer.model, read back by default.
  again = interop.load(interop.import_checkpoint("hf", out, str(tmp_path / "again")))
  assert again.tokenizer is not None
  first = jax.tree.leaves(interop.load(imported).params)
  assert all(np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(again.params)))


def test_big_vision_naflex_checkpoint_round_trips(imports, tmp_path):
  """Out in big_vision's NaFlex layout: every array is the fixture's, bit for bit; and both
  imports hold the same parameters."""
  out = interop.export_checkpoint("big_vision", imports["hf"], str(tmp_path / "bv.npz"))
  with np.load(out) as written, np.load(BV_SIGLIP2) as source:
    assert sorted(written.files) == sorted(source.files)
    for name in source.files:
      np.testing.assert_array_equal(written[name], source[name], err_msg=name)
  hf_params, bv_params = (jax.tree.leaves(interop.load(imports[k]).params)
                          for k in ("hf", "big_vision"))
  assert all(np.array_equal(a, b) for a, b in zip(hf_params, bv_params))


def test_siglip2_text_is_big_vision_s(model, imported):
  """big_vision's SigLIP 2 text: lowercase, sentencepiece, no BOS, EOS kept on truncation,
  padding with <pad> (id 0, not SigLIP's EOS), whatever the config's pad_token_id (here 1)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=SPIECE)
  max_len = model.config.data.max_len
  captions = ["A Photo of a CAT", "a photo of a cat", "", " ".join(["Dogs"] * 40)]
  for caption, ids in zip(captions, model.tokenize(captions)):
    pieces = sp.encode(caption.lower())[:max_len - 1] + [sp.eos_id()]
    np.testing.assert_array_equal(ids, pieces + [sp.pad_id()] * (max_len - len(pieces)))
  assert sp.pad_id() == 0 and model.config.model.text["embed_pad_as"] == 0
  # LiT from the import trains on lowercased captions too.
  lit = configlib.load_config_file(
      os.path.join(os.path.dirname(FIXTURES), os.pardir, os.pardir, "configs",
                   f"lit.py:scale=tiny,imported={imported}"))
  assert lit.data.lowercase


def test_bad_naflex_input_and_config_are_refused(tmp_path):
  batch = {"patches": np.zeros((1, 4, 8 * 8 * 3), np.float32),
           "spatial_shapes": np.array([[2, 2]], np.int32), "mask": np.ones((1, 4), bool)}
  tower = vit.VisionTransformer(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(8, 8))
  with pytest.raises(ValueError, match="NaFlex batch needs .*posemb_grid"):
    jax.eval_shape(tower.init, jax.random.key(0), batch)
  with pytest.raises(ValueError, match=r"posemb_grid=\(16,\): expected \(rows, columns\)"):
    jax.eval_shape(tower.clone(posemb_grid=(16,)).init, jax.random.key(0), batch)
  directory = tmp_path / "hf"
  shutil.copytree(SIGLIP2_DIR, directory)
  config = json.loads((directory / hf.CONFIG).read_text())
  config["vision_config"]["num_patches"] = 12
  (directory / hf.CONFIG).write_text(json.dumps(config))
  with pytest.raises(interop.InteropError, match="num_patches=12 is not a square"):
    interop.import_checkpoint("hf", str(directory), str(tmp_path / "out"))
  with np.load(BV_SIGLIP2) as f:
    arrays = dict(f)
  arrays["params/img/embedding/kernel"] = arrays["params/img/embedding/kernel"][:-2]
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, **arrays)
  with pytest.raises(interop.InteropError,
                     match=r"bad.npz: tensor 'params/img/embedding/kernel' has 190 rows"):
    interop.import_checkpoint("big_vision", bad, str(tmp_path / "out2"))


def test_fixed_resolution_siglip2_is_told_by_gemma_s_vocabulary():
  """A SiglipModel over Gemma's 256,000 pieces is SigLIP 2: lowercased text, <pad> padding;
  SigLIP's own stay as they were (EOS padding, no lowercasing)."""
  config = json.loads(open(os.path.join(FIXTURES, "hf_siglip", hf.CONFIG)).read())
  spec, _ = hf.spec_from_config(SIGLIP2_DIR, config)
  assert (spec.lowercase_text, spec.source_pad_id, spec.naflex_grid) == (False, 1, None)
  config["text_config"]["vocab_size"] = 256_000
  spec, _ = hf.spec_from_config(SIGLIP2_DIR, config)
  assert (spec.lowercase_text, spec.source_pad_id, spec.naflex_grid) == (True, 0, None)
  run = interop.siglip.run_config(spec)
  assert run.data.lowercase and run.model.text["embed_pad_as"] == 0
