"""Data sources by name, as written in config.data.train / config.data.eval.

Spec strings, `KIND:ARG[?name=value&name=value]`:
  synthetic                      the embedded synthetic dataset
  synthetic?task=vqa             the same images and captions, each with a question and answers
  synthetic?task=snli_ve         ... each with a hypothesis and an entailment label
  synthetic?task=nlvr2           pairs of images with a True/False statement about the pair
  webdataset:GLOB                img2dataset-style tar shards ({00000..01242}, * and ? work)
  jsonl:PATH, csv:PATH           one record per line: image path (relative to the file) + caption
                                 (jsonl: or a question and its answers)
  vqav2:QUESTIONS_JSON?annotations=ANNOTATIONS_JSON&images=IMAGE_DIR
                                 the official VQAv2 question / annotation files and COCO images
  snli_ve:JSONL?images=DIR       the official SNLI-VE json lines and the Flickr30k images
  nlvr2:JSON?images=DIR          the official NLVR2 json lines and the pairs' images
  arrayrecord:GLOB               shards written by `python -m vljax.data.convert`
  tfds:NAME[:SPLIT]              a prepared TFDS dataset (in config.data.tfds_data_dir)
  imagefolder:DIR                DIR/CLASS/*.jpg, for zero-shot classification
  W1*SPEC1|W2*SPEC2              a weighted mixture (training only); each SPEC has its own options

Options name the fields of one source (`csv:train.csv?image=filepath&caption=title`); the
kinds and the options each takes are the table OPTIONS. Because a glob may use '?' as a
wildcard, only the text after the LAST '?' is options, and only when all of it reads as
`name=value(&name=value)*` with identifier names; anything else stays part of ARG.

`check_source` opens a source and decodes a few records before training starts, so a wrong
path or field name fails in seconds with the config key that named it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vljax.configlib import ConfigError
from vljax.data import formats
from vljax.data import mixture
from vljax.data import preprocess
from vljax.data import synthetic


@dataclasses.dataclass(frozen=True)
class Option:
  """One `?name=value` option of a source kind.

  Attributes:
    default: the value when the spec does not give one (a string, as written in a spec).
    help: what it means (shown in errors; keep docs/data.md's table in step).
    parse: turns the written string into the value the reader gets (e.g. int).
  """
  default: str
  help: str
  parse: Callable[[str], Any] = str


_IMAGE = Option("image", "image path field / column (jsonl, csv) or image feature (tfds)")
_CAPTION = Option("caption", "caption field / column / feature ('/' for nested TFDS features)")
_LABEL = Option("label", "integer class label field / column / feature")
_QUESTION = Option("question", "VQA question field (a record needs a caption or a question)")
_ANSWERS = Option("answers", "VQA answers field: a list of strings or of {\"answer\": ...} "
                  "objects")


def _task(text: str) -> str:
  if text not in synthetic.TASKS:
    raise ValueError(f"the task is one of {', '.join(synthetic.TASKS)}")
  return text


# The options every kind takes (none yet; e.g. an eval sample size would go here).
COMMON_OPTIONS: dict[str, Option] = {}

# The options each kind takes after '?'. Adding one is a row here, a read of
# `option_values(...)[name]` where the source is built, and a row in docs/data.md.
OPTIONS: dict[str, dict[str, Option]] = {
    "synthetic": {"task": Option(
        "caption", "caption | vqa | snli_ve | nlvr2: vqa adds a question about the image and "
        "its answers to every record (same images and captions), snli_ve a hypothesis and an "
        "entailment label; nlvr2 gives pairs of images with a statement", _task)},
    "webdataset": {"caption": Option(
        "caption", "field of KEY.json holding the caption; when given, it is read even "
        "where a KEY.txt exists")},
    "jsonl": {"image": _IMAGE, "caption": _CAPTION, "label": _LABEL, "question": _QUESTION,
              "answers": _ANSWERS},
    "csv": {"image": _IMAGE, "caption": _CAPTION, "label": _LABEL},
    "arrayrecord": {},
    "tfds": {"image": _IMAGE, "caption": _CAPTION, "label": _LABEL},
    "imagefolder": {},
    "vqav2": {
        "annotations": Option("", "the v2_mscoco_<subtype>_annotations.json of the questions "
                              "(without it: no answers, prediction only)"),
        "images": Option("", "the folder of the COCO images COCO_<subtype>_<id>.jpg")},
    "snli_ve": {"images": Option("", "the folder of the Flickr30k images <Flikr30kID>.jpg")},
    "nlvr2": {"images": Option("", "the folder of the pairs' images <stem>-img0.png / "
                               "-img1.png (train: in its numbered subfolders)")},
}
KNOWN = tuple(OPTIONS)

# What a record must have to count as usable in `check_source`:
#   image           a decodable image (zero-shot classification)
#   caption         and a usable caption (retrieval)
#   caption_or_vqa  and a caption, or a question with at least one answer (training)
#   vqa             and a question with at least one answer (VQA evaluation)
#   statement       and a usable hypothesis / statement (SNLI-VE, NLVR2 evaluation)
# A record with a hypothesis or statement also satisfies caption_or_vqa (training).
REQUIREMENTS = ("image", "caption", "caption_or_vqa", "vqa", "statement")

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
)

# Split names of `tfds:NAME` without an explicit split.
_TFDS_SPLITS = {"train": "train", "heldout": "test"}

# Kinds whose ARG is a glob, where '?' may be a wildcard (named in option errors).
_GLOB_KINDS = ("webdataset", "arrayrecord")

# `name=value(&name=value)*`: what must follow the last '?' for it to be options.
_OPTIONS_RE = re.compile(r"[A-Za-z_]\w*=[^&]*(?:&[A-Za-z_]\w*=[^&]*)*", re.ASCII)

# Start-up probing draws its random positions from this seed, so a failure is reproducible
# whatever config.data.seed is.
_PROBE_SEED = 0


def options_of(kind: str) -> dict[str, Option]:
  """The options `kind` takes: name -> Option."""
  return {**COMMON_OPTIONS, **OPTIONS[kind]}


def _split_options(spec: str) -> tuple[str, str | None]:
  """'csv:a.csv?image=f' -> ('csv:a.csv', 'image=f'); (spec, None) when there are no options."""
  head, mark, tail = spec.rpartition("?")
  if mark and _OPTIONS_RE.fullmatch(tail):
    return head, tail
  return spec, None


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
  """One source spec -> (kind, arg, options given in the spec).

  `options` holds only what the spec writes (see `option_values` for defaults), in order, so
  `format_spec(*parse_spec(s))` gives back `s`.

  Raises:
    ConfigError: a mixture (use mixture.split_spec first), unknown kind, missing ARG, or an
      option the kind does not take (the error lists the ones it does).
  """
  spec = spec.strip()
  if "|" in spec:
    raise ConfigError(f"{spec!r} is a mixture of sources; split it with "
                      f"mixture.split_spec and parse each part.")
  head, option_text = _split_options(spec)
  kind, _, arg = head.partition(":")
  if kind not in OPTIONS:
    raise ConfigError(f"Unknown data source {spec!r} in config.data; known sources: {KNOWN} "
                      f"(e.g. 'webdataset:/data/cc12m/{{00000..01242}}.tar'), or a mixture "
                      f"'0.7*SPEC|0.3*SPEC'.")
  if kind != "synthetic" and not arg:
    raise ConfigError(f"Data source {spec!r} needs a path or name after '{kind}:'.")
  options: dict[str, str] = {}
  valid = options_of(kind)
  for item in option_text.split("&") if option_text is not None else ():
    name, _, value = item.partition("=")
    if name not in valid:
      takes = (f"{kind} takes: {', '.join(valid)}" if valid else f"{kind} takes no options")
      glob_note = (" (the text after the last '?' reads as options; if it is part of the "
                   "glob, write that '?' as a character class such as [0-9])"
                   if kind in _GLOB_KINDS else "")
      raise ConfigError(f"Unknown option {name!r} in data source {spec!r}; {takes}"
                        f"{glob_note}. See docs/data.md.")
    if name in options:
      raise ConfigError(f"Option {name!r} is given twice in data source {spec!r}.")
    if not value:
      raise ConfigError(f"Option {name!r} in data source {spec!r} needs a value "
                        f"({name}=...: {valid[name].help}).")
    options[name] = value
  return kind, arg, options


def format_spec(kind: str, arg: str, options: Mapping[str, str] | None = None) -> str:
  """The inverse of `parse_spec`."""
  spec = f"{kind}:{arg}" if arg else kind
  if options:
    return spec + "?" + "&".join(f"{k}={v}" for k, v in options.items())
  if _split_options(spec)[1] is not None:
    # The ARG's own tail would read as options; it needs explicit options after it.
    raise ValueError(f"{spec!r} would read as options; give at least one option.")
  return spec


def option_values(kind: str, given: Mapping[str, str], spec: str = "") -> dict[str, Any]:
  """Every option of `kind`: the given ones parsed, the others at their defaults."""
  out = {}
  for name, option in options_of(kind).items():
    text = given.get(name, option.default)
    try:
      out[name] = option.parse(text)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"Option {name}={text!r} in data source {spec!r}: {e} "
                        f"({option.help}).") from None
  return out


def _config_value(options: Mapping[str, Any] | None, key: str, default: Any) -> Any:
  if not options:
    return default
  value = options.get(key, default) if hasattr(options, "get") else default
  return default if value in (None, "") else value


def _mixture(parts: list[tuple[float, str]],
             open_part: Callable[[str, int], Any]) -> mixture.Mixture:
  return mixture.Mixture([open_part(s, k) for k, (_, s) in enumerate(parts)],
                         [w for w, _ in parts], names=[s for _, s in parts])


def get_source(spec: str, split: str, image_size: int, seed: int,
               options: Mapping[str, Any] | None = None) -> Any:
  """A random-access source of raw records (see vljax.data.formats), or a Mixture.

  Args:
    spec: the source string (see the module docstring); field names are its options.
    split: 'train' or 'heldout' (selects the synthetic split and the default TFDS split).
    image_size: size of synthetic images.
    seed: seed of synthetic data.
    options: config.data, for tfds_data_dir.

  Raises:
    ConfigError: unknown kind or option, a missing path/name, a named field or column the
      data does not have.
    formats.EmptySourceError: the source yields nothing (naming the path).
  """
  if "|" in spec:
    return _mixture(mixture.split_spec(spec),
                    lambda s, k: get_source(s, split, image_size, seed + k, options))
  kind, arg, given = parse_spec(spec)
  values = option_values(kind, given, spec)
  # A field the user named must exist; the default label field may be absent (label -1).
  require_label = "label" in given
  if kind == "synthetic":
    return synthetic.SyntheticImageText(split=split, image_size=image_size, seed=seed,
                                        task=values["task"])
  if kind == "snli_ve":
    return formats.SnliVe(arg, values["images"])
  if kind == "nlvr2":
    return formats.Nlvr2(arg, values["images"])
  if kind == "vqav2":
    return formats.VQAv2(arg, annotations_path=values["annotations"],
                         image_dir=values["images"])
  if kind == "webdataset":
    return formats.WebDataset(arg, caption_key=values["caption"],
                              prefer_json="caption" in given)
  if kind == "jsonl":
    return formats.JsonLines(arg, values["image"], values["caption"], values["label"],
                             require_label=require_label, question_key=values["question"],
                             answers_key=values["answers"], named=tuple(given))
  if kind == "csv":
    return formats.Csv(arg, values["image"], values["caption"], values["label"],
                       require_label=require_label)
  if kind == "arrayrecord":
    return formats.ArrayRecord(arg)
  if kind == "imagefolder":
    return formats.ImageFolder(arg)
  # tfds
  dataset, _, tfds_split = arg.partition(":")
  data_dir = _config_value(options, "tfds_data_dir", None) or os.environ.get("TFDS_DATA_DIR")
  required = tuple(values[k] for k in ("caption", "label") if k in given)
  return formats.Tfds(dataset, tfds_split or _TFDS_SPLITS.get(split, split),
                      image_key=values["image"], text_key=values["caption"],
                      label_key=values["label"], data_dir=data_dir, required=required)


# ------------------------------------------------------------------ start-up checks


def _one_line(text: str) -> str:
  return " ".join(str(text).split("\n")).strip()


def _lower_first(text: str) -> str:
  # "No file matches" -> "no file matches", but "TFDS ..." stays.
  if len(text) > 1 and text[0].isupper() and text[1].islower():
    return text[0].lower() + text[1:]
  return text


def _probe_indices(n: int, probe: int) -> list[int]:
  """The first few positions, then random ones: a bad head and a bad tail both show."""
  first = min(n, max(1, probe // 2))
  picks = list(range(first))
  rest = min(probe - first, n - first)
  if rest > 0:
    rng = np.random.default_rng(_PROBE_SEED)
    picks += sorted(int(i) + first for i in rng.choice(n - first, rest, replace=False))
  return picks


def _text_failure(record: Mapping[str, Any], require: str) -> None:
  """Raises BadRecord when the record lacks the text `require` asks for (REQUIREMENTS)."""
  if require == "image":
    return
  opts = preprocess.TextOptions()
  statement = formats.statement_of(record)
  if require == "statement" or (require == "caption_or_vqa" and statement is not None):
    if not preprocess.captions_list(statement, opts):
      raise preprocess.BadRecord(f"no usable hypothesis or statement (got {statement!r:.60})")
    return
  question = record.get("question")
  has_question = question is not None and bool(preprocess.captions_list(question, opts))
  answers = preprocess.captions_list(
      formats.answer_list(record.get("answers")) if has_question else [], opts)
  if require == "vqa" or (require == "caption_or_vqa" and has_question):
    if not has_question:
      raise preprocess.BadRecord(f"no usable question (got {question!r:.60})")
    if not answers:
      raise preprocess.BadRecord(f"the question {question!r:.60} has no answers")
    return
  if not preprocess.captions_list(record.get("caption"), opts):
    what = "caption or question" if require == "caption_or_vqa" else "caption"
    raise preprocess.BadRecord(f"no usable {what} (got {record.get('caption')!r:.60})")


def _probe_failure(record: Mapping[str, Any], image_size: int,
                   require_caption: bool = True, require: str | None = None) -> str | None:
  """Why a raw record would be skipped, or None if it decodes.

  `require` is one of REQUIREMENTS; None = 'caption_or_vqa' if require_caption else 'image'.
  """
  require = require or ("caption_or_vqa" if require_caption else "image")
  try:
    if "error" in record:
      raise preprocess.BadRecord(record["error"])
    preprocess.decode_image(record.get("image"), image_size)
    if record.get("image2") is not None:  # the second image of a pair
      preprocess.decode_image(record["image2"], image_size)
    _text_failure(record, require)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever a reader or the decoder raises is this record's reason.
    return str(e) if isinstance(e, preprocess.BadRecord) else f"{type(e).__name__}: {e}"
  return None


def _no_answers_anywhere(source: Any) -> bool:
  """A question file read without its answers (vqav2 without ?annotations=)."""
  return getattr(source, "has_answers", True) is False


def _check_one(spec: str, config_key: str, where: str, split: str, image_size: int,
               seed: int, options: Mapping[str, Any] | None, require: str,
               probe: int) -> Any:
  try:
    source = get_source(spec, split, image_size, seed, options)
  except formats.EmptySourceError as e:
    raise formats.EmptySourceError(
        f"{where}: {_lower_first(_one_line(e))} Fix: point {config_key} at an existing, "
        f"non-empty source (relative paths are resolved from {os.getcwd()}).") from e
  except ConfigError as e:
    raise ConfigError(f"{where}: {_lower_first(_one_line(e))}") from e
  except OSError as e:
    raise ConfigError(f"{where}: cannot read it ({type(e).__name__}: {_one_line(e)}). Fix: "
                      f"point {config_key} at a readable source.") from e
  if require in ("caption_or_vqa", "vqa") and _no_answers_anywhere(source):
    # Every record would be skipped one by one; say why once, now.
    raise ConfigError(
        f"{where}: the questions come without answers (no ?annotations=), so they can only "
        f"be predicted, not trained or evaluated on. Fix: add "
        f"?annotations=v2_mscoco_<subtype>_annotations.json, or use this source for "
        f"prediction only.")
  if probe <= 0:
    return source
  safe = formats.SafeSource(source)
  picks = _probe_indices(len(source), probe)
  failures = []
  for i in picks:
    record = safe[i]
    reason = _probe_failure(record, image_size, require=require)
    if reason is not None:
      failures.append((str(record.get("key", i)), _one_line(reason)))
  if len(failures) == len(picks):
    key, reason = failures[0]
    kind = parse_spec(spec)[0]
    fields = ", ".join(f"?{n}=" for n in options_of(kind))
    paths = (" (relative to the folder of the file)" if kind in ("jsonl", "csv") else "")
    raise ConfigError(
        f"{where}: no usable record among the {len(picks)} read at start-up; the first, "
        f"{key}, failed with: {reason}. Fix: check that the files are intact and the image "
        f"paths exist{paths}" + (f", and that the spec's field options ({fields}) name the "
                                 f"right fields (docs/data.md)." if fields else "."))
  if failures:
    logging.warning("%s: %d of %d records read at start-up are unusable (they will be "
                    "skipped), e.g. %s: %s", where, len(failures), len(picks), *failures[0])
  return source


def check_source(spec: str, config_key: str, split: str, image_size: int, seed: int,
                 options: Mapping[str, Any] | None = None, require_caption: bool = True,
                 probe: int = 16, require: str | None = None) -> Any:
  """Opens a source and decodes a sample of it; returns the opened source (or Mixture).

  Meant to run before anything is compiled, so that a wrong path or field name fails at once.

  Args:
    spec, split, image_size, seed, options: as for `get_source`.
    config_key: the config key that named `spec` (e.g. 'config.data.eval_retrieval'); every
      error message starts with it.
    require_caption: a record without a usable caption counts as failing, unless it is a VQA
      record (a question with answers), which training takes too (False for zero-shot
      sources such as imagefolder). Read only when `require` is None.
    probe: how many records to read and decode (the first half of them from the start, the
      rest from random positions drawn with a fixed seed); 0 = only open.
    require: what a record needs, one of REQUIREMENTS ('image', 'caption', 'caption_or_vqa',
      'vqa'); None = from require_caption. A question file without answers (vqav2 without
      ?annotations=) fails at once under 'caption_or_vqa' and 'vqa'.

  Raises:
    ConfigError (formats.EmptySourceError when nothing was found): one line starting
      "{config_key}={spec!r}: " that names the problem and the fix, when the source cannot be
      opened or when every probed record fails (naming the first failure). A mixture is
      checked component by component.
  """
  where = f"{config_key}={spec!r}"
  require = require or ("caption_or_vqa" if require_caption else "image")
  if require not in REQUIREMENTS:
    raise ValueError(f"require={require!r}; choose one of {REQUIREMENTS}.")
  check = lambda s, k, w: _check_one(s, config_key, w, split, image_size, seed + k, options,
                                     require, probe)
  if "|" in spec:
    try:
      parts = mixture.split_spec(spec)
    except ConfigError as e:
      raise ConfigError(f"{where}: {_lower_first(_one_line(e))}") from e
    return _mixture(parts, lambda s, k: check(s, k, f"{where}, component {s!r}"))
  return check(spec, 0, where)


def check_config_sources(data_config: Mapping[str, Any], train: bool = True,
                         evaluate: bool = True) -> dict[str, Any]:
  """Checks config.data.train and the eval sources it names; {config key: opened source}.

  Training records need a caption or a question with answers; retrieval records a caption;
  eval_vqa records a question with answers; eval_classification records a hypothesis or
  statement (SNLI-VE, NLVR2). Zero-shot sources (eval_zeroshot, and an `eval`
  of kind imagefolder or tfds, which may be a classification set) are checked without
  requiring any text.
  """
  get = lambda k: _config_value(data_config, k, "")
  wanted = []  # (key under config.data, split, what a record needs)
  if train and get("train"):
    wanted.append(("train", "train", "caption_or_vqa"))
  if evaluate:
    eval_spec = get("eval")
    if eval_spec and not (get("eval_zeroshot") or get("eval_retrieval")):
      kind = eval_spec.split(":", 1)[0].split("?", 1)[0]
      wanted.append(("eval", "heldout",
                     "image" if kind in ("imagefolder", "tfds") else "caption"))
    wanted += [(k, "heldout", need) for k, need in (
        ("eval_zeroshot", "image"), ("eval_retrieval", "caption"), ("eval_vqa", "vqa"),
        ("eval_classification", "statement")) if get(k)]
  out = {}
  for key, split, need in wanted:
    out[f"config.data.{key}"] = check_source(
        get(key), f"config.data.{key}", split, int(get("image_size") or 224),
        int(get("seed") or 0), data_config, require=need)
  return out


def class_prompts(spec: str, source: Any = None,
                  templates: Sequence[str] | None = None) -> list[list[str]]:
  """Zero-shot prompts of the source's classes: one list of prompts (templates) per class.

  The synthetic data has its own prompts; imagefolder takes class names from folder names,
  tfds from its label feature; `templates` ('{}' = class name) default to DEFAULT_TEMPLATES.
  """
  kind, _, _ = parse_spec(spec)
  if kind == "synthetic":
    return synthetic.class_prompts()
  names = None
  if isinstance(source, formats.ImageFolder):
    names = source.class_names
  elif isinstance(source, formats.Tfds):
    names = source.label_names()
  if not names:
    raise ConfigError(f"Zero-shot evaluation needs class names; {spec!r} has none "
                      f"(use imagefolder:DIR or a TFDS dataset with a ClassLabel feature).")
  templates = list(templates or DEFAULT_TEMPLATES)
  return [[t.format(n.replace("_", " ")) for t in templates] for n in names]
