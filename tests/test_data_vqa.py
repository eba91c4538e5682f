"""Tests for the visual question answering data: record fields, jsonl VQA rows, the official
VQAv2 files, synthetic questions (synthetic?task=vqa), the pipeline's pass-through, the VQA
eval set and the synthetic tokenizer's VQA variant.

Every test writes its own small files; expected answers are derived from the example specs or
written by hand, never read back from the code under test.
"""

import hashlib
import json
import os

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from vljax import configlib
from vljax.configlib import ConfigError
from vljax.data import evalsets
from vljax.data import formats
from vljax.data import pipeline
from vljax.data import preprocess
from vljax.data import sources
from vljax.data import synthetic
from vljax.data import tokenizer as tokenizer_lib

from tests.test_data_sources import MAX_LEN, SIZE, image_bytes

# sha256 of the caption-only synthetic tokenizer (and its cache name), computed from the code
# as it was before the VQA variant existed: the default model must stay byte-identical.
DEFAULT_TOKENIZER_SHA256 = 'd8ffc6aa22c3f66eff423a3f47acfe405df0cbc5ab16c001d20c3b087e6f6b81'
DEFAULT_TOKENIZER_NAME = 'synthetic_spm_af511d35ad41511c.model'
# sha256 over the first 40 records of both synthetic splits (seed 3, 16 px; `_records_digest`)
# computed with synthetic.py as it was before task='vqa' existed.
CAPTION_RECORDS_SHA256 = '0d1cbfbfda42c645bb6e9a39ac6f9299c6b866fc0ba07a45541dcff113e05502'


def data_config(**kw) -> ml_collections.ConfigDict:
  c = configlib.base_train_config().data
  c.image_size, c.max_len = SIZE, MAX_LEN
  c.update(kw)
  return c


def write_vqa_jsonl(root, rows, name='vqa.jsonl') -> str:
  """Writes img/<i>.png for i in 0..3 and the rows; returns the file's path."""
  os.makedirs(os.path.join(root, 'img'), exist_ok=True)
  for i in range(4):
    with open(os.path.join(root, 'img', f'{i}.png'), 'wb') as f:
      f.write(image_bytes(i, 'PNG'))
  path = os.path.join(root, name)
  with open(path, 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
  return path


def annotation(qid, image_id, answers, answer_type='other'):
  """One entry of a v2_mscoco_*_annotations.json, as the official files lay it out."""
  return {'question_id': qid, 'image_id': image_id, 'answer_type': answer_type,
          'question_type': 'what', 'multiple_choice_answer': answers[0],
          'answers': [{'answer': a, 'answer_confidence': 'yes', 'answer_id': k + 1}
                      for k, a in enumerate(answers)]}


def write_vqav2(root, subtype='val2014', image_subtype=None, annotations=True):
  """Tiny official-layout VQAv2 files: 3 questions on 2 images (+1 question without an
  annotation when annotations are written); returns (questions, annotations, image dir)."""
  image_subtype = image_subtype or subtype
  images = os.path.join(root, 'images')
  os.makedirs(images, exist_ok=True)
  # Hand-written official names: COCO_<subtype>_<image_id in 12 digits>.jpg.
  names = {42: f'COCO_{image_subtype}_000000000042.jpg',
           9001: f'COCO_{image_subtype}_000000009001.jpg'}
  for seed, (image_id, name) in enumerate(names.items()):
    with open(os.path.join(images, name), 'wb') as f:
      f.write(image_bytes(seed, 'PNG', size=(24, 18)))
  questions = {'info': {}, 'task_type': 'Open-Ended', 'data_type': 'mscoco',
               'license': {}, 'data_subtype': subtype, 'questions': [
                   {'image_id': 42, 'question': 'What color is the cat?', 'question_id': 42000},
                   {'image_id': 42, 'question': 'How many cats?', 'question_id': 42001},
                   {'image_id': 9001, 'question': 'Is it raining?', 'question_id': 9001000},
                   {'image_id': 9001, 'question': 'Where is it?', 'question_id': 9001001}]}
  qpath = os.path.join(root, f'v2_OpenEnded_mscoco_{subtype}_questions.json')
  with open(qpath, 'w') as f:
    json.dump(questions, f)
  apath = ''
  if annotations:
    apath = os.path.join(root, f'v2_mscoco_{subtype}_annotations.json')
    with open(apath, 'w') as f:
      json.dump({'info': {}, 'license': {}, 'data_subtype': subtype, 'annotations': [
          annotation(42000, 42, ['black'] * 7 + ['dark grey'] * 3),
          annotation(42001, 42, ['1'] * 9 + ['2'], 'number'),
          annotation(9001000, 9001, ['no'] * 10, 'yes/no'),
          # 9001001 has no annotation: a question without answers.
      ]}, f)
  return qpath, apath, images, names


# ------------------------------------------------------------------ jsonl


def test_jsonl_vqa_rows_read_with_either_answers_layout(tmp_path):
  human = ['two', '2', '2', 'two', '2', '2', '2', '2', 'two', '2']
  rows = [
      {'image': 'img/0.png', 'question': 'How many dogs?', 'answers': human},
      # VQAv2 annotation objects, and an answer type passed through.
      {'image': 'img/1.png', 'question': 'Is it red?', 'answer_type': 'yes/no',
       'answers': [{'answer': 'yes', 'answer_confidence': 'yes', 'answer_id': k}
                   for k in range(1, 11)]},
      {'image': 'img/2.png', 'question': 'Broken?', 'answers': 5},
      {'image': 'img/3.png', 'caption': 'a caption row in the same file'},
  ]
  # No caption field in most rows (and none named): a question is enough.
  source = sources.get_source(f'jsonl:{write_vqa_jsonl(tmp_path, rows)}', 'train', SIZE, 0)
  assert len(source) == 4
  first = source[0]
  assert first['question'] == 'How many dogs?' and first['answers'] == human
  assert first['caption'] is None and first['label'] == -1
  assert first['image'] == (tmp_path / 'img' / '0.png').read_bytes()
  second = source[1]
  assert second['answers'] == ['yes'] * 10 and second['answer_type'] == 'yes/no'
  # Answers neither strings nor answer objects: that record is bad, the others are fine.
  assert 'answers must be a list' in formats.SafeSource(source)[2]['error']
  assert 'question' not in source[3] and source[3]['caption'].startswith('a caption')

  # Other field names, named in the spec.
  renamed = write_vqa_jsonl(tmp_path / 'r', [
      {'file': 'img/0.png', 'q': 'What is it?', 'a': [{'answer': 'noise'}]}])
  record = sources.get_source(f'jsonl:{renamed}?image=file&question=q&answers=a', 'train',
                              SIZE, 0)[0]
  assert (record['question'], record['answers']) == ('What is it?', ['noise'])


def test_jsonl_needs_a_caption_or_a_question_field(tmp_path):
  path = write_vqa_jsonl(tmp_path, [{'image': 'img/0.png', 'text': 'x'}])
  with pytest.raises(ConfigError) as e:
    sources.get_source(f'jsonl:{path}', 'train', SIZE, 0)
  msg = str(e.value)
  assert "'caption'" in msg and "'question'" in msg and "'image', 'text'" in msg
  assert '?caption=FIELD' in msg and '?question=FIELD' in msg and '\n' not in msg
  # A field the spec names must exist, even though a caption would do.
  path = write_vqa_jsonl(tmp_path / 'c', [{'image': 'img/0.png', 'caption': 'x'}])
  with pytest.raises(ConfigError, match=r"question field 'q'.*\?question=FIELD"):
    sources.get_source(f'jsonl:{path}?question=q', 'train', SIZE, 0)
  with pytest.raises(ConfigError, match=r"answers field 'ans'"):
    sources.get_source(f'jsonl:{path}?answers=ans', 'train', SIZE, 0)


# ------------------------------------------------------------------ vqav2


def test_vqav2_files_read_with_official_image_names(tmp_path):
  qpath, apath, images, names = write_vqav2(tmp_path)
  source = sources.get_source(f'vqav2:{qpath}?annotations={apath}&images={images}',
                              'train', SIZE, 0)
  assert len(source) == 4 and source.has_answers
  r = source[0]
  assert r['key'] == '42000' and r['question_id'] == 42000
  assert r['question'] == 'What color is the cat?'
  assert r['answers'] == ['black'] * 7 + ['dark grey'] * 3  # order and repeats kept
  assert r['answer_type'] == 'other' and r['caption'] is None and r['label'] == -1
  assert r['image'] == open(os.path.join(images, names[42]), 'rb').read()
  # Questions about one image share its id (and file).
  assert source[1]['image_id'] == r['image_id'] == '42'
  assert source[1]['answers'] == ['1'] * 9 + ['2'] and source[1]['answer_type'] == 'number'
  third = source[2]
  assert third['image'] == open(os.path.join(images, names[9001]), 'rb').read()
  assert (third['key'], third['image_id'], third['answers']) == ('9001000', '9001', ['no'] * 10)
  # A question the annotations do not cover has no answers.
  assert source[3]['answers'] == [] and source[3]['answer_type'] == ''
  # A missing image file is one bad record, named by its question id.
  os.remove(os.path.join(images, names[9001]))
  bad = formats.SafeSource(source)[2]
  assert 'COCO_val2014_000000009001.jpg' in bad['error'] and bad['key'] == '9001000'


def test_vqav2_without_annotations_is_for_prediction_only(tok, tmp_path):
  # test-dev2015 questions: images live in test2015 and carry that name.
  qpath, _, images, names = write_vqav2(tmp_path, 'test-dev2015', 'test2015',
                                        annotations=False)
  spec = f'vqav2:{qpath}?images={images}'
  source = sources.get_source(spec, 'heldout', SIZE, 0)
  assert not source.has_answers
  assert all(source[i]['answers'] == [] for i in range(4))
  assert source[0]['image'] == open(os.path.join(images, names[42]), 'rb').read()
  # Training and VQA evaluation refuse it at once, naming the fix...
  for key, require in (('config.data.train', None), ('config.data.eval_vqa', 'vqa')):
    with pytest.raises(ConfigError) as e:
      sources.check_source(spec, key, 'train', SIZE, 0, require=require)
    assert str(e.value).startswith(f'{key}={spec!r}: ') and '?annotations=' in str(e.value)
  with pytest.raises(ConfigError, match=r'\?annotations='):
    evalsets.vqa_set(data_config(), spec, tok)
  # ... while reading it for prediction (images only) works.
  assert sources.check_source(spec, 'predict', 'heldout', SIZE, 0, require='image') is not None
  data = pipeline.load_eval_data(source, tok, image_size=SIZE, max_len=MAX_LEN,
                                 require_caption=False, require_question=True)
  assert data['question'][2] == 'Is it raining?' and data['answers'] == [[]] * 4


def test_vqav2_layout_errors_name_the_fix(tmp_path):
  qpath, apath, images, _ = write_vqav2(tmp_path)
  with pytest.raises(ConfigError, match=r'\?images='):
    sources.get_source(f'vqav2:{qpath}?annotations={apath}', 'train', SIZE, 0)
  with pytest.raises(ConfigError, match='annotations file'):  # the two files swapped
    sources.get_source(f'vqav2:{apath}?annotations={qpath}&images={images}', 'train', SIZE, 0)
  other, _, _, _ = write_vqav2(tmp_path / 'train', 'train2014', annotations=False)
  with pytest.raises(ConfigError, match="'val2014'.*'train2014'"):
    sources.get_source(f'vqav2:{other}?annotations={apath}&images={images}', 'train', SIZE, 0)
  with pytest.raises(ConfigError, match='vqav2 takes: annotations, images'):
    sources.get_source(f'vqav2:{qpath}?image={images}', 'train', SIZE, 0)
  # Without "data_subtype", the official file name still tells it.
  with open(qpath) as f:
    questions = json.load(f)
  del questions['data_subtype']
  with open(qpath, 'w') as f:
    json.dump(questions, f)
  source = sources.get_source(f'vqav2:{qpath}?images={images}', 'train', SIZE, 0)
  assert source.image_path(42) == os.path.join(images, 'COCO_val2014_000000000042.jpg')


# ------------------------------------------------------------------ synthetic


def _records_digest(module_source) -> str:
  h = hashlib.sha256()
  for split in ('train', 'heldout'):
    src = module_source(split)
    for i in range(40):
      r = src[i]
      h.update(repr(sorted(r)).encode())
      h.update(np.ascontiguousarray(r['image']).tobytes())
      h.update(r['caption'].encode() + b'\0' + str(int(r['label'])).encode() + b'\0' +
               r['key'].encode() + b'\0')
  return h.hexdigest()


def test_synthetic_caption_records_are_unchanged():
  assert _records_digest(lambda split: synthetic.SyntheticImageText(
      split, image_size=16, seed=3)) == CAPTION_RECORDS_SHA256
  assert set(sources.get_source('synthetic', 'train', SIZE, 0)[0]) == {
      'image', 'caption', 'label', 'key'}


def test_synthetic_vqa_has_the_same_images_and_captions():
  for split in ('train', 'heldout'):
    plain = sources.get_source('synthetic', split, SIZE, 5)
    vqa = sources.get_source('synthetic?task=vqa', split, SIZE, 5)
    for i in range(48):
      a, b = plain[i], vqa[i]
      np.testing.assert_array_equal(a['image'], b['image'])
      assert (a['caption'], a['label'], a['key']) == (b['caption'], b['label'], b['key'])
      assert set(b) - set(a) == {'question', 'answers', 'answer_type'}


def _expected_answer(question: str, spec: synthetic.ExampleSpec, image_size: int) -> str:
  """The answer from the spec, by rules written here (not the module's)."""
  kinds = [k for k, phrasings in synthetic.QUESTION_TEMPLATES.items() if question in phrasings]
  assert len(kinds) == 1, question
  kind = kinds[0]
  if kind == 'colour':
    return spec.color
  if kind == 'shape':
    return spec.shape
  if kind == 'size':
    return spec.size
  if kind == 'position':
    # The centre lies in one third of [radius, size - radius] along each axis.
    span = image_size - 2 * spec.radius
    col = int((spec.cx - spec.radius) / span * 3)
    row = int((spec.cy - spec.radius) / span * 3)
    return synthetic.REGIONS[row][col]
  return '2' if spec.distractor is not None else '1'


def test_synthetic_questions_are_answerable_from_the_image():
  size = 32
  source = synthetic.SyntheticImageText('train', image_size=size, seed=1, task='vqa')
  kinds, questions = {}, set()
  for i in range(200):
    ex, spec = source[i], source.describe(i)
    answer = _expected_answer(ex['question'], spec, size)
    assert ex['answers'] == [answer] * 10, (i, ex['question'])
    assert ex['question'] in synthetic.QUESTION_TEMPLATES[ex['answer_type']]
    kinds[ex['answer_type']] = kinds.get(ex['answer_type'], 0) + 1
    questions.add(ex['question'])
    # Counting needs the image: the grey distractor is the only exactly-grey shape drawn.
    grey = np.all(ex['image'] == 90, axis=-1).any()
    if ex['answer_type'] == 'count':
      assert ex['answers'][0] == ('2' if grey else '1')
  # Every kind, and most phrasings, come up (kinds are drawn uniformly).
  assert set(kinds) == set(synthetic.QUESTION_KINDS) and min(kinds.values()) >= 20
  assert len(questions) >= 12


def test_synthetic_questions_are_deterministic_per_seed_split_and_index():
  a = synthetic.SyntheticImageText('train', seed=2, task='vqa')
  b = synthetic.SyntheticImageText('train', seed=2, task='vqa')
  # Reading in another order gives the same questions.
  assert [a[i]['question'] for i in range(30)] == [b[i]['question'] for i in reversed(
      range(30))][::-1]
  seq = lambda s: [s.question(i)[0] for i in range(30)]
  assert seq(a) != seq(synthetic.SyntheticImageText('train', seed=3, task='vqa'))
  assert seq(a) != seq(synthetic.SyntheticImageText('heldout', seed=2, task='vqa'))
  with pytest.raises(ConfigError, match='caption, vqa'):
    sources.get_source('synthetic?task=qa', 'train', SIZE, 0)
  assert sources.format_spec(*sources.parse_spec('synthetic?task=vqa')) == 'synthetic?task=vqa'


# ------------------------------------------------------------------ pipeline


def _preprocess(train=True, text=preprocess.TextOptions()):
  return pipeline._Preprocess(preprocess.ImageOptions(size=SIZE), text, seed=0,  # pylint: disable=protected-access
                              train=train)


def test_preprocess_passes_questions_and_answers_through(tmp_path):
  plain = sources.get_source('synthetic', 'train', SIZE, 0)
  vqa = sources.get_source('synthetic?task=vqa', 'train', SIZE, 0)
  for i in range(6):
    a = _preprocess().map_with_index(i, plain[i])
    b = _preprocess().map_with_index(i, vqa[i])
    assert 'question' not in a and set(b) == set(a) | {'question', 'answers'}
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['caption'] == b['caption'] == plain[i]['caption']
    assert b['question'] == vqa[i]['question'] and b['answers'] == vqa[i]['answers']

  path = write_vqa_jsonl(tmp_path, [
      {'image': 'img/0.png', 'question': '  How MANY dogs? ',
       'answers': [{'answer': 'Two'}, {'answer': ' '}, {'answer': '2'}]},
      {'image': 'img/1.png', 'question': 'Any answers?', 'answers': []},
      {'image': 'img/2.png', 'question': '   ', 'caption': ''},
      {'image': 'img/3.png', 'question': '', 'caption': 'a caption'}])
  source = formats.SafeSource(sources.get_source(f'jsonl:{path}', 'train', SIZE, 0))
  lower = _preprocess(text=preprocess.TextOptions(lowercase=True))
  out = lower.map_with_index(0, source[0])
  # Cleaned like captions: stripped, lowercased here; empty answers dropped; no caption -> ''.
  assert (out['question'], out['answers'], out['caption']) == ('how many dogs?', ['two', '2'],
                                                               '')
  assert 'no answers' in _preprocess().map_with_index(1, source[1])['_bad']
  # Outside training a question without answers passes, with [].
  assert _preprocess(train=False).map_with_index(1, source[1])['answers'] == []
  assert 'no usable caption or question' in _preprocess().map_with_index(2, source[2])['_bad']
  # An empty question next to a usable caption: a caption example.
  out = _preprocess().map_with_index(3, source[3])
  assert out['caption'] == 'a caption' and 'question' not in out


def test_load_eval_data_returns_questions_and_answers(tok, tmp_path):
  path = write_vqa_jsonl(tmp_path, [
      {'image': 'img/0.png', 'question': 'Q zero?', 'answers': [' a ', 'b'],
       'answer_type': 'other'},
      {'image': 'img/1.png', 'caption': 'just a caption'},
      {'image': 'img/2.png', 'question': 'Q two?', 'answers': [{'answer': 'c'}]}])
  source = sources.get_source(f'jsonl:{path}', 'heldout', SIZE, 0)
  data = pipeline.load_eval_data(source, tok, image_size=SIZE, max_len=MAX_LEN,
                                 require_caption=False, num_threads=1)
  assert data['question'] == ['Q zero?', '', 'Q two?']
  assert data['answers'] == [['a', 'b'], [], ['c']]
  assert data['answer_type'] == ['other', '', '']
  assert data['caption'] == ['', 'just a caption', '']
  asked = pipeline.load_eval_data(source, tok, image_size=SIZE, max_len=MAX_LEN,
                                  require_caption=False, require_question=True)
  assert asked['record_index'].tolist() == [0, 2] and asked['skipped'] == 1
  # Existing callers (require_caption) are unchanged: question rows without captions are bad.
  captioned = pipeline.load_eval_data(source, tok, image_size=SIZE, max_len=MAX_LEN)
  assert captioned['record_index'].tolist() == [1] and captioned['question'] == ['']


# ------------------------------------------------------------------ eval set


def test_vqa_set_loads_caps_and_skips(tok, tmp_path):
  spec = 'synthetic?task=vqa'
  full = evalsets.vqa_set(data_config(), spec, tok)
  source = synthetic.SyntheticImageText('heldout', image_size=SIZE, task='vqa')
  assert full['image'].shape == (512, SIZE, SIZE, 3) and full['image'].dtype == np.uint8
  assert len(full['question']) == len(full['answers']) == len(full['answer_type']) == 512
  for i in (0, 17, 511):
    question, answer, kind = source.question(i)
    assert (full['question'][i], full['answers'][i], full['answer_type'][i]) == (
        question, [answer] * 10, kind)
  assert full['spec'] == spec and full['skipped'] == 0
  np.testing.assert_array_equal(full['image'][17], pipeline.eval_pixels(
      source[17]['image'], full['image_options']))

  # Capped by config.eval.max_examples.vqa, like the other sets: the seeded sample.
  eval_config = configlib.base_train_config().eval
  eval_config.max_examples.vqa = 7
  sets = evalsets.load_eval_sets(data_config(eval_vqa=spec), tok, eval_config)
  assert {'vqa', 'zeroshot', 'retrieval'} <= set(sets)
  capped = sets['vqa']
  expected = evalsets.sample_indices(512, 7, 0)
  assert capped['record_index'].tolist() == expected.tolist()
  assert capped['question'] == [source.question(int(i))[0] for i in expected]
  assert evalsets.load_eval_sets(data_config(), tok).keys().isdisjoint({'vqa'})

  # Records without answers (or without a question) are skipped and counted.
  path = write_vqa_jsonl(tmp_path, [
      {'image': 'img/0.png', 'question': 'one?', 'answers': ['1']},
      {'image': 'img/1.png', 'question': 'none?', 'answers': []},
      {'image': 'img/2.png', 'caption': 'no question'},
      {'image': 'img/3.png', 'question': 'two?', 'answers': [{'answer': '2'}]}])
  jset = evalsets.vqa_set(data_config(), f'jsonl:{path}', tok)
  assert jset['question'] == ['one?', 'two?'] and jset['answers'] == [['1'], ['2']]
  assert jset['answer_type'] == ['', ''] and jset['skipped'] == 2


def test_vqav2_eval_set(tok, tmp_path):
  qpath, apath, images, _ = write_vqav2(tmp_path)
  vset = evalsets.vqa_set(data_config(), f'vqav2:{qpath}?annotations={apath}&images={images}',
                          tok)
  # The question without an annotation is skipped; images shared by questions are decoded
  # per question.
  assert vset['skipped'] == 1 and vset['image'].shape[0] == 3
  np.testing.assert_array_equal(vset['image'][0], vset['image'][1])
  assert vset['answer_type'] == ['other', 'number', 'yes/no']
  assert vset['answers'][2] == ['no'] * 10


# ------------------------------------------------------------------ start-up checks


def test_check_source_accepts_vqa_records(tmp_path):
  path = write_vqa_jsonl(tmp_path, [
      {'image': f'img/{i}.png', 'question': f'q{i}?', 'answers': ['x']} for i in range(4)])
  spec = f'jsonl:{path}'
  assert len(sources.check_source(spec, 'config.data.train', 'train', SIZE, 0)) == 4
  assert len(sources.check_source(spec, 'config.data.eval_vqa', 'heldout', SIZE, 0,
                                  require='vqa')) == 4
  # Retrieval needs captions.
  with pytest.raises(ConfigError, match='no usable caption'):
    sources.check_source(spec, 'config.data.eval_retrieval', 'heldout', SIZE, 0,
                         require='caption')
  unanswered = write_vqa_jsonl(tmp_path / 'u', [
      {'image': f'img/{i}.png', 'question': f'q{i}?'} for i in range(4)])
  with pytest.raises(ConfigError, match='has no answers'):
    sources.check_source(f'jsonl:{unanswered}', 'config.data.train', 'train', SIZE, 0)
  # check_config_sources checks eval_vqa as a VQA set, and a VQA mixture for training.
  checked = sources.check_config_sources(data_config(
      train='0.5*synthetic|0.5*synthetic?task=vqa', eval_vqa=spec))
  assert {'config.data.train', 'config.data.eval_vqa'} <= set(checked)
  with pytest.raises(ConfigError, match=r"^config\.data\.eval_vqa=.*no usable question"):
    sources.check_config_sources(data_config(eval_vqa='synthetic'), train=False)


def test_vqa_fields_survive_arrayrecord_serialisation():
  record = {'key': '42000', 'image': b'\x89PNG...', 'caption': None, 'label': -1,
            'image_id': '42', 'question': 'What?', 'answers': [{'answer': 'cat'}] * 2,
            'answer_type': 'other', 'question_id': 42000}
  back = formats.deserialize(formats.serialize(record))
  assert back == dict(record, answers=['cat', 'cat'])
  # Caption records keep the header they always had.
  caption = {'key': 'k', 'image': b'x', 'caption': 'c', 'label': 3, 'image_id': 'i'}
  data = formats.serialize(caption)
  assert json.loads(data[8:-1]) == {'key': 'k', 'caption': 'c', 'label': 3, 'image_id': 'i'}


# ------------------------------------------------------------------ tokenizer


def test_default_synthetic_tokenizer_is_unchanged(tmp_path):
  path = tokenizer_lib.train_synthetic_tokenizer(str(tmp_path))
  assert os.path.basename(path) == DEFAULT_TOKENIZER_NAME
  with open(path, 'rb') as f:
    assert hashlib.sha256(f.read()).hexdigest() == DEFAULT_TOKENIZER_SHA256


def test_vqa_tokenizer_encodes_prompts_compactly(tmp_path, monkeypatch):
  cache = str(tmp_path / 'cache')
  default = tokenizer_lib.Tokenizer(tokenizer_lib.train_synthetic_tokenizer(cache))
  path = tokenizer_lib.train_synthetic_tokenizer(cache, vqa=True)
  assert os.path.basename(path).startswith('synthetic_vqa_spm_')
  assert tokenizer_lib.train_synthetic_tokenizer(cache, vqa=True) == path  # cached
  assert len(os.listdir(cache)) == 2
  tok = tokenizer_lib.Tokenizer(path)
  sp = spm.SentencePieceProcessor(model_file=path)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)

  prompt = 'answer en what colour is the shape?'
  ids = sp.encode(prompt)
  assert sp.unk_id() not in ids and sp.decode(ids) == prompt
  assert len(ids) < len(default._sp.encode(prompt))  # pylint: disable=protected-access
  # One piece per word (+ '?') for every phrasing, the answers and the caption prompt.
  texts = [f'answer en {q}' for qs in synthetic.QUESTION_TEMPLATES.values() for q in qs]
  for text in texts:
    ids = sp.encode(text)
    assert sp.unk_id() not in ids
    assert len(ids) == len(text.split()) + 1, [sp.id_to_piece(i) for i in ids]
  assert len(sp.encode('caption en')) == 2
  answers = list(synthetic.COLOR_NAMES + synthetic.SHAPES) + ['large', 'small'] + [
      r for row in synthetic.REGIONS for r in row]
  for answer in answers:
    assert len(sp.encode(answer)) == len(answer.split()), answer
  # Digits are split from the word boundary (split_digits): '▁' + '1'.
  assert [sp.id_to_piece(i) for i in sp.encode('2')] == ['▁', '2']
  # Captions still encode a word per piece, as with the default model.
  caption = synthetic.all_captions(1)[0]
  assert tok.decode(tok.encode([caption], 32)[0]) == caption

  # get_tokenizer(None, synthetic_vqa=True) picks it (from the default cache).
  monkeypatch.setenv('VLJAX_CACHE', cache)
  assert tokenizer_lib.get_tokenizer(None, synthetic_vqa=True).model_path == path
  assert os.path.basename(tokenizer_lib.get_tokenizer(None).model_path) == (
      DEFAULT_TOKENIZER_NAME)


def test_uses_synthetic_vqa_and_check_config():
  assert tokenizer_lib.uses_synthetic_vqa('synthetic?task=vqa')
  assert tokenizer_lib.uses_synthetic_vqa('0.3*synthetic|0.7*synthetic?task=vqa')
  assert tokenizer_lib.uses_synthetic_vqa('0.5*jsonl:/d/x.jsonl|0.5*synthetic?task=vqa')
  for spec in ('synthetic', 'synthetic?task=caption', 'jsonl:/d/vqa.jsonl', 'nonsense:x',
               '0.5*synthetic|0.5*webdataset:/d/{0..9}.tar'):
    assert not tokenizer_lib.uses_synthetic_vqa(spec), spec
  config = configlib.base_train_config()
  for train in ('synthetic?task=vqa', '0.5*synthetic|0.5*synthetic?task=vqa'):
    config.data.train = train
    tokenizer_lib.check_config(config)  # the synthetic data: no tokenizer path needed
  config.data.train = '0.5*synthetic?task=vqa|0.5*jsonl:/d/vqa.jsonl'
  with pytest.raises(ConfigError, match='config.tokenizer.path'):
    tokenizer_lib.check_config(config)


# ------------------------------------------------------------------ tokenizer training texts


def write_rows(path, rows) -> str:
  """Writes jsonl rows and no image at all: texts must be read without opening one."""
  with open(path, 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
  return str(path)


def test_read_texts_of_a_vqa_jsonl_gives_questions_and_distinct_answers(tmp_path):
  path = write_rows(tmp_path / 'vqa.jsonl', [
      {'image': 'img/0.png', 'question': 'How many dogs?', 'answers': ['two', '2', 'two', '2']},
      {'image': 'img/1.png', 'question': ' Is it red? ',
       'answers': [{'answer': 'yes'}, {'answer': 'Yes'}, {'answer': 'yes'}]},
      {'image': 'img/2.png', 'caption': 'A dog on a sofa.', 'question': 'What is on it?',
       'answers': ['a dog']},
      {'image': 'img/3.png', 'question': 'Broken?', 'answers': 5},  # a bad record in training
      {'image': 'img/4.png', 'question': '  ', 'answers': ['orphan']},  # no usable text
  ])
  texts, stats = tokenizer_lib.read_texts(f'jsonl:{path}')
  # Per record: captions, the question, its distinct answers (after clean-up), in file order.
  assert texts == ['How many dogs?', 'two', '2', 'Is it red?', 'yes', 'Yes',
                   'A dog on a sofa.', 'What is on it?', 'a dog']
  assert (stats.records_sampled, stats.records_skipped) == (5, 2)
  assert (stats.captions, stats.questions, stats.answers) == (1, 3, 5)
  assert stats.first_skipped.startswith('vqa.jsonl:4: ') and 'answers' in stats.first_skipped
  # Answers are told apart after the text options, as training sees them.
  lower, stats = tokenizer_lib.read_texts(
      f'jsonl:{path}', text_options=preprocess.TextOptions(lowercase=True))
  assert lower == ['how many dogs?', 'two', '2', 'is it red?', 'yes',
                   'a dog on a sofa.', 'what is on it?', 'a dog']
  assert (stats.captions, stats.questions, stats.answers) == (1, 3, 4)


def test_read_texts_of_captions_is_the_caption_corpus(tmp_path):
  # Exactly the captions, in record order (every one of a list), as before VQA texts existed.
  rows = [{'image': f'{i}.jpg', 'caption': f' A photo of thing {i}. '} for i in range(6)]
  rows += [{'image': 'l.jpg', 'caption': ['First of a list.', 'Second of a list.']},
           {'image': 'e.jpg', 'caption': ''}]
  texts, stats = tokenizer_lib.read_texts(f'jsonl:{write_rows(tmp_path / "c.jsonl", rows)}')
  assert texts == [f'A photo of thing {i}.' for i in range(6)] + [
      'First of a list.', 'Second of a list.']
  assert (stats.captions, stats.questions, stats.answers, stats.records_skipped) == (8, 0, 0, 1)
  assert stats.first_skipped == 'c.jsonl:8: no usable caption'
  assert tokenizer_lib.read_captions is tokenizer_lib.read_texts  # the old name still works


def _shortened_sources(monkeypatch, num_examples):
  """Makes get_source's synthetic data `num_examples` long, so a read covers all of it."""
  real = sources.get_source

  def get_source(*args, **kwargs):
    source = real(*args, **kwargs)
    source.num_examples = num_examples
    return source
  monkeypatch.setattr(sources, 'get_source', get_source)


def test_read_texts_of_synthetic_and_synthetic_vqa(monkeypatch):
  # The full-size sources: the same sample of records, the vqa one adding question + answer.
  captions, stats = tokenizer_lib.read_texts('synthetic', max_records=30, seed=4)
  assert len(captions) == 30 and (stats.questions, stats.answers) == (0, 0)
  vqa, stats = tokenizer_lib.read_texts('synthetic?task=vqa', max_records=30, seed=4)
  assert (stats.captions, stats.questions, stats.answers) == (30, 30, 30)
  assert vqa[0::3] == captions

  # Shortened so that every record is read in order: the texts are the records' own.
  _shortened_sources(monkeypatch, 24)
  records = [synthetic.SyntheticImageText(seed=4, task='vqa')[i] for i in range(24)]
  captions, _ = tokenizer_lib.read_texts('synthetic', seed=4)
  assert captions == [r['caption'] for r in records]
  vqa, _ = tokenizer_lib.read_texts('synthetic?task=vqa', seed=4)
  assert vqa == [t for r in records for t in (r['caption'], r['question'], r['answers'][0])]
  phrasings = {q for qs in synthetic.QUESTION_TEMPLATES.values() for q in qs}
  assert set(vqa[1::3]) <= phrasings and len(set(vqa[1::3])) > 3


def test_read_texts_of_a_captions_and_vqa_mixture(tmp_path):
  captions = [f'A photo of a red bus number {i}.' for i in range(10)]
  caps = write_rows(tmp_path / 'caps.jsonl', [{'image': 'x.jpg', 'caption': c} for c in captions])
  vqa = write_rows(tmp_path / 'vqa.jsonl', [
      {'image': 'x.jpg', 'question': f'How many buses in picture {i}?', 'answers': [str(i)] * 3}
      for i in range(5)])
  texts, stats = tokenizer_lib.read_texts(f'0.7*jsonl:{caps}|0.3*jsonl:{vqa}')
  assert sorted(texts) == sorted(captions + [f'How many buses in picture {i}?' for i in range(5)]
                                 + [str(i) for i in range(5)])
  assert (stats.captions, stats.questions, stats.answers) == (10, 5, 5)
  # Sampled: each part gives its weight's share of the records.
  texts, stats = tokenizer_lib.read_texts(f'0.6*jsonl:{caps}|0.4*jsonl:{vqa}', max_records=5)
  assert (stats.captions, stats.questions, stats.answers) == (3, 2, 2)


def test_read_texts_of_vqav2_opens_no_image(tmp_path):
  qpath, apath, _, _ = write_vqav2(tmp_path)
  no_images = tmp_path / 'no_images'  # the folder must exist; it holds no image
  no_images.mkdir()
  spec = f'vqav2:{qpath}?annotations={apath}&images={no_images}'
  # Reading whole records fails on every one of them...
  source = sources.get_source(spec, 'train', SIZE, 0)
  assert all('error' in formats.SafeSource(source)[i] for i in range(len(source)))
  # ... yet the texts are all there: questions in file order, each with its distinct answers.
  texts, stats = tokenizer_lib.read_texts(spec)
  assert texts == ['What color is the cat?', 'black', 'dark grey', 'How many cats?', '1', '2',
                   'Is it raining?', 'no', 'Where is it?']
  assert (stats.records_skipped, stats.captions, stats.questions, stats.answers) == (0, 0, 4, 5)


def test_read_texts_falls_back_to_whole_records(monkeypatch):
  class RecordsOnly:  # a reader without text_fields, like arrayrecord or tfds
    records = [
        {'key': 'a', 'image': b'', 'caption': None, 'question': 'Is it?', 'answers': ['yes']},
        {'key': 'b', 'image': b'', 'caption': ['One.', 'Two.'], 'label': 3},
        {'key': 'c', 'error': 'OSError: unreadable'},
    ]

    def __len__(self):
      return len(self.records)

    def __getitem__(self, index):
      return dict(self.records[index])
  monkeypatch.setattr(sources, 'get_source', lambda *args, **kwargs: RecordsOnly())
  texts, stats = tokenizer_lib.read_texts('records-only')
  assert texts == ['Is it?', 'yes', 'One.', 'Two.']
  assert (stats.records_skipped, stats.captions, stats.questions, stats.answers) == (1, 2, 1, 1)
  assert 'unreadable' in stats.first_skipped


def test_train_command_on_a_vqa_only_jsonl(tmp_path, capsys):
  objects = ['cat', 'dog', 'horse', 'bird', 'truck', 'bicycle', 'umbrella', 'giraffe',
             'elephant', 'sandwich', 'motorcycle', 'airplane', 'zebra', 'kite', 'laptop',
             'surfboard']
  colors = ['black', 'white', 'brown', 'yellow', 'green', 'purple']
  places = ['fence', 'window', 'table', 'river', 'building', 'mountain']
  rows = []
  for i, obj in enumerate(objects):
    color, place = colors[i % len(colors)], places[i % len(places)]
    rows += [
        {'image': f'{i}.jpg', 'question': f'What color is the {obj}?',
         'answers': [color] * 8 + [f'dark {color}'] * 2},
        {'image': f'{i}.jpg', 'question': f'How many {obj}s are in the picture?',
         'answers': [str(i % 4 + 1)] * 10},
        {'image': f'{i}.jpg', 'question': f'Is the {obj} standing next to a {place}?',
         'answers': ['yes', 'no', 'yes']},
    ]
  path = write_rows(tmp_path / 'vqa.jsonl', rows)
  out = tmp_path / 'vqa.model'
  assert tokenizer_lib.main(['train', f'jsonl:{path}', '--vocab_size', '80', '--out',
                             str(out)]) == 0
  report = capsys.readouterr().out
  assert f'records sampled:    {len(rows)}' in report
  assert 'captions read:      0' in report
  assert f'questions read:     {len(rows)}' in report
  assert f'answers read:       {len(objects) * (2 + 1 + 2)} (distinct per question)' in report
  assert 'tokens per text:' in report
  sp = spm.SentencePieceProcessor(model_file=str(out))
  assert sp.get_piece_size() == 80 and (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
  # Trained on the questions and answers: each encodes without <unk>, and words that only the
  # questions hold became pieces of their own.
  for text in [r['question'] for r in rows] + [a for r in rows for a in r['answers']]:
    ids = sp.encode(text)
    assert sp.unk_id() not in ids and sp.decode(ids) == text
  assert all(sp.piece_to_id(f'\u2581{obj}') != sp.unk_id() for obj in ('giraffe', 'surfboard'))
