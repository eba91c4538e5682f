"""Grain input pipelines: random-access image-text sources to numpy batches.

Training: global shuffle by seed (a fresh permutation each epoch; a weighted
interleave of per-source streams for a mixture), repeat, per-example
decoding and preprocessing (optionally in worker processes), a disjoint
slice per process, then skipping of unusable records and batching with
tokenised captions. The result is a `grain.DatasetIterator` whose small,
JSON-serialisable state resumes it exactly.

Evaluation: every usable example of a (held-out) source, or of a chosen
list of its records, in order, as one dict of numpy arrays; records are
decoded by a thread pool and images can stay uint8 until they are embedded.

A source is anything with `__len__` and `__getitem__(index)` returning a raw
record (vljax.data.formats): 'image' (encoded bytes, or uint8 [H, W, 3] /
[H, W]), 'caption' (str, bytes or a list of them) and optionally 'label'
(int; -1 when absent) and 'key' (names the record in logs). Classification records
(SNLI-VE, NLVR2) carry a 'hypothesis' or 'statement' to judge (it becomes the decoded
example's 'statement'; the caption is then optional), and NLVR2's a second image 'image2',
decoded with the same options into 'image2' / 'brightness2'.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from vljax.data import formats
from vljax.data import mixture as mixture_lib
from vljax.data import preprocess
from vljax.data import tokenizer as tokenizer_lib

# Augmentation keys understood by `augment` (see preprocess.ImageOptions).
# Horizontal flips are off unless asked for, because they contradict
# "left"/"right" in captions.
_AUGMENT_DEFAULTS: dict[str, Any] = {
    'inception_crop': False,  # random resized crop, area in [crop_scale, 1].
    'crop_scale': 1.0,  # min area fraction of a random crop; 1.0 = off.
    'crop_ratio': (3 / 4, 4 / 3),  # aspect range of the inception crop.
    'hflip': False,
    'brightness': 0.0,  # max additive brightness change, in [-1, 1] units.
}

# Sample keys of bad records carried per batch (for the trainer's log line).
_MAX_KEYS_PER_BATCH = 4
# A stream that yields this many bad records in a row is broken, not noisy:
# fail loudly instead of spinning forever.
_MAX_CONSECUTIVE_BAD = 10_000


def _check_source(source: Any) -> int:
  n = len(source)
  if n == 0:
    raise ValueError(f'Data source {source!r} is empty (len 0).')
  return n


def _parse_augment(augment: Mapping[str, Any] | None) -> dict[str, Any]:
  options = dict(_AUGMENT_DEFAULTS)
  if augment:
    unknown = set(augment) - set(_AUGMENT_DEFAULTS)
    if unknown:
      raise ValueError(
          f'Unknown augment option(s) {sorted(unknown)}; known: '
          f'{sorted(_AUGMENT_DEFAULTS)}.')
    options.update(augment)
  if not 0.0 < float(options['crop_scale']) <= 1.0:
    raise ValueError(
        f'augment.crop_scale must be in (0, 1], got {options["crop_scale"]}.')
  return options


def _image_options(image_size: int, augment: Mapping[str, Any] | None,
                   image_options: preprocess.ImageOptions | None
                   ) -> preprocess.ImageOptions:
  """Explicit ImageOptions win; otherwise the legacy (size, augment) pair."""
  if image_options is not None:
    return dataclasses.replace(image_options, size=image_size)
  opts = _parse_augment(augment)
  return preprocess.ImageOptions(
      size=image_size, inception_crop=bool(opts['inception_crop']),
      crop_scale=float(opts['crop_scale']),
      crop_ratio=tuple(opts['crop_ratio']), hflip=bool(opts['hflip']),
      brightness=float(opts['brightness']))


def preprocess_image(image: Any, image_size: int,
                     rng: np.random.Generator | None = None,
                     augment: Mapping[str, Any] | None = None) -> np.ndarray:
  """uint8 image (or encoded bytes) -> float32 [image_size, image_size, 3] in [-1, 1].

  Args:
    image: uint8 [H, W, 3] (grey [H, W] and RGBA are converted), or bytes.
    image_size: output side.
    rng: randomness for augmentation; required if any augmentation is on.
    augment: options as in `_AUGMENT_DEFAULTS`; None means none.
  """
  opts = _image_options(image_size, augment, None)
  return preprocess.process_image(preprocess.decode_image(image), opts, rng)


class _Preprocess(grain.transforms.MapWithIndex):
  """Per-example preprocessing; randomness is a function of (seed, index).

  A record that cannot be used becomes {'_bad': reason, '_key': key}; the
  batcher skips and counts it.
  """

  def __init__(self, image_options: preprocess.ImageOptions,
               text_options: preprocess.TextOptions, seed: int,
               train: bool = True):
    self._image = image_options
    self._text = text_options
    self._seed = seed
    self._train = train

  def map_with_index(self, index: int, element: Mapping[str, Any]
                     ) -> dict[str, Any]:
    # `index` is the position in the global shuffled+repeated stream, so the
    # augmentation of an example does not depend on process count or resume.
    key = str(element.get('key', index))
    try:
      if 'error' in element:
        raise preprocess.BadRecord(element['error'])
      rng = (np.random.default_rng([self._seed, index, 0x5EED])
             if self._image.random else None)
      caption_rng = (np.random.default_rng([self._seed, index, 0xCA7])
                     if self._train else None)
      texts = self._texts(element, caption_rng)
      # Decoding JPEGs at a reduced DCT scale is several times faster; only
      # safe when no random crop wants the full resolution.
      draft = None if self._image.random else self._image.size
      image = preprocess.decode_image(element.get('image'), draft)
      pixels, delta = preprocess.augment_image(image, self._image, rng)
      # uint8 pixels: normalisation happens per batch in `_collate`.
      example = {'image': pixels, 'brightness': delta, **texts,
                 'label': np.int32(element.get('label', -1))}
      if element.get('image2') is not None:
        # The second image of a pair: the same options, its own augmentation stream.
        rng2 = (np.random.default_rng([self._seed, index, 0x5EED2])
                if self._image.random else None)
        example['image2'], example['brightness2'] = preprocess.augment_image(
            preprocess.decode_image(element['image2'], draft), self._image, rng2)
      return example
    except Exception as e:  # pylint: disable=broad-except
      # One unusable record must never stop the run.
      reason = str(e) if isinstance(e, preprocess.BadRecord) else (
          f'{type(e).__name__}: {e}')
      return {'_bad': reason, '_key': key}

  def _texts(self, element: Mapping[str, Any], caption_rng: np.random.Generator | None
             ) -> dict[str, Any]:
    """{'caption'} of a caption record; {'caption', 'question', 'answers'} of a VQA one;
    {'caption', 'statement'} of a classification one.

    A usable question makes the example a VQA example (its caption, if any, is kept, else
    ''); the answers are cleaned like captions, and in training a question needs at least
    one. A record with a statement (formats.statement_of) needs it usable and nothing else.
    Otherwise the caption must be usable. Raises BadRecord with the reason.
    """
    statement = formats.statement_of(element)
    if statement is not None:
      found = preprocess.captions_list(
          preprocess.pick_caption(element.get('caption'), caption_rng), self._text)
      return {'caption': found[0] if found else '',
              'statement': preprocess.clean_caption(statement, self._text)}
    question = element.get('question')
    if question is not None:
      try:
        question = preprocess.clean_caption(question, self._text)
      except preprocess.BadRecord:
        question = None
    try:
      caption = preprocess.clean_caption(
          preprocess.pick_caption(element.get('caption'), caption_rng), self._text)
    except preprocess.BadRecord as e:
      if question is None:
        if element.get('question') is not None:
          raise preprocess.BadRecord(
              f'no usable caption or question (question '
              f'{element.get("question")!r:.60})') from e
        raise
      caption = ''
    if question is None:
      return {'caption': caption}
    answers = preprocess.captions_list(formats.answer_list(element.get('answers')),
                                       self._text)
    if self._train and not answers:
      raise preprocess.BadRecord(f'the question {question!r:.60} has no answers')
    return {'caption': caption, 'question': question, 'answers': answers}


def caption_fields(elements: Sequence[Mapping[str, Any]],
                   tokenizer: tokenizer_lib.Tokenizer, max_len: int
                   ) -> dict[str, np.ndarray]:
  """The non-image batch fields of the caption families (two towers, CoCa).

  'text': int32 [B, max_len] caption tokens; 'label': int32 [B] (-1 = none).
  """
  return {
      'text': tokenizer.encode([e['caption'] for e in elements], max_len),
      'label': np.asarray([e['label'] for e in elements], dtype=np.int32),
  }


def _collate(elements: Sequence[Mapping[str, Any]],
             fields_fn: Callable[[Sequence[Mapping[str, Any]]], dict[str, np.ndarray]],
             image_options: preprocess.ImageOptions,
             normalize: bool = True) -> dict[str, np.ndarray]:
  """Stacks the examples' images and adds `fields_fn(elements)` (the objective's text fields).

  normalize=True gives float32 model inputs; False keeps the uint8 pixels and adds each
  example's brightness delta ('brightness', float32 [B]) for normalisation on the device
  (a quarter of the bytes to transfer).
  """
  batch = dict(fields_fn(elements))
  # Pairs (NLVR2) add 'image2' / 'brightness2' alike.
  for image, brightness in (('image', 'brightness'), ('image2', 'brightness2')):
    have = sum(image in e for e in elements)
    if not have:
      continue
    if have < len(elements):
      raise ValueError(f'A batch mixes {have} records with {image!r} and '
                       f'{len(elements) - have} without: a source of image pairs (NLVR2) needs '
                       f'both images in every record.')
    pixels = np.stack([e[image] for e in elements])
    delta = np.asarray([e[brightness] for e in elements], np.float32)
    if normalize:
      batch[image] = preprocess.normalize(pixels, image_options, delta)
    else:
      batch[image], batch[brightness] = pixels, delta
  return batch


class _SkipBadAndBatch(grain.IterDataset):
  """Batches good examples, skipping bad ones; each batch counts its skips.

  Batches get '_skipped' (int: records skipped since the previous batch) and
  '_skipped_keys' (a few 'key: reason' strings). The count travels inside
  the batch because grain worker processes cannot share counters.
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int,
               batch_fn: Callable[[list[Any]], dict[str, Any]]):
    super().__init__(parent)
    self._batch_size = batch_size
    self._batch_fn = batch_fn

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipBadAndBatchIterator(self._parent.__iter__(), self._batch_size,
                                    self._batch_fn)

  def __str__(self) -> str:
    return f'SkipBadAndBatch(batch_size={self._batch_size})'


class _SkipBadAndBatchIterator(grain.DatasetIterator):
  """Iterator of `_SkipBadAndBatch`; its state is its parent's.

  It holds nothing between batches, so the parent's position after a batch
  is the whole state.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int,
               batch_fn: Callable[[list[Any]], dict[str, Any]]):
    super().__init__(parent)
    self._batch_size = batch_size
    self._batch_fn = batch_fn
    self._bad_seen = 0  # for rate-limited logging only

  def __next__(self) -> dict[str, Any]:
    good, skipped, keys, in_a_row = [], 0, [], 0
    while len(good) < self._batch_size:
      element = next(self._parent)  # StopIteration drops a partial batch
      if '_bad' not in element:
        good.append(element)
        in_a_row = 0
        continue
      skipped += 1
      in_a_row += 1
      self._bad_seen += 1
      note = f'{element["_key"]}: {element["_bad"]}'
      if len(keys) < _MAX_KEYS_PER_BATCH:
        keys.append(note)
      if self._bad_seen <= 10 or self._bad_seen % 1000 == 0:
        logging.warning('Skipped bad record #%d of this reader: %s',
                        self._bad_seen, note)
      if in_a_row >= _MAX_CONSECUTIVE_BAD:
        raise RuntimeError(
            f'{in_a_row} bad records in a row; the data is unusable. Last: '
            f'{note}')
    batch = self._batch_fn(good)
    batch['_skipped'] = np.int64(skipped)
    batch['_skipped_keys'] = keys
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def _ensure_absl_flags_parsed() -> None:
  # grain 0.2.18's worker processes read an absl flag and fail with
  # UnparsedFlagAccessError in programs that never parse flags (tests,
  # notebooks); google/grain#1355, fixed upstream in #1362. Under absl.app the
  # flags are already parsed and this does nothing.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _element_stream(source: Any, seed: int, num_epochs: int | None
                    ) -> grain.MapDataset:
  """Raw records in global shuffled order (endless unless num_epochs)."""
  if isinstance(source, mixture_lib.Mixture):
    if num_epochs is not None:
      raise ValueError('A mixture is endless; use num_epochs=None.')
    # Each component reshuffles every epoch with its own seed; mix() then
    # interleaves them in proportion to the weights, deterministically.
    parts = [grain.MapDataset.source(formats.SafeSource(c))
             .shuffle(seed=seed + 7919 * k).repeat(None)
             for k, c in enumerate(source.components)]
    return grain.MapDataset.mix(parts, source.weights)
  ds = grain.MapDataset.source(formats.SafeSource(source)).shuffle(seed=seed)
  # The shuffle draws a new permutation for every epoch of indices it sees,
  # so repeating after it reshuffles each epoch.
  return ds.repeat(num_epochs)


def make_train_dataset(source: Any, tokenizer: tokenizer_lib.Tokenizer, *,
                       batch_size: int, image_size: int, max_len: int,
                       seed: int, process_index: int = 0,
                       process_count: int = 1, num_epochs: int | None = None,
                       augment: Mapping[str, Any] | None = None,
                       image_options: preprocess.ImageOptions | None = None,
                       text_options: preprocess.TextOptions | None = None,
                       worker_count: int = 0,
                       normalize: bool = True,
                       fields_fn: Callable[[Sequence[Mapping[str, Any]]],
                                           dict[str, np.ndarray]] | None = None
                       ) -> grain.IterDataset:
  """The training pipeline as a `grain.IterDataset` of per-process batches.

  See `make_train_iterator` for the arguments.
  """
  if isinstance(source, mixture_lib.Mixture):
    n = sum(_check_source(c) for c in source.components)
  else:
    n = _check_source(source)
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  image_opts = _image_options(image_size, augment, image_options)
  text_opts = text_options or preprocess.TextOptions()
  # In-process, a few threads overlap decoding with the train step; with
  # worker processes each worker reads with one thread.
  num_threads = 1 if worker_count > 0 else 2

  ds = _element_stream(source, seed, num_epochs)
  ds = ds.map_with_index(_Preprocess(image_opts, text_opts, seed))
  if num_epochs is not None:
    # Drop the tail that would not fill a global batch, so every process
    # produces the same number of batches (otherwise one host would wait on
    # a collective forever at the end). Bad records can still make one
    # process end a batch early; see docs/data.md.
    global_batch = batch_size * process_count
    ds = ds[:len(ds) - len(ds) % global_batch]
    if len(ds) == 0:
      raise ValueError(
          f'{num_epochs} epoch(s) of {source!r} ({n} examples) do not fill '
          f'one global batch of {global_batch}.')
  ds = ds[process_index::process_count]
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(2, 2 * batch_size)))
  if worker_count > 0:
    # Workers decode and augment single examples (worker w takes elements
    # w::worker_count and grain re-interleaves them in order); skipping and
    # batching stay here, so batches do not depend on the worker count.
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count,
        per_worker_buffer_size=min(max(2, batch_size), 128)))
  if fields_fn is None:
    fields_fn = functools.partial(caption_fields, tokenizer=tokenizer,
                                  max_len=max_len)
  return _SkipBadAndBatch(
      it_ds, batch_size,
      functools.partial(_collate, fields_fn=fields_fn,
                        image_options=image_opts, normalize=normalize))


def make_train_iterator(source: Any, tokenizer: tokenizer_lib.Tokenizer, *,
                        batch_size: int, image_size: int, max_len: int,
                        seed: int, process_index: int = 0,
                        process_count: int = 1,
                        num_epochs: int | None = None,
                        augment: Mapping[str, Any] | None = None,
                        worker_count: int = 0,
                        image_options: preprocess.ImageOptions | None = None,
                        text_options: preprocess.TextOptions | None = None,
                        normalize: bool = True,
                        fields_fn: Callable[[Sequence[Mapping[str, Any]]],
                                            dict[str, np.ndarray]] | None = None,
                        ) -> grain.DatasetIterator:
  """A checkpointable iterator over this process's training batches.

  Batches are {'image': float32 [b, H, W, 3], 'text': int32 [b, max_len],
  'label': int32 [b], '_skipped': int (bad records skipped since the last
  batch), '_skipped_keys': list of 'key: reason' (a sample)}. Keys starting
  with '_' are data-only: the trainer strips them before the step.
  Processes read disjoint slices of the same global shuffled stream.

  Args:
    source: random-access source (`__len__`, `__getitem__` returning a raw
      record, see vljax.data.formats) or a `mixture.Mixture`.
    tokenizer: tokenises captions.
    batch_size: per-process batch size.
    image_size: output image side; images of another size are resized.
    max_len: token length of 'text' (EOS included).
    seed: shuffle and augmentation seed.
    process_index: this process's index.
    process_count: number of processes reading the data.
    num_epochs: passes over the source; None repeats forever.
    augment: legacy augmentation options (see `_AUGMENT_DEFAULTS`); ignored
      when `image_options` is given.
    worker_count: >0 decodes and preprocesses in that many grain worker
      processes; the batches are the same for any worker count.
    image_options: resize mode, augmentation, normalisation.
    text_options: caption lowercasing / canonicalisation.
    normalize: False keeps 'image' as uint8 pixels and adds 'brightness'
      (float32 [b]) for normalisation on the device (what the trainer does).
    fields_fn: examples -> the batch's non-image fields (an objective's
      `batch_fields_from_examples`); None = `caption_fields` ('text', 'label').
      It runs here, off the training thread, on the decoded examples
      ({'caption', 'label', and 'question'/'answers' where the record has them}).

  Returns:
    A `grain.DatasetIterator`; `get_state()` is a small JSON-serialisable
    dict and `set_state(state)` on a fresh iterator (same arguments,
    worker_count included) resumes exactly.

  Raises:
    ValueError: the source is empty, or the arguments are inconsistent.
  """
  kwargs = dict(
      batch_size=batch_size, image_size=image_size, max_len=max_len,
      seed=seed, process_index=process_index, process_count=process_count,
      num_epochs=num_epochs, augment=augment, image_options=image_options,
      text_options=text_options)
  return iter(make_train_dataset(source, tokenizer, worker_count=worker_count,
                                normalize=normalize, fields_fn=fields_fn,
                                **kwargs))


# Records decoded concurrently per window while loading an eval set: bounds
# the encoded bytes held at once (a window of ImageNet JPEGs is a few MB)
# while keeping every thread busy.
_EVAL_WINDOW_PER_THREAD = 16
# Individually logged bad eval records per set; the rest are only counted.
_EVAL_BAD_LOGGED = 10


def _default_decode_threads() -> int:
  # PIL releases the GIL while decoding and resizing: threads scale with cores.
  return max(1, min(16, os.cpu_count() or 1))


@dataclasses.dataclass
class _EvalExample:
  """One decoded eval record, or why it cannot be used (`error` set).

  `question` is '' and `answers` [] for records without them.
  """
  key: str
  pixels: np.ndarray | None = None
  label: int = -1
  captions: list[str] | None = None
  image_id: str = ''
  question: str = ''
  answers: list[str] = dataclasses.field(default_factory=list)
  answer_type: str = ''
  statement: str = ''
  pixels2: np.ndarray | None = None
  error: str | None = None


def _read_eval_example(safe: formats.SafeSource, index: int,
                       image_opts: preprocess.ImageOptions,
                       text_opts: preprocess.TextOptions,
                       require_caption: bool, require_question: bool = False,
                       require_answers: bool = False, require_statement: bool = False,
                       require_pair: bool = False) -> _EvalExample:
  """Reads, decodes and resizes record `index` (uint8); never raises."""
  record = safe[index]
  key = str(record.get('key', index))
  try:
    if 'error' in record:
      raise preprocess.BadRecord(record['error'])
    caps = preprocess.captions_list(record.get('caption'), text_opts)
    if not caps and require_caption:
      raise preprocess.BadRecord('no usable caption')
    # The question is model input: cleaned exactly as training cleans it.
    found = (preprocess.captions_list(record['question'], text_opts)
             if record.get('question') is not None else [])
    question = found[0] if found else ''
    if not question and require_question:
      raise preprocess.BadRecord('no usable question')
    # The human answers are only stripped, not cleaned with the text options: the official
    # metric normalises them itself (vljax.evals.vqa), and compares unanimous ones verbatim.
    answers = [a.strip() for a in formats.answer_list(record.get('answers')) if a.strip()]
    if not answers and require_answers:
      raise preprocess.BadRecord('no answers')
    found = preprocess.captions_list(formats.statement_of(record), text_opts)
    statement = found[0] if found else ''
    if not statement and require_statement:
      raise preprocess.BadRecord('no usable hypothesis or statement')
    if require_pair and record.get('image2') is None:
      raise preprocess.BadRecord('no second image (image2)')
    pixels = eval_pixels(record.get('image'), image_opts)
    pixels2 = eval_pixels(record['image2'], image_opts) if require_pair else None
    image_id = record.get('image_id', record.get('key', index))
    answer_type = record.get('answer_type')
    return _EvalExample(key=key, pixels=pixels,
                        label=int(record.get('label', -1)), captions=caps,
                        image_id=str(image_id), question=question, answers=answers,
                        answer_type=answer_type if isinstance(answer_type, str) else '',
                        statement=statement, pixels2=pixels2)
  except Exception as e:  # pylint: disable=broad-except
    # One unusable record must never stop an evaluation; it is counted instead.
    return _EvalExample(key=key, error=str(e))


def eval_pixels(image: Any, opts: preprocess.ImageOptions) -> np.ndarray:
  """One image (encoded bytes or uint8) decoded and resized as evaluation does: uint8 [S, S, 3].

  `opts` are eval options (eval_image_options); normalise with preprocess.normalize. Prediction
  uses this too, so it sees exactly the pixels evaluation sees.
  """
  # The eval options are never random, so a reduced-scale JPEG decode is safe.
  pixels, _ = preprocess.augment_image(preprocess.decode_image(image, opts.size), opts)
  return pixels


def eval_image_options(image_size: int,
                       image_options: preprocess.ImageOptions | None
                       ) -> preprocess.ImageOptions:
  """The deterministic part of the options: evaluation never augments."""
  opts = _image_options(image_size, None, image_options)
  if opts.random:
    opts = preprocess.ImageOptions(size=image_size, resize=opts.resize,
                                   mean=opts.mean, std=opts.std)
  return opts


def load_eval_data(source: Any, tokenizer: tokenizer_lib.Tokenizer, *,
                   image_size: int, max_len: int,
                   num_examples: int | None = None,
                   indices: Sequence[int] | np.ndarray | None = None,
                   image_options: preprocess.ImageOptions | None = None,
                   text_options: preprocess.TextOptions | None = None,
                   require_caption: bool = True, normalize: bool = True,
                   num_threads: int | None = None, require_question: bool = False,
                   require_answers: bool = False, require_statement: bool = False,
                   require_pair: bool = False) -> dict[str, Any]:
  """The usable examples of a source (or of the records `indices`), in order.

  Records are read, decoded and resized by a pool of `num_threads` threads;
  the result does not depend on the thread count. Bad records are skipped and
  counted (the first few are logged at WARNING).

  Args:
    source: random-access source of raw records (vljax.data.formats).
    tokenizer: tokenises the first caption of each example into 'text'.
    image_size: output image side.
    max_len: token length of 'text'.
    num_examples: stop after this many usable examples (the first ones of
      the records read); None = all.
    indices: the record indices to read, in this order; None = every record.
    image_options: resize mode and normalisation (augmentation is ignored).
    text_options: caption clean-up.
    require_caption: a record without a usable caption is bad (False for VQA sets,
      whose records may have none).
    normalize: True returns float32 normalised images (4x the memory);
      False returns the uint8 pixels, to be normalised per batch later with
      `preprocess.normalize(pixels, result['image_options'])`, which gives
      exactly the float32 values of normalize=True.
    num_threads: decoding threads; None = one per core (at most 16); <= 1
      decodes in this thread.
    require_question: a record without a usable question is bad (VQA sets).
    require_answers: a record without a (non-empty) answer is bad (VQA evaluation).
    require_statement: a record without a usable hypothesis / statement is bad (SNLI-VE,
      NLVR2 evaluation).
    require_pair: a record without a second image is bad; the result then has 'image2'.

  Returns:
    {'image': float32 (or uint8) [N, H, W, 3], 'text': int32 [N, max_len]
    (first caption), 'label': int32 [N], 'caption': list of N str (first
    caption), 'captions': list of N lists of str (all captions), 'image_id':
    list of N str, 'question': list of N str (cleaned with `text_options`; ''
    when the record has none), 'answers': list of N lists of str (the human
    answers, stripped but otherwise as given; [] when none), 'answer_type':
    list of N str ('' when unknown), 'statement': list of N str (the hypothesis or
    statement, cleaned like captions; '' when none), with require_pair 'image2' (uint8 or
    float32 like 'image'), 'record_index': int64 [N] (source index
    of each example), 'skipped': int (bad records among those read),
    'image_options': the ImageOptions the images were (or are to be)
    normalised with}.

  Raises:
    ValueError: the source is empty, nothing is selected, or no selected
      record is usable.
  """
  total = _check_source(source)
  if indices is None:
    indices = np.arange(total)
  indices = np.asarray(indices, dtype=np.int64).reshape(-1)
  if indices.size and (indices.min() < 0 or indices.max() >= total):
    raise ValueError(f'Record indices outside [0, {total}) of {source!r}.')
  wanted = len(indices)
  if num_examples is not None:
    wanted = min(wanted, num_examples)
  if wanted <= 0:
    raise ValueError(f'num_examples={num_examples} with {len(indices)} record '
                     f'index(es) selects no examples.')
  image_opts = eval_image_options(image_size, image_options)
  text_opts = text_options or preprocess.TextOptions()
  threads = (_default_decode_threads() if num_threads is None
             else int(num_threads))
  safe = formats.SafeSource(source)
  read = functools.partial(_read_eval_example, safe, image_opts=image_opts,
                           text_opts=text_opts, require_caption=require_caption,
                           require_question=require_question,
                           require_answers=require_answers,
                           require_statement=require_statement, require_pair=require_pair)

  # Filled in place, so the pixels are never held twice (a list plus a stack).
  pixels = np.empty((wanted, image_size, image_size, 3), np.uint8)
  pixels2 = np.empty_like(pixels) if require_pair else None
  labels, captions, ids, kept = [], [], [], []
  questions, answers, answer_types, statements = [], [], [], []
  skipped = 0
  pool = (concurrent.futures.ThreadPoolExecutor(threads, 'vljax-eval-decode')
          if threads > 1 else None)
  window = max(1, threads) * _EVAL_WINDOW_PER_THREAD
  try:
    for start in range(0, len(indices), window):
      chunk = indices[start:start + window].tolist()
      # map() yields in submission order: the thread count reorders nothing.
      examples = pool.map(read, chunk) if pool else map(read, chunk)
      for index, example in zip(chunk, examples):
        if example.error is not None:
          skipped += 1
          if skipped <= _EVAL_BAD_LOGGED:
            logging.warning('Skipped bad eval record %s: %s', example.key,
                            example.error)
          continue
        pixels[len(kept)] = example.pixels
        if pixels2 is not None:
          pixels2[len(kept)] = example.pixels2
        statements.append(example.statement)
        labels.append(example.label)
        captions.append(example.captions)
        ids.append(example.image_id)
        questions.append(example.question)
        answers.append(example.answers)
        answer_types.append(example.answer_type)
        kept.append(index)
        if len(kept) == wanted:
          break
      if len(kept) == wanted:
        break
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  if not kept:
    raise ValueError(
        f'No usable example in {source!r} ({skipped} bad records).')
  if skipped > _EVAL_BAD_LOGGED:
    logging.warning('Skipped %d bad eval records of %r in all.', skipped,
                    source)
  # A view: rows left over by bad records stay allocated, but are few.
  pixels = pixels[:len(kept)]

  def as_inputs(pixels: np.ndarray) -> np.ndarray:
    if not normalize:
      return pixels
    images = np.empty(pixels.shape, np.float32)
    for start in range(0, len(images), 1024):  # bounded float temporaries
      images[start:start + 1024] = preprocess.normalize(
          pixels[start:start + 1024], image_opts)
    return images

  first = [c[0] if c else '' for c in captions]
  pair = {} if pixels2 is None else {'image2': as_inputs(pixels2[:len(kept)])}
  return {
      'image': as_inputs(pixels), **pair, 'statement': statements,
      'text': tokenizer.encode(first, max_len),
      'label': np.asarray(labels, dtype=np.int32),
      'caption': first, 'captions': captions, 'image_id': ids,
      'question': questions, 'answers': answers, 'answer_type': answer_types,
      'record_index': np.asarray(kept, dtype=np.int64),
      'skipped': skipped,
      'image_options': image_opts,
  }
