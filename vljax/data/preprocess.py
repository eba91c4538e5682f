"""Per-example preprocessing: decode, validate, resize/augment, normalise, text clean-up.

`BadRecord` marks an example that cannot be used (corrupt or truncated image,
zero-size image, missing or empty or non-UTF-8 caption); the pipeline skips
and counts it.
"""
from __future__ import annotations

import dataclasses
import io
import re
import unicodedata
from typing import Any, Mapping

import numpy as np
from PIL import Image

RESIZE_MODES = ('warp', 'crop', 'pad')


class BadRecord(ValueError):
  """An example that cannot be used; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """How images become model inputs.

  Attributes:
    size: output side.
    resize: 'warp' (square, ignoring aspect), 'crop' (short side to `size`,
      centre crop) or 'pad' (long side to `size`, zero-pad (value 0 after
      normalisation is mid-grey for [-1, 1])).
    inception_crop: train-time random resized crop (area fraction in
      [crop_scale, 1], aspect ratio in crop_ratio) before resizing to square.
    crop_scale: minimum area fraction of a random crop; 1.0 = no crop.
    crop_ratio: (min, max) aspect ratio of the inception crop.
    hflip: random horizontal flip (off by default: it contradicts "left"/"right").
    brightness: max additive brightness change in [-1, 1] units.
    mean, std: per-channel mean/std on the [0, 1] scale; None = [-1, 1] range.
  """
  size: int
  resize: str = 'warp'
  inception_crop: bool = False
  crop_scale: float = 1.0
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = False
  brightness: float = 0.0
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.resize not in RESIZE_MODES:
      raise ValueError(f'resize={self.resize!r}; choose one of {RESIZE_MODES}.')
    if not 0.0 < float(self.crop_scale) <= 1.0:
      raise ValueError(f'crop_scale must be in (0, 1], got {self.crop_scale}.')
    if (self.mean is None) != (self.std is None):
      raise ValueError('Give both mean and std, or neither.')

  @property
  def random(self) -> bool:
    return (self.inception_crop or self.crop_scale < 1.0 or self.hflip or
            bool(self.brightness))


def decode_image(image: Any, draft_size: int | None = None) -> np.ndarray:
  """Encoded bytes or an array -> uint8 [H, W, 3]; raises BadRecord if unusable."""
  if image is None:
    raise BadRecord('missing image')
  if isinstance(image, (bytes, bytearray, memoryview)):
    if not image:
      raise BadRecord('empty image file')
    try:
      pil = Image.open(io.BytesIO(bytes(image)))
      if draft_size and pil.format == 'JPEG':
        # JPEG DCT scaling: decode straight at >= the size we need.
        pil.draft('RGB', (draft_size, draft_size))
      pil.load()
      pil = pil.convert('RGB')
    except Exception as e:  # pylint: disable=broad-except
      # Truncated and corrupt files raise many types inside pillow.
      raise BadRecord(f'cannot decode image ({type(e).__name__}: {e})') from e
    array = np.asarray(pil)
  else:
    array = np.asarray(image)
    if array.ndim == 2:
      array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
      raise BadRecord(f'image has shape {array.shape}')
    if array.shape[-1] == 1:
      array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
      array = np.clip(array, 0, 255).astype(np.uint8)
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise BadRecord('zero-size image')
  return array


def _resize_pil(image: np.ndarray, width: int, height: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize(
      (max(1, width), max(1, height)), Image.Resampling.BICUBIC))


def resize(image: np.ndarray, size: int, mode: str) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3] by 'warp', 'crop' or 'pad'."""
  h, w = image.shape[:2]
  if mode == 'warp' or h == w:
    return _resize_pil(image, size, size)
  if mode == 'crop':
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    image = _resize_pil(image, nw, nh)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top:top + size, left:left + size]
  if mode == 'pad':
    scale = size / max(h, w)
    nh, nw = min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))
    image = _resize_pil(image, nw, nh)
    # Padding is filled with mid-grey, which normalises to about 0.
    out = np.full((size, size, 3), 128, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = image
    return out
  raise ValueError(f'Unknown resize mode {mode!r}; choose one of {RESIZE_MODES}.')


def _inception_crop_box(h: int, w: int, rng: np.random.Generator,
                        scale: tuple[float, float],
                        ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """(top, left, height, width) of an inception-style random crop."""
  area = h * w
  log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return top, left, ch, cw
  # Fallback, as in the original: the whole image's central square-ish crop.
  side = min(h, w)
  return (h - side) // 2, (w - side) // 2, side, side


def augment_image(image: np.ndarray, opts: ImageOptions,
                  rng: np.random.Generator | None = None
                  ) -> tuple[np.ndarray, np.float32]:
  """uint8 [H, W, 3] -> (uint8 [size, size, 3], brightness delta).

  The geometric part of preprocessing; `normalize` does the rest. Split so
  that worker processes hand over uint8 pixels (4x less than float32).
  """
  h, w = image.shape[:2]
  if opts.inception_crop:
    top, left, ch, cw = _inception_crop_box(h, w, rng, (opts.crop_scale, 1.0),
                                            opts.crop_ratio)
    image = _resize_pil(image[top:top + ch, left:left + cw], opts.size, opts.size)
  elif opts.crop_scale < 1.0:
    # Aspect-preserving random crop of a random area fraction.
    area = rng.uniform(opts.crop_scale, 1.0)
    ch = max(1, int(round(h * np.sqrt(area))))
    cw = max(1, int(round(w * np.sqrt(area))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    image = resize(image[top:top + ch, left:left + cw], opts.size, opts.resize)
  else:
    image = resize(image, opts.size, opts.resize)
  if opts.hflip and rng.uniform() < 0.5:
    image = image[:, ::-1]
  delta = np.float32(rng.uniform(-opts.brightness, opts.brightness)
                     if opts.brightness else 0.0)
  return np.ascontiguousarray(image), delta


def normalize(images: np.ndarray, opts: ImageOptions,
              delta: np.ndarray | float = 0.0) -> np.ndarray:
  """uint8 [..., H, W, 3] (+ per-image brightness delta) -> float32, normalised."""
  if opts.mean is None:
    out = images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
  else:
    out = ((images.astype(np.float32) / np.float32(255.0)
            - np.asarray(opts.mean, np.float32)) / np.asarray(opts.std, np.float32))
  if opts.brightness:
    delta = np.asarray(delta, np.float32).reshape(
        np.shape(delta) + (1,) * 3)
    out = out + delta
    if opts.mean is None:
      out = np.clip(out, -1.0, 1.0)
  return np.ascontiguousarray(out, dtype=np.float32)


def process_image(image: np.ndarray, opts: ImageOptions,
                  rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [size, size, 3], normalised, augmented if asked."""
  pixels, delta = augment_image(image, opts, rng)
  return normalize(pixels, opts, delta)


@dataclasses.dataclass(frozen=True)
class TextOptions:
  """Caption clean-up before tokenisation (the tokenizer truncates/pads/adds EOS).

  Attributes:
    lowercase: lowercase captions.
    canonicalize: NFKC-normalise, drop punctuation except apostrophes and
      collapse whitespace (CLIP/big_vision-style canonical captions).
  """
  lowercase: bool = False
  canonicalize: bool = False


_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)
_SPACE = re.compile(r'\s+')


def clean_caption(caption: Any, opts: TextOptions = TextOptions()) -> str:
  """A raw caption (str/bytes) -> str; raises BadRecord if missing, non-UTF-8 or empty."""
  if caption is None:
    raise BadRecord('missing caption')
  if isinstance(caption, (bytes, bytearray)):
    try:
      caption = bytes(caption).decode('utf-8')
    except UnicodeDecodeError as e:
      raise BadRecord('caption is not UTF-8') from e
  caption = str(caption)
  if any('\udc80' <= c <= '\udcff' for c in caption):  # undecodable bytes (csv)
    raise BadRecord('caption is not UTF-8')
  caption = caption.strip()
  if opts.canonicalize:
    caption = unicodedata.normalize('NFKC', caption)
    caption = _SPACE.sub(' ', _PUNCT.sub(' ', caption)).strip()
  if opts.lowercase:
    caption = caption.lower()
  if not caption:
    raise BadRecord('empty caption')
  return caption


def pick_caption(caption: Any, rng: np.random.Generator | None) -> Any:
  """One caption of a list (random in training, the first otherwise)."""
  if isinstance(caption, (list, tuple, np.ndarray)) and not isinstance(
      caption, (bytes, str)):
    options = list(caption)
    if not options:
      return None
    return options[int(rng.integers(len(options)))] if rng is not None else options[0]
  return caption


def captions_list(caption: Any, opts: TextOptions) -> list[str]:
  """All usable captions of a record (for retrieval), possibly empty."""
  items = caption if isinstance(caption, (list, tuple)) else [caption]
  out = []
  for c in items:
    try:
      out.append(clean_caption(c, opts))
    except BadRecord:
      pass
  return out


def image_options_from_config(data_config: Mapping[str, Any], size: int,
                              train: bool) -> ImageOptions:
  """ImageOptions from config.data (augmentation only when `train`)."""
  get = lambda k, d: data_config.get(k, d) if hasattr(data_config, 'get') else d
  mean, std = get('mean', None), get('std', None)
  kwargs = dict(size=size, resize=get('resize', 'warp'),
                mean=tuple(mean) if mean else None,
                std=tuple(std) if std else None)
  if train:
    aug = dict(get('augment', None) or {})
    kwargs.update(
        inception_crop=bool(aug.get('inception_crop', False)),
        crop_scale=float(aug.get('crop_scale', 1.0)),
        crop_ratio=tuple(aug.get('crop_ratio', (3 / 4, 4 / 3))),
        hflip=bool(aug.get('hflip', False)),
        brightness=float(aug.get('brightness', 0.0)))
  return ImageOptions(**kwargs)


def text_options_from_config(data_config: Mapping[str, Any]) -> TextOptions:
  """TextOptions from config.data (lowercase, canonicalize)."""
  get = lambda k: bool(data_config.get(k, False)) if hasattr(data_config, 'get') else False
  return TextOptions(lowercase=get('lowercase'), canonicalize=get('canonicalize'))
