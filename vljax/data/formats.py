"""Random-access readers of the on-disk formats researchers bring.

Every reader has `__len__` and `__getitem__(index)` returning a *raw record*:

  {'key': str,              # names the record in logs (file:member, path:line)
   'image': bytes | np.ndarray | None,   # encoded bytes, or decoded uint8
   'caption': str | bytes | list[str] | None,
   'label': int,            # -1 when the source has none
   'image_id': str}         # records sharing an image share this id

Visual question answering records (jsonl with a question field, vqav2, synthetic?task=vqa)
also carry

   'question': str | bytes  # asked about the image
   'answers': list[str]     # the human answers (VQAv2: 10, repeats kept); [] when unknown
   'answer_type': str       # optional: VQAv2's 'yes/no' | 'number' | 'other'
   'question_id': int       # optional: VQAv2's id (the record's key is its str)

and may have no caption at all: a record is usable with a caption or a question. Which of
the two a decoded example has decides its task (vljax.data.pipeline).

Classification records (snli_ve, nlvr2, jsonl rows with these fields, synthetic?task=snli_ve /
nlvr2) carry instead

   'hypothesis' | 'statement': str   # the text to judge (SNLI-VE | NLVR2); no caption needed
   'image2': bytes | np.ndarray      # NLVR2: the right image of the pair
   'label': int                      # synthetic.ENTAILMENT_LABELS / NLVR2_LABELS id

Readers that can read a record's texts without its image (jsonl, csv, webdataset, vqav2 and
the synthetic source) also have `text_fields(index)`: the record's 'caption' and, where it has
them, its 'question' and 'answers', as __getitem__ would return them (`text_fields_of` takes
the same fields from a whole record). Tokenizer training reads texts that way: images are
~1000x the bytes of their texts.

Readers never decode images and never raise on a bad record once
constructed: a record that cannot be read is returned with an 'error' entry
(see `SafeSource`), and the preprocessing step skips and counts it. A reader
that finds nothing at all (a glob matching no file, an empty file) raises
`EmptySourceError` at construction, naming the path; one whose named fields
cannot exist (a CSV header without the image column, jsonl records none of
which has a caption or a question field) raises `ConfigError` naming the fields it has.
"""
from __future__ import annotations

import collections
import csv
import glob as glob_lib
import hashlib
import io
import json
import logging
import os
import re
import struct
import tarfile
import threading
from typing import Any

import numpy as np

from vljax import configlib
from vljax.configlib import ConfigError
from vljax.data import synthetic

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif')
# The fields of a raw record that hold text (see `text_fields_of`).
TEXT_FIELDS = ('caption', 'question', 'answers', 'hypothesis', 'statement')
# The text a classification record is judged by: SNLI-VE's hypothesis, NLVR2's statement.
STATEMENT_FIELDS = ('hypothesis', 'statement')


def statement_of(record: Any) -> Any:
  """The record's hypothesis or statement (raw, as the reader gave it), or None."""
  for name in STATEMENT_FIELDS:
    if record.get(name) is not None:
      return record[name]
  return None


class EmptySourceError(ConfigError):
  """A data source yields nothing at all (wrong glob, empty file)."""


class SourceFileError(RuntimeError):
  """A file the source itself consists of (a shard) cannot be opened.

  Not one record's problem: SafeSource lets it through, so the run stops with this message
  instead of silently counting every record of the shard as bad.
  """


# ----------------------------------------------------------------- paths


def expand_braces(pattern: str) -> list[str]:
  """Expands `{00000..01242}` ranges and `{a,b}` alternatives, in order."""
  match = re.search(r'\{([^{}]*)\}', pattern)
  if not match:
    return [pattern]
  head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
  span = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if span:
    lo, hi = span.group(1), span.group(2)
    width = len(lo) if lo.startswith('0') or len(lo) == len(hi) else 0
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    options = body.split(',')
  out = []
  for option in options:
    out.extend(expand_braces(head + option + tail))
  return out


def expand_paths(pattern: str) -> list[str]:
  """Files named by a brace/glob pattern; raises naming the pattern if none."""
  paths = []
  for expanded in expand_braces(os.path.expanduser(pattern)):
    if glob_lib.has_magic(expanded):
      paths.extend(sorted(glob_lib.glob(expanded)))
    elif os.path.exists(expanded):
      paths.append(expanded)
  if not paths:
    raise EmptySourceError(f'No file matches {pattern!r}.')
  return paths


# ----------------------------------------------------------------- webdataset


def _split_member(name: str) -> tuple[str, str]:
  """'dir/000001.jpg' -> ('dir/000001', 'jpg'): webdataset keys end at the first dot."""
  directory, base = os.path.split(name)
  stem, _, ext = base.partition('.')
  return os.path.join(directory, stem), ext.lower()


class WebDataset:
  """Tar shards as img2dataset writes them: KEY.jpg|png|webp + KEY.txt/KEY.json.

  Each tar is indexed once here (member name, data offset, size; only the
  headers are read); `__getitem__` then reads the members of one key by
  offset, so access is random and cheap.
  """

  def __init__(self, pattern: str, caption_key: str = 'caption',
               prefer_json: bool = False, max_open_files: int = 64,
               index_cache_dir: str | None = None):
    """Indexes the shards (or reads their cached indexes).

    Args:
      pattern: brace/glob pattern of the tar files.
      caption_key: field of KEY.json holding the caption.
      prefer_json: read the caption from KEY.json even when KEY.txt exists
        (set when the user named the json field: img2dataset writes both, and
        a named field must not be silently shadowed by the .txt).
      max_open_files: shard files held open at once (least recently used are
        closed first).
      index_cache_dir: where shard indexes are cached; default
        $VLJAX_CACHE/webdataset_index (~/.cache/vljax/...); '' = no cache.
    """
    self.pattern = pattern
    self.paths = expand_paths(pattern)
    self.caption_key = caption_key
    self.prefer_json = prefer_json
    self.max_open_files = max(1, int(max_open_files))
    # One row per key: (shard index, key, {ext: (offset, size)}).
    self._index: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
    for shard, path in enumerate(self.paths):
      groups = _cached_tar_index(path, index_cache_dir)
      self._index.extend((shard, key, exts) for key, exts in groups.items())
    if not self._index:
      raise EmptySourceError(f'No records in the tar shards {pattern!r}.')
    self._init_files()

  def _init_files(self) -> None:
    # Open shards, least recently used first, at most max_open_files of them: a pod-scale
    # source has more shards than a process may hold descriptors.
    self._files: collections.OrderedDict[int, int] = collections.OrderedDict()
    # Reads come from several threads (the pipeline's and the eval loader's); a descriptor is
    # never closed while another thread reads through it.
    self._files_lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._index)

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    # File descriptors and locks do not cross processes.
    del state['_files'], state['_files_lock']
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._init_files()

  def __del__(self) -> None:
    for fd in getattr(self, '_files', {}).values():
      try:
        os.close(fd)
      except OSError:
        pass

  def open_files(self) -> int:
    """How many shard files this reader holds open now."""
    return len(self._files)

  def _read(self, shard: int, offset: int, size: int) -> bytes:
    with self._files_lock:
      fd = self._files.get(shard)
      if fd is None:
        path = self.paths[shard]
        try:
          fd = os.open(path, os.O_RDONLY)
        except OSError as e:
          raise SourceFileError(f'Cannot open the tar shard {path} of {self.pattern!r}: '
                                f'{e}') from e
        self._files[shard] = fd
        if len(self._files) > self.max_open_files:
          _, oldest = self._files.popitem(last=False)
          os.close(oldest)
      else:
        self._files.move_to_end(shard)
      data = os.pread(fd, size, offset)
    if len(data) != size:
      raise IOError(f'truncated member ({len(data)} of {size} bytes)')
    return data

  def _caption(self, shard: int, key: str, exts: dict[str, tuple[int, int]]) -> Any:
    """KEY.txt, or the json field when there is no .txt or the spec named the field."""
    if 'json' in exts and (self.prefer_json or 'txt' not in exts):
      meta = json.loads(self._read(shard, *exts['json']))
      if not isinstance(meta, dict) or self.caption_key not in meta:
        have = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise KeyError(f'no field {self.caption_key!r} in {key}.json (it has '
                       f'{have}); name the caption field with ?caption=FIELD')
      return meta[self.caption_key]
    if 'txt' in exts:
      return self._read(shard, *exts['txt'])
    return None

  def text_fields(self, index: int) -> dict[str, Any]:
    """{'caption': the record's raw caption}, without reading its image (tokenizer training).

    Shards hold captions only: no question or answers, as in __getitem__.
    """
    return {'caption': self._caption(*self._index[index])}

  def __getitem__(self, index: int) -> dict[str, Any]:
    shard, key, exts = self._index[index]
    name = f'{os.path.basename(self.paths[shard])}:{key}'
    record = {'key': name, 'image': None, 'caption': None, 'label': -1,
              'image_id': name}
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in exts), None)
    if image_ext is None:
      raise KeyError(f'no image member (has {sorted(exts)})')
    record['image'] = self._read(shard, *exts[image_ext])
    record['caption'] = self._caption(shard, key, exts)
    if 'cls' in exts:
      record['label'] = int(self._read(shard, *exts['cls']).strip())
    return record


def _index_tar(path: str) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
  """{key: {ext: (data offset, size)}} from the tar headers, and why it stopped early if so."""
  groups: dict[str, dict[str, tuple[int, int]]] = {}
  damage = None
  try:
    with tarfile.open(path, 'r:') as tar:
      for member in tar:
        if member.isfile():
          key, ext = _split_member(member.name)
          groups.setdefault(key, {})[ext] = (member.offset_data, member.size)
  except FileNotFoundError as e:
    raise SourceFileError(f'Cannot open the tar shard {path}: {e}') from e
  except (tarfile.TarError, OSError, EOFError) as e:
    damage = f'{type(e).__name__}: {e}'
  return groups, damage


def _default_index_cache() -> str:
  return os.path.join(configlib.cache_root(), 'webdataset_index')


def _cached_tar_index(path: str, cache_dir: str | None) -> dict[str, Any]:
  """The shard's index, read from the cache when the file is unchanged (same path, size and
  modification time), else built from its headers and cached. Reading every header of a
  thousand shards at each start costs minutes; a cached index costs a JSON load.
  """
  cache_dir = _default_index_cache() if cache_dir is None else cache_dir
  cached = None
  if cache_dir:
    try:
      stat = os.stat(path)
    except OSError as e:
      raise SourceFileError(f'Cannot open the tar shard {path}: {e}') from e
    name = hashlib.sha256(f'{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}'
                          .encode()).hexdigest()[:24]
    cached = os.path.join(cache_dir, f'{name}.json')
    try:
      with open(cached) as f:
        entry = json.load(f)
      groups, damage = entry['groups'], entry['damage']
      groups = {k: {e: tuple(v) for e, v in exts.items()} for k, exts in groups.items()}
      cached = None  # found: nothing to write
    except (OSError, ValueError, KeyError, TypeError):
      groups = None
  else:
    groups = None
  if groups is None:
    groups, damage = _index_tar(path)
  if damage:
    # A truncated shard keeps the members indexed before the damage; the ones
    # cut short fail when read and are skipped.
    logging.warning('Tar shard %s is damaged (%s); using the %d keys before the damage.',
                    path, damage, len(groups))
  if cached:
    try:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f'{cached}.{os.getpid()}.tmp'
      with open(tmp, 'w') as f:
        json.dump({'path': os.path.abspath(path), 'groups': groups, 'damage': damage}, f)
      os.replace(tmp, cached)  # atomic: concurrent readers see no half-written index
    except OSError as e:  # a read-only cache only costs the next start its indexing
      logging.info('Could not cache the index of %s: %s', path, e)
  return groups


# ----------------------------------------------------------------- jsonl / csv


# How many records of a jsonl file are searched for the named fields.
_FIELD_SCAN = 100


class _TableSource:
  """Rows of (image path relative to the file, caption); shared by jsonl/csv.

  `rows` holds (line number, dict) pairs, or (line number, exception) for a
  row that could not be parsed: reading it raises, so it is skipped and
  counted like any other bad record.
  """
  # Whether rows may be classification records: a 'hypothesis' or 'statement' field, and
  # 'image2' (a second image path) for pairs (jsonl).
  classification = False

  def __init__(self, path: str, rows: list[Any], image_key: str,
               caption_key: str, label_key: str, question_key: str | None = None,
               answers_key: str | None = None):
    if not rows:
      raise EmptySourceError(f'No records in {path!r} (empty file?).')
    self.path = path
    self.root = os.path.dirname(os.path.abspath(path))
    self.rows = rows
    self.image_key, self.caption_key, self.label_key = (
        image_key, caption_key, label_key)
    # None: the format has no question/answers fields (csv).
    self.question_key, self.answers_key = question_key, answers_key

  def __len__(self) -> int:
    return len(self.rows)

  def _row(self, index: int) -> tuple[int, dict[str, Any]]:
    line, row = self.rows[index]
    if isinstance(row, Exception):
      raise row
    if not isinstance(row, dict):
      raise ValueError(f'row is {type(row).__name__}, not an object')
    return line, row

  def _texts_of_row(self, row: dict[str, Any]) -> dict[str, Any]:
    """The text fields of a row as a raw record has them; raises on unusable answers."""
    fields: dict[str, Any] = {'caption': row.get(self.caption_key)}
    for name in STATEMENT_FIELDS if self.classification else ():
      if row.get(name) is not None:
        fields[name] = row[name]
    if self.question_key is not None and self.question_key in row:
      fields['question'] = row[self.question_key]
    if self.answers_key is not None and self.answers_key in row:
      fields['answers'] = answer_list(row[self.answers_key])
    return fields

  def text_fields(self, index: int) -> dict[str, Any]:
    """The record's raw 'caption' (and 'question', 'answers' where the row has them), without
    reading its image (tokenizer training). Raises as __getitem__ would for a bad row."""
    return self._texts_of_row(self._row(index)[1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    line, row = self._row(index)
    key = f'{os.path.basename(self.path)}:{line}'
    rel = row.get(self.image_key)
    if not rel:
      raise KeyError(f'no {self.image_key!r} field')
    image_path = os.path.join(self.root, str(rel))
    with open(image_path, 'rb') as f:
      image = f.read()
    label = row.get(self.label_key)
    record = {'key': f'{key} ({rel})', 'image': image,
              'label': int(label) if label not in (None, '') else -1,
              'image_id': str(rel)}
    rel2 = row.get('image2') if self.classification else None
    if rel2:  # the second image of a pair (NLVR2 rows)
      with open(os.path.join(self.root, str(rel2)), 'rb') as f:
        record['image2'] = f.read()
    record.update(self._texts_of_row(row))
    if 'answers' in record and isinstance(row.get('answer_type'), str):
      record['answer_type'] = row['answer_type']  # VQAv2-style rows: per-type accuracy
    return record


def answer_list(answers: Any) -> list[str]:
  """A record's answers as a list of str.

  Takes a list of strings, a list of {"answer": STR, ...} objects (VQAv2's annotation layout),
  a single string (one answer) or None (no answers: []). Anything else raises ValueError,
  which makes the record a bad one.
  """
  if answers is None:
    return []
  if isinstance(answers, (str, bytes)):
    answers = [answers]
  if not isinstance(answers, (list, tuple)):
    raise ValueError(f'answers must be a list of strings or of {{"answer": ...}} objects, '
                     f'got {type(answers).__name__}')
  out = []
  for item in answers:
    if isinstance(item, dict):
      if 'answer' not in item:
        raise ValueError(f'an answer object without an "answer" field: {item!r:.80}')
      item = item['answer']
    if isinstance(item, bytes):
      item = item.decode('utf-8')
    if not isinstance(item, str):
      raise ValueError(f'an answer is {type(item).__name__}, not a string: {item!r:.80}')
    out.append(item)
  return out


def text_fields_of(record: dict[str, Any]) -> dict[str, Any]:
  """The text fields of a raw record, as `text_fields(index)` returns them.

  For readers without `text_fields`: the caller reads the whole record, this keeps its texts.
  """
  return {name: record[name] for name in TEXT_FIELDS if name in record}


def _fields_to_check(image_key: str, caption_key: str, label_key: str,
                     require_label: bool) -> list[tuple[str, str]]:
  """(spec option, field name) pairs a table source must have."""
  fields = [('image', image_key), ('caption', caption_key)]
  return fields + [('label', label_key)] if require_label else fields


def _missing_field_error(kind: str, path: str, option: str, name: str,
                         where: str, have: list[str]) -> ConfigError:
  noun = 'column' if kind == 'csv' else 'field'
  have_text = ', '.join(repr(h) for h in have) or 'none'
  return ConfigError(
      f'{path}: {where} has no {option} {noun} {name!r}; the {noun}s there '
      f'are {have_text}. Name the right one in the source spec: '
      f'{kind}:{path}?{option}={noun.upper()} (docs/data.md).')


class JsonLines(_TableSource):
  """`jsonl:PATH`: one JSON object per line, e.g. {"image": "a.jpg", "caption": "..."}.

  VQA rows carry a question and its answers instead of (or besides) a caption:
  {"image": "a.jpg", "question": "what is it?", "answers": ["a dog", ...]}; answers may also be
  VQAv2 annotation objects [{"answer": "a dog", ...}, ...] (see `answer_list`).
  Classification rows carry a 'hypothesis' (visual entailment: {"image", "hypothesis",
  "label": 0 | 1 | 2}) or a 'statement' about two images ({"image", "image2", "statement",
  "label": 0 | 1}); label ids as synthetic.ENTAILMENT_LABELS / NLVR2_LABELS.
  """
  classification = True

  def __init__(self, path: str, image_key: str = 'image',
               caption_key: str = 'caption', label_key: str = 'label',
               require_label: bool = False, question_key: str = 'question',
               answers_key: str = 'answers', named: tuple[str, ...] = ()):
    """Reads the file.

    Args:
      path: the jsonl file (a glob: its first match).
      image_key, caption_key, label_key, question_key, answers_key: the field names.
      require_label: the label field must exist (the spec named it); same as 'label' in
        `named`.
      named: the options the spec named ('caption', 'question', ...): each of those fields
        must exist. Whatever is named, the records need a caption or a question field.
    """
    path = expand_paths(path)[0]
    rows = _json_rows(path)
    super().__init__(path, rows, image_key, caption_key, label_key, question_key,
                     answers_key)
    # Records may omit a field now and then (bad records), but when none of
    # the first ones has it, the field name is wrong: every record would be
    # skipped, so say so now.
    objects = [r for _, r in rows[:_FIELD_SCAN] if isinstance(r, dict)]
    if not objects:
      return
    have = sorted({k for r in objects for k in r})
    where = f'each of the first {len(objects)} records'
    keys = {'image': image_key, 'caption': caption_key, 'label': label_key,
            'question': question_key, 'answers': answers_key}
    wanted = ['image'] + [o for o in ('caption', 'question', 'answers', 'label')
                          if o in named or (o == 'label' and require_label)]
    for option in wanted:
      if not any(keys[option] in r for r in objects):
        raise _missing_field_error('jsonl', path, option, keys[option], where, have)
    # A caption, VQA or classification record: one of the text fields must be there.
    texts = (caption_key, question_key) + STATEMENT_FIELDS
    if not any(k in r for r in objects for k in texts):
      have_text = ', '.join(repr(h) for h in have) or 'none'
      raise ConfigError(
          f'{path}: {where} has neither the caption field {caption_key!r} nor the question '
          f'field {question_key!r} (a record needs a caption or a question); the fields there '
          f'are {have_text}. Name the right one in the source spec: jsonl:{path}?caption=FIELD '
          f'or jsonl:{path}?question=FIELD (docs/data.md).')


def _image_folder(spec: str, name: str, image_dir: str, holds: str) -> str:
  """The `?images=DIR` of `spec`, expanded; ConfigError when not given, EmptySourceError when
  it does not exist (`holds`: what it should hold, for the messages)."""
  if not image_dir:
    raise ConfigError(f'{spec} needs the image folder: add ?images=DIR (the folder of '
                      f'{holds}).')
  path = os.path.expanduser(image_dir)
  if not os.path.isdir(path):
    raise EmptySourceError(f'{name} image folder {image_dir!r} does not exist (it should '
                           f'hold {holds}).')
  return path


def _json_rows(path: str) -> list[tuple[int, Any]]:
  """(line number, parsed object) of each non-blank line; a line that is not JSON keeps its
  ValueError, so it is a bad record when read, not a failure of the whole file."""
  rows = []
  with open(path, 'rb') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append((line_no, json.loads(line)))
      except ValueError as e:  # keep the row: it is counted when read
        rows.append((line_no, ValueError(f'invalid JSON line: {e}')))
  return rows


class _OfficialLines(_TableSource):
  """Json lines of a classification benchmark with its images in one folder (SNLI-VE, NLVR2).

  Subclasses name the fields every record needs (FIELDS), which of them holds the text and
  under which raw-record name (TEXT), and turn a row into the rest of a raw record
  (`_record`); the checks and the bad-record handling are shared.
  """
  KIND = ''
  FIELDS: tuple[str, ...] = ()
  TEXT = ('', '')  # (field of the file, raw-record name)
  LABEL = ''  # the field holding the label name
  LABELS: tuple[str, ...] = ()  # label names in id order
  IMAGES = ''  # what the image folder holds, for messages

  def __init__(self, path: str, image_dir: str):
    path = expand_paths(path)[0]
    super().__init__(path, _json_rows(path), '', '', '')
    self.image_dir = _image_folder(f'{self.KIND}:{path}', self.KIND, image_dir, self.IMAGES)
    objects = [r for _, r in self.rows[:_FIELD_SCAN] if isinstance(r, dict)]
    have = sorted({k for r in objects for k in r})
    for field in self.FIELDS:
      if objects and not any(field in r for r in objects):
        raise ConfigError(f'{path}: none of the first {len(objects)} records has the field '
                          f'{field!r} of the official {self.KIND} files; the fields there '
                          f'are {", ".join(map(repr, have)) or "none"} (docs/data.md).')

  def _field(self, row: dict[str, Any], name: str) -> Any:
    if row.get(name) is None:
      raise KeyError(f'no {name!r} field')
    return row[name]

  def _read(self, *parts: str) -> bytes:
    with open(os.path.join(self.image_dir, *parts), 'rb') as f:
      return f.read()

  def _texts(self, row: dict[str, Any]) -> dict[str, Any]:
    return {'caption': None, self.TEXT[1]: self._field(row, self.TEXT[0])}

  def text_fields(self, index: int) -> dict[str, Any]:
    return self._texts(self._row(index)[1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    line, row = self._row(index)
    label = str(self._field(row, self.LABEL))
    if label not in self.LABELS:
      raise ValueError(f'{self.LABEL} {label!r:.40} is not one of {", ".join(self.LABELS)}')
    record = {**self._texts(row), **self._record(row), 'label': self.LABELS.index(label)}
    record['key'] = f'{os.path.basename(self.path)}:{line} ({record["image_id"]})'
    return record


class SnliVe(_OfficialLines):
  """`snli_ve:snli_ve_{train,dev,test}.jsonl?images=DIR`: the official SNLI-VE files.

  Each line: {"Flikr30kID": "3416050480" (the Flickr30k image, with or without ".jpg"),
  "sentence2": the hypothesis, "gold_label": "entailment" | "neutral" | "contradiction",
  "pairID": ...}; DIR holds the Flickr30k images {Flikr30kID}.jpg. The label id follows
  synthetic.ENTAILMENT_LABELS (0 entailment, 1 neutral, 2 contradiction).
  """
  KIND = 'snli_ve'
  FIELDS = ('Flikr30kID', 'sentence2', 'gold_label')
  IMAGES = 'the Flickr30k images <Flikr30kID>.jpg'
  TEXT = ('sentence2', 'hypothesis')
  LABEL, LABELS = 'gold_label', synthetic.ENTAILMENT_LABELS

  def _record(self, row: dict[str, Any]) -> dict[str, Any]:
    image_id = str(self._field(row, 'Flikr30kID'))
    name = image_id if image_id.endswith('.jpg') else f'{image_id}.jpg'
    return {'image': self._read(name), 'image_id': image_id}


class Nlvr2(_OfficialLines):
  """`nlvr2:{train,dev,test1}.json?images=DIR`: the official NLVR2 json lines.

  Each line: {"identifier": "dev-850-0-0" (split-set-pair-sentence), "sentence": the
  statement, "label": "True" | "False", "directory": N (train only)}. The pair's images are
  {stem}-img0.png (left) and {stem}-img1.png (right), stem = the identifier without its last
  "-N", in DIR (train: DIR/{directory}/). Label id 1 = True (synthetic.NLVR2_LABELS).
  """
  KIND = 'nlvr2'
  FIELDS = ('identifier', 'sentence', 'label')
  IMAGES = '<identifier stem>-img0.png / -img1.png (train: in subfolders <directory>/)'
  TEXT = ('sentence', 'statement')
  LABEL, LABELS = 'label', synthetic.NLVR2_LABELS

  def _record(self, row: dict[str, Any]) -> dict[str, Any]:
    stem = str(self._field(row, 'identifier')).rsplit('-', 1)[0]
    folder = () if row.get('directory') is None else (str(row['directory']),)
    return {'image': self._read(*folder, f'{stem}-img0.png'),
            'image2': self._read(*folder, f'{stem}-img1.png'), 'image_id': stem}


class Csv(_TableSource):
  """`csv:PATH`: a header row, then one record per row (columns named by the spec).

  Parsed by the csv module (excel dialect): fields holding commas, quotes or
  newlines are double-quoted, a quote inside is doubled. A row whose field
  count differs from the header's is a bad record naming its line, not
  silently re-aligned.
  """

  def __init__(self, path: str, image_key: str = 'image',
               caption_key: str = 'caption', label_key: str = 'label',
               require_label: bool = False):
    path = expand_paths(path)[0]
    name = os.path.basename(path)
    header, rows = None, []
    # Bytes are decoded per field later; a non-UTF-8 caption must not make
    # the whole file unreadable. utf-8-sig drops the byte-order mark that
    # spreadsheet exports put before the first column name.
    with open(path, 'r', encoding='utf-8-sig', errors='surrogateescape',
              newline='') as f:
      reader = csv.reader(f)
      end = 0  # last physical line consumed so far
      while True:
        start = end + 1  # a quoted newline makes one row span several lines
        try:
          fields = next(reader)
        except StopIteration:
          break
        except csv.Error as e:
          end = reader.line_num
          rows.append((start, ValueError(f'{name} line {start}: {e}')))
          continue
        end = reader.line_num
        if not fields:  # blank line
          continue
        if header is None:
          header = fields
          continue
        if len(fields) != len(header):
          rows.append((start, ValueError(
              f'{name} line {start}: expected {len(header)} fields '
              f'({", ".join(header)}), got {len(fields)}; quote fields that '
              f'contain commas, quotes or newlines ("a, b")')))
          continue
        rows.append((start, _unescape_row(dict(zip(header, fields)))))
    if header is None:
      raise EmptySourceError(f'No records in {path!r} (empty file?).')
    for option, field in _fields_to_check(image_key, caption_key, label_key,
                                          require_label):
      if field not in header:
        raise _missing_field_error('csv', path, option, field, 'the header',
                                   header)
    if not rows:
      raise EmptySourceError(f'No records in {path!r} (only a header).')
    super().__init__(path, rows, image_key, caption_key, label_key)


def _unescape_row(row: dict[str, str]) -> dict[str, Any]:
  out = {}
  for k, v in row.items():
    if isinstance(v, str):
      try:
        v.encode('utf-8')
      except UnicodeEncodeError:
        v = v.encode('utf-8', 'surrogateescape')  # bytes: rejected later
    out[k] = v
  return out


# ----------------------------------------------------------------- vqav2

# Image folder (and file-name part) of each VQAv2 questions subtype: test-dev2015 is a subset
# of test2015, whose images are named COCO_test2015_*.jpg (visualqa.org download layout).
_VQAV2_IMAGE_SUBTYPES = {'test-dev2015': 'test2015'}
_VQAV2_NAME = re.compile(r'OpenEnded_mscoco_(.+?)_questions\.json$')


def _load_json(path: str, what: str) -> Any:
  try:
    with open(path, 'rb') as f:
      return json.load(f)
  except ValueError as e:
    raise ConfigError(f'{path} is not valid JSON ({e}); it should be a VQAv2 {what} file '
                      f'(docs/data.md).') from e


class VQAv2:
  """`vqav2:QUESTIONS_JSON?annotations=ANNOTATIONS_JSON&images=IMAGE_DIR`: the official files.

  QUESTIONS_JSON is v2_OpenEnded_mscoco_<subtype>_questions.json ({"data_subtype": ...,
  "questions": [{"image_id", "question", "question_id"}, ...]}); ANNOTATIONS_JSON is
  v2_mscoco_<subtype>_annotations.json ({"annotations": [{"question_id", "answers": [{"answer",
  ...}, ...], "answer_type", ...}, ...]}); IMAGE_DIR holds the COCO images of that subtype,
  COCO_<subtype>_<image_id, 12 digits>.jpg (test-dev2015 questions: COCO_test2015_...).

  One record per question, keyed by its question_id. Without annotations (the test
  questions) every record has answers [] and `has_answers` is False: fit for prediction only.
  Questions and annotations are held in memory as compact tuples (an image is read only when
  its record is).
  """

  def __init__(self, questions_path: str, annotations_path: str = '', image_dir: str = ''):
    """Reads the question (and annotation) files.

    Raises:
      EmptySourceError: no such questions file, or it holds no question.
      ConfigError: a file that is not the VQAv2 layout (naming what it holds), no image
        folder, or annotations that do not belong to the questions.
    """
    self.path = expand_paths(questions_path)[0]
    data = _load_json(self.path, 'questions')
    if not isinstance(data, dict) or not isinstance(data.get('questions'), list):
      have = sorted(data) if isinstance(data, dict) else type(data).__name__
      hint = (' It looks like an annotations file: give the questions file as the path and '
              'this one as ?annotations=' if isinstance(data, dict) and 'annotations' in data
              else '')
      raise ConfigError(f'{self.path} is not a VQAv2 questions file: it should hold '
                        f'{{"questions": [...]}}, it has {have}.{hint} (docs/data.md)')
    if not data['questions']:
      raise EmptySourceError(f'No questions in {self.path!r}.')
    name_match = _VQAV2_NAME.search(os.path.basename(self.path))
    subtype = data.get('data_subtype') or (name_match.group(1) if name_match else '')
    if not subtype:
      raise ConfigError(f'{self.path} has no "data_subtype" (e.g. "val2014"), so the image '
                        f'file names COCO_<subtype>_<id>.jpg are unknown; keep the official '
                        f'file name v2_OpenEnded_mscoco_<subtype>_questions.json.')
    self.data_subtype = str(subtype)
    self.image_subtype = _VQAV2_IMAGE_SUBTYPES.get(self.data_subtype, self.data_subtype)
    self.image_dir = _image_folder(f'vqav2:{questions_path}', 'VQAv2', image_dir,
                                   f'COCO_{self.image_subtype}_*.jpg')
    # (question_id, image_id, question); a malformed entry keeps its Nones and is a bad
    # record when read.
    self._questions = [
        (q.get('question_id'), q.get('image_id'), q.get('question'))
        if isinstance(q, dict) else (None, None, None) for q in data['questions']]
    del data
    self.has_answers = bool(annotations_path)
    # question_id -> (answers, answer_type).
    self._annotations: dict[Any, tuple[tuple[str, ...], str]] = {}
    if annotations_path:
      self._read_annotations(expand_paths(annotations_path)[0])

  def _read_annotations(self, path: str) -> None:
    data = _load_json(path, 'annotations')
    if not isinstance(data, dict) or not isinstance(data.get('annotations'), list):
      have = sorted(data) if isinstance(data, dict) else type(data).__name__
      raise ConfigError(f'{path} is not a VQAv2 annotations file: it should hold '
                        f'{{"annotations": [...]}}, it has {have} (docs/data.md).')
    subtype = data.get('data_subtype')
    if subtype and subtype != self.data_subtype:
      raise ConfigError(f'The annotations {path} are for {subtype!r} but the questions '
                        f'{self.path} for {self.data_subtype!r}; give the matching '
                        f'?annotations= file.')
    # ~4M answers in train2014, mostly repeats ('yes', '2'): one str object per distinct one.
    distinct: dict[str, str] = {}
    for entry in data['annotations']:
      if not isinstance(entry, dict) or 'question_id' not in entry:
        continue
      try:
        answers = tuple(distinct.setdefault(a, a) for a in answer_list(entry.get('answers')))
      except ValueError:
        answers = ()  # an unusable annotation: the question counts as one without answers
      answer_type = entry.get('answer_type')
      self._annotations[entry['question_id']] = (
          answers, distinct.setdefault(answer_type, answer_type)
          if isinstance(answer_type, str) else '')
    if not any(qid in self._annotations for qid, _, _ in self._questions[:1000]):
      raise ConfigError(f'None of the questions of {self.path} has an annotation in {path} '
                        f'(no question_id in common); give the annotations of the same '
                        f'subtype as ?annotations=.')

  def __len__(self) -> int:
    return len(self._questions)

  def __repr__(self) -> str:
    return f'VQAv2({self.path!r}, {len(self)} questions, answers={self.has_answers})'

  def image_path(self, image_id: int) -> str:
    """Where the image of `image_id` is: IMAGE_DIR/COCO_<subtype>_<12-digit id>.jpg."""
    return os.path.join(self.image_dir,
                        f'COCO_{self.image_subtype}_{int(image_id):012d}.jpg')

  def _question(self, index: int) -> tuple[Any, Any, str]:
    """(question_id, image_id, question) of a well-formed entry; raises KeyError otherwise."""
    question_id, image_id, question = self._questions[index]
    if question_id is None or image_id is None or not isinstance(question, str):
      raise KeyError('question entry without question_id, image_id or question')
    return question_id, image_id, question

  def text_fields(self, index: int) -> dict[str, Any]:
    """{'caption': None, 'question', 'answers'} of the record, without reading its image
    (tokenizer training); raises as __getitem__ would for a malformed question entry."""
    question_id, _, question = self._question(index)
    answers, _ = self._annotations.get(question_id, ((), ''))
    return {'caption': None, 'question': question, 'answers': list(answers)}

  def __getitem__(self, index: int) -> dict[str, Any]:
    question_id, image_id, question = self._question(index)
    answers, answer_type = self._annotations.get(question_id, ((), ''))
    with open(self.image_path(image_id), 'rb') as f:
      image = f.read()
    return {'key': str(question_id), 'image': image, 'caption': None, 'label': -1,
            'image_id': str(image_id), 'question': question, 'answers': list(answers),
            'answer_type': answer_type, 'question_id': int(question_id)}


# ----------------------------------------------------------------- arrayrecord

_MAGIC = b'VLJ1'
_VQA_FIELDS = ('question', 'answers', 'answer_type', 'question_id')


def serialize(record: dict[str, Any]) -> bytes:
  """A raw record (image as encoded bytes) -> bytes for ArrayRecord.

  Layout: b'VLJ1', uint32 header length, JSON header {key, caption, label,
  image_id, and question, answers, answer_type, question_id where the record has
  them}, then the encoded image bytes.
  """
  image = record['image']
  if not isinstance(image, (bytes, bytearray)):
    raise TypeError('serialize expects encoded image bytes')
  caption = record.get('caption')
  if isinstance(caption, bytes):
    caption = caption.decode('utf-8')
  fields = {'key': record['key'], 'caption': caption,
            'label': int(record.get('label', -1)),
            'image_id': record.get('image_id', record['key'])}
  # VQA fields only where the record has them: caption records serialise as before.
  for name in _VQA_FIELDS:
    if record.get(name) is not None:
      value = record[name]
      if name == 'question' and isinstance(value, bytes):
        value = value.decode('utf-8')
      elif name == 'answers':
        value = answer_list(value)
      elif name == 'question_id':
        value = int(value)
      fields[name] = value
  header = json.dumps(fields).encode('utf-8')
  return _MAGIC + struct.pack('<I', len(header)) + header + bytes(image)


def deserialize(data: bytes) -> dict[str, Any]:
  """Inverse of `serialize`."""
  if data[:4] != _MAGIC:
    raise ValueError('not a vljax ArrayRecord example')
  (n,) = struct.unpack('<I', data[4:8])
  header = json.loads(data[8:8 + n])
  header['image'] = data[8 + n:]
  return header


class ArrayRecord:
  """`arrayrecord:GLOB`: shards written by `python -m vljax.data.convert`."""

  def __init__(self, pattern: str):
    import grain  # pylint: disable=g-import-not-at-top
    self.pattern = pattern
    self.paths = expand_paths(pattern)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    if len(self._source) == 0:
      raise EmptySourceError(f'No records in the ArrayRecord files {pattern!r}.')

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return deserialize(self._source[index])


# ----------------------------------------------------------------- tfds


class Tfds:
  """`tfds:NAME[:split]` through `tfds.data_source` (random access, no TF runtime).

  Text features may be a string or a sequence of strings (e.g. COCO's
  'captions/text'); nested keys are written with '/'.
  """

  def __init__(self, name: str, split: str, image_key: str = 'image',
               text_key: str = 'caption', label_key: str = 'label',
               data_dir: str | None = None, data_source: Any = None,
               required: tuple[str, ...] = ()):
    """Opens the split.

    Args:
      name, split: the TFDS dataset and split.
      image_key, text_key, label_key: feature names ('/' for nested).
      data_dir: where the prepared dataset lives (None: TFDS's default).
      data_source: an already opened random-access source (tests).
      required: feature keys besides `image_key` that must exist (those the
        user named: a classification dataset has no caption, but a caption
        feature named in the spec must be there).
    """
    self.name, self.split = name, split
    self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
    if data_source is None:
      try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        data_source = tfds.data_source(name, split=split, data_dir=data_dir)
      except ImportError as e:
        raise ConfigError(f'tfds:{name} needs tensorflow_datasets ({e}); '
                          f'install it (pip install -e .[tfds]).') from e
      except Exception as e:  # pylint: disable=broad-except
        # Not registered / not prepared / no such split raise assorted types.
        # TFDS appends the list of every registered dataset: keep the gist.
        where = data_dir or '$TFDS_DATA_DIR or the TFDS default directory'
        gist = (str(e).strip().splitlines() or [''])[0][:300]
        raise ConfigError(
            f'TFDS dataset {name!r} split {split!r} cannot be opened from '
            f'{where} ({type(e).__name__}: {gist}); prepare it with '
            f'`tfds build {name}` or set config.data.tfds_data_dir.') from e
    self._source = data_source
    if len(self._source) == 0:
      raise EmptySourceError(f'TFDS dataset {name!r} split {split!r} is empty.')
    self._check_features((image_key,) + tuple(required))

  def _check_features(self, keys: tuple[str, ...]) -> None:
    """Named features missing from the first example are a config error."""
    try:
      first = self._source[0]
    except Exception:  # pylint: disable=broad-except
      return  # an unreadable first example is a bad record, found later
    for key in keys:
      if _nested(first, key) is None:
        raise ConfigError(
            f'TFDS dataset {self.name!r} has no feature {key!r}; its features '
            f'are {", ".join(_feature_paths(first))}. Name the right one in '
            f'the source spec, e.g. tfds:{self.name}?caption=FEATURE '
            f'(docs/data.md).')

  def label_names(self) -> list[str] | None:
    """Class names of the label feature, if it is a ClassLabel."""
    info = getattr(self._source, 'dataset_info', None)
    try:
      feature = info.features[self.label_key]
    except (AttributeError, KeyError, TypeError):
      return None
    return list(feature.names) if hasattr(feature, 'names') else None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._source[index]
    caption = _nested(ex, self.text_key)
    if isinstance(caption, np.ndarray):
      caption = [c.decode('utf-8') if isinstance(c, bytes) else str(c)
                 for c in caption.tolist()]
    label = _nested(ex, self.label_key)
    return {'key': f'{self.name}/{self.split}[{index}]',
            'image': _nested(ex, self.image_key, required=True),
            'caption': caption,
            'label': int(label) if label is not None else -1,
            'image_id': f'{self.name}[{index}]'}


def _feature_paths(ex: Any, prefix: str = '') -> list[str]:
  """'/'-joined keys of a nested example, e.g. ['captions/text', 'image']."""
  if not isinstance(ex, dict):
    return [prefix]
  out = []
  for k in sorted(ex):
    out.extend(_feature_paths(ex[k], f'{prefix}{k}/') if isinstance(
        ex[k], dict) else [f'{prefix}{k}'])
  return out


def _nested(ex: dict[str, Any], key: str, required: bool = False) -> Any:
  node: Any = ex
  for part in key.split('/'):
    if not isinstance(node, dict) or part not in node:
      if required:
        raise KeyError(f'no feature {key!r}')
      return None
    node = node[part]
  return node


# ----------------------------------------------------------------- imagefolder


class ImageFolder:
  """`imagefolder:DIR`: DIR/CLASS_NAME/*.jpg; labels in sorted folder order."""

  def __init__(self, root: str):
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
      raise EmptySourceError(f'Image folder {root!r} does not exist.')
    self.root = root
    self.class_names = sorted(d for d in os.listdir(root)
                              if os.path.isdir(os.path.join(root, d)))
    self.files = []
    for label, name in enumerate(self.class_names):
      for f in sorted(os.listdir(os.path.join(root, name))):
        if f.rpartition('.')[2].lower() in IMAGE_EXTENSIONS:
          self.files.append((os.path.join(name, f), label))
    if not self.files:
      raise EmptySourceError(f'No images in class folders under {root!r}.')

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rel, label = self.files[index]
    with open(os.path.join(self.root, rel), 'rb') as f:
      image = f.read()
    return {'key': rel, 'image': image, 'label': label,
            'caption': self.class_names[label].replace('_', ' '),
            'image_id': rel}


# ----------------------------------------------------------------- safety


class SafeSource:
  """Wraps a reader: an exception while reading becomes an error record."""

  def __init__(self, source: Any):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f'SafeSource({self.source!r})'

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      record = self.source[index]
    except SourceFileError:
      raise  # the source itself is broken: the run must stop, not skip every record
    except Exception as e:  # pylint: disable=broad-except
      # Any failure to read one record is that record's problem, not the run's.
      return {'key': describe_record(self.source, index), 'image': None,
              'caption': None, 'label': -1, 'image_id': str(index),
              'error': f'{type(e).__name__}: {e}'}
    record.setdefault('key', str(index))
    record.setdefault('label', -1)
    record.setdefault('image_id', record['key'])
    return record


def describe_record(source: Any, index: int) -> str:
  """How logs name record `index` of `source` (shard:key, file:line); never raises."""
  try:
    if isinstance(source, WebDataset):
      shard, key, _ = source._index[index]  # pylint: disable=protected-access
      return f'{os.path.basename(source.paths[shard])}:{key}'
    if isinstance(source, _TableSource):
      return f'{os.path.basename(source.path)}:{source.rows[index][0]}'
    if isinstance(source, VQAv2):
      return str(source._questions[index][0])  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    pass
  return f'{type(source).__name__}[{index}]'


def encode_image(image: np.ndarray, fmt: str = 'PNG') -> bytes:
  """uint8 array -> encoded bytes (used by the converter for decoded sources)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()
