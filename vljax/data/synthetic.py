"""Embedded synthetic image-text data: coloured shapes with captions.

Every example is generated on the fly, deterministically, from
(seed, split, index): nothing is downloaded and nothing is stored. An image
shows one main coloured shape (its colour and shape are the class) of a random
size at a random position, on a lightly textured background, sometimes with a
small grey distractor shape. The caption describes the main shape in words, e.g.
"a large red circle in the top left".

With task='vqa' every example also carries a question about its image and the answer
(colour, shape, size, position of the coloured shape, or how many shapes there are), drawn
from a random stream of its own: the image and caption of an index are the same for both
tasks.

The source follows grain's random-access protocol (`__len__`, `__getitem__`),
so it plugs straight into `grain.MapDataset.source`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Well-separated RGB colours: each differs from every other by >= 150 in at
# least one channel, and none is grey, so the shape is distinguishable from the
# background and the distractor.
COLORS: dict[str, tuple[int, int, int]] = {
    'red': (220, 40, 40),
    'green': (40, 180, 60),
    'blue': (40, 80, 220),
    'yellow': (230, 210, 40),
    'purple': (150, 50, 200),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle', 'cross')

# Class `c * len(SHAPES) + s` is colour c with shape s.
CLASS_NAMES: tuple[str, ...] = tuple(
    f'{color} {shape}' for color in COLOR_NAMES for shape in SHAPES)
NUM_CLASSES: int = len(CLASS_NAMES)

PROMPT_TEMPLATES: tuple[str, ...] = (
    'a photo of a {}.',
    'a {} in the picture.',
    'an image of a {}.',
    'a picture showing a {}.',
)

# The 3x3 grid of regions, indexed [row][col], and the phrases naming them.
REGIONS: tuple[tuple[str, ...], ...] = (
    ('top left', 'top', 'top right'),
    ('left', 'center', 'right'),
    ('bottom left', 'bottom', 'bottom right'),
)
_REGION_PHRASES: dict[str, tuple[str, ...]] = {
    'top left': ('in the top left', 'in the top left corner'),
    'top': ('at the top', 'in the top middle'),
    'top right': ('in the top right', 'in the top right corner'),
    'left': ('on the left', 'at the left side'),
    'center': ('in the center', 'in the middle'),
    'right': ('on the right', 'at the right side'),
    'bottom left': ('in the bottom left', 'in the bottom left corner'),
    'bottom': ('at the bottom', 'in the bottom middle'),
    'bottom right': ('in the bottom right', 'in the bottom right corner'),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    'small': ('small', 'little'),
    'large': ('large', 'big'),
}
# Captions differ in detail, as real ones do. With every caption naming size and position as
# well, colour + size + position already tell almost every pair in a batch apart (90
# combinations), so a contrastive model never needs the shape and zero-shot classification
# (colour x shape) stalls near 0.35; captions that name only colour and shape make the shape
# worth learning.
_CAPTION_TEMPLATES: tuple[str, ...] = (
    'a {size} {color} {shape} {where}',
    'a photo of a {size} {color} {shape} {where}',
    'there is a {size} {color} {shape} {where}',
    'an image with a {size} {color} {shape} {where}',
    '{where_cap} a {size} {color} {shape}',
    'a {color} {shape} {where}',
    'a {size} {color} {shape}',
    'a {color} {shape}',
    'a picture of a {color} {shape}',
)

# Shape radius as a fraction of the image side, per size bucket.
_RADIUS_RANGE: dict[str, tuple[float, float]] = {
    'small': (0.13, 0.17),  # at 32 px: 8-11 pixels across, about one patch of 8
    'large': (0.20, 0.26),
}
# Questions by kind; the answer is a function of the example's spec (`_answer`). Each kind
# has a few phrasings, so a model cannot key on one exact string. "the shape" means the
# coloured one: the grey distractor is only ever counted.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    'colour': ('what colour is the shape?', 'what color is the shape?',
               'which colour does the shape have?'),
    'shape': ('what shape is it?', 'what shape is the coloured object?',
              'which shape is shown?'),
    'size': ('is the shape large or small?', 'is the shape small or large?',
             'how big is the coloured shape?'),
    'position': ('where is the shape?', 'where is the coloured shape?',
                 'in which part of the image is the shape?'),
    'count': ('how many shapes are there?', 'how many shapes can you see?',
              'how many objects are in the image?'),
}
QUESTION_KINDS: tuple[str, ...] = tuple(QUESTION_TEMPLATES)
TASKS: tuple[str, ...] = ('caption', 'vqa')
# Synthetic annotators all agree: the answer, as many times as VQAv2 has human answers.
NUM_ANSWERS = 10
# Mixed into the seed of the question stream: SeedSequence([seed, split, index, _QUESTION_STREAM])
# is independent of the image/caption stream SeedSequence([seed, split, index]).
_QUESTION_STREAM = 0x9A

_DISTRACTOR_GREY = 90
_DISTRACTOR_PROB = 0.5
_SPLIT_IDS: dict[str, int] = {'train': 0, 'heldout': 1}
_DEFAULT_LENGTHS: dict[str, int] = {'train': 2**20, 'heldout': 512}


def class_prompts() -> list[list[str]]:
  """Zero-shot prompts: per class, one prompt per entry of PROMPT_TEMPLATES."""
  return [[t.format(name) for t in PROMPT_TEMPLATES] for name in CLASS_NAMES]


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Everything that defines an example except its pixel noise.

  Attributes:
    label: class index into CLASS_NAMES.
    color: colour name.
    shape: shape name.
    size: 'small' or 'large'.
    region: one of the REGIONS names.
    cx: shape centre column in pixels (float, pixel centres at i + 0.5).
    cy: shape centre row in pixels.
    radius: half-extent of the shape in pixels.
    caption: the caption text.
    distractor: (shape, cx, cy, radius) of the grey distractor, or None.
  """
  label: int
  color: str
  shape: str
  size: str
  region: str
  cx: float
  cy: float
  radius: float
  caption: str
  distractor: tuple[str, float, float, float] | None


def shape_mask(shape: str, cx: float, cy: float, radius: float,
               image_size: int) -> np.ndarray:
  """Boolean [image_size, image_size] mask of a shape centred at (cx, cy)."""
  coords = np.arange(image_size, dtype=np.float32) + 0.5
  dy = (coords - cy)[:, None]
  dx = (coords - cx)[None, :]
  if shape == 'circle':
    return dx * dx + dy * dy <= radius * radius
  if shape == 'square':
    # The full bounding square: at 32 px a square shrunk to the circle's area (half = 0.85r)
    # differed from the circle by about one pixel per corner and the two were not told apart.
    half = radius
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)
  if shape == 'triangle':
    # Apex at the top, base at the bottom; the half-width grows linearly from
    # 0 at the apex to `radius` at the base.
    depth = dy + radius
    return (depth >= 0) & (dy <= radius) & (np.abs(dx) <= 0.5 * depth)
  if shape == 'cross':
    arm = max(0.35 * radius, 0.75)
    return (((np.abs(dx) <= radius) & (np.abs(dy) <= arm)) |
            ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)))
  raise ValueError(f'Unknown shape {shape!r}; expected one of {SHAPES}.')


class SyntheticImageText:
  """Random-access source of synthetic (image, caption, label) examples.

  Examples are a pure function of (seed, split, index): the same arguments
  give the same example in any process. 'train' and 'heldout' use different
  generator streams, so they are distinct samples.

  Each example is a dict with 'image' (uint8 [H, W, 3]), 'caption' (str),
  'label' (np.int32) and 'key' (str, unique per (split, seed, index)); with
  task='vqa' also 'question' (str), 'answers' (NUM_ANSWERS copies of the answer)
  and 'answer_type' (the question's kind, one of QUESTION_KINDS).
  """

  def __init__(self, split: str = 'train', image_size: int = 32,
               num_examples: int | None = None, seed: int = 0,
               task: str = 'caption'):
    """Initialises the source.

    Args:
      split: 'train' or 'heldout'.
      image_size: side of the square images, >= 16.
      num_examples: length of the source; defaults to 2**20 for 'train'
        (generated lazily, effectively infinite) and 512 for 'heldout'.
      seed: base seed; different seeds give different datasets.
      task: 'caption', or 'vqa' to add a question and its answers to every
        example (images and captions stay the same).
    """
    if task not in TASKS:
      raise ValueError(f'Unknown task {task!r}; expected one of {TASKS}.')
    if split not in _SPLIT_IDS:
      raise ValueError(
          f'Unknown split {split!r}; expected one of {tuple(_SPLIT_IDS)}.')
    if image_size < 16:
      raise ValueError(f'image_size must be >= 16, got {image_size}.')
    if num_examples is None:
      num_examples = _DEFAULT_LENGTHS[split]
    if num_examples < 0:
      raise ValueError(f'num_examples must be >= 0, got {num_examples}.')
    self.split = split
    self.image_size = int(image_size)
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.task = task

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f'SyntheticImageText(split={self.split!r}, '
            f'image_size={self.image_size}, num_examples={self.num_examples}, '
            f'seed={self.seed}' +
            (f', task={self.task!r})' if self.task != 'caption' else ')'))

  def _check_index(self, index: int) -> int:
    index = int(index)
    if index < 0:
      index += self.num_examples
    if not 0 <= index < self.num_examples:
      raise IndexError(
          f'Index {index} out of range for {self!r} of length '
          f'{self.num_examples}.')
    return index

  def _rng(self, index: int) -> np.random.Generator:
    # SeedSequence mixes the whole tuple, so the split id selects an
    # independent stream rather than an offset into a shared one.
    return np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])

  def _sample_spec(self, rng: np.random.Generator) -> ExampleSpec:
    """Draws the semantic content of an example (consumes rng in fixed order)."""
    size_px = self.image_size
    color_idx = int(rng.integers(len(COLOR_NAMES)))
    shape_idx = int(rng.integers(len(SHAPES)))
    size = ('small', 'large')[int(rng.integers(2))]
    row, col = (int(v) for v in rng.integers(3, size=2))
    lo, hi = _RADIUS_RANGE[size]
    radius = max(float(rng.uniform(lo, hi)) * size_px, 2.0)
    # Centres live in [radius, size - radius] so the shape stays in frame; the
    # region picks a third of that range and the jitter stays within it.
    jitter = rng.uniform(-0.3, 0.3, size=2)
    span = size_px - 2 * radius
    cx = radius + (col + 0.5 + jitter[0]) / 3 * span
    cy = radius + (row + 0.5 + jitter[1]) / 3 * span
    region = REGIONS[row][col]

    distractor = None
    if rng.uniform() < _DISTRACTOR_PROB:
      d_shape = SHAPES[int(rng.integers(len(SHAPES)))]
      d_radius = max(0.07 * size_px, 1.5)
      # Of a few candidate positions, keep the one farthest from the main
      # shape; accept it only if the two cannot overlap.
      cands = rng.uniform(d_radius, size_px - d_radius, size=(4, 2))
      dist = np.hypot(cands[:, 0] - cx, cands[:, 1] - cy)
      best = int(np.argmax(dist))
      if dist[best] > 1.5 * (radius + d_radius) + 1:
        distractor = (d_shape, float(cands[best, 0]), float(cands[best, 1]),
                      float(d_radius))

    color, shape = COLOR_NAMES[color_idx], SHAPES[shape_idx]
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    size_words = _SIZE_WORDS[size]
    phrases = _REGION_PHRASES[region]
    where = phrases[int(rng.integers(len(phrases)))]
    caption = template.format(
        size=size_words[int(rng.integers(len(size_words)))],
        color=color, shape=shape, where=where,
        where_cap=where + ',')
    if distractor is not None and rng.uniform() < 0.5:
      caption += f' and a grey {distractor[0]}'
    return ExampleSpec(
        label=color_idx * len(SHAPES) + shape_idx, color=color, shape=shape,
        size=size, region=region, cx=float(cx), cy=float(cy), radius=radius,
        caption=caption, distractor=distractor)

  def question(self, index: int) -> tuple[str, str, str]:
    """(question, answer, kind) of example `index`, without rendering the image.

    Drawn from the question stream only, so it never shifts the image or caption.
    """
    index = self._check_index(index)
    return self._question(index, self.describe(index))

  def _question(self, index: int, spec: ExampleSpec) -> tuple[str, str, str]:
    """`question` for a checked index whose spec is already drawn."""
    rng = np.random.default_rng(
        [self.seed, _SPLIT_IDS[self.split], index, _QUESTION_STREAM])
    kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
    phrasings = QUESTION_TEMPLATES[kind]
    text = phrasings[int(rng.integers(len(phrasings)))]
    return text, _answer(kind, spec), kind

  def caption(self, index: int) -> str:
    """The caption of example `index`, without rendering the image."""
    return self.describe(index).caption

  def text_fields(self, index: int) -> dict[str, Any]:
    """The texts of example `index` as `__getitem__` has them, without rendering the image
    (tokenizer training): 'caption', and with task='vqa' 'question' and 'answers'."""
    index = self._check_index(index)
    spec = self.describe(index)
    fields: dict[str, Any] = {'caption': spec.caption}
    if self.task == 'vqa':
      question, answer, _ = self._question(index, spec)
      fields.update(question=question, answers=[answer] * NUM_ANSWERS)
    return fields

  def describe(self, index: int) -> ExampleSpec:
    """The semantic content of example `index`, without rendering the image."""
    index = self._check_index(index)
    return self._sample_spec(self._rng(index))

  def _render(self, spec: ExampleSpec,
              rng: np.random.Generator) -> np.ndarray:
    """Draws the image for `spec`; pixel noise comes from `rng`."""
    n = self.image_size
    # Background: a muted light tone with a gentle linear gradient and mild
    # per-pixel noise, so the model cannot key on a flat background.
    base = rng.uniform(150.0, 215.0) + rng.uniform(-12.0, 12.0, size=3)
    grad = rng.uniform(-20.0, 20.0, size=2)
    ramp = np.linspace(-0.5, 0.5, n, dtype=np.float32)
    image = (base.astype(np.float32)[None, None, :] +
             (grad[0] * ramp)[:, None, None] + (grad[1] * ramp)[None, :, None])
    image = image + rng.normal(0.0, 6.0, size=(n, n, 3)).astype(np.float32)

    if spec.distractor is not None:
      d_shape, dcx, dcy, dr = spec.distractor
      mask = shape_mask(d_shape, dcx, dcy, dr, n)
      image[mask] = _DISTRACTOR_GREY

    color = np.asarray(COLORS[spec.color], np.float32)
    color = color + rng.uniform(-15.0, 15.0, size=3).astype(np.float32)
    mask = shape_mask(spec.shape, spec.cx, spec.cy, spec.radius, n)
    noise = rng.normal(0.0, 5.0, size=(int(mask.sum()), 3)).astype(np.float32)
    image[mask] = color[None, :] + noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = self._check_index(index)
    rng = self._rng(index)
    spec = self._sample_spec(rng)
    image = self._render(spec, rng)
    example = {
        'image': image,
        'caption': spec.caption,
        'label': np.int32(spec.label),
        'key': f'synthetic/{self.split}/{self.seed}/{index}',
    }
    if self.task == 'vqa':
      question, answer, kind = self._question(index, spec)
      example.update(question=question, answers=[answer] * NUM_ANSWERS,
                     answer_type=kind)
    return example


def _answer(kind: str, spec: ExampleSpec) -> str:
  """The answer to a question of `kind` about the example `spec` describes."""
  if kind == 'colour':
    return spec.color
  if kind == 'shape':
    return spec.shape
  if kind == 'size':
    return spec.size
  if kind == 'position':
    return spec.region
  if kind == 'count':
    # The distractor is drawn whenever the spec has one (placed clear of the main shape).
    return '2' if spec.distractor is not None else '1'
  raise ValueError(f'Unknown question kind {kind!r}; expected one of {QUESTION_KINDS}.')


def all_captions(n: int, seed: int = 0, split: str = 'train') -> list[str]:
  """Captions of the first `n` examples of a split (no images rendered)."""
  source = SyntheticImageText(split=split, num_examples=max(n, 0), seed=seed)
  return [source.describe(i).caption for i in range(n)]


def all_questions(n: int, seed: int = 0, split: str = 'train'
                  ) -> list[tuple[str, str]]:
  """(question, answer) of the first `n` examples of a split with task='vqa' (no images)."""
  source = SyntheticImageText(split=split, num_examples=max(n, 0), seed=seed, task='vqa')
  return [source.question(i)[:2] for i in range(n)]
