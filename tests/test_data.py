"""Tests for vljax.data: synthetic source, tokenizer, grain pipelines."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from vljax.data import pipeline
from vljax.data import synthetic
from vljax.data import tokenizer as tokenizer_lib

MAX_LEN = 17


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('vljax_cache'))


@pytest.fixture(scope='module')
def tok(cache_dir):
  return tokenizer_lib.Tokenizer(
      tokenizer_lib.train_synthetic_tokenizer(cache_dir))


def _digest(array: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


# ------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_across_instances():
  a = synthetic.SyntheticImageText('train', seed=3)
  b = synthetic.SyntheticImageText('train', seed=3)
  for i in (0, 1, 777, 2**20 - 1):
    x, y = a[i], b[i]
    np.testing.assert_array_equal(x['image'], y['image'])
    assert x['caption'] == y['caption']
    assert x['label'] == y['label']
    assert x['key'] == y['key']
  # Re-reading the same instance gives the same example too.
  np.testing.assert_array_equal(a[5]['image'], a[5]['image'])
  # Another seed is another dataset.
  other = synthetic.SyntheticImageText('train', seed=4)
  assert not np.array_equal(a[0]['image'], other[0]['image'])


def test_synthetic_splits_differ():
  train = synthetic.SyntheticImageText('train')
  heldout = synthetic.SyntheticImageText('heldout')
  assert len(train) == 2**20
  assert len(heldout) == 512
  train_images = {_digest(train[i]['image']) for i in range(64)}
  heldout_images = {_digest(heldout[i]['image']) for i in range(64)}
  assert not train_images & heldout_images
  assert {train[i]['key'] for i in range(8)}.isdisjoint(
      {heldout[i]['key'] for i in range(8)})


@pytest.mark.parametrize('image_size', [16, 32, 64, 224])
def test_synthetic_shapes_and_types(image_size):
  source = synthetic.SyntheticImageText('heldout', image_size=image_size,
                                        num_examples=4)
  assert len(source) == 4
  for i in range(4):
    ex = source[i]
    assert ex['image'].shape == (image_size, image_size, 3)
    assert ex['image'].dtype == np.uint8
    assert isinstance(ex['caption'], str) and ex['caption']
    assert isinstance(ex['label'], np.int32)
    assert 0 <= ex['label'] < synthetic.NUM_CLASSES
  with pytest.raises(IndexError):
    source[4]


def test_synthetic_rejects_bad_arguments():
  with pytest.raises(ValueError, match='split'):
    synthetic.SyntheticImageText('validation')
  with pytest.raises(ValueError, match='image_size'):
    synthetic.SyntheticImageText(image_size=8)


def test_synthetic_colour_fills_shape_and_caption_names_class():
  size = 32
  source = synthetic.SyntheticImageText('train', image_size=size)
  palette = np.array([synthetic.COLORS[c] for c in synthetic.COLOR_NAMES],
                     np.float32)
  seen_labels = set()
  for i in range(100):
    ex, spec = source[i], source.describe(i)
    assert spec.caption == ex['caption']
    assert spec.label == ex['label']
    color, shape = synthetic.CLASS_NAMES[ex['label']].split()
    assert (color, shape) == (spec.color, spec.shape)
    words = ex['caption'].replace(',', ' ').split()
    assert color in words and shape in words, ex['caption']
    seen_labels.add(int(ex['label']))

    mask = synthetic.shape_mask(spec.shape, spec.cx, spec.cy, spec.radius,
                                size)
    assert mask.sum() >= 8
    pixels = ex['image'].astype(np.float32)
    mean = pixels[mask].mean(axis=0)
    # Inside the shape: the class colour (up to the colour jitter and noise),
    # and closer to it than to any other colour of the palette.
    np.testing.assert_allclose(mean, synthetic.COLORS[color], atol=25)
    nearest = np.argmin(np.linalg.norm(palette - mean, axis=1))
    assert synthetic.COLOR_NAMES[nearest] == color
    # Outside: (almost) no pixel of that colour, i.e. the mask is the shape.
    target = np.asarray(synthetic.COLORS[color], np.float32)
    outside_close = np.linalg.norm(pixels[~mask] - target, axis=1) < 40
    assert outside_close.sum() <= 2
  assert len(seen_labels) >= synthetic.NUM_CLASSES // 2


def test_class_names_and_prompts():
  assert 12 <= synthetic.NUM_CLASSES <= 24
  assert len(set(synthetic.CLASS_NAMES)) == synthetic.NUM_CLASSES
  prompts = synthetic.class_prompts()
  assert len(prompts) == synthetic.NUM_CLASSES
  for name, per_class in zip(synthetic.CLASS_NAMES, prompts):
    assert len(per_class) == len(synthetic.PROMPT_TEMPLATES)
    assert all(name in p for p in per_class)


def test_all_captions_match_source():
  captions = synthetic.all_captions(10)
  source = synthetic.SyntheticImageText('train')
  assert captions == [source[i]['caption'] for i in range(10)]


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_trained_and_cached(cache_dir, tok):
  path = tokenizer_lib.train_synthetic_tokenizer(cache_dir)
  assert os.path.dirname(path) == cache_dir and path.endswith('.model')
  stat = os.stat(path)
  with open(path, 'rb') as f:
    content = f.read()
  again = tokenizer_lib.train_synthetic_tokenizer(cache_dir)
  assert again == path
  assert os.stat(path).st_mtime_ns == stat.st_mtime_ns
  assert os.stat(path).st_ino == stat.st_ino  # Not replaced by a new file.
  with open(path, 'rb') as f:
    assert f.read() == content
  # No temporary files left behind.
  assert [n for n in os.listdir(cache_dir) if n.endswith('.tmp')] == []
  assert tok.pad_id == 0 and tok.eos_id == 1
  assert 100 <= tok.vocab_size <= 256


def test_tokenizer_settings_change_the_cache_key(cache_dir):
  a = tokenizer_lib.train_synthetic_tokenizer(cache_dir)
  b = tokenizer_lib.train_synthetic_tokenizer(cache_dir, vocab_size=200)
  assert a != b
  assert tokenizer_lib.Tokenizer(b).vocab_size <= 200


def test_encode_pads_truncates_and_ends_with_eos(tok):
  captions = ['a large red circle in the top left', '',
              'a photo of a small blue triangle at the bottom']
  ids = tok.encode(captions, MAX_LEN)
  assert ids.shape == (3, MAX_LEN) and ids.dtype == np.int32
  for row in ids:
    n = int(np.argmax(row == tok.eos_id))
    assert row[n] == tok.eos_id
    assert np.all(row[:n] > 2)  # Real tokens: no pad, eos or unk.
    assert np.all(row[n + 1:] == tok.pad_id)
  np.testing.assert_array_equal(ids[1], [tok.eos_id] + [0] * (MAX_LEN - 1))
  # Truncation keeps the first tokens and ends with EOS.
  short = tok.encode(captions, 4)
  assert short.shape == (3, 4)
  np.testing.assert_array_equal(short[0, :3], ids[0, :3])
  assert short[0, 3] == tok.eos_id and short[2, 3] == tok.eos_id
  np.testing.assert_array_equal(tok.encode(captions, 1), [[1], [1], [1]])
  assert tok.encode([], 5).shape == (0, 5)
  with pytest.raises(ValueError):
    tok.encode(['x'], 0)


def test_decode_round_trips_captions(tok):
  captions = synthetic.all_captions(50) + [
      p for ps in synthetic.class_prompts() for p in ps]
  ids = tok.encode(captions, 32)
  assert [tok.decode(row) for row in ids] == captions
  assert tok.decode_batch(ids[:3]) == captions[:3]
  # Padding and anything after EOS are ignored.
  assert tok.decode(list(ids[0]) + [5, 6]) == captions[0]
  assert tok.decode([]) == ''


def test_tokenizer_lowercase_and_pickle(cache_dir, tok):
  path = tokenizer_lib.train_synthetic_tokenizer(cache_dir)
  lower = tokenizer_lib.Tokenizer(path, lowercase=True)
  np.testing.assert_array_equal(
      lower.encode(['A Red CIRCLE'], 8), tok.encode(['a red circle'], 8))
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(
      clone.encode(['a red circle'], 8), tok.encode(['a red circle'], 8))


def test_get_tokenizer(cache_dir, monkeypatch, tmp_path):
  missing = str(tmp_path / 'nope.model')
  with pytest.raises(FileNotFoundError) as err:
    tokenizer_lib.get_tokenizer(missing)
  assert missing in str(err.value)
  assert 'config.tokenizer.path' in str(err.value)
  monkeypatch.setenv('VLJAX_CACHE', cache_dir)
  default = tokenizer_lib.get_tokenizer(None)
  assert os.path.dirname(default.model_path) == cache_dir
  assert tokenizer_lib.get_tokenizer('').model_path == default.model_path
  explicit = tokenizer_lib.get_tokenizer(default.model_path)
  assert explicit.vocab_size == default.vocab_size


# ------------------------------------------------------------------- pipeline


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _image_digests(batches):
  return [_digest(img) for b in batches for img in b['image']]


def test_train_batches_shapes_and_values(tok):
  source = synthetic.SyntheticImageText('train', image_size=32)
  it = pipeline.make_train_iterator(source, tok, batch_size=8, image_size=48,
                                    max_len=MAX_LEN, seed=0)
  for batch in _take(it, 2):
    assert {k for k in batch if not k.startswith('_')} == {'image', 'text', 'label'}
    assert batch['image'].shape == (8, 48, 48, 3)
    assert batch['image'].dtype == np.float32
    assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
    assert batch['image'].std() > 0.1
    assert batch['text'].shape == (8, MAX_LEN)
    assert batch['text'].dtype == np.int32
    assert np.all((batch['text'] == tok.eos_id).sum(axis=1) == 1)
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32


def test_train_batch_matches_source_examples(tok):
  source = synthetic.SyntheticImageText('train', num_examples=64)
  it = pipeline.make_train_iterator(source, tok, batch_size=64, image_size=32,
                                    max_len=MAX_LEN, seed=1, num_epochs=1)
  batch = next(it)
  by_digest = {}
  for i in range(64):
    ex = source[i]
    by_digest[_digest(pipeline.preprocess_image(ex['image'], 32))] = ex
  for image, text, label in zip(batch['image'], batch['text'],
                                batch['label']):
    ex = by_digest[_digest(image)]
    assert label == ex['label']
    np.testing.assert_array_equal(text, tok.encode([ex['caption']],
                                                   MAX_LEN)[0])
  # Shuffled: not the source order.
  assert [by_digest[_digest(im)]['key'] for im in batch['image']] != [
      source[i]['key'] for i in range(64)]


def test_processes_read_disjoint_slices_of_the_epoch(tok):
  source = synthetic.SyntheticImageText('train', num_examples=64)
  kwargs = dict(image_size=32, max_len=MAX_LEN, seed=7, num_epochs=1)
  single = list(pipeline.make_train_iterator(source, tok, batch_size=8,
                                             **kwargs))
  assert len(single) == 8
  epoch = _image_digests(single)
  assert len(set(epoch)) == 64
  per_process = []
  for index in range(2):
    batches = list(pipeline.make_train_iterator(
        source, tok, batch_size=8, process_index=index, process_count=2,
        **kwargs))
    assert len(batches) == 4
    per_process.append(_image_digests(batches))
  assert not set(per_process[0]) & set(per_process[1])
  assert set(per_process[0]) | set(per_process[1]) == set(epoch)


def test_epochs_are_reshuffled(tok):
  source = synthetic.SyntheticImageText('train', num_examples=32)
  batches = list(pipeline.make_train_iterator(
      source, tok, batch_size=32, image_size=32, max_len=MAX_LEN, seed=0,
      num_epochs=2))
  assert len(batches) == 2
  first, second = (_image_digests([b]) for b in batches)
  assert set(first) == set(second)
  assert first != second


def test_uneven_split_gives_equal_batch_counts(tok):
  source = synthetic.SyntheticImageText('train', num_examples=70)
  counts = [
      len(list(pipeline.make_train_iterator(
          source, tok, batch_size=8, image_size=32, max_len=MAX_LEN, seed=0,
          num_epochs=1, process_index=i, process_count=3)))
      for i in range(3)]
  assert counts == [2, 2, 2]


@pytest.mark.parametrize('augment', [None, {'crop_scale': 0.7, 'hflip': True,
                                            'brightness': 0.1}])
def test_resume_matches_uninterrupted(tok, augment):
  source = synthetic.SyntheticImageText('train')
  kwargs = dict(batch_size=4, image_size=32, max_len=MAX_LEN, seed=11,
                augment=augment)
  it = pipeline.make_train_iterator(source, tok, **kwargs)
  _take(it, 3)
  state = it.get_state()
  state = json.loads(json.dumps(state))  # As a checkpoint would store it.
  expected = _take(it, 3)
  resumed = pipeline.make_train_iterator(source, tok, **kwargs)
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 3)):
    assert set(want) == set(got)
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_augmentation_is_seeded_and_optional(tok):
  source = synthetic.SyntheticImageText('train')
  aug = {'crop_scale': 0.7, 'brightness': 0.1}
  def first(seed, augment):
    return next(pipeline.make_train_iterator(
        source, tok, batch_size=4, image_size=32, max_len=MAX_LEN, seed=seed,
        augment=augment))['image']
  plain = first(0, None)
  np.testing.assert_array_equal(first(0, aug), first(0, aug))
  assert not np.array_equal(first(0, aug), plain)
  with pytest.raises(ValueError, match='vflip'):
    first(0, {'vflip': True})


def test_empty_source_is_an_error(tok):
  empty = synthetic.SyntheticImageText('heldout', num_examples=0)
  with pytest.raises(ValueError, match='SyntheticImageText'):
    pipeline.make_train_iterator(empty, tok, batch_size=2, image_size=32,
                                 max_len=MAX_LEN, seed=0)
  with pytest.raises(ValueError, match='SyntheticImageText'):
    pipeline.load_eval_data(empty, tok, image_size=32, max_len=MAX_LEN)


def test_load_eval_data_in_order(tok):
  source = synthetic.SyntheticImageText('heldout', image_size=32)
  data = pipeline.load_eval_data(source, tok, image_size=32, max_len=MAX_LEN,
                                 num_examples=40)
  assert data['image'].shape == (40, 32, 32, 3)
  assert data['image'].dtype == np.float32
  assert data['text'].shape == (40, MAX_LEN) and data['text'].dtype == np.int32
  assert data['label'].dtype == np.int32
  examples = [source[i] for i in range(40)]
  assert data['caption'] == [e['caption'] for e in examples]
  np.testing.assert_array_equal(data['label'], [e['label'] for e in examples])
  np.testing.assert_array_equal(
      data['image'][3], pipeline.preprocess_image(examples[3]['image'], 32))
  np.testing.assert_array_equal(
      data['text'], tok.encode(data['caption'], MAX_LEN))
  full = pipeline.load_eval_data(source, tok, image_size=32, max_len=MAX_LEN)
  assert full['image'].shape[0] == 512


def test_worker_processes_match_in_process(tok):
  source = synthetic.SyntheticImageText('train')
  kwargs = dict(batch_size=4, image_size=32, max_len=MAX_LEN, seed=2)
  local = _take(pipeline.make_train_iterator(source, tok, **kwargs), 3)
  it = pipeline.make_train_iterator(source, tok, worker_count=2, **kwargs)
  try:
    remote = _take(it, 3)
    json.dumps(it.get_state())
  finally:
    it.close()
  for want, got in zip(local, remote):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
