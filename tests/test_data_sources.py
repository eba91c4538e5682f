"""Tests for the real-data sources: webdataset, jsonl, csv, arrayrecord, mixtures.

Every test writes its own small files (real JPEG/PNG bytes from pillow, real
tar shards). Each record's label is unique, so batches name their examples.
"""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from vljax.configlib import ConfigError
from vljax.data import formats
from vljax.data import mixture
from vljax.data import pipeline
from vljax.data import sources

MAX_LEN = 12
SIZE = 16


def image_bytes(seed: int, fmt: str = 'JPEG', size=(20, 14)) -> bytes:
  rng = np.random.default_rng(seed)
  array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shards(root, num_shards: int, per_shard: int, label_base: int = 0,
                 bad: dict[int, str] | None = None) -> str:
  """img2dataset-style shards; returns the brace pattern naming them.

  `bad` maps a label to a defect: 'corrupt', 'truncated', 'empty_caption',
  'non_utf8', 'no_image'.
  """
  bad = bad or {}
  os.makedirs(root, exist_ok=True)
  for s in range(num_shards):
    with tarfile.open(os.path.join(root, f'{s:05d}.tar'), 'w') as tar:
      for j in range(per_shard):
        label = label_base + s * per_shard + j
        key = f'{s:05d}{j:04d}'
        defect = bad.get(label)
        data = image_bytes(label, 'PNG' if label % 2 else 'JPEG')
        if defect == 'corrupt':
          data = b'this is not an image' * 3
        elif defect == 'truncated':
          data = data[:len(data) // 3]
        if defect != 'no_image':
          _add(tar, f'{key}.{"png" if label % 2 else "jpg"}', data)
        caption = f'a photo of thing {label}'.encode()
        if defect == 'empty_caption':
          caption = b'   '
        elif defect == 'non_utf8':
          caption = b'caf\xe9 \xff\xfe'
        if label % 3 == 0 and defect not in ('empty_caption', 'non_utf8'):
          _add(tar, f'{key}.json', json.dumps(
              {'caption': caption.decode(), 'url': 'x'}).encode())
        else:
          _add(tar, f'{key}.txt', caption)
        _add(tar, f'{key}.cls', str(label).encode())
  return os.path.join(str(root), f'{{00000..{num_shards - 1:05d}}}.tar')


def write_jsonl(root, n: int, bad: dict[int, str] | None = None,
                name: str = 'data.jsonl') -> str:
  bad = bad or {}
  os.makedirs(os.path.join(root, 'img'), exist_ok=True)
  lines = []
  for i in range(n):
    rel = f'img/{i}.png'
    with open(os.path.join(root, rel), 'wb') as f:
      f.write(image_bytes(i, 'PNG'))
    row = {'image': rel, 'caption': f'thing number {i}', 'label': i}
    if bad.get(i) == 'missing_file':
      row['image'] = 'img/does_not_exist.png'
    if bad.get(i) == 'empty_caption':
      row['caption'] = ''
    lines.append(json.dumps(row) if bad.get(i) != 'bad_json' else '{"image": ')
  path = os.path.join(root, name)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def labels_of(batches) -> list[int]:
  return [int(x) for b in batches for x in b['label']]


def take(it, n):
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------------ readers


def test_expand_braces_and_paths(tmp_path):
  assert formats.expand_braces('a{000..002}.tar') == [
      'a000.tar', 'a001.tar', 'a002.tar']
  assert formats.expand_braces('{x,y}/{1..2}') == ['x/1', 'x/2', 'y/1', 'y/2']
  with pytest.raises(formats.EmptySourceError, match='nothing-here'):
    formats.expand_paths(str(tmp_path / 'nothing-here' / '*.tar'))


def test_webdataset_reads_img2dataset_shards(tmp_path):
  pattern = write_shards(tmp_path / 'wds', 3, 4)
  source = sources.get_source(f'webdataset:{pattern}', 'train', SIZE, 0)
  assert len(source) == 12
  records = [source[i] for i in range(12)]
  assert sorted(r['label'] for r in records) == list(range(12))
  for r in records:
    # Captions come from .txt, or from the json 'caption' field (label % 3 == 0).
    caption = r['caption']
    caption = caption.decode() if isinstance(caption, bytes) else caption
    assert caption == f'a photo of thing {r["label"]}'
    assert Image.open(io.BytesIO(r['image'])).size == (20, 14)


def test_jsonl_and_csv_sources(tok, tmp_path):
  path = write_jsonl(tmp_path, 5)
  source = sources.get_source(f'jsonl:{path}', 'train', SIZE, 0)
  assert len(source) == 5 and source[3]['caption'] == 'thing number 3'
  csv_path = tmp_path / 'data.csv'
  csv_path.write_text('file,text\n' + ''.join(
      f'img/{i}.png,"thing, number {i}"\n' for i in range(5)))
  options = {'image_key': 'file', 'caption_key': 'text'}
  source = sources.get_source(f'csv:{csv_path}', 'train', SIZE, 0, options)
  assert len(source) == 5 and source[2]['caption'] == 'thing, number 2'
  assert source[2]['image'] == (tmp_path / 'img' / '2.png').read_bytes()
  # A non-UTF-8 caption in one row spoils only that row.
  bad_csv = tmp_path / 'bad.csv'
  bad_csv.write_bytes(b'image,caption\nimg/0.png,ok\nimg/1.png,caf\xe9\n')
  source = sources.get_source(f'csv:{bad_csv}', 'train', SIZE, 0)
  batches = list(pipeline.make_train_iterator(
      source, tok, batch_size=1, image_size=SIZE, max_len=MAX_LEN, seed=1,
      num_epochs=2))
  assert len(batches) == 2
  assert sum(int(b['_skipped']) for b in batches) >= 1


def test_unknown_and_empty_sources_fail_at_startup(tmp_path):
  with pytest.raises(ConfigError, match='webdataset'):
    sources.get_source('parquet:/x', 'train', SIZE, 0)
  with pytest.raises(ConfigError, match='no-such-dir'):
    sources.get_source(f'webdataset:{tmp_path}/no-such-dir/{{0..3}}.tar',
                       'train', SIZE, 0)
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  with pytest.raises(ConfigError, match='empty.jsonl'):
    sources.get_source(f'jsonl:{empty}', 'train', SIZE, 0)
  with tarfile.open(tmp_path / 'empty.tar', 'w'):
    pass
  with pytest.raises(ConfigError, match='empty.tar'):
    sources.get_source(f'webdataset:{tmp_path}/empty.tar', 'train', SIZE, 0)


# ------------------------------------------------------------------ pipeline


def test_webdataset_batches(tok, tmp_path):
  pattern = write_shards(tmp_path / 'wds', 2, 4)
  source = sources.get_source(f'webdataset:{pattern}', 'train', SIZE, 0)
  batches = list(pipeline.make_train_iterator(
      source, tok, batch_size=4, image_size=SIZE, max_len=MAX_LEN, seed=0,
      num_epochs=1))
  assert len(batches) == 2
  assert sorted(labels_of(batches)) == list(range(8))
  b = batches[0]
  assert b['image'].shape == (4, SIZE, SIZE, 3) and b['image'].dtype == np.float32
  assert -1.0 <= b['image'].min() and b['image'].max() <= 1.0
  assert b['text'].shape == (4, MAX_LEN) and b['_skipped'] == 0


def test_every_bad_record_kind_is_skipped_and_counted(tok, tmp_path, caplog):
  bad = {1: 'corrupt', 2: 'truncated', 4: 'empty_caption', 6: 'non_utf8',
         9: 'no_image'}
  pattern = write_shards(tmp_path / 'wds', 2, 6, bad=bad)
  # A damaged shard: the tail of the second shard is cut off mid-member.
  last = tmp_path / 'wds' / '00001.tar'
  with tarfile.open(last) as tar:
    cut = [m for m in tar.getmembers() if m.name.endswith('.png')][-1].offset_data
  last.write_bytes(last.read_bytes()[:cut + 10])
  source = sources.get_source(f'webdataset:{pattern}', 'train', SIZE, 0)
  batches = list(pipeline.make_train_iterator(
      source, tok, batch_size=1, image_size=SIZE, max_len=MAX_LEN, seed=0,
      num_epochs=1))
  good = labels_of(batches)
  assert not set(good) & set(bad)
  skipped = sum(int(b['_skipped']) for b in batches)
  # The cut-off tail members of the damaged shard are skipped too.
  assert skipped > len(bad)
  assert len(good) + skipped == len(source)
  keys = [k for b in batches for k in b['_skipped_keys']]
  assert keys and all(':' in k for k in keys)

  # jsonl: missing file, empty caption, invalid JSON; plus a zero-size image.
  path = write_jsonl(tmp_path / 'j', 8, bad={1: 'missing_file', 3: 'empty_caption',
                                             5: 'bad_json'})
  jsource = sources.get_source(f'jsonl:{path}', 'train', SIZE, 0)
  batches = list(pipeline.make_train_iterator(
      jsource, tok, batch_size=1, image_size=SIZE, max_len=MAX_LEN, seed=0,
      num_epochs=1))
  assert sorted(labels_of(batches)) == [0, 2, 4, 6, 7]
  assert sum(int(b['_skipped']) for b in batches) == 3

  class ZeroSize:
    def __len__(self):
      return 4

    def __getitem__(self, i):
      shape = (0, 5, 3) if i == 2 else (5, 5, 3)
      return {'image': np.zeros(shape, np.uint8), 'caption': 'x', 'label': i}

  batches = list(pipeline.make_train_iterator(
      ZeroSize(), tok, batch_size=1, image_size=SIZE, max_len=MAX_LEN, seed=0,
      num_epochs=1))
  assert sorted(labels_of(batches)) == [0, 1, 3]
  # (Skips after the last full batch of a finite run are logged, not counted.)
  assert 'zero-size image' in caplog.text


def test_all_bad_data_fails_instead_of_hanging(tok, monkeypatch):
  class AllBad:
    def __len__(self):
      return 10

    def __getitem__(self, i):
      raise IOError('disk on fire')

  monkeypatch.setattr(pipeline, '_MAX_CONSECUTIVE_BAD', 50)
  it = pipeline.make_train_iterator(AllBad(), tok, batch_size=2, image_size=SIZE,
                                    max_len=MAX_LEN, seed=0)
  with pytest.raises(RuntimeError, match='disk on fire'):
    next(it)


def test_two_processes_read_disjoint_complete_halves(tok, tmp_path):
  pattern = write_shards(tmp_path / 'wds', 3, 4)
  source = sources.get_source(f'webdataset:{pattern}', 'train', SIZE, 0)
  kwargs = dict(batch_size=2, image_size=SIZE, max_len=MAX_LEN, seed=5,
                num_epochs=1)
  single = labels_of(pipeline.make_train_iterator(
      source, tok, **{**kwargs, 'batch_size': 4}))
  halves = [labels_of(pipeline.make_train_iterator(
      source, tok, process_index=p, process_count=2, **kwargs)) for p in (0, 1)]
  assert len(halves[0]) == len(halves[1]) == 6
  assert not set(halves[0]) & set(halves[1])
  assert sorted(halves[0] + halves[1]) == sorted(single) == list(range(12))


def _assert_same(a, b):
  for x, y in zip(a, b):
    for key in ('image', 'text', 'label'):
      np.testing.assert_array_equal(x[key], y[key])


def test_resume_is_exact_on_multi_file_source(tok, tmp_path):
  pattern = write_shards(tmp_path / 'wds', 3, 3, bad={4: 'corrupt'})
  source = sources.get_source(f'webdataset:{pattern}', 'train', SIZE, 0)
  kwargs = dict(batch_size=2, image_size=SIZE, max_len=MAX_LEN, seed=1,
                augment={'inception_crop': True, 'crop_scale': 0.5,
                         'hflip': True})
  it = pipeline.make_train_iterator(source, tok, **kwargs)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  want = take(it, 7)  # crosses the epoch boundary (9 records)
  fresh = pipeline.make_train_iterator(source, tok, **kwargs)
  fresh.set_state(state)
  _assert_same(want, take(fresh, 7))


def test_mixture_weights_and_resume(tok, tmp_path):
  a = write_shards(tmp_path / 'a', 2, 5, label_base=0)
  b_path = write_jsonl(tmp_path / 'b', 6)
  spec = f'0.75*webdataset:{a}|0.25*jsonl:{b_path}'
  source = sources.get_source(spec, 'train', SIZE, 0)
  assert isinstance(source, mixture.Mixture) and source.weights == [0.75, 0.25]
  kwargs = dict(batch_size=4, image_size=SIZE, max_len=MAX_LEN, seed=3)
  it = pipeline.make_train_iterator(source, tok, **kwargs)
  first = take(it, 5)
  state = it.get_state()
  json.dumps(state)
  want = take(it, 20)
  labels = labels_of(first + want)
  # jsonl records are told apart by their caption text 'thing number'.
  texts = [t for b in first + want for t in tok.decode_batch(b['text'])]
  from_b = sum('number' in t for t in texts)
  assert from_b / len(texts) == pytest.approx(0.25, abs=0.05)
  assert len(labels) == 100
  fresh = pipeline.make_train_iterator(source, tok, **kwargs)
  fresh.set_state(state)
  _assert_same(want, take(fresh, 20))


def test_worker_processes_match_in_process_and_resume(tok, tmp_path):
  pattern = write_shards(tmp_path / 'wds', 2, 5, bad={3: 'corrupt'})
  source = sources.get_source(f'webdataset:{pattern}', 'train', SIZE, 0)
  kwargs = dict(batch_size=2, image_size=SIZE, max_len=MAX_LEN, seed=0)
  local = take(pipeline.make_train_iterator(source, tok, **kwargs), 6)
  it = pipeline.make_train_iterator(source, tok, worker_count=2, **kwargs)
  try:
    remote = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  _assert_same(local[:3], remote)
  # Skips counted in worker processes travel inside the batches.
  assert [int(b['_skipped']) for b in remote] == [
      int(b['_skipped']) for b in local[:3]]
  assert sum(int(b['_skipped']) for b in local) >= 1
  it = pipeline.make_train_iterator(source, tok, worker_count=2, **kwargs)
  try:
    it.set_state(state)
    _assert_same(local[3:], take(it, 3))
  finally:
    it.close()


# ------------------------------------------------------------------ arrayrecord


def test_convert_to_arrayrecord_round_trips(tok, tmp_path):
  pattern = write_shards(tmp_path / 'wds', 2, 5, bad={7: 'corrupt'})
  dst = tmp_path / 'ar' / 'train'
  out = subprocess.run(
      [sys.executable, '-m', 'vljax.data.convert', f'webdataset:{pattern}',
       str(dst), '--num_shards=3'], capture_output=True, text=True, check=True)
  files = sorted(os.listdir(tmp_path / 'ar'))
  assert files == [f'train-{i:05d}-of-00003.arrayrecord' for i in range(3)], (
      out.stdout, out.stderr)
  source = sources.get_source(f'arrayrecord:{dst}-*.arrayrecord', 'train', SIZE, 0)
  assert len(source) == 10  # bad records are copied; the reader skips them
  wds = sources.get_source(f'webdataset:{pattern}', 'train', SIZE, 0)
  by_label = {r['label']: r for r in (wds[i] for i in range(10))}
  for i in range(10):
    rec = source[i]
    ref = by_label[rec['label']]
    assert rec['image'] == ref['image']
    ref_caption = ref['caption']
    if isinstance(ref_caption, bytes):
      ref_caption = ref_caption.decode()
    assert rec['caption'] == ref_caption
  batches = list(pipeline.make_train_iterator(
      source, tok, batch_size=1, image_size=SIZE, max_len=MAX_LEN, seed=0,
      num_epochs=1))
  assert sorted(labels_of(batches)) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
  # The converter also reads jsonl and synthetic sources.
  path = write_jsonl(tmp_path / 'j', 4)
  subprocess.run([sys.executable, '-m', 'vljax.data.convert', f'jsonl:{path}',
                  str(tmp_path / 'ar2' / 'x')], check=True, capture_output=True)
  assert len(sources.get_source(f'arrayrecord:{tmp_path}/ar2/x-*', 'train',
                                SIZE, 0)) == 4
