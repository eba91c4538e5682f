"""Grain input pipelines: random-access image-text sources to numpy batches.

Training: global shuffle by seed (a fresh permutation each epoch), repeat,
per-example preprocessing, a disjoint slice per process, batching with
tokenised captions. The result is a `grain.DatasetIterator` whose small,
JSON-serialisable state resumes it exactly.

Evaluation: every example of a (held-out) source in order, as one dict of
numpy arrays.

A source is anything with `__len__` and `__getitem__(index)` returning a dict
with 'image' (uint8 [H, W, 3] or [H, W]), 'caption' (str) and optionally
'label' (int; -1 when absent).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from vljax.data import tokenizer as tokenizer_lib

# Augmentation keys understood by `augment`. Horizontal flips are off unless
# asked for, because they contradict "left"/"right" in captions.
_AUGMENT_DEFAULTS: dict[str, Any] = {
    'crop_scale': 1.0,  # min area fraction of a random crop; 1.0 = off.
    'hflip': False,
    'brightness': 0.0,  # max additive brightness change, in [-1, 1] units.
}


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


def _to_rgb_uint8(image: Any) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'Expected an [H, W, 3] image, got shape {image.shape}.')
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  image = image[..., :3]
  if image.dtype != np.uint8:
    image = np.clip(image, 0, 255).astype(np.uint8)
  return image


def _resize(image: np.ndarray, image_size: int) -> np.ndarray:
  if image.shape[:2] == (image_size, image_size):
    return image
  pil = Image.fromarray(image).resize((image_size, image_size),
                                      Image.Resampling.BICUBIC)
  return np.asarray(pil)


def preprocess_image(image: Any, image_size: int,
                     rng: np.random.Generator | None = None,
                     augment: Mapping[str, Any] | None = None) -> np.ndarray:
  """uint8 image -> float32 [image_size, image_size, 3] in [-1, 1].

  Args:
    image: uint8 [H, W, 3] (grey [H, W] and RGBA are converted).
    image_size: output side.
    rng: randomness for augmentation; required if any augmentation is on.
    augment: options as in `_AUGMENT_DEFAULTS`; None means none.
  """
  opts = _parse_augment(augment)
  image = _to_rgb_uint8(image)
  scale = float(opts['crop_scale'])
  if scale < 1.0:
    h, w = image.shape[:2]
    area = rng.uniform(scale, 1.0)
    ch = max(1, int(round(h * np.sqrt(area))))
    cw = max(1, int(round(w * np.sqrt(area))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    image = image[top:top + ch, left:left + cw]
  image = _resize(image, image_size)
  if opts['hflip'] and rng.uniform() < 0.5:
    image = image[:, ::-1]
  out = image.astype(np.float32) * (2.0 / 255.0) - 1.0
  if opts['brightness']:
    delta = rng.uniform(-opts['brightness'], opts['brightness'])
    out = np.clip(out + np.float32(delta), -1.0, 1.0)
  return np.ascontiguousarray(out, dtype=np.float32)


class _Preprocess(grain.transforms.MapWithIndex):
  """Per-example preprocessing; randomness is a function of (seed, index)."""

  def __init__(self, image_size: int, augment: dict[str, Any], seed: int):
    self._image_size = image_size
    self._augment = augment
    self._seed = seed
    self._random = (augment['crop_scale'] < 1.0 or augment['hflip'] or
                    bool(augment['brightness']))

  def map_with_index(self, index: int, element: Mapping[str, Any]
                     ) -> dict[str, Any]:
    # `index` is the position in the global shuffled+repeated stream, so the
    # augmentation of an example does not depend on process count or resume.
    rng = (np.random.default_rng([self._seed, index, 0x5EED])
           if self._random else None)
    return {
        'image': preprocess_image(element['image'], self._image_size, rng,
                                  self._augment),
        'caption': str(element['caption']),
        'label': np.int32(element.get('label', -1)),
    }


def _collate(elements: Sequence[Mapping[str, Any]],
             tokenizer: tokenizer_lib.Tokenizer,
             max_len: int) -> dict[str, np.ndarray]:
  """Stacks preprocessed examples and tokenises their captions in one call."""
  return {
      'image': np.stack([e['image'] for e in elements]),
      'text': tokenizer.encode([e['caption'] for e in elements], max_len),
      'label': np.asarray([e['label'] for e in elements], dtype=np.int32),
  }


def _ensure_absl_flags_parsed() -> None:
  # grain 0.2.18's worker processes read an absl flag and fail with
  # UnparsedFlagAccessError in programs that never parse flags (tests,
  # notebooks); google/grain#1355, fixed upstream in #1362. Under absl.app the
  # flags are already parsed and this does nothing.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_dataset(source: Any, tokenizer: tokenizer_lib.Tokenizer, *,
                       batch_size: int, image_size: int, max_len: int,
                       seed: int, process_index: int = 0,
                       process_count: int = 1, num_epochs: int | None = None,
                       augment: Mapping[str, Any] | None = None
                       ) -> grain.MapDataset:
  """The training pipeline as a `grain.MapDataset` of per-process batches.

  See `make_train_iterator` for the arguments.
  """
  n = _check_source(source)
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  options = _parse_augment(augment)

  ds = grain.MapDataset.source(source).shuffle(seed=seed)
  # The shuffle draws a new permutation for every epoch of indices it sees,
  # so repeating after it reshuffles each epoch.
  ds = ds.repeat(num_epochs)
  ds = ds.map_with_index(_Preprocess(image_size, options, seed))
  if num_epochs is not None:
    # Drop the tail that would not fill a global batch, so every process
    # produces the same number of batches (otherwise one host would wait on
    # a collective forever at the end).
    global_batch = batch_size * process_count
    ds = ds[:len(ds) - len(ds) % global_batch]
    if len(ds) == 0:
      raise ValueError(
          f'{num_epochs} epoch(s) of {source!r} ({n} examples) do not fill '
          f'one global batch of {global_batch}.')
  ds = ds[process_index::process_count]
  return ds.batch(batch_size, drop_remainder=True,
                  batch_fn=functools.partial(_collate, tokenizer=tokenizer,
                                             max_len=max_len))


def make_train_iterator(source: Any, tokenizer: tokenizer_lib.Tokenizer, *,
                        batch_size: int, image_size: int, max_len: int,
                        seed: int, process_index: int = 0,
                        process_count: int = 1,
                        num_epochs: int | None = None,
                        augment: Mapping[str, Any] | None = None,
                        worker_count: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator over this process's training batches.

  Batches are {'image': float32 [b, H, W, 3] in [-1, 1], 'text': int32
  [b, max_len], 'label': int32 [b]}. Processes read disjoint slices of the
  same global shuffled stream; the k-th batches of all processes together
  form the k-th global batch.

  Args:
    source: random-access source (`__len__`, `__getitem__`).
    tokenizer: tokenises captions.
    batch_size: per-process batch size.
    image_size: output image side; images of another size are resized.
    max_len: token length of 'text' (EOS included).
    seed: shuffle and augmentation seed.
    process_index: this process's index.
    process_count: number of processes reading the data.
    num_epochs: passes over the source; None repeats forever.
    augment: augmentation options ('crop_scale', 'hflip', 'brightness');
      None means none.
    worker_count: >0 preprocesses in that many grain worker processes.

  Returns:
    A `grain.DatasetIterator`; `get_state()` is a small JSON-serialisable
    dict and `set_state(state)` on a fresh iterator resumes exactly.

  Raises:
    ValueError: the source is empty, or the arguments are inconsistent.
  """
  ds = make_train_dataset(
      source, tokenizer, batch_size=batch_size, image_size=image_size,
      max_len=max_len, seed=seed, process_index=process_index,
      process_count=process_count, num_epochs=num_epochs, augment=augment)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count))
  else:
    # A few threads overlap numpy work with the train step; each computes
    # whole batches, and grain's state counts only consumed ones.
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  return iter(it_ds)


def load_eval_data(source: Any, tokenizer: tokenizer_lib.Tokenizer, *,
                   image_size: int, max_len: int,
                   num_examples: int | None = None) -> dict[str, Any]:
  """All (or the first `num_examples`) examples of a source, in order.

  Returns:
    {'image': float32 [N, H, W, 3] in [-1, 1], 'text': int32 [N, max_len],
    'label': int32 [N], 'caption': list of N str}.
  """
  n = _check_source(source)
  if num_examples is not None:
    n = min(n, num_examples)
  if n <= 0:
    raise ValueError(f'num_examples={num_examples} selects no examples.')
  preprocess = _Preprocess(image_size, _parse_augment(None), seed=0)
  elements = [preprocess.map_with_index(i, source[i]) for i in range(n)]
  batch = _collate(elements, tokenizer, max_len)
  batch['caption'] = [e['caption'] for e in elements]
  return batch
