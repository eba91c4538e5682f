"""Tests for the real-data sources: webdataset, jsonl, csv, arrayrecord, mixtures,
source spec options, CSV rules and the start-up checks.

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

from vljax import configlib
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
  source = sources.get_source(f'csv:{csv_path}?image=file&caption=text', 'train',
                              SIZE, 0)
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


# ------------------------------------------------------------------ spec options


def solid_png(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((6, 9, 3), value, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def write_titled_csv(root, n: int) -> str:
  """A CSV with its own column names (filepath,title); image i is solid grey 40*i."""
  os.makedirs(os.path.join(root, 'pics'), exist_ok=True)
  rows = []
  for i in range(n):
    with open(os.path.join(root, 'pics', f'{i}.png'), 'wb') as f:
      f.write(solid_png(40 * i))
    rows.append(f'pics/{i}.png,"a red, round thing {i}"\n')
  path = os.path.join(root, 'train.csv')
  with open(path, 'w') as f:
    f.write('filepath,title\n' + ''.join(rows))
  return path


def test_parse_spec_round_trips():
  for spec in ('synthetic', 'jsonl:/d/val.jsonl',
               'csv:train.csv?image=filepath&caption=title',
               'jsonl:val.jsonl?image=file&caption=captions&label=cls',
               'tfds:coco_captions:val?caption=captions/text',
               'webdataset:/d/{000..009}.tar?caption=text',
               'webdataset:/d/0000?.tar', 'webdataset:/d/0000?.tar?caption=text',
               'arrayrecord:/d/x-?????-of-00004.arrayrecord'):
    kind, arg, options = sources.parse_spec(spec)
    assert sources.format_spec(kind, arg, options) == spec
    assert sources.parse_spec(sources.format_spec(kind, arg, options)) == (
        kind, arg, options)
  # Options come only from the text after the last '?', and only when it reads
  # as name=value pairs: the glob wildcards stay in the path.
  assert sources.parse_spec('webdataset:/d/0000?.tar?caption=text') == (
      'webdataset', '/d/0000?.tar', {'caption': 'text'})
  assert sources.parse_spec('arrayrecord:/d/a?.x') == ('arrayrecord', '/d/a?.x', {})
  # Each mixture component carries its own options.
  parts = mixture.split_spec('0.7*csv:a.csv?image=fp|0.3*jsonl:b.jsonl')
  assert [sources.parse_spec(s)[2] for _, s in parts] == [{'image': 'fp'}, {}]


def test_unknown_option_lists_the_valid_ones():
  with pytest.raises(ConfigError, match='csv takes: image, caption, label'):
    sources.parse_spec('csv:x.csv?imgae=file')
  with pytest.raises(ConfigError, match='arrayrecord takes no options'):
    sources.get_source('arrayrecord:/d/x?shard=1', 'train', SIZE, 0)
  with pytest.raises(ConfigError, match='webdataset takes: caption'):
    sources.get_source('webdataset:/d/x.tar?image=a', 'train', SIZE, 0)
  with pytest.raises(ConfigError, match='twice'):
    sources.parse_spec('jsonl:x?image=a&image=b')


def test_csv_columns_belong_to_its_spec_not_to_the_config(tok, tmp_path):
  # Training reads a CSV with its own column names ...
  csv_path = write_titled_csv(tmp_path / 'train', 6)
  # ... while the eval set in the same process is jsonl with the default names.
  eval_path = write_jsonl(tmp_path / 'eval', 4)
  data = configlib.base_train_config().data
  data.update(train=f'csv:{csv_path}?image=filepath&caption=title', eval='',
              eval_retrieval=f'jsonl:{eval_path}', image_size=SIZE)
  opened = sources.check_config_sources(data)
  assert set(opened) == {'config.data.train', 'config.data.eval_retrieval'}
  it = pipeline.make_train_iterator(opened['config.data.train'], tok, batch_size=3,
                                    image_size=SIZE, max_len=MAX_LEN, seed=0)
  want = {i: tok.encode([f'a red, round thing {i}'], MAX_LEN)[0] for i in range(6)}
  seen = set()
  for batch in take(it, 4):
    assert int(batch['_skipped']) == 0
    for image, text in zip(batch['image'], batch['text']):
      # The grey level names the row the image came from; the text must be its title.
      i = round((float(image.mean()) + 1) * 255 / 2 / 40)
      np.testing.assert_array_equal(text, want[i])
      seen.add(i)
  assert seen == set(range(6))
  ev = pipeline.load_eval_data(opened['config.data.eval_retrieval'], tok,
                               image_size=SIZE, max_len=MAX_LEN)
  assert ev['caption'] == [f'thing number {i}' for i in range(4)]
  # A mixture: each component with its own field names.
  both = sources.get_source(
      f'0.5*csv:{csv_path}?image=filepath&caption=title|0.5*jsonl:{eval_path}',
      'train', SIZE, 0)
  assert [c.caption_key for c in both.components] == ['title', 'caption']
  assert both.components[0][2]['caption'] == 'a red, round thing 2'


def test_csv_quoting_and_rows_with_wrong_field_counts(tok, tmp_path):
  os.makedirs(tmp_path / 'img')
  for i in range(6):
    (tmp_path / 'img' / f'{i}.png').write_bytes(image_bytes(i, 'PNG'))
  path = tmp_path / 'data.csv'
  path.write_text(
      'image,caption\n'                   # line 1
      'img/0.png,"comma, inside"\n'       # line 2
      'img/1.png,"line one\nline two"\n'  # lines 3-4
      'img/2.png,too,many\n'              # line 5
      'img/3.png\n'                       # line 6
      'img/4.png,"say ""hi"""\n'          # line 7
      '\n'                                # line 8
      'img/5.png,last\n')                 # line 9
  source = sources.get_source(f'csv:{path}', 'train', SIZE, 0)
  records = [formats.SafeSource(source)[i] for i in range(len(source))]
  assert [r['caption'] for r in records] == [
      'comma, inside', 'line one\nline two', None, None, 'say "hi"', 'last']
  assert records[5]['image'] == (tmp_path / 'img' / '5.png').read_bytes()
  too_many, too_few = records[2]['error'], records[3]['error']
  assert 'data.csv line 5' in too_many and 'expected 2' in too_many
  assert 'got 3' in too_many
  assert 'data.csv line 6' in too_few and 'got 1' in too_few
  assert records[2]['key'] == 'data.csv:5' and records[3]['key'] == 'data.csv:6'
  # In training they are skipped and counted like any other bad record.
  it = pipeline.make_train_iterator(source, tok, batch_size=2, image_size=SIZE,
                                    max_len=MAX_LEN, seed=0)
  batches = take(it, 8)  # 16 good examples: four epochs of the 4 good rows
  assert sum(int(b['_skipped']) for b in batches) >= 6  # the first three epochs' 2 each
  notes = [k for b in batches for k in b['_skipped_keys']]
  assert any('line 5' in n and 'got 3' in n for n in notes)
  assert any('line 6' in n and 'got 1' in n for n in notes)


def test_missing_column_or_field_is_a_config_error(tmp_path):
  csv_path = write_titled_csv(tmp_path, 2)
  with pytest.raises(ConfigError) as e:
    sources.get_source(f'csv:{csv_path}', 'train', SIZE, 0)
  msg = str(e.value)
  assert csv_path in msg and "'image'" in msg
  assert "'filepath', 'title'" in msg and '?image=COLUMN' in msg
  with pytest.raises(ConfigError, match=r"'title2'.*'filepath', 'title'.*\?caption=COLUMN"):
    sources.get_source(f'csv:{csv_path}?image=filepath&caption=title2', 'train', SIZE, 0)
  # A label column is optional unless the spec names one.
  assert sources.get_source(f'csv:{csv_path}?image=filepath&caption=title',
                            'train', SIZE, 0)[0]['label'] == -1
  with pytest.raises(ConfigError, match="'cls'"):
    sources.get_source(f'csv:{csv_path}?image=filepath&caption=title&label=cls',
                       'train', SIZE, 0)
  # jsonl: when none of the first records has the field, list the keys they have.
  path = tmp_path / 'v.jsonl'
  path.write_text('\n'.join(json.dumps({'file': f'{i}.png', 'text': 'x'})
                            for i in range(3)))
  with pytest.raises(ConfigError, match=r"'image'.*'file', 'text'.*\?image=FIELD"):
    sources.get_source(f'jsonl:{path}', 'train', SIZE, 0)
  assert len(sources.get_source(f'jsonl:{path}?image=file&caption=text', 'train',
                                SIZE, 0)) == 3
  # TFDS: a named feature the examples lack; nested ones are listed with '/'.
  examples = [{'image': np.zeros((4, 4, 3), np.uint8), 'label': 1,
               'captions': {'text': np.array([b'a cat'])}}]
  with pytest.raises(ConfigError, match=r"'captions/txt'.*captions/text, image, label"):
    formats.Tfds('tiny', 'train', text_key='captions/txt', data_source=examples,
                 required=('captions/txt',))
  found = formats.Tfds('tiny', 'train', text_key='captions/text', data_source=examples,
                       required=('captions/text',))
  assert found[0]['caption'] == ['a cat']


def test_webdataset_glob_wildcard_and_json_caption_option(tmp_path):
  write_shards(tmp_path / 'wds', 3, 4)
  for spec in (f'webdataset:{tmp_path}/wds/0000?.tar',
               f'webdataset:{tmp_path}/wds/0000?.tar?caption=caption',
               f'webdataset:{tmp_path}/wds/0000[01].tar'):
    source = sources.get_source(spec, 'train', SIZE, 0)
    assert len(source) == (8 if '[' in spec else 12)
  # img2dataset writes both KEY.txt and KEY.json; a json field named in the spec
  # is read, not shadowed by the .txt.
  with tarfile.open(tmp_path / 'both.tar', 'w') as tar:
    _add(tar, 'k0.jpg', image_bytes(0))
    _add(tar, 'k0.txt', b'short')
    _add(tar, 'k0.json', json.dumps({'caption': 'short', 'recap': 'long'}).encode())
  get = lambda spec: sources.get_source(spec, 'train', SIZE, 0)
  assert get(f'webdataset:{tmp_path}/both.tar')[0]['caption'] == b'short'
  assert get(f'webdataset:{tmp_path}/both.tar?caption=recap')[0]['caption'] == 'long'
  error = formats.SafeSource(get(f'webdataset:{tmp_path}/both.tar?caption=text'))[0]['error']
  assert "'text'" in error and "'caption', 'recap'" in error


# ------------------------------------------------------------------ start-up checks


def test_check_source_names_the_config_key_for_a_missing_path(tmp_path):
  spec = f'jsonl:{tmp_path}/x/val.jsonl'
  with pytest.raises(ConfigError) as e:
    sources.check_source(spec, 'config.data.eval_retrieval', 'heldout', SIZE, 0)
  msg = str(e.value)
  assert msg.startswith(f"config.data.eval_retrieval={spec!r}: no file matches ")
  assert 'Fix:' in msg and '\n' not in msg
  # An empty file, a missing image folder and a missing mixture component, too.
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  with pytest.raises(formats.EmptySourceError, match=r"^config\.data\.eval='jsonl:.*empty"):
    sources.check_source(f'jsonl:{empty}', 'config.data.eval', 'heldout', SIZE, 0)
  with pytest.raises(ConfigError, match=r"^config\.data\.eval_zeroshot='imagefolder:"):
    sources.check_source(f'imagefolder:{tmp_path}/none', 'config.data.eval_zeroshot',
                         'heldout', SIZE, 0, require_caption=False)
  good = write_jsonl(tmp_path / 'ok', 3)
  mix = f'0.5*jsonl:{good}|0.5*csv:{tmp_path}/nope.csv'
  with pytest.raises(ConfigError) as e:
    sources.check_source(mix, 'config.data.train', 'train', SIZE, 0)
  assert str(e.value).startswith(
      f"config.data.train={mix!r}, component 'csv:{tmp_path}/nope.csv': no file matches")
  # Spec errors are reported with the key as well.
  with pytest.raises(ConfigError, match=r"^config\.data\.train='csv:x\?imgae=f': unknown option"):
    sources.check_source('csv:x?imgae=f', 'config.data.train', 'train', SIZE, 0)


def test_check_source_fails_when_every_probed_record_is_bad(tmp_path):
  pattern = write_shards(tmp_path / 'wds', 2, 4, bad={i: 'corrupt' for i in range(8)})
  spec = f'webdataset:{pattern}'
  # Opening alone succeeds: the damage is inside the records.
  assert len(sources.get_source(spec, 'train', SIZE, 0)) == 8
  with pytest.raises(ConfigError) as e:
    sources.check_source(spec, 'config.data.train', 'train', SIZE, 0)
  msg = str(e.value)
  assert msg.startswith(f'config.data.train={spec!r}: no usable record among the 8 read')
  assert 'cannot decode image' in msg and '\n' not in msg
  # Images fine but no caption: fatal for retrieval, fine for zero-shot.
  path = write_jsonl(tmp_path / 'j', 4, bad={i: 'empty_caption' for i in range(4)})
  with pytest.raises(ConfigError, match='no usable caption'):
    sources.check_source(f'jsonl:{path}', 'config.data.eval_retrieval', 'heldout',
                         SIZE, 0)
  assert len(sources.check_source(f'jsonl:{path}', 'config.data.eval_zeroshot',
                                  'heldout', SIZE, 0, require_caption=False)) == 4


def test_check_source_passes_with_some_bad_records(tok, tmp_path, caplog):
  bad = {1: 'corrupt', 2: 'truncated', 5: 'no_image'}
  pattern = write_shards(tmp_path / 'wds', 2, 4, bad=bad)
  source = sources.check_source(f'webdataset:{pattern}', 'config.data.train', 'train',
                                SIZE, 0)
  assert 'unusable' in caplog.text
  # The opened source is returned, ready for the pipeline.
  batches = list(pipeline.make_train_iterator(
      source, tok, batch_size=1, image_size=SIZE, max_len=MAX_LEN, seed=0,
      num_epochs=1))
  assert not set(labels_of(batches)) & set(bad)
  # The probe reaches past the first records: a head of bad records longer than
  # the probe itself is not fatal.
  head_bad = write_shards(tmp_path / 'h', 1, 40, bad={i: 'corrupt' for i in range(20)})
  assert len(sources.check_source(f'webdataset:{head_bad}', 'config.data.train',
                                  'train', SIZE, 0, probe=16)) == 40
  # A mixture is checked (and returned) component by component.
  mix = sources.check_source(f'0.5*webdataset:{pattern}|0.5*synthetic',
                             'config.data.train', 'train', SIZE, 0)
  assert isinstance(mix, mixture.Mixture) and len(mix.components) == 2


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


def test_webdataset_holds_a_bounded_number_of_shards_open(tmp_path):
  pattern = write_shards(tmp_path / 'shards', num_shards=12, per_shard=3)
  source = formats.WebDataset(pattern, max_open_files=4,
                              index_cache_dir=str(tmp_path / 'cache'))
  order = np.random.default_rng(0).permutation(len(source))
  labels = []
  for i in order:
    labels.append(source[int(i)]['label'])
    assert source.open_files() <= 4
  assert sorted(labels) == list(range(36))  # every record read, none turned bad
  # Reads from several threads at once (the pipeline's and the eval loader's) stay correct
  # while descriptors are being closed and reopened underneath them.
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    again = list(pool.map(lambda i: source[int(i)]['label'], np.tile(order, 5)))
  assert again == [labels[k % 36] for k in range(len(again))]


def test_a_shard_that_cannot_be_opened_stops_the_run(tok, tmp_path):
  pattern = write_shards(tmp_path / 'shards', num_shards=3, per_shard=4)
  source = formats.WebDataset(pattern, index_cache_dir='')
  os.remove(tmp_path / 'shards' / '00001.tar')  # e.g. an unmounted disk, after indexing
  # Not a bad record to skip and count: the source itself is broken.
  with pytest.raises(formats.SourceFileError, match=r'00001.tar'):
    formats.SafeSource(source)[4]
  it = pipeline.make_train_iterator(source, tok, batch_size=4, image_size=16, max_len=8,
                                    seed=0)
  with pytest.raises(Exception, match=r'Cannot open the tar shard .*00001.tar'):
    take(it, 3)


def test_webdataset_index_is_cached_per_unchanged_shard(tmp_path, monkeypatch):
  pattern = write_shards(tmp_path / 'shards', num_shards=3, per_shard=4)
  cache = str(tmp_path / 'cache')
  first = formats.WebDataset(pattern, index_cache_dir=cache)
  assert len(os.listdir(cache)) == 3
  records = [first[i] for i in range(len(first))]

  def no_tar_reading(*args, **kwargs):
    raise AssertionError('the tar headers were read again')

  monkeypatch.setattr(tarfile, 'open', no_tar_reading)
  second = formats.WebDataset(pattern, index_cache_dir=cache)
  assert [second[i] for i in range(len(second))] == records  # same order, same bytes
  monkeypatch.undo()
  # A rewritten shard (new size / time) is indexed afresh, not read with a stale index.
  write_shards(tmp_path / 'shards', num_shards=1, per_shard=6, label_base=100)
  third = formats.WebDataset(pattern, index_cache_dir=cache)
  assert len(third) == 6 + 4 + 4
  assert sorted(third[i]['label'] for i in range(6)) == list(range(100, 106))
