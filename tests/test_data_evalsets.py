"""Tests for eval sets (imagefolder, TFDS, multi-caption retrieval, whole sets by default,
random samples under config.eval.max_examples, parallel decoding, uint8 storage), the counts the
evaluator reports, preprocessing options, and the trainer over a real-file source with bad
records."""

import io
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vljax import configlib
from vljax import evals
from vljax import metrics
from vljax import sharding
from vljax import train
from vljax.configlib import ConfigError
from vljax.data import evalsets
from vljax.data import formats
from vljax.data import pipeline
from vljax.data import preprocess
from vljax.data import sources
from vljax.evals import common

from tests.test_data_sources import MAX_LEN, SIZE, image_bytes, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(**kw) -> ml_collections.ConfigDict:
  c = configlib.base_train_config().data
  c.image_size, c.max_len = SIZE, MAX_LEN
  c.update(kw)
  return c


def eval_config(**max_examples) -> ml_collections.ConfigDict:
  """config.eval with config.eval.max_examples updated by `max_examples`."""
  c = configlib.base_train_config().eval
  c.max_examples.update(max_examples)
  return c


# ------------------------------------------------------------------ preprocessing


def test_resize_modes():
  wide = np.zeros((10, 40, 3), np.uint8)
  wide[:, :20] = 255  # left half white
  warp = preprocess.resize(wide, 8, 'warp')
  crop = preprocess.resize(wide, 8, 'crop')
  pad = preprocess.resize(wide, 8, 'pad')
  assert warp.shape == crop.shape == pad.shape == (8, 8, 3)
  assert warp[:, :3].min() == 255 and warp[:, 5:].max() == 0
  # Crop keeps the centre: the white/black edge sits in the middle.
  assert crop[:, :3].min() == 255 and crop[:, 5:].max() == 0
  # Pad keeps the whole image (8 wide, 2 high) between grey bands.
  assert (pad[0] == 128).all() and (pad[-1] == 128).all()
  assert pad[4, 0].min() == 255 and pad[4, -1].max() == 0


def test_augmentation_is_a_function_of_seed_and_index():
  opts = preprocess.ImageOptions(size=8, inception_crop=True, crop_scale=0.3,
                                 hflip=True)
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
  run = lambda i: preprocess.process_image(
      image, opts, np.random.default_rng([7, i]))
  np.testing.assert_array_equal(run(1), run(1))
  assert not all(np.array_equal(run(1), run(i)) for i in range(2, 6))
  norm = preprocess.ImageOptions(size=4, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3)
  out = preprocess.process_image(np.full((4, 4, 3), 255, np.uint8), norm)
  np.testing.assert_allclose(out, 2.0)


def test_captions_are_cleaned_and_bad_ones_rejected(tok):
  opts = preprocess.TextOptions(lowercase=True, canonicalize=True)
  assert preprocess.clean_caption('  A Dog,  on   the MAT!! ', opts) == 'a dog on the mat'
  assert preprocess.clean_caption(b'caf\xc3\xa9') == 'café'
  for bad in (None, '', '  ', b'\xff\xfe', b''):
    with pytest.raises(preprocess.BadRecord):
      preprocess.clean_caption(bad)
  # A caption far over the limit is truncated by the tokenizer, never an error.
  ids = tok.encode(['word ' * 500], MAX_LEN)
  assert ids.shape == (1, MAX_LEN)


def test_text_options_reach_the_batches(tok, tmp_path):
  pattern = write_shards(tmp_path / 'w', 1, 4)
  source = sources.get_source(f'webdataset:{pattern}', 'train', SIZE, 0)
  kwargs = dict(batch_size=4, image_size=SIZE, max_len=MAX_LEN, seed=0,
                num_epochs=1)
  plain = next(pipeline.make_train_iterator(source, tok, **kwargs))
  upper = next(pipeline.make_train_iterator(
      source, tok, image_options=preprocess.ImageOptions(SIZE, resize='pad'),
      text_options=preprocess.TextOptions(lowercase=True), **kwargs))
  np.testing.assert_array_equal(plain['text'], upper['text'])  # already lower
  assert not np.array_equal(plain['image'], upper['image'])   # pad vs warp


# ------------------------------------------------------------------ eval sets


def test_imagefolder_zeroshot(tok, tmp_path):
  for c, name in enumerate(['golden_retriever', 'cat', 'airplane']):
    os.makedirs(tmp_path / 'imgs' / name)
    for j in range(2):
      (tmp_path / 'imgs' / name / f'{j}.jpg').write_bytes(image_bytes(10 * c + j))
  (tmp_path / 'imgs' / 'cat' / 'broken.jpg').write_bytes(b'nope')
  sets = evalsets.load_eval_sets(
      data_config(eval=f'imagefolder:{tmp_path}/imgs',
                  prompt_templates=['a photo of a {}.', 'art of a {}.']), tok)
  assert set(sets) == {'zeroshot'}
  zs = sets['zeroshot']
  assert zs['image'].shape == (6, SIZE, SIZE, 3)
  assert zs['class_prompts'][0] == ['a photo of a airplane.', 'art of a airplane.']
  assert zs['class_prompts'][2][0] == 'a photo of a golden retriever.'
  assert sorted(zs['label'].tolist()) == [0, 0, 1, 1, 2, 2]


def test_retrieval_with_several_captions_per_image(tok, tmp_path):
  os.makedirs(tmp_path / 'img')
  rows = []
  for i in range(4):
    (tmp_path / 'img' / f'{i}.png').write_bytes(image_bytes(i, 'PNG'))
    # COCO-style: a list of captions, or one line per (image, caption) pair.
    if i % 2:
      rows.append({'image': f'img/{i}.png', 'caption': [f'cap {i} a', f'cap {i} b', '']})
    else:
      rows += [{'image': f'img/{i}.png', 'caption': f'cap {i} {c}'} for c in 'xyz']
  rows.append({'image': 'img/missing.png', 'caption': 'lost'})
  path = tmp_path / 'coco.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in rows))
  sets = evalsets.load_eval_sets(data_config(eval=f'jsonl:{path}'), tok)
  assert set(sets) == {'retrieval'}
  rt = sets['retrieval']
  assert rt['image'].shape[0] == 4
  assert len(rt['captions']) == 3 + 2 + 3 + 2
  assert rt['caption_image'].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
  assert rt['captions'][:4] == ['cap 0 x', 'cap 0 y', 'cap 0 z', 'cap 1 a']


def test_eval_defaults_unchanged_and_errors(tok):
  # The synthetic held-out split is 512 images; by default all of them serve both tasks, as
  # one array (so the evaluator embeds them once).
  sets = evalsets.load_eval_sets(data_config(), tok)
  assert set(sets) == {'zeroshot', 'retrieval'}
  assert sets['retrieval']['caption_image'] is None
  assert sets['zeroshot']['image'] is sets['retrieval']['image']
  assert sets['zeroshot']['image'].shape == (512, SIZE, SIZE, 3)
  assert sets['zeroshot']['image'].dtype == np.uint8
  assert len(sets['retrieval']['captions']) == 512
  capped = evalsets.load_eval_sets(data_config(), tok, eval_config(zeroshot=8, retrieval=8))
  assert capped['zeroshot']['image'] is capped['retrieval']['image']
  assert len(capped['zeroshot']['label']) == 8
  # Different caps load each task on its own; the smaller sample lies inside the larger.
  apart = evalsets.load_eval_sets(data_config(), tok, eval_config(zeroshot=8, retrieval=16))
  assert len(apart['zeroshot']['label']) == 8 and len(apart['retrieval']['captions']) == 16
  assert set(apart['zeroshot']['record_index']) < set(apart['retrieval']['record_index'])
  with pytest.raises(ConfigError, match='class names'):
    sources.class_prompts('jsonl:/x')
  with pytest.raises(ConfigError, match='max_examples'):
    evalsets.load_eval_sets(data_config(), tok, eval_config(zeroshot=-1))
  with pytest.raises(ConfigError, match='unknown task'):
    evalsets.load_eval_sets(data_config(), tok, eval_config(captioning=5))


# ------------------------------------------------------------------ whole sets, samples, counts

# Ten classes of unequal size (55 images): reading the first N in class order would drop
# whole classes.
CLASS_SIZES = (3, 1, 7, 2, 9, 4, 6, 5, 8, 10)


def _write_imagefolder(root, fmt='PNG'):
  """DIR/class_C/JJ.png plus one undecodable file in class 4.

  Returns the records in reading order (sorted class, sorted file) as (path, label); the
  broken file has label None.
  """
  ext = 'png' if fmt == 'PNG' else 'jpg'
  records = []
  for c, n in enumerate(CLASS_SIZES):
    folder = root / f'class_{c}'
    os.makedirs(folder)
    for j in range(n):
      path = folder / f'{j:02d}.{ext}'
      pixels = np.random.default_rng(100 * c + j).integers(0, 256, (9, 11, 3), np.uint8)
      Image.fromarray(pixels).save(path, format=fmt)
      records.append((path, c))
    if c == 4:
      (folder / f'zz_broken.{ext}').write_bytes(b'nope')
      records.append((folder / f'zz_broken.{ext}', None))
  return records


def _expected_pixels(path) -> np.ndarray:
  """What evaluation should see of a PNG: RGB, bicubic to SIZE x SIZE (config resize 'warp')."""
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB').resize((SIZE, SIZE), Image.Resampling.BICUBIC))


class _Objective:
  """A stand-in model: an image embeds as its mean colour, a text as the sum of a fixed
  random vector per token; it captions every image with the same sentence."""

  def __init__(self, tok):
    self.table = np.random.default_rng(0).normal(size=(4096, 3)).astype(np.float32)
    self.sentence = tok.encode(['a red circle in the middle'], MAX_LEN)[0]

  def embed_images(self, params, images):
    del params
    z = images.mean(axis=(1, 2))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def embed_texts(self, params, tokens):
    del params
    z = jnp.asarray(self.table)[tokens % 4096].sum(axis=1)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def generate(self, params, images, max_len):
    del params
    return jnp.broadcast_to(jnp.asarray(self.sentence[:max_len]), (images.shape[0], max_len))


def _evaluate(sets, tok):
  config = configlib.base_train_config()
  config.data.max_len, config.eval.batch_size = MAX_LEN, 16
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  evaluator = evals.build_evaluator(config, _Objective(tok), sets, tok, mesh,
                                    sharding.DEFAULT_RULES)
  return evaluator, evaluator(None)


def _reference_top1(tok, pixels, labels, class_prompts) -> float:
  """Zero-shot top-1 of `_Objective` in float64 numpy, from uint8 pixels in the [-1, 1] range."""
  table = _Objective(tok).table.astype(np.float64)
  unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
  zimg = unit((pixels.astype(np.float64) * 2 / 255 - 1).mean(axis=(1, 2)))
  tokens = tok.encode([p for ps in class_prompts for p in ps], MAX_LEN)
  zcls = unit(unit(table[tokens % 4096].sum(axis=1)).reshape(len(class_prompts), -1, 3)
              .mean(axis=1))
  return float(np.mean(np.argmax(zimg @ zcls.T, axis=1) == labels))


def test_imagefolder_is_scored_whole_by_default(tok, tmp_path):
  records = _write_imagefolder(tmp_path / 'imgs')
  spec = f'imagefolder:{tmp_path}/imgs'
  sets = evalsets.load_eval_sets(data_config(eval=spec), tok)
  zs = sets['zeroshot']
  good = [(path, c) for path, c in records if c is not None]
  assert zs['image'].shape == (55, SIZE, SIZE, 3) and zs['image'].dtype == np.uint8
  np.testing.assert_array_equal(zs['label'], [c for _, c in good])
  np.testing.assert_array_equal(np.bincount(zs['label']), CLASS_SIZES)  # every class, whole
  np.testing.assert_array_equal(zs['image'], np.stack([_expected_pixels(p) for p, _ in good]))
  assert zs['skipped'] == 1 and zs['spec'] == spec
  evaluator, got = _evaluate(sets, tok)
  assert evaluator.sources == {'zeroshot': spec}
  assert got['eval/zeroshot_examples'] == 55
  assert got['eval/zeroshot_classes'] == 10
  assert got['eval/zeroshot_skipped'] == 1
  assert got['eval/zeroshot_top1'] == pytest.approx(_reference_top1(
      tok, zs['image'], zs['label'], zs['class_prompts']))


def test_max_examples_is_a_random_sample_fixed_by_the_seed(tok, tmp_path):
  records = _write_imagefolder(tmp_path / 'imgs')
  spec = f'imagefolder:{tmp_path}/imgs'
  load = lambda seed: evalsets.load_eval_sets(
      data_config(eval=spec, seed=seed), tok, eval_config(zeroshot=20, retrieval=0))['zeroshot']
  zs = load(3)
  # The first 20 entries of a seed-3 permutation of the 56 records, read in file order; the
  # broken record is one of them, so 19 images are scored.
  chosen = np.sort(np.random.default_rng(3).permutation(len(records))[:20])
  kept = [i for i in chosen if records[i][1] is not None]
  assert len(kept) == 19
  np.testing.assert_array_equal(zs['record_index'], kept)
  np.testing.assert_array_equal(zs['label'], [records[i][1] for i in kept])
  np.testing.assert_array_equal(zs['image'], np.stack([_expected_pixels(records[i][0])
                                                       for i in kept]))
  assert zs['skipped'] == 1
  # Not the first 20 records (classes 0 to 4 only): the sample spans the classes.
  first_classes = {c for _, c in records[:20] if c is not None}
  assert first_classes == {0, 1, 2, 3, 4}
  assert len(set(zs['label'].tolist()) - first_classes) >= 3
  again = load(3)
  np.testing.assert_array_equal(again['record_index'], zs['record_index'])
  np.testing.assert_array_equal(again['image'], zs['image'])
  other = load(4)
  assert len(other['label']) + other['skipped'] == 20
  assert not np.array_equal(other['record_index'], zs['record_index'])
  _, got = _evaluate({'zeroshot': zs}, tok)
  assert got['eval/zeroshot_examples'] == 19 and got['eval/zeroshot_skipped'] == 1
  assert got['eval/zeroshot_classes'] == len(set(zs['label'].tolist()))


def _write_caption_file(root):
  """12 records with 2 or 3 captions each (texts repeat across images); record 7 has no image
  file. Returns (path, records as (image path, captions))."""
  os.makedirs(root / 'img')
  shared = ['a shared caption', 'another shared one']
  records = []
  for i in range(12):
    if i != 7:
      (root / 'img' / f'{i}.png').write_bytes(image_bytes(i, 'PNG'))
    captions = [f'image {i} first', shared[i % 2] if i % 3 == 0 else f'image {i} second']
    if i % 4 == 1:
      captions.append(f'image {i} third')
    records.append((f'img/{i}.png', captions))
  path = root / 'captions.jsonl'
  path.write_text('\n'.join(json.dumps({'image': im, 'caption': caps}) for im, caps in records))
  return path, records


def test_retrieval_counts_and_record_samples(tok, tmp_path):
  path, records = _write_caption_file(tmp_path)
  spec = f'jsonl:{path}'
  sets = evalsets.load_eval_sets(data_config(eval=spec), tok)
  rt = sets['retrieval']
  good = [i for i in range(12) if i != 7]
  captions = [c for i in good for c in records[i][1]]
  assert rt['captions'] == captions and rt['skipped'] == 1
  owner = [n for n, i in enumerate(good) for _ in records[i][1]]
  duplicates = sum(1 for j in range(len(captions))
                   if any(captions[l] == captions[j] and owner[l] != owner[j]
                          for l in range(len(captions))))
  assert duplicates == 4  # 'a shared caption' on images 0, 6; 'another shared one' on 3, 9
  evaluator, got = _evaluate(sets, tok)
  assert evaluator.sources == {'retrieval': spec}
  assert got['eval/retrieval_images'] == 11
  assert got['eval/retrieval_captions'] == len(captions)
  assert got['eval/retrieval_duplicate_captions'] == duplicates
  assert got['eval/retrieval_skipped'] == 1
  assert got['eval/captioning_examples'] == 11
  assert 'eval/i2t_recall@1' in got and 'eval/cider' in got
  # A cap samples whole records: each sampled image keeps all its captions.
  capped = evalsets.load_eval_sets(data_config(eval=spec, seed=5), tok,
                                   eval_config(zeroshot=0, retrieval=6))['retrieval']
  chosen = np.sort(np.random.default_rng(5).permutation(12)[:6])
  kept = [i for i in chosen if i != 7]
  np.testing.assert_array_equal(capped['record_index'], kept)
  assert capped['captions'] == [c for i in kept for c in records[i][1]]
  assert capped['skipped'] == len(chosen) - len(kept)
  np.testing.assert_array_equal(
      capped['caption_image'], [n for n, i in enumerate(kept) for _ in records[i][1]])


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_parallel_decoding_matches_sequential(tok, tmp_path, fmt):
  _write_imagefolder(tmp_path / 'imgs', fmt)
  source = formats.ImageFolder(str(tmp_path / 'imgs'))
  load = lambda threads, **kw: pipeline.load_eval_data(
      source, tok, image_size=SIZE, max_len=MAX_LEN, require_caption=False, normalize=False,
      num_threads=threads, **kw)
  for kw in ({}, {'indices': [40, 3, 22, 17, 55, 0]}, {'num_examples': 30}):
    sequential, parallel = load(1, **kw), load(4, **kw)
    assert sequential.keys() == parallel.keys()
    for key, want in sequential.items():
      if isinstance(want, np.ndarray):
        assert want.dtype == parallel[key].dtype
        np.testing.assert_array_equal(parallel[key], want, err_msg=key)
      else:
        assert parallel[key] == want, key
  assert load(4)['skipped'] == 1 and load(4)['image'].shape[0] == 55
  assert load(4, indices=[40, 3, 22])['record_index'].tolist() == [40, 3]  # 22 is broken
  assert len(load(4, num_examples=30)['label']) == 30


@pytest.mark.parametrize('opts', [
    preprocess.ImageOptions(SIZE),
    preprocess.ImageOptions(SIZE, resize='crop', mean=(0.48, 0.46, 0.41),
                            std=(0.27, 0.26, 0.28)),
])
def test_uint8_storage_and_batch_normalisation_equal_eager_floats(tok, tmp_path, opts):
  records = _write_imagefolder(tmp_path / 'imgs')
  source = formats.ImageFolder(str(tmp_path / 'imgs'))
  # The old eager path: each usable image decoded and normalised to float32 on its own.
  eager = []
  for path, label in records:
    if label is not None:
      eager.append(preprocess.process_image(
          preprocess.decode_image(path.read_bytes(), SIZE), opts))
  eager = np.stack(eager)
  kwargs = dict(image_size=SIZE, max_len=MAX_LEN, image_options=opts, require_caption=False)
  stored = pipeline.load_eval_data(source, tok, normalize=False, **kwargs)
  assert stored['image'].dtype == np.uint8 and stored['image'].nbytes * 4 == eager.nbytes
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  embedded = common.embed_images(jax.jit(lambda p, x: x), None, stored, mesh, batch_size=16)
  np.testing.assert_array_equal(np.asarray(embedded), eager)
  np.testing.assert_array_equal(
      pipeline.load_eval_data(source, tok, normalize=True, **kwargs)['image'], eager)


# ------------------------------------------------------------------ tfds


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """A real TFDS dataset (array_record files) built without TensorFlow.

  Images are passed encoded (PNG file objects): encoding arrays would need TF.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (test extra)

  class VljaxTinyCls(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(names=['cat', 'dog', 'red_car']),
          'captions': tfds.features.Sequence({'text': tfds.features.Text()}),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(6),
              'test': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'image': io.BytesIO(image_bytes(i, 'PNG')), 'label': i % 3,
                  'captions': {'text': [f'thing {i}', f'object {i}']}}

  root = str(tmp_path_factory.mktemp('tfds'))
  VljaxTinyCls(data_dir=root, file_format='array_record').download_and_prepare()
  return root


def test_tfds_train_and_eval(tok, tfds_dir):
  options = {'tfds_data_dir': tfds_dir}
  source = sources.get_source('tfds:vljax_tiny_cls?caption=captions/text', 'train', SIZE, 0,
                              options)
  assert len(source) == 6
  batches = list(pipeline.make_train_iterator(
      source, tok, batch_size=3, image_size=SIZE, max_len=MAX_LEN, seed=0,
      num_epochs=1))
  assert len(batches) == 2
  assert sorted(int(x) for b in batches for x in b['label']) == [0, 0, 1, 1, 2, 2]
  cfg = data_config(eval='tfds:vljax_tiny_cls?caption=captions/text', tfds_data_dir=tfds_dir)
  sets = evalsets.load_eval_sets(cfg, tok)
  assert set(sets) == {'zeroshot'}  # a ClassLabel feature: classification
  assert sets['zeroshot']['class_prompts'][2][0] == 'a photo of a red car.'
  cfg.eval, cfg.eval_retrieval = '', 'tfds:vljax_tiny_cls:test?caption=captions/text'
  rt = evalsets.load_eval_sets(cfg, tok)['retrieval']
  assert rt['image'].shape[0] == 3 and len(rt['captions']) == 6


# ------------------------------------------------------------------ trainer


def test_trainer_counts_skipped_records(tok, tmp_path):
  pattern = write_shards(tmp_path / 'wds', 2, 8, bad={1: 'corrupt', 5: 'non_utf8'})
  jsonl = tmp_path / 'eval.jsonl'
  os.makedirs(tmp_path / 'img')
  for i in range(8):
    Image.fromarray(np.full((9, 9, 3), 30 * i, np.uint8)).save(tmp_path / 'img' / f'{i}.png')
  jsonl.write_text('\n'.join(json.dumps({'image': f'img/{i}.png', 'caption': f'c {i}'})
                             for i in range(8)))
  config = configlib.load_config_file(os.path.join(ROOT, 'configs', 'siglip.py:scale=tiny'))
  config = configlib.apply_overrides(config, [f'tokenizer.path={tok.model_path}',
      f'data.train=webdataset:{pattern}', f'data.eval=jsonl:{jsonl}', 'total_steps=3',
      'log_every_steps=3', 'eval.every_steps=0', 'checkpoint.every_steps=100',
      'data.augment.inception_crop=True', 'data.augment.crop_scale=0.5'])
  config.batch_size = 8
  workdir = str(tmp_path / 'work')
  final = train.run(config, workdir)
  rows = [r for r in metrics.read_metrics(workdir) if 'train/loss' in r]
  assert rows[-1]['step'] == 3
  # 3 steps of 8 from 16 records (2 bad) cross one epoch: at least 2 skips.
  assert rows[-1]['data/skipped_records'] >= 2
  assert 0.0 <= final['eval/i2t_recall@1'] <= 1.0
