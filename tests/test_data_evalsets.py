"""Tests for eval sets (imagefolder, TFDS, multi-caption retrieval), preprocessing
options, and the trainer over a real-file source with bad records."""

import io
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vljax import configlib
from vljax import metrics
from vljax import train
from vljax.configlib import ConfigError
from vljax.data import evalsets
from vljax.data import pipeline
from vljax.data import preprocess
from vljax.data import sources

from tests.test_data_sources import MAX_LEN, SIZE, image_bytes, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def data_config(**kw) -> ml_collections.ConfigDict:
  c = configlib.base_train_config().data
  c.image_size, c.max_len, c.eval_examples = SIZE, MAX_LEN, 100
  c.update(kw)
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
  sets = evalsets.load_eval_sets(data_config(eval_examples=8), tok)
  assert set(sets) == {'zeroshot', 'retrieval'}
  assert sets['retrieval']['caption_image'] is None
  with pytest.raises(ConfigError, match='class names'):
    sources.class_prompts('jsonl:/x')


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
  options = {'tfds_data_dir': tfds_dir, 'caption_key': 'captions/text'}
  source = sources.get_source('tfds:vljax_tiny_cls', 'train', SIZE, 0, options)
  assert len(source) == 6
  batches = list(pipeline.make_train_iterator(
      source, tok, batch_size=3, image_size=SIZE, max_len=MAX_LEN, seed=0,
      num_epochs=1))
  assert len(batches) == 2
  assert sorted(int(x) for b in batches for x in b['label']) == [0, 0, 1, 1, 2, 2]
  cfg = data_config(eval='tfds:vljax_tiny_cls', tfds_data_dir=tfds_dir,
                    caption_key='captions/text')
  sets = evalsets.load_eval_sets(cfg, tok)
  assert set(sets) == {'zeroshot'}  # a ClassLabel feature: classification
  assert sets['zeroshot']['class_prompts'][2][0] == 'a photo of a red car.'
  cfg.eval, cfg.eval_retrieval = '', 'tfds:vljax_tiny_cls:test'
  rt = evalsets.load_eval_sets(cfg, tok)['retrieval']
  assert rt['image'].shape[0] == 3 and len(rt['captions']) == 6


# ------------------------------------------------------------------ trainer


def test_trainer_counts_skipped_records(tmp_path):
  pattern = write_shards(tmp_path / 'wds', 2, 8, bad={1: 'corrupt', 5: 'non_utf8'})
  jsonl = tmp_path / 'eval.jsonl'
  os.makedirs(tmp_path / 'img')
  for i in range(8):
    Image.fromarray(np.full((9, 9, 3), 30 * i, np.uint8)).save(tmp_path / 'img' / f'{i}.png')
  jsonl.write_text('\n'.join(json.dumps({'image': f'img/{i}.png', 'caption': f'c {i}'})
                             for i in range(8)))
  config = configlib.load_config_file(os.path.join(ROOT, 'configs', 'siglip.py:scale=tiny'))
  config = configlib.apply_overrides(config, [
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
