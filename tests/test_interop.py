"""vljax.interop: SigLIP checkpoints of Hugging Face and big_vision in and out, with logit parity.

The fixtures (tests/fixtures/interop, written by tools/make_interop_fixtures.py with torch and
transformers in a side environment) are one small random SigLIP saved by transformers'
save_pretrained, the same weights as a big_vision .npz, and the reference model's outputs on
fixed inputs. Nothing here needs torch or a network.
"""
import json
import os
import pickle
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import pytest

from vljax import configlib, init_weights, interop, optim, predict, sharding, train
from vljax import evaluate as evaluate_lib
from vljax.checkpoint import load_exported_params
from vljax.data import tokenizer as tokenizer_lib
from vljax.interop import __main__ as cli
from vljax.interop import hf, siglip, tensors, torch_pickle
from vljax.models import layers
from vljax.models import text as text_lib
from vljax.models import two_towers
from vljax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "interop")
HF_DIR = os.path.join(FIXTURES, "hf_siglip")
BV_FILE = os.path.join(FIXTURES, "big_vision_siglip.npz")
SPIECE = os.path.join(HF_DIR, "spiece.model")
OPEN_CLIP_DIR = os.path.join(FIXTURES, "open_clip")
HF_CLIP_DIR = os.path.join(FIXTURES, "hf_clip")
OPEN_CLIP_SIGLIP_DIR = os.path.join(FIXTURES, "open_clip_siglip")
MAX_LEN_CLIP = 16  # the HF CLIP fixture's max_position_embeddings
TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
    return dict(f)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """The two fixtures imported once: {'hf': export dir, 'big_vision': export dir}."""
  root = tmp_path_factory.mktemp("imports")
  return {"hf": interop.import_checkpoint("hf", HF_DIR, str(root / "hf")),
          "big_vision": interop.import_checkpoint("big_vision", BV_FILE, str(root / "bv"),
                                                  tokenizer=SPIECE)}


def _leaves(params):
  return {optim.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _reference(name):
  with np.load(os.path.join(FIXTURES, name)) as f:
    return dict(f)


def _assert_parity(model, ref):
  zimg, ztxt = model.embed_images(ref["images"]), model.embed_texts(ref["tokens"])
  np.testing.assert_allclose(zimg, ref["zimg"], rtol=0, atol=TOL)
  np.testing.assert_allclose(ztxt, ref["ztxt"], rtol=0, atol=TOL)
  np.testing.assert_allclose(model.logits(zimg, ztxt), ref["logits"], rtol=0, atol=TOL)
  np.testing.assert_allclose(model.logit_scale, ref["scale"], rtol=1e-6)
  np.testing.assert_allclose(model.logit_bias, ref.get("bias", 0.0), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["hf", "big_vision"])
def test_import_matches_the_reference_model(exports, ref, fmt):
  _assert_parity(interop.load(exports[fmt]), ref)


def test_open_clip_export_round_trips(exports, tmp_path):
  imported = interop.import_checkpoint("open_clip", OPEN_CLIP_DIR, str(tmp_path / "in"))
  out = interop.export_checkpoint("open_clip", imported, str(tmp_path / "out"))
  source = tensors.read_safetensors(os.path.join(OPEN_CLIP_DIR, "open_clip_model.safetensors"))
  written = tensors.read_safetensors(os.path.join(out, "open_clip_model.safetensors")).arrays
  assert {k: v.shape for k, v in written.items()} == {
      k: v.shape for k, v in source.arrays.items()}
  for name, value in source.arrays.items():
    if name not in ("visual.class_embedding", "visual.positional_embedding"):
      np.testing.assert_array_equal(written[name], value, err_msg=name)
  # CLIP's class token is class_embedding + positional_embedding[0]: the same sum, written
  # with the position's share moved into the class embedding.
  cls = lambda a: a["visual.class_embedding"] + a["visual.positional_embedding"][0]
  np.testing.assert_array_equal(cls(written), cls(source.arrays))
  np.testing.assert_array_equal(written["visual.positional_embedding"][1:],
                                source.arrays["visual.positional_embedding"][1:])
  with open(os.path.join(OPEN_CLIP_DIR, "open_clip_config.json")) as f:
    want_config = json.load(f)
  with open(os.path.join(out, "open_clip_config.json")) as f:
    assert json.load(f) == want_config
  again = interop.import_checkpoint("open_clip", out, str(tmp_path / "again"))
  first, second = _leaves(load_exported_params(imported)), _leaves(load_exported_params(again))
  assert sorted(first) == sorted(second)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)
  # A SigLIP model is not an open_clip CLIP: refused before anything is written.
  with pytest.raises(interop.InteropError,
                     match=r"model\.image\.\w+=.*; an open_clip CLIP ViT has"):
    interop.export_checkpoint("open_clip", exports["hf"], str(tmp_path / "siglip"))
  assert not os.path.exists(tmp_path / "siglip")


@pytest.mark.parametrize("config", [None, "open_clip_config.json"])
def test_open_clip_import_matches_the_reference_model(tmp_path, config):
  """A hub directory, or a weights file with the model config named apart."""
  if config is None:
    src, model_config = OPEN_CLIP_DIR, None
  else:
    src = os.path.join(OPEN_CLIP_DIR, "open_clip_model.safetensors")
    model_config = shutil.copy(os.path.join(OPEN_CLIP_DIR, config), tmp_path / "ViT-tiny.json")
  out = interop.import_checkpoint("open_clip", src, str(tmp_path / "out"),
                                  model_config=model_config and str(model_config))
  model = interop.load(out)
  _assert_parity(model, _reference("open_clip_reference.npz"))
  options = model.config.model
  assert (options.image.patch_bias, options.image.pre_norm, options.image.norm_eps,
          options.image.activation, options.text.pool_type, options.image_head) == (
              False, True, 1e-5, "gelu", "argmax", "linear")
  # CLIP-shaped: --format=hf writes a CLIPModel, not a SiglipModel.
  with open(os.path.join(interop.export_checkpoint("hf", out, str(tmp_path / "hf")),
                         "config.json")) as f:
    assert json.load(f)["model_type"] == "clip"


def test_hf_clip_import_matches_the_reference_model(tmp_path):
  """A transformers CLIPModel (quick GELU) gives the same embeddings and logits in vljax."""
  out = interop.import_checkpoint("hf", HF_CLIP_DIR, str(tmp_path / "out"))
  model = interop.load(out)
  _assert_parity(model, _reference("hf_clip_reference.npz"))
  options = model.config.model
  assert (options.image.patch_bias, options.image.pre_norm, options.image.activation,
          options.text.activation, options.text.pool_type, options.embed_dim) == (
              False, True, "quick_gelu", "quick_gelu", "argmax", 24)
  # The directory's merges.txt came along: texts tokenize as open_clip's tokenizer does.
  bpe = _reference("clip_bpe_reference.npz")
  short = [i for i, ids in enumerate(bpe["ids"]) if ids[MAX_LEN_CLIP - 1] == 0]
  np.testing.assert_array_equal(model.tokenize([str(bpe["captions"][i]) for i in short]),
                                bpe["ids"][short, :MAX_LEN_CLIP])
  # Back out as a CLIPModel: every tensor is the fixture's, bit for bit, but the class token,
  # which holds class_embedding + position 0 (exported as that sum and a zero position 0).
  written = tensors.read_safetensors(os.path.join(
      interop.export_checkpoint("hf", out, str(tmp_path / "hf")), "model.safetensors")).arrays
  source = tensors.read_safetensors(os.path.join(HF_CLIP_DIR, "model.safetensors")).arrays
  cls, pos = ("vision_model.embeddings.class_embedding",
              "vision_model.embeddings.position_embedding.weight")
  assert sorted(written) == sorted(k for k in source if not k.endswith("position_ids"))
  for name in written:
    if name not in (cls, pos):
      np.testing.assert_array_equal(written[name], source[name], err_msg=name)
  np.testing.assert_array_equal(written[cls], source[cls] + source[pos][0])
  np.testing.assert_array_equal(written[pos][1:], source[pos][1:])
  assert not written[pos][0].any()
  # Round trips through HF's and open_clip's layouts of the architecture give the same bits
  # (and HF's, the same tokenizer: its merges.txt and vocab.json are written too).
  first = jax.tree.leaves(model.params)
  for fmt in ("hf", "open_clip"):
    again = interop.load(interop.import_checkpoint(
        fmt, interop.export_checkpoint(fmt, out, str(tmp_path / f"{fmt}_out")),
        str(tmp_path / f"{fmt}_again")))
    second = jax.tree.leaves(again.params)
    assert len(first) == len(second)
    for a, b in zip(first, second):
      np.testing.assert_array_equal(a, b)
  assert again.tokenizer is None  # open_clip's hub directory names no tokenizer file
  for name in ("merges.txt", "vocab.json"):
    with open(os.path.join(HF_CLIP_DIR, name)) as f, open(tmp_path / "hf_out" / name) as g:
      assert f.read() == g.read(), name


@pytest.mark.parametrize("section,key,value,message", [
    ("text_config", "eos_token_id", 7, r"eos_token_id=7; HF pools the text at the first EOS"),
    ("vision_config", "hidden_act", "gelu", r"vision_config.hidden_act='gelu' but "
                                            r"text_config.hidden_act='quick_gelu'"),
    ("text_config", "layer_norm_eps", 1e-6, r"text_config.layer_norm_eps=1e-06"),
    ("text_config", "hidden_act", "relu", r"text_config.hidden_act='relu'"),
])
def test_hf_clip_unsupported_configs_are_refused(tmp_path, section, key, value, message):
  directory = _copy_with_config_value(HF_CLIP_DIR, "config.json", [section, key], value,
                                      tmp_path)
  with pytest.raises(interop.InteropError, match=message):
    interop.import_checkpoint("hf", directory, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def _copy_with_config_value(source_dir, config_name, keys, value, tmp_path) -> str:
  """A copy of the fixture directory whose JSON config file has config[keys[0]][...] = value."""
  directory = tmp_path / "edited"
  shutil.copytree(source_dir, directory)
  config = json.loads((directory / config_name).read_text())
  inner = config
  for key in keys[:-1]:
    inner = inner[key]
  inner[keys[-1]] = value
  (directory / config_name).write_text(json.dumps(config))
  return str(directory)


def test_open_clip_siglip_import_matches_the_reference_model(tmp_path):
  """open_clip's SigLIP (a timm ViT with MAP pooling, its own text tower): the same embeddings,
  logits and tokenization in vljax; it does not leave for formats whose GELU differs."""
  out = interop.import_checkpoint("open_clip", OPEN_CLIP_SIGLIP_DIR, str(tmp_path / "out"),
                                  tokenizer=SPIECE)
  model = interop.load(out)
  ref = _reference("open_clip_siglip_reference.npz")
  _assert_parity(model, ref)
  options = model.config.model
  assert (options.image.pool_type, options.image.activation, options.text.activation,
          options.text.pool_type, options.image.num_heads, options.image.width) == (
              "map", "gelu", "gelu", "last_position", 12, 48)
  np.testing.assert_array_equal(model.tokenize([str(c) for c in ref["captions"]]),
                                ref["caption_tokens"])
  for fmt in ("hf", "big_vision"):
    with pytest.raises(interop.InteropError, match=r"model.image.activation='gelu'; a SigLIP "
                                                   r"checkpoint needs 'gelu_tanh'"):
      interop.export_checkpoint(fmt, out, str(tmp_path / fmt))


@pytest.mark.parametrize("section,key,value,message", [
    ("vision_cfg", "timm_model_name", "vit_base_patch16_224",
     r"timm_model_name='vit_base_patch16_224'; vljax reads timm's SigLIP ViTs"),
    ("vision_cfg", "timm_pool", "avg", r"vision_cfg.timm_pool='avg' is not supported"),
    ("text_cfg", "pool_type", "argmax", r"text_cfg.pool_type='argmax' is not supported"),
    ("text_cfg", "layers", 3, r"text.transformer.resblocks.2.attn.in_proj_weight' is missing"),
])
def test_open_clip_siglip_unsupported_configs_are_refused(tmp_path, section, key, value,
                                                          message):
  directory = _copy_with_config_value(OPEN_CLIP_SIGLIP_DIR, "open_clip_config.json",
                                      ["model_cfg", section, key], value, tmp_path)
  with pytest.raises(interop.InteropError, match=message):
    interop.import_checkpoint("open_clip", directory, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_open_clip_unsupported_configs_are_refused(tmp_path):
  directory = tmp_path / "oc"
  shutil.copytree(OPEN_CLIP_DIR, directory)
  config_file = directory / "open_clip_config.json"
  config = json.loads(config_file.read_text())
  for where, key, value, message in (
      # A timm tower makes it an open_clip SigLIP, which has no CLIP ViT sizes.
      ("vision_cfg", "timm_model_name", "vit_base_patch16_siglip_224",
       "vision_cfg.patch_size is not supported in an open_clip SigLIP"),
      ("text_cfg", "pool_type", "last", "text_cfg.pool_type='last' is not supported")):
    bad = json.loads(json.dumps(config))
    bad["model_cfg"][where][key] = value
    config_file.write_text(json.dumps(bad))
    message_got = _import_error("open_clip", str(directory), tmp_path)
    assert str(config_file) in message_got and message in message_got
  config_file.write_text(json.dumps(config))
  with pytest.raises(interop.InteropError, match="take CLIP.s BPE vocabulary"):
    interop.import_checkpoint("open_clip", str(directory), str(tmp_path / "o"), tokenizer=SPIECE)
  with pytest.raises(interop.InteropError, match=r"clip_bpe_merges.txt.gz: the tokenizer has "
                                                 r"731 pieces but the model's vocabulary"):
    interop.import_checkpoint("open_clip", str(directory), str(tmp_path / "o"),
                              tokenizer=os.path.join(FIXTURES, "clip_bpe_merges.txt.gz"))


def test_both_formats_give_the_same_params(exports):
  a = _leaves(load_exported_params(exports["hf"]))
  b = _leaves(load_exported_params(exports["big_vision"]))
  assert set(a) == set(b) and len(a) > 80
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  # SigLIP's image tower has no projection head: its MAP output is the embedding.
  assert not any(n.startswith("img/head/") for n in a)


def test_scanned_big_vision_checkpoint_is_unrolled(exports, tmp_path):
  """A scanned big_vision run stores 'encoderblock' with a leading depth axis."""
  def stack(arrays):
    for tower in ("params/img/Transformer", "params/txt/Encoder_0"):
      names = [n for n in list(arrays) if n.startswith(f"{tower}/encoderblock_")]
      for name in [n for n in names if n.startswith(f"{tower}/encoderblock_0/")]:
        leaf = name[len(f"{tower}/encoderblock_0/"):]
        arrays[f"{tower}/encoderblock/{leaf}"] = np.stack(
            [arrays.pop(f"{tower}/encoderblock_{i}/{leaf}") for i in range(2)])
      assert not [n for n in arrays if n.startswith(f"{tower}/encoderblock_")]
  out = interop.import_checkpoint("big_vision", _bv_copy(tmp_path, stack),
                                  str(tmp_path / "out"), tokenizer=SPIECE)
  a = _leaves(load_exported_params(out))
  b = _leaves(load_exported_params(exports["big_vision"]))
  assert set(a) == set(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_tokenizer_matches_hugging_face(exports, ref):
  model = interop.load(exports["hf"])
  captions = [str(c) for c in ref["captions"]]
  np.testing.assert_array_equal(model.tokenize(captions), ref["hf_tokens"])


def test_vljax_padding_embeds_like_siglip_eos_padding(exports, ref):
  """vljax's tokenizer pads with 0, SigLIP with EOS (1): embed_pad_as makes them one input."""
  model = interop.load(exports["hf"])
  eos_padded = ref["tokens"][:2]  # rows that end in EOS padding
  zero_padded = eos_padded.copy()
  for row in zero_padded:
    first_eos = int(np.argmax(row == 1))
    row[first_eos + 1:] = model.tokenizer.pad_id
  assert (zero_padded == 0).any()
  np.testing.assert_array_equal(model.embed_texts(zero_padded), model.embed_texts(eos_padded))


def test_export_round_trips_bit_exactly(exports, tmp_path):
  out = interop.export_checkpoint("hf", exports["hf"], str(tmp_path / "hf"))
  original = tensors.read_safetensors(os.path.join(HF_DIR, hf.WEIGHTS)).arrays
  written = tensors.read_safetensors(os.path.join(out, hf.WEIGHTS)).arrays
  assert set(written) == set(original)
  for name in original:
    np.testing.assert_array_equal(written[name], original[name], err_msg=name)
  with open(os.path.join(out, hf.TOKENIZER), "rb") as a, open(SPIECE, "rb") as b:
    assert a.read() == b.read()
  with open(os.path.join(out, hf.CONFIG)) as f:
    assert json.load(f)["text_config"]["projection_size"] == 64

  again = interop.import_checkpoint("hf", out, str(tmp_path / "again"))
  first, second = (_leaves(load_exported_params(d)) for d in (exports["hf"], again))
  assert set(first) == set(second)
  for name in first:
    np.testing.assert_array_equal(second[name], first[name], err_msg=name)

  npz = interop.export_checkpoint("big_vision", exports["hf"], str(tmp_path / "bv.npz"))
  with np.load(npz) as a, np.load(BV_FILE) as b:
    assert sorted(a.files) == sorted(b.files)
    for name in b.files:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_lit_starts_from_an_import_with_its_image_tower_locked(exports):
  """configs/lit.py:imported=DIR builds a run whose config.init loads exactly the import's
  image tower, the parameters it locks (train.py does the same at step 0)."""
  directory = exports["hf"]
  config = configlib.load_config_file(
      os.path.join(ROOT, "configs", f"lit.py:scale=tiny,imported={directory}"))
  tokenizer = train.run_tokenizer(config)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  fresh = train.init_state(setup, config.seed).params
  params, loaded = init_weights.load_initial_params(config.init, fresh, log=lambda _: None)
  imported, got, before = (_leaves(p) for p in (load_exported_params(directory), params, fresh))
  assert set(got) == set(imported)
  frozen = {optim.param_path(p) for p, f in
            jax.tree_util.tree_flatten_with_path(setup.frozen)[0] if f}
  assert loaded == sorted(frozen) == sorted(n for n in imported if n.startswith("img/"))
  for name in got:
    want = imported[name] if name.startswith("img/") else before[name]
    np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_export_loads_through_vljax_predict(exports, ref):
  predictor = predict.load(exports["hf"])
  zimg = predictor.objective.embed_images(predictor.params, ref["images"])
  np.testing.assert_allclose(np.asarray(zimg), ref["zimg"], rtol=0, atol=TOL)


def test_vljax_evaluate_scores_an_export_directory(exports, tmp_path):
  directory = shutil.copytree(exports["hf"], str(tmp_path / "hf"))
  config = configlib.apply_overrides(configlib.load_run_config(directory), [
      "data.eval=synthetic", "eval.max_examples.zeroshot=40",
      "eval.max_examples.retrieval=40"])
  results = evaluate_lib.evaluate(config, directory)
  assert results["eval/zeroshot_examples"] == 40 and results["eval/retrieval_images"] == 40
  with open(os.path.join(directory, "evaluations.jsonl")) as f:
    assert json.loads(f.readlines()[-1])["checkpoint_step"] is None
  # The export's own weights were scored: the same evaluation of them in memory agrees, and
  # the freshly initialised model scores otherwise.
  predictor = predict.load(directory)
  evaluator = train.make_evaluator(config, predictor.objective, predictor.tokenizer,
                                   predictor.mesh, predictor.rules)
  assert evaluator(predictor.params) == results
  fresh = train.init_state(train.build(config, predictor.tokenizer, predictor.mesh,
                                       epoch_size=None), seed=0).params
  assert evaluator(fresh) != results


def test_command_line_imports_and_exports(tmp_path, capsys):
  out = str(tmp_path / "export")
  assert cli.main(["import", "--format=big_vision", BV_FILE, "--out", out,
                   "--tokenizer", SPIECE]) == 0
  assert os.path.isdir(os.path.join(out, "params"))
  assert os.path.isfile(os.path.join(out, "config.json"))
  assert os.path.isfile(os.path.join(out, tokenizer_lib.TOKENIZER_FILENAME))
  assert cli.main(["export", "--format=hf", out, "--out", str(tmp_path / "hf")]) == 0
  assert os.path.isfile(tmp_path / "hf" / hf.WEIGHTS)
  assert cli.main(["import", "--format=hf", str(tmp_path / "nowhere"), "--out", out]) == 2
  assert "nowhere: not a directory" in capsys.readouterr().err


# Bad input: one clear error naming the file and the tensor.


def _hf_copy(tmp_path, edit):
  """A copy of the HF fixture whose tensors went through `edit(dict)`."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  directory = tmp_path / "hf"
  shutil.copytree(HF_DIR, directory)
  arrays = tensors.read_safetensors(os.path.join(HF_DIR, hf.WEIGHTS)).arrays
  edit(arrays)
  st_numpy.save_file(arrays, str(directory / hf.WEIGHTS))
  return str(directory)


def _write_bfloat16_safetensors(path, arrays):
  """A .safetensors file written byte by byte, its float32 tensors stored as bfloat16
  (safetensors' numpy writer has no bfloat16)."""
  header, chunks, offset = {}, [], 0
  for name, array in arrays.items():
    if array.dtype == np.float32:
      raw, dtype = array.astype(ml_dtypes.bfloat16).tobytes(), "BF16"
    else:
      raw, dtype = array.tobytes(), {np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}[
          array.dtype]
    header[name] = {"dtype": dtype, "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def test_bfloat16_safetensors_are_read_as_float32(tmp_path):
  values = np.asarray([[1.5, -2.0, 0.15625], [3.0e-3, 65280.0, -0.0]], np.float32)
  path = str(tmp_path / "bf16.safetensors")
  _write_bfloat16_safetensors(path, {"w": values, "n": np.arange(3, dtype=np.int64)})
  arrays = tensors.read_safetensors(path).arrays
  assert arrays["w"].dtype == np.float32 and arrays["n"].dtype == np.int64
  np.testing.assert_array_equal(arrays["w"], values.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert arrays["w"][1, 0] != values[1, 0]  # 3e-3 is not a bfloat16: it was rounded
  np.testing.assert_array_equal(arrays["n"], [0, 1, 2])


def test_hf_import_of_a_bfloat16_checkpoint_equals_its_float32_values(tmp_path):
  arrays = tensors.read_safetensors(os.path.join(HF_DIR, hf.WEIGHTS)).arrays
  bf16_dir = tmp_path / "bf16"
  shutil.copytree(HF_DIR, bf16_dir)
  _write_bfloat16_safetensors(str(bf16_dir / hf.WEIGHTS), arrays)
  # The same values in float32, through safetensors' own reader.
  rounded = _hf_copy(tmp_path, lambda a: a.update(
      {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in a.items()
       if v.dtype == np.float32}))
  got = load_exported_params(interop.import_checkpoint("hf", str(bf16_dir),
                                                      str(tmp_path / "out_bf16")))
  want = load_exported_params(interop.import_checkpoint("hf", rounded,
                                                       str(tmp_path / "out_f32")))
  got, want = _leaves(got), _leaves(want)
  assert sorted(got) == sorted(want) and len(got) > 20
  for name in got:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _bv_copy(tmp_path, edit):
  with np.load(BV_FILE) as f:
    arrays = dict(f)
  edit(arrays)
  path = str(tmp_path / "bv.npz")
  np.savez(path, **arrays)
  return path


def _import_error(fmt, src, tmp_path) -> str:
  with pytest.raises(interop.InteropError) as e:
    interop.import_checkpoint(fmt, src, str(tmp_path / "out"), tokenizer=SPIECE)
  assert not os.path.exists(tmp_path / "out")
  return str(e.value)


QUERY = "text_model.encoder.layers.1.self_attn.q_proj.weight"
BV_QUERY = "params/txt/Encoder_0/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
  directory = tmp_path / "hf"
  shutil.copytree(HF_DIR, directory)
  weights = directory / hf.WEIGHTS
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) - 1000])
  message = _import_error("hf", str(directory), tmp_path)
  assert str(weights) in message and "truncated" in message
  assert "tensor 'text_model." in message or "tensor 'vision_model." in message


def test_truncated_npz_names_file_and_tensor(tmp_path):
  path = tmp_path / "bv.npz"
  data = open(BV_FILE, "rb").read()
  path.write_bytes(data[:len(data) // 2])
  message = _import_error("big_vision", str(path), tmp_path)
  assert str(path) in message and "truncated" in message and "'params/" in message


def test_wrong_format_file_is_refused(tmp_path):
  directory = tmp_path / "hf"
  shutil.copytree(HF_DIR, directory)
  shutil.copy(BV_FILE, directory / hf.WEIGHTS)  # a zip where safetensors should be
  message = _import_error("hf", str(directory), tmp_path)
  assert str(directory / hf.WEIGHTS) in message and "not a .safetensors file" in message
  message = _import_error("big_vision", os.path.join(HF_DIR, hf.WEIGHTS), tmp_path)
  assert "not a complete .npz archive" in message


@pytest.mark.parametrize("fmt", ["hf", "big_vision"])
def test_missing_tensor_names_file_and_tensor(tmp_path, fmt):
  if fmt == "hf":
    src = _hf_copy(tmp_path, lambda a: a.pop(QUERY))
    name, where = QUERY, os.path.join(src, hf.WEIGHTS)
  else:
    src = _bv_copy(tmp_path, lambda a: a.pop(BV_QUERY))
    name, where = BV_QUERY, src
  message = _import_error(fmt, src, tmp_path)
  assert where in message and f"tensor {name!r} is missing" in message


@pytest.mark.parametrize("fmt", ["hf", "big_vision"])
def test_shape_mismatch_names_file_and_tensor(tmp_path, fmt):
  def shrink(arrays, name):
    arrays[name] = arrays[name][..., :-1]
  if fmt == "hf":
    src = _hf_copy(tmp_path, lambda a: shrink(a, QUERY))
    name, where = QUERY, os.path.join(src, hf.WEIGHTS)
  else:
    src = _bv_copy(tmp_path, lambda a: shrink(a, BV_QUERY))
    name, where = BV_QUERY, src
  message = _import_error(fmt, src, tmp_path)
  assert where in message and f"tensor {name!r} has shape" in message and "expected" in message


class _Boom:
  """Unpickling this creates the directory `path`: the test checks it never appears."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.makedirs, (self.path,))


def test_npz_pickles_are_never_executed(tmp_path):
  ran = str(tmp_path / "pickle_ran")
  pickle.loads(pickle.dumps(_Boom(ran)))  # the payload works when unpickled...
  assert os.path.isdir(ran)
  os.rmdir(ran)
  with np.load(BV_FILE) as f:
    arrays = dict(f)
  arrays["params/t"] = np.array([_Boom(ran)], dtype=object)
  path = str(tmp_path / "bv.npz")
  np.savez(path, **arrays)
  message = _import_error("big_vision", path, tmp_path)  # ...and is refused here
  assert "'params/t' is a pickled object" in message
  assert not os.path.exists(ran)


def test_torch_files_read_without_torch(ref):
  got = torch_pickle.read_torch(os.path.join(FIXTURES, "torch_tensors.pt")).arrays
  with np.load(os.path.join(FIXTURES, "torch_tensors.npz")) as f:
    want = dict(f)  # what torch.load reads back
  assert set(got) == set(want)
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_hf_directory_with_only_pytorch_model_bin(exports, tmp_path):
  directory = tmp_path / "hf_bin"
  directory.mkdir()
  for name in (hf.CONFIG, hf.TOKENIZER):
    shutil.copy(os.path.join(HF_DIR, name), directory / name)
  shutil.copy(os.path.join(FIXTURES, "hf_siglip_fp16.bin"), directory / hf.TORCH_WEIGHTS)
  got = _leaves(load_exported_params(
      interop.import_checkpoint("hf", str(directory), str(tmp_path / "out"))))
  # The same weights rounded to float16 (the conversion only moves values around).
  want = _leaves(load_exported_params(exports["hf"]))
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name].astype(np.float16).astype(np.float32),
                                  err_msg=name)


def test_torch_pickles_are_never_executed(tmp_path):
  import zipfile  # pylint: disable=g-import-not-at-top
  ran = str(tmp_path / "pickle_ran")
  directory = tmp_path / "hf"
  directory.mkdir()
  shutil.copy(os.path.join(HF_DIR, hf.CONFIG), directory / hf.CONFIG)
  weights = directory / hf.TORCH_WEIGHTS
  with zipfile.ZipFile(weights, "w") as zf:  # torch.save's layout, with a hostile data.pkl
    zf.writestr("archive/data.pkl", pickle.dumps({"logit_scale": _Boom(ran)}))
    zf.writestr("archive/version", "3\n")
  message = _import_error("hf", str(directory), tmp_path)
  assert str(weights) in message and "refused global" in message and "makedirs" in message
  assert not os.path.exists(ran)
  weights.write_bytes(pickle.dumps({"a": 1}))  # the legacy (non-zip) torch format
  assert "not a torch.save zip archive" in _import_error("hf", str(directory), tmp_path)


def test_unsupported_hf_options_are_refused(tmp_path):
  directory = tmp_path / "hf"
  shutil.copytree(HF_DIR, directory)
  config = json.loads((directory / hf.CONFIG).read_text())
  config["vision_config"]["hidden_act"] = "gelu"
  (directory / hf.CONFIG).write_text(json.dumps(config))
  assert "hidden_act='gelu'" in _import_error("hf", str(directory), tmp_path)
  config["model_type"] = "siglip3"
  (directory / hf.CONFIG).write_text(json.dumps(config))
  assert "'siglip3' is not supported" in _import_error("hf", str(directory), tmp_path)


# The model options the conversion needs leave today's models as they were.


def test_text_options_default_to_todays_behaviour():
  kwargs = dict(vocab_size=20, width=16, depth=1, mlp_dim=32, num_heads=2, max_len=6)
  tokens = np.array([[5, 6, 7, 1, 0, 0], [8, 1, 0, 0, 0, 0]], np.int32)
  def run(**options):
    return jax.jit(text_lib.TextTransformer(**kwargs, **options).apply)(params, tokens)

  params = jax.jit(text_lib.TextTransformer(**kwargs).init)(jax.random.key(0), tokens)
  default = run()
  explicit = run(mask_pad=True, embed_pad_as=None)
  np.testing.assert_array_equal(default[0], explicit[0])
  np.testing.assert_array_equal(default[1], explicit[1])
  # The SigLIP options change what they say: the final position is pooled, padding attended.
  pooled, seq = run(pool_type="last_position", mask_pad=False)
  np.testing.assert_array_equal(pooled, seq[:, -1])
  masked = run(pool_type="last_position")[1]
  assert not np.allclose(masked[:, :3], seq[:, :3], atol=1e-6)


def test_vit_options_default_to_todays_behaviour():
  kwargs = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(8, 8), pool_type="tok")
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  params = jax.jit(vit.VisionTransformer(**kwargs).init)(jax.random.key(0), images)

  def run(**options):
    return jax.jit(vit.VisionTransformer(**kwargs, **options).apply)(params, images)

  default = run()
  explicit = run(patch_bias=True, pre_norm=False, norm_eps=1e-6, activation="gelu_tanh")
  np.testing.assert_array_equal(default[0], explicit[0])
  np.testing.assert_array_equal(default[1], explicit[1])
  for options in (dict(norm_eps=1e-5), dict(activation="gelu"),
                  dict(activation="quick_gelu")):
    assert not np.array_equal(run(**options)[0], default[0]), options


def test_activations_are_what_they_say():
  x = np.linspace(-4, 4, 101).astype(np.float32)
  act = layers.ACTIVATIONS
  np.testing.assert_allclose(act["quick_gelu"](x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6,
                             atol=1e-7)
  from scipy import special  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(act["gelu"](x), 0.5 * x * (1 + special.erf(x / np.sqrt(2))),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(act["gelu_tanh"](x), jax.nn.gelu(x, approximate=True))


def test_tower_without_head_needs_embed_dim_width():
  model = two_towers.TwoTowers(image=dict(width=16, depth=1, mlp_dim=32, num_heads=2,
                                          patch_size=(8, 8)),
                               text=dict(vocab_size=10, width=16, depth=1, mlp_dim=32,
                                         num_heads=2, max_len=4),
                               embed_dim=24, image_head="none")
  with pytest.raises(ValueError, match="no head, so its width \\(16\\) must be embed_dim"):
    jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), None)


def test_spec_from_config_refuses_non_siglip_models(exports):
  config = configlib.load_run_config(exports["hf"])
  assert siglip.spec_from_config(config, "x").embed_dim == 64
  with config.unlocked():
    config.model.text = dict(config.model.text, pool_type="last")
  with pytest.raises(interop.InteropError, match="model.text.pool_type='last'"):
    siglip.spec_from_config(config, "x")
