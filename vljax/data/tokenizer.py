"""SentencePiece tokenizer wrapper, and the tokenizer of the synthetic data.

`Tokenizer` turns caption batches into fixed-length int32 arrays (tokens, EOS,
right padding) and back. `train_synthetic_tokenizer` trains a small
sentencepiece model on the synthetic captions and caches it on disk, keyed by
a hash of the corpus and the trainer settings; `get_tokenizer` picks either a
user-provided model or that synthetic one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Sequence

import numpy as np
import sentencepiece as spm

from vljax.data import synthetic

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# Bump when the corpus recipe changes in a way the hash would not see.
_SYNTHETIC_VERSION = 1
_SYNTHETIC_NUM_CAPTIONS = 2000
_DEFAULT_SYNTHETIC_VOCAB = 256
# Every printable ASCII character appears in the corpus so that arbitrary
# English text (prompts, VQA questions) encodes without <unk>.
_ASCII_LINE = ''.join(chr(c) for c in range(33, 127))


class Tokenizer:
  """A sentencepiece model with fixed-length batch encoding.

  Ids: `pad_id` (0) pads, `eos_id` (1) ends every encoded text. The model must
  have been trained with these ids (the synthetic one is).
  """

  pad_id: int = PAD_ID
  eos_id: int = EOS_ID

  def __init__(self, model_path: str, lowercase: bool = False):
    """Loads the model.

    Args:
      model_path: path to a sentencepiece `.model` file.
      lowercase: lowercase texts before encoding.
    """
    if not os.path.exists(model_path):
      raise FileNotFoundError(
          f'Tokenizer model {model_path!r} does not exist; set '
          'config.tokenizer.path to a sentencepiece .model file, or leave it '
          'empty to use the synthetic-data tokenizer.')
    with open(model_path, 'rb') as f:
      proto = f.read()
    self.model_path = model_path
    self.lowercase = lowercase
    self._load(proto)

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    self._sp.load_from_serialized_proto(proto)
    if (self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID):
      raise ValueError(
          f'Tokenizer {self.model_path!r} has pad_id={self._sp.pad_id()}, '
          f'eos_id={self._sp.eos_id()}; vljax needs pad_id={PAD_ID}, '
          f'eos_id={EOS_ID}.')

  # Grain worker processes receive the tokenizer by pickling; the swig
  # processor is rebuilt from the serialized model instead.
  def __getstate__(self) -> dict[str, object]:
    return {'model_path': self.model_path, 'lowercase': self.lowercase,
            'proto': self._proto}

  def __setstate__(self, state: dict[str, object]) -> None:
    self.model_path = state['model_path']
    self.lowercase = state['lowercase']
    self._load(state['proto'])

  def __repr__(self) -> str:
    return (f'Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, '
            f'lowercase={self.lowercase})')

  @property
  def vocab_size(self) -> int:
    """Number of ids, including pad, eos and unk."""
    return self._sp.get_piece_size()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Encodes texts to int32 [len(texts), max_len]: tokens, EOS, padding.

    Texts longer than `max_len - 1` tokens are truncated; EOS is always kept
    as the last token. An empty text becomes just [EOS].
    """
    if max_len < 1:
      raise ValueError(f'max_len must be >= 1, got {max_len}.')
    if isinstance(texts, str):
      raise TypeError('encode expects a sequence of strings, not one string.')
    texts = [t.lower() if self.lowercase else t for t in texts]
    out = np.full((len(texts), max_len), PAD_ID, dtype=np.int32)
    if not texts:
      return out
    for row, ids in enumerate(self._sp.encode(texts, out_type=int)):
      ids = ids[:max_len - 1]
      out[row, :len(ids)] = ids
      out[row, len(ids)] = EOS_ID
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes one id sequence: stops at the first EOS, ignores padding."""
    tokens = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if i != PAD_ID:
        tokens.append(int(i))
    return self._sp.decode(tokens)

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    """Decodes each row of a [B, L] id array."""
    return [self.decode(row) for row in np.asarray(ids)]


def _default_cache_dir() -> str:
  return os.environ.get('VLJAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'vljax')


def _synthetic_corpus() -> list[str]:
  """Sentences the synthetic tokenizer is trained on."""
  corpus = synthetic.all_captions(_SYNTHETIC_NUM_CAPTIONS, seed=0)
  corpus += [p for prompts in synthetic.class_prompts() for p in prompts]
  corpus.append(_ASCII_LINE)
  return corpus


def train_synthetic_tokenizer(cache_dir: str | None = None,
                              vocab_size: int = _DEFAULT_SYNTHETIC_VOCAB
                              ) -> str:
  """Trains (or finds cached) a sentencepiece model for the synthetic captions.

  The model is cached as `<cache_dir>/synthetic_spm_<hash>.model`, where the
  hash covers the corpus and the trainer settings, so changing either trains
  a new one. It is written to a temporary file and renamed into place, so a
  concurrent reader sees either no file or a complete one.

  Args:
    cache_dir: where to cache the model; defaults to $VLJAX_CACHE, else
      ~/.cache/vljax.
    vocab_size: target vocabulary size. It is a soft limit: the tiny corpus
      may support fewer pieces, and training then stops early instead of
      failing.

  Returns:
    The path of the `.model` file.
  """
  cache_dir = cache_dir or _default_cache_dir()
  corpus = _synthetic_corpus()
  settings = dict(
      # BPE merges every caption word into one piece at this size (unigram
      # stalls at ~140 sub-word pieces on this corpus), so captions stay short.
      model_type='bpe', vocab_size=vocab_size, hard_vocab_limit=False,
      character_coverage=1.0, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
      bos_id=-1, normalization_rule_name='nmt_nfkc', split_digits=True,
      num_threads=1, version=_SYNTHETIC_VERSION)
  digest = hashlib.sha256(
      json.dumps(settings, sort_keys=True).encode() + b'\0' +
      '\n'.join(corpus).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir, f'synthetic_spm_{digest}.model')
  if os.path.exists(path):
    return path

  os.makedirs(cache_dir, exist_ok=True)
  trainer_args = {k: v for k, v in settings.items() if k != 'version'}
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model,
      minloglevel=2, **trainer_args)
  fd, tmp_path = tempfile.mkstemp(dir=cache_dir, prefix='.synthetic_spm_',
                                  suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(model.getvalue())
      f.flush()
      os.fsync(f.fileno())
    # Atomic on POSIX: racing writers each install a complete, identical file.
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return path


def get_tokenizer(path: str | None = None, lowercase: bool = False
                  ) -> Tokenizer:
  """The tokenizer at `path` (config.tokenizer.path), or the synthetic one.

  Args:
    path: a sentencepiece `.model` file; None or '' selects the tokenizer
      trained on the synthetic captions.
    lowercase: lowercase texts before encoding.

  Raises:
    FileNotFoundError: `path` is given but does not exist.
  """
  if not path:
    path = train_synthetic_tokenizer()
  elif not os.path.exists(path):
    raise FileNotFoundError(
        f'Tokenizer model {path!r} not found; check config.tokenizer.path '
        '(leave it empty to use the synthetic-data tokenizer).')
  return Tokenizer(path, lowercase=lowercase)
