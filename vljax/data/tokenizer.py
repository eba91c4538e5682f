"""SentencePiece tokenizers: loading any model, and training one on captions.

`Tokenizer` turns caption batches into fixed-length int32 arrays (tokens, EOS,
right padding) and back, using the pad and EOS ids of its own model, so
existing models work as they are (T5/mT5 and SigLIP: pad 0, eos 1, unk 2;
Gemma: pad 0, eos 1, bos 2, unk 3). A tokenizer travels with its checkpoints:
`Tokenizer.save` writes the model, `load_from_dir` finds it again.

Two ways to get a model:

* `train_synthetic_tokenizer` trains a small model on the synthetic captions
  and caches it on disk, keyed by a hash of the corpus and the trainer
  settings. It is only fit for the synthetic data: real captions fall apart
  into characters, which is why `check_config` refuses real training data
  without config.tokenizer.path. Its `vqa=True` variant also knows the
  synthetic questions, their answers and the task prompts ("caption en",
  "answer en ..."), for models trained on `synthetic?task=vqa`
  (`uses_synthetic_vqa` tells when).
* The command line trains one on the captions of any source, and the questions and answers
  of its VQA records (docs/tokenizer.md):

    python -m vljax.data.tokenizer train SPEC --vocab_size N --out PATH \\
        [--max_captions M] [--model_type unigram|bpe] [--lowercase] \\
        [--canonicalize] [--character_coverage F] [--seed S]

Models trained here use vljax's ids: pad 0, eos 1, unk 2, no bos.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shlex
import sys
import tempfile
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm

from vljax import configlib
from vljax.configlib import ConfigError
from vljax.data import formats
from vljax.data import mixture
from vljax.data import preprocess
from vljax.data import sources
from vljax.data import synthetic

# The ids of models trained by vljax. Loaded models bring their own
# (`Tokenizer.pad_id`, `Tokenizer.eos_id`).
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# The name of the tokenizer saved in a workdir or an export.
TOKENIZER_FILENAME = 'tokenizer.model'

# Bump when the corpus recipe changes in a way the hash would not see.
_SYNTHETIC_VERSION = 1
# The task prompts of a PaLI-style model ("caption en" -> caption, "answer en {question}" ->
# answer), in the corpus of the vqa variant of the synthetic tokenizer.
_CAPTION_PROMPT = 'caption en'
_VQA_PROMPT = 'answer en'
_SYNTHETIC_NUM_CAPTIONS = 2000
_DEFAULT_SYNTHETIC_VOCAB = 256
# The vqa variant's words (questions, prompts) need more pieces: at 256 'part' and 'which'
# split into characters; from 272 on every word of every question is one piece.
_DEFAULT_SYNTHETIC_VQA_VOCAB = 288
# Every printable ASCII character appears in the corpus so that arbitrary
# English text (prompts, VQA questions) encodes without <unk>.
_ASCII_LINE = ''.join(chr(c) for c in range(33, 127))

# The train command's defaults.
DEFAULT_MAX_RECORDS = 1_000_000
DEFAULT_CHARACTER_COVERAGE = 0.9995  # sentencepiece's own default
MODEL_TYPES = ('unigram', 'bpe')
# The vocabulary suggested by check_config (SigLIP's and T5's size).
_SUGGESTED_VOCAB = 32000


class Tokenizer:
  """A sentencepiece model with fixed-length batch encoding.

  Attributes:
    pad_id: the model's pad id; pads every encoded text on the right.
    eos_id: the model's EOS id; ends every encoded text.
    model_path: where the model was loaded from (a name, for messages).
    lowercase: whether texts are lowercased before encoding.
  """

  pad_id: int
  eos_id: int

  def __init__(self, model_path: str, lowercase: bool = False):
    """Loads the model.

    Args:
      model_path: path to a sentencepiece `.model` file.
      lowercase: lowercase texts before encoding.

    Raises:
      FileNotFoundError: no file at `model_path`.
      ConfigError: the model has no pad or no EOS piece.
    """
    if not os.path.exists(model_path):
      raise FileNotFoundError(
          f'Tokenizer model {model_path!r} does not exist; set '
          'config.tokenizer.path to a sentencepiece .model file (empty only '
          'on the synthetic data; docs/tokenizer.md).')
    with open(model_path, 'rb') as f:
      proto = f.read()
    self.model_path = model_path
    self.lowercase = lowercase
    self._load(proto)

  @classmethod
  def from_serialized(cls, proto: bytes, name: str = '<serialized model>',
                      lowercase: bool = False) -> Tokenizer:
    """A tokenizer from serialized model bytes (`serialized_model`)."""
    tok = cls.__new__(cls)
    tok.model_path = name
    tok.lowercase = lowercase
    tok._load(bytes(proto))
    return tok

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    self._sp.load_from_serialized_proto(proto)
    # vljax right-pads every text and ends it with EOS, so a model must have
    # both pieces; their ids are the model's own (-1 means "no such piece").
    missing = [f'no {name} piece ({name}_id=-1)'
               for name, i in (('pad', self._sp.pad_id()),
                               ('eos', self._sp.eos_id())) if i < 0]
    if missing:
      raise ConfigError(
          f'Tokenizer {self.model_path!r} has {" and ".join(missing)}; vljax '
          'pads every text with the pad id and ends it with EOS. Use a model '
          'with both (T5/mT5, SigLIP, Gemma, or one trained with `python -m '
          'vljax.data.tokenizer train`).')
    self.pad_id = int(self._sp.pad_id())
    self.eos_id = int(self._sp.eos_id())

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
            f'pad_id={self.pad_id}, eos_id={self.eos_id}, '
            f'lowercase={self.lowercase})')

  @property
  def vocab_size(self) -> int:
    """Number of ids, including pad, eos and unk."""
    return self._sp.get_piece_size()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def serialized_model(self) -> bytes:
    """The sentencepiece model as bytes (the content of a `.model` file)."""
    return self._proto

  def save(self, path: str) -> None:
    """Writes the model to `path` atomically (a reader never sees half)."""
    write_atomic(path, self._proto)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Encodes texts to int32 [len(texts), max_len]: tokens, EOS, padding.

    Texts longer than `max_len - 1` tokens are truncated; EOS is always kept
    as the last token. An empty text becomes just [EOS]. No BOS is added,
    even where the model has one.
    """
    if max_len < 1:
      raise ValueError(f'max_len must be >= 1, got {max_len}.')
    if isinstance(texts, str):
      raise TypeError('encode expects a sequence of strings, not one string.')
    texts = [t.lower() if self.lowercase else t for t in texts]
    out = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    if not texts:
      return out
    for row, ids in enumerate(self._sp.encode(texts, out_type=int)):
      ids = ids[:max_len - 1]
      out[row, :len(ids)] = ids
      out[row, len(ids)] = self.eos_id
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes one id sequence: stops at the first EOS, ignores padding."""
    tokens = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i != self.pad_id:
        tokens.append(int(i))
    return self._sp.decode(tokens)

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    """Decodes each row of a [B, L] id array."""
    return [self.decode(row) for row in np.asarray(ids)]


def open_tokenizer(path: str, lowercase: bool = False):
  """The tokenizer in the file `path`: a sentencepiece .model, a serialized CLIP BPE tokenizer
  (what vljax saves for one), or a CLIP BPE vocabulary (OpenAI's .txt.gz, HF's merges.txt;
  vljax.data.clip_bpe, which lowercases by itself)."""
  from vljax.data import clip_bpe  # pylint: disable=g-import-not-at-top
  if path.endswith(('.txt.gz', 'merges.txt')):
    return clip_bpe.ClipBpeTokenizer.from_file(path)
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      if clip_bpe.is_serialized(f.read(len(clip_bpe.MAGIC))):
        f.seek(0)
        return clip_bpe.ClipBpeTokenizer.from_serialized(f.read(), path)
  return Tokenizer(path, lowercase=lowercase)


def load_from_dir(directory: str, lowercase: bool = False) -> Tokenizer | None:
  """The tokenizer saved as DIRECTORY/tokenizer.model, or None if there is none."""
  path = os.path.join(directory, TOKENIZER_FILENAME)
  if not os.path.exists(path):
    return None
  return open_tokenizer(path, lowercase=lowercase)


def save_to_dir(tokenizer: Tokenizer, directory: str) -> str:
  """Saves `tokenizer` as DIRECTORY/tokenizer.model; returns that path."""
  path = os.path.join(directory, TOKENIZER_FILENAME)
  tokenizer.save(path)
  return path


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it there.

  Atomic on POSIX: a concurrent reader sees the old file or the complete new
  one, and racing writers each install a complete file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
      dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def _train_sentencepiece(sentences: Iterable[str], **settings: Any) -> bytes:
  """Trains a sentencepiece model in memory; returns the serialized model."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, minloglevel=2,
      **settings)
  return model.getvalue()


# ----------------------------------------------------------------- synthetic


def _synthetic_corpus(vqa: bool = False) -> list[str]:
  """Sentences the synthetic tokenizer is trained on (vqa: and the VQA task's texts)."""
  corpus = synthetic.all_captions(_SYNTHETIC_NUM_CAPTIONS, seed=0)
  corpus += [p for prompts in synthetic.class_prompts() for p in prompts]
  if vqa:
    # The texts a PaLI-style model reads and writes on synthetic?task=vqa: prompts with the
    # questions, the answers, and the captioning prompt, as often as the captions, so that
    # BPE gives each of their words one piece.
    for question, answer in synthetic.all_questions(_SYNTHETIC_NUM_CAPTIONS, seed=0):
      corpus += [f'{_VQA_PROMPT} {question}', answer]
    corpus += [_CAPTION_PROMPT] * _SYNTHETIC_NUM_CAPTIONS
  corpus.append(_ASCII_LINE)
  return corpus


def train_synthetic_tokenizer(cache_dir: str | None = None,
                              vocab_size: int | None = None,
                              vqa: bool = False) -> str:
  """Trains (or finds cached) a sentencepiece model for the synthetic captions.

  The model is cached as `<cache_dir>/synthetic_spm_<hash>.model` (vqa:
  `synthetic_vqa_spm_<hash>.model`), where the hash covers the corpus and the
  trainer settings, so changing either trains a new one. It is written
  atomically (`write_atomic`).

  Args:
    cache_dir: where to cache the model; defaults to $VLJAX_CACHE, else
      ~/.cache/vljax.
    vocab_size: target vocabulary size (None: 256, or 288 with vqa). It is a
      soft limit: the tiny corpus may support fewer pieces, and training then
      stops early instead of failing.
    vqa: train on the synthetic questions, answers and task prompts as well
      (for synthetic?task=vqa); False gives the caption-only model, unchanged.

  Returns:
    The path of the `.model` file.
  """
  cache_dir = cache_dir or configlib.cache_root()
  if vocab_size is None:
    vocab_size = _DEFAULT_SYNTHETIC_VQA_VOCAB if vqa else _DEFAULT_SYNTHETIC_VOCAB
  corpus = _synthetic_corpus(vqa)
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
  name = 'synthetic_vqa_spm' if vqa else 'synthetic_spm'
  path = os.path.join(cache_dir, f'{name}_{digest}.model')
  if os.path.exists(path):
    return path
  trainer_args = {k: v for k, v in settings.items() if k != 'version'}
  write_atomic(path, _train_sentencepiece(corpus, **trainer_args))
  return path


def get_tokenizer(path: str | None = None, lowercase: bool = False,
                  synthetic_vqa: bool = False) -> Tokenizer:
  """The tokenizer at `path` (config.tokenizer.path), or the synthetic one.

  Args:
    path: a sentencepiece `.model` file (or a CLIP BPE vocabulary: open_tokenizer);
      None or '' selects the tokenizer trained on the synthetic captions (see
      `check_config`).
    lowercase: lowercase texts before encoding.
    synthetic_vqa: without `path`, the synthetic tokenizer that also knows
      the VQA texts (`train_synthetic_tokenizer(vqa=True)`); pass
      `uses_synthetic_vqa(config.data.train)`. Ignored when `path` is given.

  Raises:
    FileNotFoundError: `path` is given but does not exist.
  """
  if not path:
    path = train_synthetic_tokenizer(vqa=synthetic_vqa)
  elif not os.path.exists(path):
    raise FileNotFoundError(
        f'Tokenizer model {path!r} not found; check config.tokenizer.path '
        '(empty only on the synthetic data; docs/tokenizer.md).')
  return open_tokenizer(path, lowercase=lowercase)


# ----------------------------------------------------------------- config


def _is_synthetic(spec: str) -> bool:
  """Whether a (mixture) spec reads only the embedded synthetic data."""
  for _, part in mixture.split_spec(spec):
    name = part.strip().partition(':')[0].partition('?')[0].strip()
    if name != 'synthetic':
      return False
  return True


def uses_synthetic_vqa(spec: str) -> bool:
  """Whether a source spec, or a part of a mixture, is `synthetic?task=vqa`.

  A spec (or part) that does not parse counts as not naming it: the data
  checks report it, with the config key.
  """
  try:
    parts = mixture.split_spec(spec)
  except ConfigError:
    return False
  for _, part in parts:
    try:
      kind, _, options = sources.parse_spec(part)
    except ConfigError:
      continue
    if kind == 'synthetic' and options.get('task') == 'vqa':
      return True
  return False


def train_command(spec: str, out: str = 'tokenizer.model',
                  vocab_size: int = _SUGGESTED_VOCAB, lowercase: bool = False,
                  canonicalize: bool = False) -> str:
  """The shell command that trains a tokenizer on `spec`'s captions."""
  words = ['python', '-m', 'vljax.data.tokenizer', 'train', shlex.quote(spec),
           '--vocab_size', str(vocab_size), '--out', shlex.quote(out)]
  if lowercase:
    words.append('--lowercase')
  if canonicalize:
    words.append('--canonicalize')
  return ' '.join(words)


def check_config(config: Any) -> None:
  """Refuses real training data without config.tokenizer.path.

  The fallback tokenizer is trained on the synthetic captions; it splits real
  captions into single characters, which trains, but badly and silently.

  Raises:
    ConfigError: config.tokenizer.path is empty and config.data.train is not
      only the synthetic data (one part of a mixture is enough).
  """
  tokenizer_config = config.get('tokenizer') or {}
  if tokenizer_config.get('path'):
    return
  data = config.get('data') or {}
  train = str(data.get('train') or 'synthetic')
  if _is_synthetic(train):
    return
  command = train_command(train, lowercase=bool(data.get('lowercase')),
                          canonicalize=bool(data.get('canonicalize')))
  raise ConfigError(
      f'config.tokenizer.path is empty, but config.data.train={train!r} is '
      'real data: the fallback tokenizer knows only the synthetic captions and '
      'would split real ones into characters. Train one with `'
      f'{command}` and set --config.tokenizer.path=tokenizer.model, or set '
      'config.tokenizer.path to an existing sentencepiece model (T5, SigLIP, '
      'Gemma; docs/tokenizer.md).')


# ----------------------------------------------------------------- training


class NoCaptionsError(ConfigError):
  """A source yields no usable caption to train a tokenizer on."""


@dataclasses.dataclass
class TextStats:
  """What `read_texts` read (counts after clean-up)."""
  records_sampled: int = 0  # records chosen (at most max_records)
  records_skipped: int = 0  # of those, unreadable or without any usable text
  first_skipped: str = ''  # 'KEY: reason' of the first skipped record
  captions: int = 0
  questions: int = 0  # VQA records' questions
  answers: int = 0  # their distinct answers (one per distinct answer per question)


# The name from before VQA records were read.
CaptionStats = TextStats


def text_reader(source: Any) -> Callable[[int], dict[str, Any]]:
  """index -> raw text fields of that record ('caption', 'question', 'answers'), reading no
  image where it can.

  Images are ~1000x the bytes of their texts, so readers that can read texts alone
  (webdataset, jsonl/csv, vqav2, synthetic: their `text_fields(index)`) are read that way; the
  others through __getitem__. Raises as the reader would for a bad record.
  """
  if hasattr(source, 'text_fields'):
    return source.text_fields

  def read_record(i: int) -> dict[str, Any]:
    record = source[i]
    if 'error' in record:  # a SafeSource-style error record
      raise ValueError(record['error'])
    return formats.text_fields_of(record)
  return read_record


def _clean_texts(fields: dict[str, Any], options: preprocess.TextOptions
                 ) -> tuple[list[str], list[str], list[str]]:
  """(captions, [question], distinct answers) of a record, cleaned as training cleans them.

  Raises BadRecord when nothing is usable, ValueError on answers that are not strings.
  """
  captions = preprocess.captions_list(fields.get('caption'), options)
  questions: list[str] = []
  answers: list[str] = []
  if fields.get('question') is not None:
    try:
      questions = [preprocess.clean_caption(fields['question'], options)]
    except preprocess.BadRecord:
      pass
  # Training uses answers only with a usable question, so the tokenizer does too. Repeats
  # (VQAv2's 10 human answers, mostly the same) are read once: otherwise 'yes' and 'no' would
  # make up a large share of the corpus.
  if questions:
    cleaned = preprocess.captions_list(formats.answer_list(fields.get('answers')), options)
    answers = list(dict.fromkeys(cleaned))
  if not (captions or questions):
    raise preprocess.BadRecord('no usable caption or question'
                               if fields.get('question') is not None else 'no usable caption')
  return captions, questions, answers


def sample_plan(source: Any, max_records: int,
                rng: np.random.Generator) -> list[tuple[Any, np.ndarray]]:
  """(component source, sorted record indices) to read, at most max_records.

  A mixture gives each component its weight's share of `max_records`, capped
  at its size (components are not repeated to make up a share); everything
  when it all fits.
  """
  if isinstance(source, mixture.Mixture):
    parts, weights = source.components, source.weights
  else:
    parts, weights = [source], [1.0]
  sizes = [len(p) for p in parts]
  if sum(sizes) <= max_records:
    quotas = sizes
  else:
    quotas = [min(n, int(round(max_records * w))) for n, w in zip(sizes, weights)]
  plan = []
  for part, size, quota in zip(parts, sizes, quotas):
    if quota >= size:
      indices = np.arange(size)
    else:
      # Sorted: sequential reads are much faster on tar shards and disks.
      indices = np.sort(rng.choice(size, size=quota, replace=False))
    plan.append((part, indices))
  return plan


def read_texts(spec: str, max_records: int = DEFAULT_MAX_RECORDS,
               seed: int = 0,
               text_options: preprocess.TextOptions = preprocess.TextOptions(),
               progress: Callable[[str], None] | None = None
               ) -> tuple[list[str], TextStats]:
  """The cleaned texts of up to `max_records` random records of `spec`.

  A record gives its captions (every one of a record with several), then, for a VQA record,
  its question and its distinct answers: the texts a captioning + VQA model reads and writes.
  A captions-only source gives exactly its captions. Records that cannot be read or have no
  usable caption or question are skipped and counted.

  Args:
    spec: a vljax source spec (vljax.data.sources), mixtures included.
    max_records: how many records to sample at most (at random, without
      replacement; all when the source is no larger).
    seed: seed of the sample (and of the synthetic data).
    text_options: the clean-up the pipeline applies (config.data.lowercase,
      canonicalize), to captions, questions and answers alike.
    progress: called with a short line now and then on large sources.

  Raises:
    ConfigError: a bad spec, or a source that yields nothing.
  """
  source = sources.get_source(spec, 'train', image_size=32, seed=seed)
  rng = np.random.default_rng(seed)
  plan = sample_plan(source, max(0, int(max_records)), rng)
  stats = TextStats(records_sampled=sum(len(ix) for _, ix in plan))
  texts: list[str] = []
  done = 0
  for part, indices in plan:
    read = text_reader(part)
    for index in indices.tolist():
      done += 1
      if progress and done % 100_000 == 0:
        progress(f'read {done:,} of {stats.records_sampled:,} records')
      try:
        captions, questions, answers = _clean_texts(read(index), text_options)
      except Exception as e:  # pylint: disable=broad-except
        # One unreadable record must not stop the run; it is counted instead.
        stats.records_skipped += 1
        if not stats.first_skipped:
          stats.first_skipped = f'{formats.describe_record(part, index)}: {e}'
        continue
      texts += captions + questions + answers
      stats.captions += len(captions)
      stats.questions += len(questions)
      stats.answers += len(answers)
  return texts, stats


# The name from before VQA records were read (tests, docs/tokenizer.md).
read_captions = read_texts


@dataclasses.dataclass
class TrainReport:
  """The outcome of `train_tokenizer`."""
  spec: str
  out: str
  model_type: str
  stats: TextStats
  vocab_size: int
  tokens_per_caption: float  # mean per text read (caption, question or answer), EOS not counted
  tokens_per_word: float  # tokens / whitespace-separated words
  unk_share: float  # share of <unk> among the tokens
  examples: list[tuple[str, list[str], list[int]]]  # text, pieces, ids

  def format(self) -> str:
    s = self.stats
    skipped = f'{s.records_skipped:,}'
    if s.first_skipped:
      skipped += f' (first: {s.first_skipped})'
    # VQA lines only when the sample had VQA records: a captions-only report reads as before.
    vqa = bool(s.questions or s.answers)
    read = [f'  captions read:      {s.captions:,}']
    if vqa:
      read += [f'  questions read:     {s.questions:,}',
               f'  answers read:       {s.answers:,} (distinct per question)']
    per = '  tokens per text:   ' if vqa else '  tokens per caption:'
    lines = [
        f'Trained a {self.model_type} sentencepiece model on {self.spec!r}; '
        f'wrote {self.out}',
        f'  records sampled:    {s.records_sampled:,}',
        f'  records skipped:    {skipped}',
        *read,
        f'  vocabulary size:    {self.vocab_size:,} '
        f'(pad {PAD_ID}, eos {EOS_ID}, unk {UNK_ID})',
        f'{per} {self.tokens_per_caption:.2f} mean, EOS not '
        f'counted ({self.tokens_per_word:.2f} per word)',
        f'  <unk> share:        {100 * self.unk_share:.3f}% of tokens',
        '  examples:',
    ]
    for text, pieces, ids in self.examples:
      lines.append(f'    {text!r}')
      lines.append(f'      -> {" ".join(pieces)}')
      lines.append(f'      -> {ids}')
    return '\n'.join(lines)


def train_tokenizer(spec: str, vocab_size: int, out: str, *,
                    max_records: int = DEFAULT_MAX_RECORDS,
                    model_type: str = 'unigram', lowercase: bool = False,
                    canonicalize: bool = False,
                    character_coverage: float = DEFAULT_CHARACTER_COVERAGE,
                    seed: int = 0,
                    progress: Callable[[str], None] | None = None
                    ) -> TrainReport:
  """Trains a sentencepiece model on `spec`'s texts and writes it to `out`.

  The texts are those of `read_texts`: captions, and the questions and answers of VQA
  records.

  The model has vljax's ids (pad 0, eos 1, unk 2, no bos) and no byte
  fallback: a character outside `character_coverage` becomes <unk>, which the
  report counts, rather than several byte pieces.

  Raises:
    NoCaptionsError: the sample holds no usable caption or question.
    ConfigError: a bad spec or empty source.
    ValueError: a bad argument, or sentencepiece cannot train (e.g. the
      vocabulary is larger than the texts support).
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type={model_type!r}; choose one of {MODEL_TYPES}.')
  if vocab_size < 4:
    raise ValueError(f'vocab_size must be >= 4, got {vocab_size}.')
  options = preprocess.TextOptions(lowercase=lowercase,
                                   canonicalize=canonicalize)
  texts, stats = read_texts(spec, max_records, seed, options, progress)
  if not texts:
    detail = f' (first: {stats.first_skipped})' if stats.first_skipped else ''
    raise NoCaptionsError(
        f'No usable caption or question in {spec!r}: {stats.records_sampled:,} records '
        f'sampled, {stats.records_skipped:,} skipped{detail}.')
  if progress and len(texts) >= 100_000:  # only worth saying when it takes a while
    progress(f'training on {len(texts):,} texts')
  # The trainer shuffles its input with sentencepiece's global generator.
  spm.set_random_generator_seed(seed)
  try:
    proto = _train_sentencepiece(
        texts, model_type=model_type, vocab_size=vocab_size,
        character_coverage=character_coverage, pad_id=PAD_ID, eos_id=EOS_ID,
        unk_id=UNK_ID, bos_id=-1, byte_fallback=False,
        normalization_rule_name='nmt_nfkc', num_threads=os.cpu_count() or 1)
  except RuntimeError as e:
    # Drop sentencepiece's 'INTERNAL: file.cc(744) [check] ' prefix.
    reason = str(e).rsplit('] ', 1)[-1].strip()
    raise ValueError(
        f'sentencepiece cannot train a {vocab_size}-piece {model_type} model '
        f'on the {len(texts):,} texts of {spec!r}: {reason} Use a '
        'smaller --vocab_size or more records.') from e
  tok = Tokenizer.from_serialized(proto, name=out)
  write_atomic(out, proto)

  num_tokens = num_unk = num_words = 0
  chunk = 10_000  # encode in chunks: a million id lists at once is ~1 GB
  for start in range(0, len(texts), chunk):
    batch = texts[start:start + chunk]
    for ids in tok._sp.encode(batch, out_type=int):  # pylint: disable=protected-access
      num_tokens += len(ids)
      num_unk += sum(1 for i in ids if i == UNK_ID)
    num_words += sum(len(c.split()) for c in batch)
  examples = []
  for text in texts[:3]:
    ids = tok._sp.encode(text, out_type=int)  # pylint: disable=protected-access
    examples.append((text, [tok.id_to_piece(i) for i in ids], ids))
  return TrainReport(
      spec=spec, out=out, model_type=model_type, stats=stats,
      vocab_size=tok.vocab_size,
      tokens_per_caption=num_tokens / len(texts),
      tokens_per_word=num_tokens / max(num_words, 1),
      unk_share=num_unk / max(num_tokens, 1), examples=examples)


# ----------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m vljax.data.tokenizer',
      description='Sentencepiece tokenizers for vljax (docs/tokenizer.md).')
  commands = parser.add_subparsers(dest='command', required=True)
  train = commands.add_parser(
      'train', help="train a model on a source's captions (and VQA questions and answers)",
      description='Trains a sentencepiece model (pad 0, eos 1, unk 2) on the '
      'captions, and the questions and answers of VQA records, of a vljax source, e.g. '
      '"jsonl:/data/cc3m.jsonl" or '
      '"webdataset:/data/cc12m/{00000..01242}.tar".')
  train.add_argument('spec', help='vljax source spec (mixtures included)')
  train.add_argument('--vocab_size', type=int, required=True,
                     help='number of pieces, pad/eos/unk included')
  train.add_argument('--out', required=True, help='the .model file to write')
  train.add_argument('--max_captions', type=int, default=DEFAULT_MAX_RECORDS,
                     help='read at most this many records, chosen at random '
                     '(each gives all its captions, question and distinct answers; '
                     'default %(default)s)')
  train.add_argument('--model_type', choices=MODEL_TYPES, default='unigram')
  train.add_argument('--lowercase', action='store_true',
                     help='lowercase the texts (as config.data.lowercase)')
  train.add_argument('--canonicalize', action='store_true',
                     help='canonicalize the texts (as config.data.canonicalize)')
  train.add_argument('--character_coverage', type=float,
                     default=DEFAULT_CHARACTER_COVERAGE,
                     help='share of characters given a piece; the rarest '
                     'others become <unk> (default %(default)s)')
  train.add_argument('--seed', type=int, default=0,
                     help='seed of the record sample and of the trainer')
  return parser


def main(argv: Sequence[str]) -> int:
  """The command line; returns the exit code."""
  try:
    args = _parser().parse_args(list(argv))
  except SystemExit as e:  # --help, or a usage error argparse has printed
    return int(e.code or 0)
  progress = lambda line: print(line, file=sys.stderr, flush=True)
  try:
    report = train_tokenizer(
        args.spec, args.vocab_size, args.out, max_records=args.max_captions,
        model_type=args.model_type, lowercase=args.lowercase,
        canonicalize=args.canonicalize,
        character_coverage=args.character_coverage, seed=args.seed,
        progress=progress)
  except (ValueError, OSError) as e:  # ConfigError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(report.format())
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
