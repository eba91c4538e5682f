"""Held-out evaluation sets named by config.data (see vljax.evals for the structure).

config.data.eval names one source used for everything it can serve:
  synthetic       zero-shot and retrieval on the same held-out images
  imagefolder:DIR zero-shot (class names = folder names, config.data.prompt_templates)
  tfds:NAME[:S]   zero-shot if its label feature has class names, else retrieval
  anything else   retrieval (records sharing an image, or a record with a list of
                  captions, give several captions per image)
config.data.eval_zeroshot / eval_retrieval, when set, name the source of that task instead.
config.data.eval_vqa, when set, names a visual question answering set (a jsonl with questions
and answers, vqav2 with annotations, synthetic?task=vqa); no other source serves VQA.
config.data.eval_classification, when set, names a SNLI-VE or NLVR2 set (snli_ve:, nlvr2:, a
jsonl with hypotheses or statements, synthetic?task=snli_ve / nlvr2), scored by the fine-tuning
objectives (vljax.evals.classification).

Every set is scored whole unless `max_examples` (config.eval.max_examples) caps it: then a
random sample of that many records, drawn with config.data.seed, is read (`sample_indices`),
and bad records within the sample are skipped, so a cap of N scores N minus the bad ones.
Images are kept as uint8 with the options that normalise them per batch (docs/evaluation.md).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import ml_collections
import numpy as np

from vljax.configlib import ConfigError
from vljax.data import formats, pipeline, preprocess, sources

TASKS = ("zeroshot", "retrieval", "vqa", "classification")


def _get(data_config, key: str, default: Any = None) -> Any:
  value = data_config.get(key, default) if hasattr(data_config, "get") else default
  return default if value in (None, "") else value


def sample_indices(num_records: int, max_examples: int, seed: int) -> np.ndarray | None:
  """Sorted record indices of a random sample of `max_examples` records; None = all.

  The sample is the first `max_examples` entries of a permutation drawn from `seed`, so it is
  the same for every evaluation and run with that seed, and a smaller cap picks a subset of a
  larger one. Sorted, because sequential formats read faster in file order.
  """
  if max_examples < 0:
    raise ConfigError(f"config.eval.max_examples must be >= 0 (0 = every example); got "
                      f"{max_examples}.")
  if max_examples == 0 or max_examples >= num_records:
    return None
  order = np.random.default_rng(seed).permutation(num_records)
  return np.sort(order[:max_examples])


def _load(data_config, spec: str, tokenizer, require_caption: bool, max_examples: int,
          vqa: bool = False, statement: bool = False):
  """(source, load_eval_data's dict); `vqa`: records need a question and answers instead;
  `statement`: a hypothesis or statement instead (and both images, if the first has two)."""
  if "|" in spec:
    raise ConfigError(f"Evaluation data cannot be a mixture: {spec!r}.")
  source = sources.get_source(spec, "heldout", data_config.image_size, data_config.seed,
                              data_config)
  if vqa and getattr(source, "has_answers", True) is False:
    raise ConfigError(f"VQA eval source {spec!r} (config.data.eval_vqa) has no answers to "
                      f"score against; add ?annotations=v2_mscoco_<subtype>_annotations.json "
                      f"(questions without answers serve prediction only).")
  indices = sample_indices(len(source), max_examples, data_config.seed)
  pair = statement and formats.SafeSource(source)[0].get("image2") is not None
  data = pipeline.load_eval_data(
      source, tokenizer, image_size=data_config.image_size, max_len=data_config.max_len,
      indices=indices, normalize=False,
      image_options=preprocess.image_options_from_config(data_config, data_config.image_size,
                                                         train=False),
      text_options=preprocess.text_options_from_config(data_config),
      require_caption=require_caption, require_question=vqa, require_answers=vqa, require_statement=statement,
      require_pair=pair)
  sampled = "every record" if indices is None else (
      f"a random sample of {len(indices)} (seed {data_config.seed})")
  logging.info("Eval source %s: %d usable examples of %d records (%s), %d bad skipped.",
               spec, len(data["image"]), len(source), sampled, data["skipped"])
  return source, data


def _bookkeeping(spec: str, data: dict[str, Any]) -> dict[str, Any]:
  """What every set carries besides its examples: how to normalise, where it came from."""
  return {"image_options": data["image_options"], "spec": spec, "skipped": data["skipped"]}


def zeroshot_set(data_config, spec: str, tokenizer, max_examples: int = 0) -> dict[str, Any]:
  """{'image' (uint8), 'label', 'class_prompts', 'record_index', 'image_options', 'spec',
  'skipped'}."""
  source, data = _load(data_config, spec, tokenizer, require_caption=False,
                       max_examples=max_examples)
  prompts = sources.class_prompts(spec, source, _get(data_config, "prompt_templates"))
  if np.any(data["label"] < 0) or np.any(data["label"] >= len(prompts)):
    raise ConfigError(f"Zero-shot source {spec!r} has labels outside its {len(prompts)} "
                      f"classes.")
  return {"image": data["image"], "label": data["label"], "class_prompts": prompts,
          "record_index": data["record_index"], **_bookkeeping(spec, data)}


def group_captions(data: dict[str, Any]) -> dict[str, Any]:
  """Records -> retrieval set: one row per distinct image, every caption of it."""
  first: dict[str, int] = {}
  keep, captions, caption_image = [], [], []
  for row, (image_id, caps) in enumerate(zip(data["image_id"], data["captions"])):
    if image_id not in first:
      first[image_id] = len(keep)
      keep.append(row)
    captions.extend(caps)
    caption_image.extend([first[image_id]] * len(caps))
  out = {"image": data["image"][np.asarray(keep)], "captions": captions,
         "caption_image": np.asarray(caption_image, dtype=np.int32)}
  if "record_index" in data:
    out["record_index"] = np.asarray(data["record_index"])[np.asarray(keep)]
  return out


def retrieval_set(data_config, spec: str, tokenizer, max_examples: int = 0) -> dict[str, Any]:
  """{'image' (uint8), 'captions', 'caption_image', 'record_index' (of each image's first
  record), 'image_options', 'spec', 'skipped'}.

  A cap samples records: each sampled record brings its image and its captions (in a file
  with one line per (image, caption) pair, only the sampled pairs' captions).
  """
  _, data = _load(data_config, spec, tokenizer, require_caption=True,
                  max_examples=max_examples)
  return {**group_captions(data), **_bookkeeping(spec, data)}


def vqa_set(data_config, spec: str, tokenizer, max_examples: int = 0) -> dict[str, Any]:
  """{'image' (uint8 [N, H, W, 3]), 'question' ([str] * N, cleaned like training's),
  'answers' ([[str]] * N, the human answers), 'answer_type' ([str] * N, '' when unknown),
  'record_index', 'image_options', 'spec', 'skipped'}.

  One row per question. Records without a usable question or without answers are bad:
  skipped and counted in 'skipped'. Questions about the same image each decode it again
  (VQAv2 has ~5 per image): simpler than grouping, and a capped sample rarely repeats one.

  Raises:
    ConfigError: a mixture, or a question file read without answers (vqav2 without
      ?annotations=).
  """
  _, data = _load(data_config, spec, tokenizer, require_caption=False,
                  max_examples=max_examples, vqa=True)
  return {"image": data["image"], "question": data["question"], "answers": data["answers"],
          "answer_type": data["answer_type"], "record_index": data["record_index"],
          **_bookkeeping(spec, data)}


def classification_set(data_config, spec: str, tokenizer, max_examples: int = 0
                       ) -> dict[str, Any]:
  """{'image' (uint8 [N, H, W, 3]), 'image2' (for pairs: when the source's first record has
  a second image, every record needs one), 'statement' ([str] * N, the hypothesis or
  statement cleaned like training's), 'label' (int32 [N]), 'record_index', 'image_options',
  'spec', 'skipped'}. Records without a usable statement, image or label are skipped."""
  _, data = _load(data_config, spec, tokenizer, require_caption=False,
                  max_examples=max_examples, statement=True)
  keep = np.flatnonzero(data["label"] >= 0)
  out = {"statement": [data["statement"][i] for i in keep],
         **{k: np.asarray(data[k])[keep] for k in ("image", "image2", "label", "record_index")
            if k in data},
         **_bookkeeping(spec, data)}
  out["skipped"] += len(data["label"]) - len(keep)
  if not len(keep):
    raise ConfigError(f"Classification eval source {spec!r} (config.data.eval_classification) "
                      f"has no record with a label.")
  return out


def _caps(eval_config: Mapping[str, Any] | None) -> dict[str, int]:
  """{'zeroshot': N, 'retrieval': N, 'vqa': N} from config.eval.max_examples (0 = whole set)."""
  given = eval_config.get("max_examples") if eval_config is not None else None
  caps = {task: 0 for task in TASKS}
  for task, value in (dict(given) if given else {}).items():
    if task not in caps:
      raise ConfigError(f"config.eval.max_examples has an unknown task {task!r}; known: "
                        f"{', '.join(TASKS)}.")
    caps[task] = int(value or 0)
  return caps


def load_eval_sets(data_config: ml_collections.ConfigDict, tokenizer,
                   eval_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The zero-shot, retrieval, VQA and classification sets the config names.

  Args:
    data_config: config.data (sources, image and text options, seed of the samples).
    tokenizer: the model's tokenizer.
    eval_config: config.eval; its max_examples {'zeroshot': N, 'retrieval': N, 'vqa': N} caps
      each set to a random sample of N records drawn with data_config.seed (0 or missing = the
      whole set). None = every set whole.
  """
  caps = _caps(eval_config)
  spec = _get(data_config, "eval", "")
  zs_spec = _get(data_config, "eval_zeroshot", "")
  rt_spec = _get(data_config, "eval_retrieval", "")
  vqa_spec = _get(data_config, "eval_vqa", "")
  out: dict[str, Any] = {}
  if vqa_spec:
    out["vqa"] = vqa_set(data_config, vqa_spec, tokenizer, caps["vqa"])
  cls_spec = _get(data_config, "eval_classification", "")
  if cls_spec:
    out["classification"] = classification_set(data_config, cls_spec, tokenizer,
                                               caps["classification"])
  if spec == "synthetic" and not zs_spec and not rt_spec and (
      caps["zeroshot"] == caps["retrieval"]):
    # The same held-out images serve both tasks (one caption per image); the evaluator embeds
    # the one image array once for both.
    source, data = _load(data_config, spec, tokenizer, require_caption=True,
                         max_examples=caps["zeroshot"])
    kept = {**_bookkeeping(spec, data), "record_index": data["record_index"]}
    out.update({
        "zeroshot": {"image": data["image"], "label": data["label"],
                     "class_prompts": sources.class_prompts(spec), **kept},
        "retrieval": {"image": data["image"], "captions": data["caption"],
                      "caption_image": None, **kept},
    })
    return out
  if spec and not (zs_spec or rt_spec):
    # The kind without options ('synthetic?task=vqa' is synthetic); a mixture is refused by
    # _load.
    kind = sources.parse_spec(spec)[0] if "|" not in spec else ""
    if kind in ("imagefolder", "synthetic"):
      zs_spec = spec
    if kind == "synthetic":
      rt_spec = spec
    elif kind == "tfds":
      source = sources.get_source(spec, "heldout", data_config.image_size, data_config.seed,
                                  data_config)
      if source.label_names():
        zs_spec = spec
      else:
        rt_spec = spec
    elif kind != "imagefolder":
      rt_spec = spec
  if zs_spec:
    out["zeroshot"] = zeroshot_set(data_config, zs_spec, tokenizer, caps["zeroshot"])
  if rt_spec:
    out["retrieval"] = retrieval_set(data_config, rt_spec, tokenizer, caps["retrieval"])
  return out
