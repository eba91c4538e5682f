"""Tests for vljax.data.tokenizer: existing models' ids, the train command, config check, saving.

Every sentencepiece model here is trained in the test by sentencepiece's own trainer, with the
special-id layout of a real family (T5/SigLIP, Gemma, LLaMA), and expected encodings are built
with sentencepiece directly, never by the code under test.
"""

import io
import json
import os
import pickle
import shlex
import tarfile

import numpy as np
import pytest
import sentencepiece as spm

from vljax import configlib
from vljax.configlib import ConfigError
from vljax.data import preprocess
from vljax.data import synthetic
from vljax.data import tokenizer as tokenizer_lib

# COCO-style captions: the corpus of every model in this file.
CAPTIONS = [
    'A man riding a bicycle down a busy city street.',
    'A woman sitting on a wooden bench in the park.',
    'Two dogs playing with a ball on the beach.',
    'A young girl holding a red umbrella in the rain.',
    'A group of people standing next to a large building.',
    'A black cat sleeping on a white couch.',
    'A plate of food with rice, chicken and vegetables.',
    'A red double decker bus driving down the street.',
    'A man and a woman walking their dog in the park.',
    'A small boat floating on a calm blue lake.',
    'A train pulling into a station on a sunny day.',
    'A little boy eating a slice of pizza at the table.',
    'A kitchen with white cabinets and a wooden table.',
    'A person riding a surfboard on a large wave.',
    'A herd of sheep grazing in a green field.',
    'A brown horse standing in a field of grass.',
    'A man holding a tennis racket on a tennis court.',
    'A woman talking on her phone while walking down the street.',
    'A cat sitting on a window sill looking outside.',
    'Two people sitting at a table eating dinner.',
    'A giraffe standing next to a tall tree.',
    'A large airplane flying in a clear blue sky.',
    'A skateboarder doing a trick on a ramp.',
    'A bowl of fruit on a kitchen counter.',
    'A group of children playing soccer in a field.',
    'A man sitting on a bench reading a newspaper.',
    'A yellow taxi parked on the side of the road.',
    'A woman cutting a cake with a large knife.',
    'A dog running across a grassy field.',
    'An elephant walking through the tall grass.',
    'A bathroom with a white sink and a mirror.',
    'A man flying a kite on a windy beach.',
    'A bird sitting on a branch of a tree.',
    'A table with a laptop computer and a cup of coffee.',
    'A clock tower in the middle of a city.',
    'Two zebras standing together in a field.',
    'A man wearing a hat and a blue shirt.',
    'A woman riding a horse on a dirt road.',
    'A stop sign on the corner of a street.',
    'A living room with a couch, a television and a lamp.',
    'A boy throwing a frisbee in the park.',
    'A pizza with cheese and tomatoes on a wooden board.',
    'A truck driving on a highway near the mountains.',
    'A woman holding a baby in her arms.',
    'A teddy bear sitting on a bed.',
    'A man skiing down a snowy mountain.',
    'A fire hydrant on the side of a city street.',
    'A group of people waiting for a train at the station.',
    'A sandwich and a bowl of soup on a table.',
    'A motorcycle parked in front of a building.',
    'A girl sitting on the grass with her dog.',
    'A street sign next to a tall building.',
    'A cow standing in a green field near a fence.',
    'A person walking with an umbrella on a rainy day.',
    'A man cooking food in a small kitchen.',
    'Two men playing frisbee on a sunny day.',
    'A bench in a park covered with snow.',
    'A woman sitting at a desk with a computer.',
    'A large clock on the wall of a building.',
    'A child eating a banana at the kitchen table.',
]

# Captions not in the corpus, made of its words: "real captions" the model has not seen.
HELD_OUT = [
    'A man sitting on a bench in the park.',
    'A woman riding a horse down the street.',
    'Two dogs playing in a green field.',
    'A little girl eating a sandwich at the table.',
    'A black dog sleeping on the couch.',
]

# Special-id layouts of real model families, as sentencepiece trainer arguments.
T5 = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)  # also mT5 and SigLIP
GEMMA = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)
# Not a real family: ids that differ from vljax's own, so reading them from the model shows.
SHIFTED = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)
LLAMA = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
NO_EOS = dict(pad_id=0, unk_id=1, bos_id=-1, eos_id=-1)


def train_model(path, layout, vocab_size=120, model_type='unigram'):
  """Trains a sentencepiece model on CAPTIONS with sentencepiece itself; returns the path."""
  with open(path, 'wb') as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS), model_writer=f, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type=model_type, minloglevel=2, **layout)
  return str(path)


def expected_row(sp, text, max_len):
  """What vljax's encoding must be, built from sentencepiece directly."""
  ids = sp.encode(text)[:max_len - 1] + [sp.eos_id()]
  return ids + [sp.pad_id()] * (max_len - len(ids))


# ------------------------------------------------------------------ existing models


@pytest.mark.parametrize('layout', [T5, GEMMA, SHIFTED], ids=['t5', 'gemma', 'shifted'])
def test_loads_existing_layouts_with_their_own_ids(tmp_path, layout):
  path = train_model(tmp_path / 'm.model', layout)
  sp = spm.SentencePieceProcessor(model_file=path)
  # The trainer honoured the layout (else this test would prove nothing).
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (
      layout['pad_id'], layout['eos_id'], layout['unk_id'], layout['bos_id'])

  tok = tokenizer_lib.Tokenizer(path)
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (
      layout['pad_id'], layout['eos_id'], layout['unk_id'])
  assert tok.vocab_size == sp.get_piece_size()

  max_len = 16
  texts = HELD_OUT + ['', CAPTIONS[17]]  # an empty text, and one longer than max_len
  assert len(sp.encode(CAPTIONS[17])) > max_len
  ids = tok.encode(texts, max_len)
  assert ids.dtype == np.int32 and ids.shape == (len(texts), max_len)
  for text, row in zip(texts, ids):
    assert row.tolist() == expected_row(sp, text, max_len)
  if layout['bos_id'] >= 0:
    assert not np.any(ids == layout['bos_id'])  # texts never start with BOS
  for text, row in zip(texts, ids):
    pieces = sp.encode(text)
    # Decoding gives the text back, or the part of it that fitted.
    assert tok.decode(row) == (text if len(pieces) < max_len else
                               sp.decode(pieces[:max_len - 1]))
  assert tok.decode_batch(ids[-2:]) == [tok.decode(ids[-2]), tok.decode(ids[-1])]

  # Grain workers get the tokenizer pickled: ids and encodings survive.
  clone = pickle.loads(pickle.dumps(tok))
  assert (clone.pad_id, clone.eos_id) == (tok.pad_id, tok.eos_id)
  np.testing.assert_array_equal(clone.encode(texts, max_len), ids)


def test_lowercase_option_lowercases_before_encoding(tmp_path):
  path = train_model(tmp_path / 'm.model', T5)
  sp = spm.SentencePieceProcessor(model_file=path)
  tok = tokenizer_lib.Tokenizer(path, lowercase=True)
  assert tok.encode(['A Man ON a Bench'], 10)[0].tolist() == expected_row(
      sp, 'a man on a bench', 10)


@pytest.mark.parametrize('layout, missing', [(LLAMA, 'pad'), (NO_EOS, 'eos')])
def test_model_without_pad_or_eos_is_refused(tmp_path, layout, missing):
  path = train_model(tmp_path / f'no_{missing}.model', layout)
  assert getattr(spm.SentencePieceProcessor(model_file=path), f'{missing}_id')() == -1
  with pytest.raises(ConfigError) as err:
    tokenizer_lib.Tokenizer(path)
  message = str(err.value)
  assert path in message
  assert f'no {missing} piece' in message
  with open(path, 'rb') as f:
    with pytest.raises(ConfigError, match=f'no {missing} piece'):
      tokenizer_lib.Tokenizer.from_serialized(f.read())


def test_missing_model_file_names_the_config_key(tmp_path):
  missing = str(tmp_path / 'nope.model')
  for load in (tokenizer_lib.Tokenizer, tokenizer_lib.get_tokenizer):
    with pytest.raises(FileNotFoundError) as err:
      load(missing)
    assert missing in str(err.value) and 'config.tokenizer.path' in str(err.value)


# ------------------------------------------------------------------ saving with the workdir


def test_save_and_load_from_dir_round_trip(tmp_path):
  original = train_model(tmp_path / 'shifted.model', SHIFTED)
  tok = tokenizer_lib.Tokenizer(original)
  with open(original, 'rb') as f:
    assert tok.serialized_model == f.read()

  workdir = tmp_path / 'workdir'
  assert tokenizer_lib.load_from_dir(str(workdir)) is None  # nothing saved yet
  saved = tokenizer_lib.save_to_dir(tok, str(workdir))
  assert saved == str(workdir / tokenizer_lib.TOKENIZER_FILENAME)
  export = tmp_path / 'export' / 'tokenizer.model'
  tok.save(str(export))
  os.remove(original)  # the saved copies must not depend on the original file

  # Written atomically: no temporary file is left beside it.
  assert os.listdir(workdir) == ['tokenizer.model']
  for directory in (workdir, export.parent):
    loaded = tokenizer_lib.load_from_dir(str(directory))
    assert loaded is not None
    assert loaded.serialized_model == tok.serialized_model
    assert (loaded.pad_id, loaded.eos_id) == (SHIFTED['pad_id'], SHIFTED['eos_id'])
    np.testing.assert_array_equal(loaded.encode(HELD_OUT + CAPTIONS, 16),
                                  tok.encode(HELD_OUT + CAPTIONS, 16))

  # Saving again over an existing file replaces it.
  other = tokenizer_lib.Tokenizer(train_model(tmp_path / 't5.model', T5))
  other.save(saved)
  assert tokenizer_lib.load_from_dir(str(workdir)).serialized_model == other.serialized_model
  assert os.listdir(workdir) == ['tokenizer.model']


# ------------------------------------------------------------------ config check


def _config(train, path='', lowercase=False):
  config = configlib.base_train_config()
  config.data.train = train
  config.data.lowercase = lowercase
  config.tokenizer.path = path
  return config


def test_check_config_passes_synthetic_data_and_explicit_models():
  tokenizer_lib.check_config(_config('synthetic'))
  tokenizer_lib.check_config(_config('0.3*synthetic|0.7*synthetic'))
  tokenizer_lib.check_config(_config('jsonl:/data/cc3m.jsonl', path='/models/spm.model'))
  tokenizer_lib.check_config(
      _config('0.5*synthetic|0.5*webdataset:/d/{0..9}.tar', path='/models/spm.model'))


@pytest.mark.parametrize('train', [
    'jsonl:/data/cc3m.jsonl',
    'webdataset:/data/cc12m/{00000..01242}.tar',
    '0.5*synthetic|0.5*csv:/data/my captions.csv',  # one real part is enough
])
def test_check_config_refuses_real_data_without_a_tokenizer(train):
  with pytest.raises(ConfigError) as err:
    tokenizer_lib.check_config(_config(train, lowercase=True))
  message = str(err.value)
  assert '\n' not in message
  assert 'config.tokenizer.path' in message
  # The suggested command parses, with the user's own spec and clean-up.
  command = shlex.split(message.split('`')[1])
  assert command[:4] == ['python', '-m', 'vljax.data.tokenizer', 'train']
  args = tokenizer_lib._parser().parse_args(command[3:])  # pylint: disable=protected-access
  assert args.spec == train
  assert args.lowercase


def test_check_config_command_trains_on_the_users_data(tmp_path, capsys):
  path = write_jsonl(tmp_path / 'caps.jsonl', [{'image': 'x.jpg', 'caption': c}
                                               for c in CAPTIONS])
  with pytest.raises(ConfigError) as err:
    tokenizer_lib.check_config(_config(f'jsonl:{path}'))
  argv = shlex.split(str(err.value).split('`')[1])[3:]
  # Later options override the suggested ones: a vocabulary this tiny corpus supports.
  out = tmp_path / 'tok.model'
  assert tokenizer_lib.main(argv + ['--vocab_size', '120', '--out', str(out)]) == 0
  capsys.readouterr()
  tokenizer_lib.check_config(_config(f'jsonl:{path}', path=str(out)))


# ------------------------------------------------------------------ the train command


def write_jsonl(path, rows, corrupt_after=None):
  """Writes records (dicts) as JSON lines; a corrupt line after record `corrupt_after`."""
  with open(path, 'w') as f:
    for i, row in enumerate(rows):
      f.write(json.dumps(row) + '\n')
      if i == corrupt_after:
        f.write('{"image": "broken.jpg", "caption": "A cut-off li\n')
  return str(path)


def caption_records():
  """40 records with one caption, 10 with a list of two: every caption of CAPTIONS once."""
  rows = [{'image': f'images/{i:04d}.jpg', 'caption': c} for i, c in enumerate(CAPTIONS[:40])]
  rows += [{'image': f'images/{40 + i:04d}.jpg', 'caption': list(CAPTIONS[40 + 2 * i:42 + 2 * i])}
           for i in range(10)]
  return rows


def tokens_per_word(sp, texts):
  return sum(len(ids) for ids in sp.encode(texts)) / sum(len(t.split()) for t in texts)


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_train_command_on_a_jsonl_source(tmp_path, capsys, model_type):
  # No image file exists: the command reads captions only.
  path = write_jsonl(tmp_path / 'captions.jsonl', caption_records(), corrupt_after=20)
  out = tmp_path / 'models' / 'captions.model'
  argv = ['train', f'jsonl:{path}', '--vocab_size', '150', '--out', str(out), '--seed', '3']
  if model_type != 'unigram':
    argv += ['--model_type', model_type]
  assert tokenizer_lib.main(argv) == 0
  report = capsys.readouterr().out

  # The report: the corrupt line (line 22 of the file) is skipped and named, every caption
  # of the 50 good records (10 of them lists) is read.
  assert 'records skipped:    1 (first: captions.jsonl:22' in report
  assert f'captions read:      {len(CAPTIONS)}' in report
  assert 'vocabulary size:    150' in report
  assert '<unk> share:        0.000%' in report
  assert model_type in report.splitlines()[0]
  assert os.listdir(out.parent) == ['captions.model']  # written atomically

  # vljax's ids, checked with sentencepiece itself.
  sp = spm.SentencePieceProcessor(model_file=str(out))
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.get_piece_size() == 150
  assert all(sp.unk_id() not in ids for ids in sp.encode(CAPTIONS + HELD_OUT))

  # Real captions become word and sub-word pieces, far fewer than characters.
  chars_per_word = sum(len(t) for t in HELD_OUT) / sum(len(t.split()) for t in HELD_OUT)
  per_word = tokens_per_word(sp, HELD_OUT)
  assert per_word < chars_per_word / 2
  if model_type == 'bpe':
    assert per_word < 2

  tok = tokenizer_lib.Tokenizer(str(out))
  assert (tok.pad_id, tok.eos_id) == (0, 1)
  rows = tok.encode(HELD_OUT, 24)
  for text, row in zip(HELD_OUT, rows):
    assert row.tolist() == expected_row(sp, text, 24)
    assert tok.decode(row) == text


def test_bpe_keeps_whole_words_on_a_small_corpus(tmp_path, capsys):
  # sentencepiece's unigram trainer needs more text than a test holds to keep whole words;
  # BPE shows on a small corpus what both do on a real one: < 2 tokens per word.
  path = write_jsonl(tmp_path / 'captions.jsonl', caption_records())
  out = tmp_path / 'bpe.model'
  assert tokenizer_lib.main(['train', f'jsonl:{path}', '--vocab_size', '250', '--out', str(out),
                             '--model_type', 'bpe']) == 0
  capsys.readouterr()
  sp = spm.SentencePieceProcessor(model_file=str(out))
  assert tokens_per_word(sp, HELD_OUT) < 2
  assert tokens_per_word(sp, CAPTIONS) < 2
  assert {'▁man', '▁sitting', '▁bench', '▁park'} <= set(sp.encode(HELD_OUT[0], out_type=str))


def test_train_command_lowercase(tmp_path, capsys):
  path = write_jsonl(tmp_path / 'captions.jsonl', caption_records())
  out = tmp_path / 'lower.model'
  assert tokenizer_lib.main(['train', f'jsonl:{path}', '--vocab_size', '100', '--out', str(out),
                             '--lowercase']) == 0
  capsys.readouterr()
  sp = spm.SentencePieceProcessor(model_file=str(out))
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  assert not any(c.isupper() for p in pieces for c in p)


def test_train_command_without_usable_captions_exits_2(tmp_path, capsys):
  rows = [{'image': 'a.jpg'}, {'image': 'b.jpg', 'caption': ''}, {'image': 'c.jpg', 'caption': []}]
  spec = f'jsonl:{write_jsonl(tmp_path / "empty.jsonl", rows)}'
  out = tmp_path / 'never.model'
  assert tokenizer_lib.main(['train', spec, '--vocab_size', '100', '--out', str(out)]) == 2
  captured = capsys.readouterr()
  assert len(captured.err.strip().splitlines()) == 1
  assert spec in captured.err
  assert not out.exists()


def test_train_command_reports_a_vocabulary_too_large(tmp_path, capsys):
  path = write_jsonl(tmp_path / 'captions.jsonl', caption_records())
  out = tmp_path / 'never.model'
  assert tokenizer_lib.main(['train', f'jsonl:{path}', '--vocab_size', '32000',
                             '--out', str(out)]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and '--vocab_size' in err
  assert not out.exists()


def test_train_command_usage_errors_return_2(capsys):
  assert tokenizer_lib.main(['train', 'synthetic', '--out', 'x.model']) == 2  # no --vocab_size
  assert tokenizer_lib.main(['train', 'nosuchformat:/x', '--vocab_size', '100',
                             '--out', 'x.model']) == 2
  assert 'nosuchformat' in capsys.readouterr().err


# ------------------------------------------------------------------ reading captions


def test_read_captions_samples_records_at_random(tmp_path):
  path = write_jsonl(tmp_path / 'captions.jsonl', caption_records())
  spec = f'jsonl:{path}'
  everything, stats = tokenizer_lib.read_captions(spec)
  assert sorted(everything) == sorted(CAPTIONS)
  assert (stats.records_sampled, stats.records_skipped, stats.captions) == (50, 0, 60)

  first, stats = tokenizer_lib.read_captions(spec, max_records=20, seed=1)
  assert stats.records_sampled == 20 and stats.records_skipped == 0
  assert 20 <= len(first) <= 30 and set(first) <= set(CAPTIONS)
  assert tokenizer_lib.read_captions(spec, max_records=20, seed=1)[0] == first
  assert set(tokenizer_lib.read_captions(spec, max_records=20, seed=2)[0]) != set(first)

  lower, _ = tokenizer_lib.read_captions(
      spec, text_options=preprocess.TextOptions(lowercase=True))
  assert sorted(lower) == sorted(c.lower() for c in CAPTIONS)


def test_read_captions_of_a_mixture(tmp_path):
  a = write_jsonl(tmp_path / 'a.jsonl', [{'image': 'a.jpg', 'caption': f'A photo of dog {i}.'}
                                         for i in range(30)])
  b = write_jsonl(tmp_path / 'b.jsonl', [{'image': 'b.jpg', 'caption': f'A photo of cat {i}.'}
                                         for i in range(30)])
  spec = f'0.8*jsonl:{a}|0.2*jsonl:{b}'
  captions, stats = tokenizer_lib.read_captions(spec, max_records=10)
  assert stats.records_sampled == 10
  assert sum('dog' in c for c in captions) == 8 and sum('cat' in c for c in captions) == 2
  everything, _ = tokenizer_lib.read_captions(spec)  # all of it fits: every record once
  assert len(everything) == 60 and len(set(everything)) == 60


def test_read_captions_of_webdataset_shards_reads_no_image(tmp_path):
  members = []
  for i in range(6):
    members.append((f'{i:04d}.jpg', b'not even an image'))
    members.append((f'{i:04d}.json', json.dumps({'caption': CAPTIONS[i],
                                                 'alt': f'Alt text {i}.'}).encode()))
    if i % 2 == 0:
      members.append((f'{i:04d}.txt', CAPTIONS[i].encode()))
  members.append(('0006.jpg', b'no caption member'))
  with tarfile.open(tmp_path / '00000.tar', 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  # KEY.txt where there is one, else the json's caption field.
  captions, stats = tokenizer_lib.read_captions(f'webdataset:{tmp_path}/00000.tar')
  assert sorted(captions) == sorted(CAPTIONS[:6])
  assert stats.records_skipped == 1 and '0006' in stats.first_skipped
  # A json field named in the spec wins over KEY.txt, as in training.
  captions, _ = tokenizer_lib.read_captions(f'webdataset:{tmp_path}/00000.tar?caption=alt')
  assert sorted(captions) == [f'Alt text {i}.' for i in range(6)]


# ------------------------------------------------------------------ synthetic tokenizer


def test_synthetic_tokenizer_still_trains_and_caches(tmp_path):
  cache = str(tmp_path / 'cache')
  path = tokenizer_lib.train_synthetic_tokenizer(cache)
  assert tokenizer_lib.train_synthetic_tokenizer(cache) == path  # cached
  assert os.listdir(cache) == [os.path.basename(path)]
  sp = spm.SentencePieceProcessor(model_file=path)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
  tok = tokenizer_lib.get_tokenizer(path)
  captions = [synthetic.SyntheticImageText(num_examples=8)[i]['caption'] for i in range(8)]
  rows = tok.encode(captions, 32)
  for caption, row in zip(captions, rows):
    assert row.tolist() == expected_row(sp, caption, 32)
    assert tok.decode(row) == caption
