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

With task='snli_ve' (visual entailment) every example also carries a 'hypothesis' about its
image and a 'label' (ENTAILMENT_LABELS: 0 entailment, 1 neutral, 2 contradiction) instead of
the class, drawn from a stream of its own (the image and caption stay those of the caption
task). With task='nlvr2' every example is a PAIR of images ('image', 'image2', each drawn and
rendered like an ordinary example from a stream of its own) and a 'statement' about the pair
with a 'label' (NLVR2_LABELS: 0 False, 1 True). `visual_entailment(index)` and
`pair_statement(index)` give the texts and labels without rendering (docs/fusion.md).

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
TASKS: tuple[str, ...] = ('caption', 'vqa', 'snli_ve', 'nlvr2')
# Synthetic annotators all agree: the answer, as many times as VQAv2 has human answers.
NUM_ANSWERS = 10
# Mixed into the seed of the question stream: SeedSequence([seed, split, index, _QUESTION_STREAM])
# is independent of the image/caption stream SeedSequence([seed, split, index]).
_QUESTION_STREAM = 0x9A
# The visual-entailment hypothesis stream and the two image streams of an nlvr2 pair, likewise.
_HYPOTHESIS_STREAM = 0x5E
_PAIR_STREAMS = (0x1E, 0x2E)

# Visual entailment (task='snli_ve'): SNLI-VE's label names, in id order.
ENTAILMENT_LABELS: tuple[str, ...] = ('entailment', 'neutral', 'contradiction')
# Predicates no image can decide (neutral about a shape that is there, contradiction about one
# that is not).
UNDECIDABLE_PREDICATES: tuple[str, ...] = (
    'is made of wood', 'is heavy', 'is for sale', 'was drawn by a child', 'is new')
# NLVR2 (task='nlvr2'): label 1 = the statement is true of the pair.
NLVR2_LABELS: tuple[str, ...] = ('False', 'True')
# Statement kinds about a pair; each names the colour or the shape of the coloured shapes.
PAIR_KINDS: tuple[str, ...] = ('both', 'left_right', 'exactly_one', 'same')
# Pairs of specs drawn per nlvr2 example until one fits its label (a True 'both red' needs
# about 25); running out is astronomically unlikely and raises.
_MAX_PAIR_DRAWS = 2000

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
  and 'answer_type' (the question's kind, one of QUESTION_KINDS); with task='snli_ve'
  also 'hypothesis' (str), and 'label' is its ENTAILMENT_LABELS id; with task='nlvr2'
  'image', 'image2', 'statement' and 'label' (its NLVR2_LABELS id), and no caption.
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
        example (images and captions stay the same), 'snli_ve' to add a hypothesis and
        an entailment label, 'nlvr2' for pairs of images with a statement.
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
    if self.task == 'nlvr2':
      return {'caption': None, 'statement': self._pair(index)[2]}
    spec = self.describe(index)
    fields: dict[str, Any] = {'caption': spec.caption}
    if self.task == 'vqa':
      question, answer, _ = self._question(index, spec)
      fields.update(question=question, answers=[answer] * NUM_ANSWERS)
    if self.task == 'snli_ve':
      fields['hypothesis'] = self._hypothesis(index, spec)[0]
    return fields

  def visual_entailment(self, index: int) -> tuple[str, int]:
    """(hypothesis, ENTAILMENT_LABELS id) of example `index` (task='snli_ve' or not), without
    rendering the image. Drawn from the hypothesis stream only."""
    index = self._check_index(index)
    return self._hypothesis(index, self.describe(index))

  def _hypothesis(self, index: int, spec: ExampleSpec) -> tuple[str, int]:
    """A hypothesis about `spec` and its label, balanced over ENTAILMENT_LABELS.

    "the {subject} {predicate}": the subject names the colour, the shape or both; the
    predicate states another attribute (colour, shape, size, position) or one that no image
    shows (UNDECIDABLE_PREDICATES). Entailment: true subject, true predicate. Neutral: true
    subject, undecidable predicate. Contradiction, half each: true subject with a false
    predicate, or a false subject (no such shape) with an undecidable predicate. So the text
    alone tells {entailment, contradiction} from {neutral, contradiction} (at most 2/3
    accuracy); within each group only the image decides.
    """
    rng = np.random.default_rng(
        [self.seed, _SPLIT_IDS[self.split], index, _HYPOTHESIS_STREAM])
    label = int(rng.integers(len(ENTAILMENT_LABELS)))
    subject_kinds = (('colour',), ('shape',), ('colour', 'shape'))[int(rng.integers(3))]
    false_subject = label == 2 and rng.uniform() < 0.5
    wrong = subject_kinds[int(rng.integers(len(subject_kinds)))] if false_subject else None
    values = {'colour': spec.color, 'shape': spec.shape, 'size': spec.size,
              'position': spec.region}
    choices = {'colour': COLOR_NAMES, 'shape': SHAPES, 'size': tuple(_SIZE_WORDS),
               'position': tuple(r for row in REGIONS for r in row)}

    def value(kind: str, true: bool) -> str:
      if true:
        return values[kind]
      others = [v for v in choices[kind] if v != values[kind]]
      return others[int(rng.integers(len(others)))]

    subj = {k: value(k, k != wrong) for k in subject_kinds}
    subject = ' '.join(['the'] + [subj[k] for k in ('colour',) if k in subj] +
                       [subj.get('shape', 'one')])
    if label == 1 or false_subject:
      predicate = UNDECIDABLE_PREDICATES[int(rng.integers(len(UNDECIDABLE_PREDICATES)))]
    else:
      kinds = [k for k in ('colour', 'shape', 'size', 'position') if k not in subject_kinds]
      kind = kinds[int(rng.integers(len(kinds)))]
      v = value(kind, label == 0)
      if kind == 'shape':
        predicate = f'is a {v}'
      elif kind == 'size':
        words = _SIZE_WORDS[v]
        predicate = f'is {words[int(rng.integers(len(words)))]}'
      elif kind == 'position':
        phrases = _REGION_PHRASES[v]
        predicate = f'is {phrases[int(rng.integers(len(phrases)))]}'
      else:
        predicate = f'is {v}'
    return f'{subject} {predicate}', label

  def pair_statement(self, index: int) -> tuple[ExampleSpec, ExampleSpec, str, int]:
    """(left spec, right spec, statement, NLVR2_LABELS id) of nlvr2 example `index`, without
    rendering the images."""
    return self._pair(self._check_index(index))[:4]

  def _pair(self, index: int):
    """(left spec, right spec, statement, label, left rng, right rng) of pair `index`.

    The statement (PAIR_KINDS about the colour or the shape, values uniform) and the label
    (uniform) are drawn first, from the left stream, independently of each other: the text
    alone predicts nothing. Then pairs of specs are drawn, each from its own stream, until
    the statement's truth on the pair is the label; each rng then renders its image.
    """
    left, right = (np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index, stream])
                   for stream in _PAIR_STREAMS)
    kind = PAIR_KINDS[int(left.integers(len(PAIR_KINDS)))]
    attr = ('colour', 'shape')[int(left.integers(2))]
    names = COLOR_NAMES if attr == 'colour' else SHAPES
    v1, v2 = (names[int(left.integers(len(names)))] for _ in range(2))
    label = int(left.integers(2))
    noun = (lambda v: v) if attr == 'colour' else (lambda v: f'a {v}')
    statement = {
        'both': f'both images show {noun(v1)}',
        'left_right': f'the left image shows {noun(v1)} and the right image shows {noun(v2)}',
        'exactly_one': f'exactly one image shows {noun(v1)}',
        'same': f'both images show the same {attr}',
    }[kind]
    for _ in range(_MAX_PAIR_DRAWS):
      spec_l, spec_r = self._sample_spec(left), self._sample_spec(right)
      if int(pair_truth(kind, attr, v1, v2, spec_l, spec_r)) == label:
        return spec_l, spec_r, statement, label, left, right
    raise RuntimeError(f'No image pair for {statement!r} (label {label}) in '
                       f'{_MAX_PAIR_DRAWS} draws.')

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
    if self.task == 'nlvr2':
      spec_l, spec_r, statement, label, rng_l, rng_r = self._pair(index)
      return {'image': self._render(spec_l, rng_l), 'image2': self._render(spec_r, rng_r),
              'statement': statement, 'label': np.int32(label),
              'key': f'synthetic/{self.split}/{self.seed}/{index}'}
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
    if self.task == 'snli_ve':
      hypothesis, label = self._hypothesis(index, spec)
      example.update(hypothesis=hypothesis, label=np.int32(label))
    return example


def pair_truth(kind: str, attr: str, v1: str, v2: str, left: ExampleSpec,
               right: ExampleSpec) -> bool:
  """Whether the PAIR_KINDS statement (`attr` 'colour' or 'shape', values v1, v2) holds."""
  a, b = ((left.color, right.color) if attr == 'colour' else (left.shape, right.shape))
  if kind == 'both':
    return a == v1 and b == v1
  if kind == 'left_right':
    return a == v1 and b == v2
  if kind == 'exactly_one':
    return (a == v1) != (b == v1)
  if kind == 'same':
    return a == b
  raise ValueError(f'Unknown statement kind {kind!r}; expected one of {PAIR_KINDS}.')


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
