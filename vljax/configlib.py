"""Loading, overriding and validating ml_collections configs.

A config is `configs/NAME.py:get_config(arg)`, selected as `configs/NAME.py[:k=v,k=v]`, then
amended by `--config.a.b=value` overrides. Every mistake a user can make here (unknown key,
wrong type, impossible mesh or batch) raises ConfigError naming the key and the fix, before
anything is compiled.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Mapping, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config that cannot be used; the message names the key and the fix."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config-string argument "k=v,k2=v2" against typed defaults.

  Values are converted to the type of their default; keys without a default are an error.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ConfigError(f"Config argument {item!r} is not of the form key=value. "
                        f"Valid keys: {', '.join(sorted(defaults))}.")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ConfigError(f"Unknown config argument {key!r}. Valid keys: "
                        f"{', '.join(sorted(defaults))}.")
    out[key] = _convert(value, defaults[key], f"config argument {key!r}")
  return out


def _convert(text: str, current: Any, where: str) -> Any:
  """Converts `text` to the type of `current` (the value it replaces); "None" unsets an
  optional value of any type but str (e.g. --config.optim.adafactor.clip_threshold=None)."""
  if text == "None" and current is not None and not isinstance(current, str):
    return None
  try:
    if isinstance(current, bool):
      lowered = text.lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError("expected true/false")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return type(current)(value)
    # None or another type: take a Python literal, else the raw string.
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"{where}: cannot read {text!r} as {type(current).__name__} "
                      f"(current value {current!r}): {e}") from None


def _config_module(path: str):
  """The config file at `path` as a module (not added to sys.modules)."""
  module_spec = importlib.util.spec_from_file_location(
      f"vljax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def sibling_config(config_file: str, name: str):
  """The config file `name` (e.g. 'blip.py') next to `config_file` (a config's __file__), as a
  module: a fine-tuning config builds on its pre-training config's get_config."""
  return _config_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"Config file {path!r} does not exist (from --config={spec}).")
  module = _config_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file {path!r} has no get_config(arg) function.")
  config = module.get_config(arg or None)
  config.lock()
  return config


DURATION_UNITS = ("steps", "examples", "epochs")


def _duration_siblings(node: Any, leaf: str) -> list[str]:
  """For a duration key such as 'total_epochs', the other units of it that are set."""
  stem, _, unit = leaf.rpartition("_")
  if not stem or unit not in DURATION_UNITS:
    return []
  return [f"{stem}_{other}" for other in DURATION_UNITS
          if other != unit and f"{stem}_{other}" in node and node[f"{stem}_{other}"] is not None]


def _overlay(base: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
  for key, value in values.items():
    if (isinstance(value, Mapping) and key in base
        and isinstance(base[key], ml_collections.ConfigDict)):
      _overlay(base[key], value)
    else:
      base[key] = value


def read_run_config(directory: str) -> dict:
  """DIRECTORY/config.json (a workdir or its export) as written, a plain dict."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"No config.json in {directory!r}: is it a vljax workdir or export? "
                      f"Name a config explicitly with --config=configs/NAME.py.")
  with open(path) as f:
    return json.load(f)


def load_run_config(directory: str) -> ml_collections.ConfigDict:
  """The config a run wrote to DIRECTORY/config.json (a workdir or its export), locked.

  It is laid over today's defaults (base_train_config), so a workdir written before a key
  existed still loads, with that key at its default.
  """
  config = base_train_config()
  _overlay(config, read_run_config(directory))
  config.lock()
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    notes: list[str] | None = None) -> ml_collections.ConfigDict:
  """Applies "a.b.c=value" overrides; unknown keys and unreadable values raise ConfigError.

  A duration given in one unit (total_epochs, optim.warmup_examples, ...) replaces the same
  duration in the other units, so the last one given wins; what it replaced is appended to
  `notes` for the log.
  """
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"Override {item!r} is not of the form --config.key=value.")
    dotted, text = item.split("=", 1)
    *parents, leaf = dotted.split(".")
    node = config
    walked = []
    for name in parents + [leaf]:
      if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or name not in node:
        valid = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict,
                                                         Mapping)) else []
        where = ".".join(walked) or "the top level"
        raise ConfigError(f"Unknown config key 'config.{dotted}' (from --config.{item}): "
                          f"{name!r} is not a key of {where}. Valid keys there: "
                          f"{', '.join(valid)}.")
      if name != leaf:
        node = node[name]
        walked.append(name)
    value = _convert(text, node[leaf], f"--config.{dotted}")
    replaced = _duration_siblings(node, leaf) if value is not None else []
    with config.unlocked():
      try:
        node[leaf] = value
      except TypeError as e:
        raise ConfigError(f"--config.{dotted}={text}: {e}") from None
      for sibling in replaced:
        prefix = ".".join(parents + [sibling])
        if notes is not None:
          notes.append(f"--config.{dotted}={text} replaces config.{prefix}={node[sibling]}.")
        node[sibling] = None
  return config


def steps_for(config: ml_collections.ConfigDict, prefix: str, global_batch: int,
              epoch_size: int | None) -> int:
  """Reads a duration given as `{prefix}_steps`, `{prefix}_examples` or `{prefix}_epochs`.

  Exactly one of the three may be set (non-None); returns it in steps, rounded down.
  """
  given = {unit: config.get(f"{prefix}_{unit}") for unit in ("steps", "examples", "epochs")}
  given = {k: v for k, v in given.items() if v is not None}
  if len(given) != 1:
    raise ConfigError(f"Set exactly one of config.{prefix}_steps, config.{prefix}_examples, "
                      f"config.{prefix}_epochs (got {given or 'none'}).")
  unit, value = next(iter(given.items()))
  if unit == "steps":
    return int(value)
  if unit == "examples":
    return int(value) // global_batch
  if not epoch_size:
    raise ConfigError(f"config.{prefix}_epochs needs a finite dataset size; use "
                      f"config.{prefix}_steps or config.{prefix}_examples instead.")
  return int(value * epoch_size) // global_batch


def cache_root() -> str:
  """Where vljax caches what it can rebuild (tokenizers, tar indexes, compiled steps):
  $VLJAX_CACHE, else ~/.cache/vljax."""
  return os.environ.get("VLJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "vljax")


def base_train_config() -> ml_collections.ConfigDict:
  """Trainer settings shared by every family; a config file fills in model, loss and recipe."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = ""
  c.model = ml_collections.ConfigDict()
  # How every transformer stack runs its layers (docs/scale.md, "Scan and remat"):
  #   scan   false: a Python loop, parameters {prefix}_0, {prefix}_1, ...; true: one nn.scan
  #          over the layers (compiles once whatever the depth), parameters stacked on a
  #          leading 'layers' axis under {prefix}. Checkpoints of either layout load into
  #          either (config.init converts).
  #   remat  what a layer keeps for the backward pass: "none" (everything), "full" or
  #          "block_inputs" (only its input; the layer is recomputed), "dots" (its matmul
  #          outputs; the rest is recomputed).
  #   attention  how jax.nn.dot_product_attention runs: "xla" (JAX's default), "auto" (cuDNN's
  #          fused kernel on GPUs where it applies, XLA's elsewhere) or "cudnn"
  #          (vljax.models.stacks).
  c.layers = ml_collections.ConfigDict(dict(scan=False, remat="none", attention="xla"))
  c.loss = ml_collections.ConfigDict()
  c.dtype = "float32"

  c.data = ml_collections.ConfigDict(dict(
      train="synthetic", eval="synthetic", image_size=224, max_len=64, seed=0,
      worker_count=0,
      # Field names are options of each source spec (`csv:PATH?image=filepath&caption=title`,
      # docs/data.md); this is only where prepared TFDS datasets live ("" = $TFDS_DATA_DIR).
      tfds_data_dir="",
      # Optional task-specific eval sources ("" = derived from data.eval).
      eval_zeroshot="", eval_retrieval="",
      # A visual question answering eval set ("" = none; e.g. "synthetic?task=vqa" or
      # "vqav2:QUESTIONS?annotations=ANNOTATIONS&images=DIR", docs/data.md).
      eval_vqa="",
      # A classification set for SNLI-VE / NLVR2 fine-tuning ("" = none; e.g.
      # "synthetic?task=snli_ve", "nlvr2:dev.json?images=DIR", docs/fusion.md).
      eval_classification="",
      prompt_templates=["a photo of a {}.", "a picture of a {}.", "an image of a {}.",
                        "a photo of the {}."],
      # Images: resize "warp" | "crop" | "pad"; mean/std on [0, 1] ([] = [-1, 1] range).
      resize="warp", mean=[], std=[],
      augment=dict(inception_crop=False, crop_scale=1.0, crop_ratio=[0.75, 4 / 3],
                   hflip=False, brightness=0.0),
      # Text clean-up before tokenisation.
      lowercase=False, canonicalize=False))
  # A sentencepiece .model file. "" is allowed only on the synthetic data (its own tokenizer);
  # make one for real data with `python -m vljax.data.tokenizer train SPEC --out PATH`.
  c.tokenizer = ml_collections.ConfigDict(dict(path=""))

  # Start from weights (LiT, fine-tuning): a vljax workdir or export directory, and
  # [regex, replacement] rules from the source's parameter paths to this model's (first match
  # wins; a source path no rule matches is not loaded; [] = every parameter under its own name).
  c.init = ml_collections.ConfigDict(dict(path="", mapping=[]))

  c.batch_size = 32768  # global
  # Compute each step's gradient in this many micro-batches (memory of one micro-batch). Exact
  # for every objective, contrastive ones included (cached embeddings; docs/scale.md).
  c.grad_accum_steps = 1
  c.total_steps = None  # set exactly one of total_steps / total_examples / total_epochs
  c.total_examples = None
  c.total_epochs = None

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
      # Decoupled weight decay (docs/optim.md): each step a decayed parameter shrinks by
      # wd * mult * schedule(step) / lr, NOT multiplied by the learning rate; wd_mults picks the
      # decayed parameters by regex over their paths ([regex, mult], first match wins).
      wd=1e-4, wd_mults=[["(^|/)kernel$", 1.0]],
      schedule="cosine", end_lr_frac=0.0, rsqrt_timescale=10_000,
      warmup_steps=None, warmup_examples=None, warmup_epochs=None,
      freeze=[], lr_mults=[],
      # The dtype the first moment (Adam's mu, Adafactor's momentum) is stored in: "" = the
      # parameter dtype (float32), "bfloat16" = half its memory (docs/scale.md, "Mixed
      # precision"); the second moment stays float32 either way.
      mu_dtype="",
      # Used when name="adafactor" (docs/optim.md), which ignores b1/b2/eps. beta2 at step t
      # is 1 - (t+1)^-decay_rate; second moments of parameters whose two largest dims are both
      # >= min_dim_size_to_factor are kept as row/column statistics; each update is scaled to
      # an RMS of at most clip_threshold (None: off); momentum None = no first moment (PaLI),
      # 0.9 = an EMA of the updates (CoCa).
      adafactor=dict(decay_rate=0.8, min_dim_size_to_factor=128, clip_threshold=1.0,
                     momentum=None, epsilon=1e-30)))

  # The batch splits over data x fsdp; fsdp also splits the weights' width, tensor their heads,
  # MLP and vocabulary dimensions (docs/scale.md). -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(rules=None))  # None: vljax.sharding.DEFAULT_RULES

  c.log_every_steps = 50
  # Compiled train steps are kept here and reused by the next run with the same program: ""
  # = $VLJAX_CACHE/jax_compilation (~/.cache/vljax/...), shared by the runs of this machine;
  # "none" = off; or a directory (a shared filesystem serves a whole cluster).
  c.compilation_cache = ""
  c.tensorboard = True
  c.nan_policy = "stop"  # or "skip": drop the update of a step whose loss/grad is not finite
  # on_restore_error: "stop" (default; nothing is deleted) or "previous" (fall back to the
  # newest checkpoint that restores).
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True,
                                                on_restore_error="stop"))
  # max_examples: per eval set, 0 = score every example; N > 0 = a random sample of N examples
  # drawn with config.data.seed (the metrics eval/*_examples say how many were scored).
  # itm_rerank_k: for objectives with an ITM head (ALBEF, BLIP): retrieval ranks each query's
  # k best ITC candidates by the ITM score (eval/*_recall@K; the ITC-only recalls are
  # eval/itc_*); 0 = ITC only. ALBEF and BLIP evaluate with k = 128 (Flickr30k) or 256 (COCO).
  c.eval = ml_collections.ConfigDict(dict(every_steps=5000, batch_size=512,
                                          max_examples=dict(zeroshot=0, retrieval=0, vqa=0,
                                                            classification=0),
                                          itm_rerank_k=128))
  return c
