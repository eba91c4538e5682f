"""The one train loop and the one jitted train step, for every model family.

The family is an objective (vljax.objectives): the trainer owns the sharded state, gradients,
the optimizer, metrics, checkpoints and evaluation, and never knows which family it trains.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax import checkpoint as ckpt_lib
from vljax import configlib
from vljax import metrics as metrics_lib
from vljax import objectives
from vljax import optim
from vljax import sharding
from vljax.configlib import ConfigError
from vljax.data import evalsets
from vljax.data import pipeline as data_pipeline
from vljax.data import preprocess
from vljax.data import sources
from vljax.data import tokenizer as tokenizer_lib
from vljax.models import stacks
from vljax.objectives import make_objective

NAN_POLICIES = ("stop", "skip")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  """What one step reads and writes; everything in it is sharded and checkpointed.

  `extra` is the objective's non-gradient state (vljax.objectives.base): {} for most families.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> dict:
  """Checks everything that can be checked before compiling. Returns the mesh shape."""
  mesh_shape = sharding.mesh_shape(config.mesh, num_devices)
  batch_devices = int(np.prod([mesh_shape[a] for a in sharding.BATCH_AXES]))
  if config.batch_size <= 0 or config.batch_size % batch_devices:
    raise ConfigError(
        f"config.batch_size={config.batch_size} does not divide over the {batch_devices} "
        f"data-parallel devices of config.mesh {mesh_shape}. Use a multiple of "
        f"{batch_devices}, e.g. --config.batch_size={max(1, config.batch_size // batch_devices) * batch_devices}.")
  accum = config.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum < 1:
    raise ConfigError(f"config.grad_accum_steps={accum!r} must be an integer >= 1.")
  if config.batch_size % (accum * batch_devices):
    raise ConfigError(
        f"config.batch_size={config.batch_size} does not split into config.grad_accum_steps="
        f"{accum} micro-batches over the {batch_devices} data-parallel devices; use a multiple "
        f"of {accum * batch_devices}.")
  if config.batch_size % process_count:
    raise ConfigError(f"config.batch_size={config.batch_size} does not divide over "
                      f"{process_count} processes.")
  if config.nan_policy not in NAN_POLICIES:
    raise ConfigError(f"config.nan_policy={config.nan_policy!r}; choose one of {NAN_POLICIES}.")
  if config.dtype not in DTYPES:
    raise ConfigError(f"config.dtype={config.dtype!r}; choose one of {sorted(DTYPES)}.")
  if config.get("layers", {}).get("attention") == "cudnn" and (
      jax.default_backend() != "gpu" or config.dtype != "bfloat16"):
    raise ConfigError(f"config.layers.attention='cudnn' needs a GPU and config.dtype=bfloat16 "
                      f"(here: {jax.default_backend()}, {config.dtype}); use 'auto', which "
                      "takes cuDNN's kernel where it applies.")
  if config.log_every_steps <= 0:
    raise ConfigError(f"config.log_every_steps={config.log_every_steps} must be positive.")
  if not config.data.train:
    raise ConfigError("config.data.train is empty: name a training source, e.g. "
                      "--config.data.train=webdataset:/data/shards/{00000..01242}.tar "
                      "(docs/data.md).")
  if config.data.max_len <= 0 or config.data.image_size <= 0:
    raise ConfigError("config.data.max_len and config.data.image_size must be positive.")
  if config.checkpoint.get("on_restore_error", "stop") not in ckpt_lib.ON_RESTORE_ERROR:
    raise ConfigError(f"config.checkpoint.on_restore_error="
                      f"{config.checkpoint.on_restore_error!r}; choose one of "
                      f"{ckpt_lib.ON_RESTORE_ERROR}.")
  tokenizer_lib.check_config(config)
  if config.optim.freeze and not config.init.get("path"):
    raise ConfigError(
        f"config.optim.freeze={list(config.optim.freeze)} locks parameters but config.init.path "
        f"is empty, so they would stay at their random initialisation; set "
        f"--config.init.path=WORKDIR_OR_EXPORT (e.g. configs/lit.py:init=workdirs/siglip).")
  return mesh_shape


def _opt_state_shardings(abstract_opt: Any, abstract_params: Any, param_shardings: Any,
                         mesh: Mesh) -> Any:
  """Optimizer-state leaves that mirror a parameter (Adam moments) take its sharding.

  A leaf mirrors a parameter when a suffix of its tree path is that parameter's path and the
  shapes agree; everything else (step counters) is replicated.
  """
  by_path = {}
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  for (path, leaf), s in zip(flat_params, jax.tree.leaves(param_shardings)):
    by_path[optim.param_path(path)] = (leaf.shape, s)

  def pick(path, leaf):
    parts = optim.param_path(path).split("/")
    for start in range(len(parts)):
      shape, s = by_path.get("/".join(parts[start:]), (None, None))
      if s is not None and shape == leaf.shape:
        return s
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


@dataclasses.dataclass
class Setup:
  """Everything built from the config before the loop starts."""
  mesh: Mesh
  rules: Any
  objective: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  abstract_state: TrainState
  init_fn: Callable[[jax.Array], TrainState]
  total_steps: int
  frozen: Any  # pytree of bools like the params: True = locked (config.optim.freeze)
  image_options: preprocess.ImageOptions  # how the step turns uint8 pixels into model inputs
  batch_fields: dict[str, Any]  # the objective's declared batch (objectives.base.BatchField)
  batch_shardings: dict[str, NamedSharding]
  init_extra_fn: Callable[[Any], Any]  # params -> extra state, in its sharded layout
  grad_accum_steps: int = 1


def _grad_accum_steps(config: ml_collections.ConfigDict, objective) -> int:
  """config.grad_accum_steps, checked against what the objective can do."""
  from vljax.objectives import base  # pylint: disable=g-import-not-at-top
  k = int(config.get("grad_accum_steps", 1))
  if k == 1:
    return k
  name = type(objective).__name__
  # State first: it is the deeper reason, a split alone would not let such an objective
  # accumulate.
  if (type(objective).loss_with_extra is not base.Objective.loss_with_extra
      or objective.rule_updated_params):
    raise ConfigError(f"config.grad_accum_steps={k}: {name} updates state outside the gradient "
                      f"(TrainState.extra, rule-set parameters) from the whole step's outputs, "
                      f"which accumulation does not produce; use 1.")
  if not (hasattr(objective, "embed") and hasattr(objective, "loss_from_embeddings")):
    raise ConfigError(f"config.grad_accum_steps={k}: {name} does not split its loss into "
                      f"embed / loss_from_embeddings (per-example outputs and the batch-coupled "
                      f"rest), so micro-batches cannot give the whole batch's gradient; use 1.")
  return k


def _batch_shardings(fields: dict[str, Any], mesh: Mesh, rules) -> dict[str, NamedSharding]:
  """The input sharding of each declared batch field, from its logical axes."""
  out = {}
  for name, field in fields.items():
    spec = nn.logical_to_mesh_axes(field.logical_axes(), rules)
    out[name] = NamedSharding(mesh, spec)
  return out


def batch_dummy(fields: dict[str, Any], batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a batch as the objective sees it (pixels already normalised to float32)."""
  return {name: jax.ShapeDtypeStruct((batch_size,) + tuple(f.shape), f.model_dtype())
          for name, f in fields.items()}


def batch_on_host_shapes(fields: dict[str, Any], batch_size: int,
                         shardings: dict[str, NamedSharding] | None = None
                         ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a batch as it crosses to the device (the step's compile-time arguments)."""
  shardings = shardings or {}
  return {name: jax.ShapeDtypeStruct((batch_size,) + tuple(f.shape), f.dtype,
                                     sharding=shardings.get(name))
          for name, f in fields.items()}


def optimizer_config(config: ml_collections.ConfigDict, objective) -> ml_collections.ConfigDict:
  """config.optim with the objective's rule-updated parameters frozen as well: the optimizer
  leaves them alone (no gradient, state or decay) and the objective sets them after each step."""
  if not objective.rule_updated_params:
    return config.optim
  optim_config = ml_collections.ConfigDict(config.optim.to_dict())
  optim_config.freeze = list(config.optim.freeze) + list(objective.rule_updated_params)
  return optim_config


def build(config: ml_collections.ConfigDict, tokenizer, mesh: Mesh,
          epoch_size: int | None, objective=None) -> Setup:
  """Builds objective, optimizer and the sharded-state plan (nothing is allocated yet).

  `objective` overrides the one config.objective names (tests plug in their own).
  """
  rules = sharding.rules_from_config(config.sharding.rules)
  stacks.set_attention_implementation(config.get("layers", {}).get("attention", "xla"))
  if objective is None:
    objective = make_objective(config, tokenizer)
  total_steps = configlib.steps_for(config, "total", config.batch_size, epoch_size)
  warmup_steps = configlib.steps_for(config.optim, "warmup", config.batch_size, epoch_size)
  if total_steps <= 0:
    raise ConfigError(f"Training is {total_steps} steps long; raise config.total_*.")
  fields = objective.batch_fields()
  # Parameter shapes do not depend on the batch; one row per device keeps the batch-sharding
  # constraints inside the model evenly divisible while it is initialised.
  dummy = batch_dummy(fields, mesh.size)
  zeros = lambda: {k: jnp.zeros(v.shape, v.dtype) for k, v in dummy.items()}

  def init_boxed(rng):
    # The params take the seed's key itself (the initialisation every run had before objectives
    # could keep extra state); the extra state a key derived from it.
    params = objective.init(rng, zeros())
    return params, objective.init_extra(jax.random.fold_in(rng, 1), params, zeros())

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed, boxed_extra = jax.eval_shape(init_boxed, jax.random.key(0))
  param_shardings = sharding.logical_to_shardings(boxed, mesh, rules)
  extra_shardings = sharding.logical_to_shardings(boxed_extra, mesh, rules)
  abstract_params = nn.meta.unbox(boxed)
  abstract_extra = nn.meta.unbox(boxed_extra)
  optim_config = optimizer_config(config, objective)
  tx, schedule = optim.make_optimizer(optim_config, abstract_params, total_steps, warmup_steps)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  state_shardings = TrainState(
      step=NamedSharding(mesh, P()), params=param_shardings,
      opt_state=_opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh),
      extra=extra_shardings)

  def init_fn(rng):
    params, extra = nn.meta.unbox(init_boxed(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      extra=extra)

  def init_extra_fn(params):
    # The same key init_boxed gives the extra state, so a fresh run's extra state equals what
    # init_fn made; only what depends on the (loaded) params differs.
    extra_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    return nn.meta.unbox(objective.init_extra(extra_rng, params, zeros()))

  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                 opt_state=abstract_opt, extra=abstract_extra), state_shardings)
  image_options = preprocess.image_options_from_config(config.data, config.data.image_size,
                                                       train=True)
  return Setup(mesh, rules, objective, tx, schedule, state_shardings, abstract_state, init_fn,
               total_steps, optim.frozen_mask(optim_config, abstract_params), image_options,
               fields, _batch_shardings(fields, mesh, rules), init_extra_fn,
               _grad_accum_steps(config, objective))


def init_state(setup: Setup, seed: int) -> TrainState:
  """Creates the state directly in its sharded layout: nothing is materialised whole."""
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    return jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.key(seed))


def value_and_trainable_grad(loss_fn: Callable, params: Any, frozen: Any, *args):
  """((loss, aux), grads) of loss_fn(params, *args), differentiated w.r.t. trainable leaves only.

  `frozen` is a pytree of bools like params. Frozen leaves enter the loss as constants, so no
  backward pass runs through a part of the model that only frozen parameters feed (LiT's locked
  image tower); their gradient is returned as zeros, which a frozen optimizer branch ignores.
  """
  leaves, treedef = jax.tree.flatten(params)
  is_frozen = jax.tree.leaves(frozen)
  trainable = [x for x, f in zip(leaves, is_frozen) if not f]

  def loss_of_trainable(trainable_leaves):
    it = iter(trainable_leaves)
    full = [x if f else next(it) for x, f in zip(leaves, is_frozen)]
    return loss_fn(jax.tree.unflatten(treedef, full), *args)

  out, trainable_grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(trainable)
  it = iter(trainable_grads)
  grads = [jnp.zeros_like(x) if f else next(it) for x, f in zip(leaves, is_frozen)]
  return out, jax.tree.unflatten(treedef, grads)


def _micro_batches(tree: Any, k: int, mesh: Mesh) -> Any:
  """[B, ...] leaves -> [k, B/k, ...]: micro-batch j holds rows j, j+k, j+2k, ...

  Strided rows keep every micro-batch spread over all devices (each device already holds a
  contiguous block of rows whose size k divides), so splitting moves no data.
  """
  def split(x):
    x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    spec = P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree.map(split, tree)


def _merge_micro_batches(tree: Any) -> Any:
  """The inverse of _micro_batches: [k, B/k, ...] -> [B, ...] in the batch's own row order."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


def accumulated_value_and_grad(objective, params: Any, frozen: Any, batch: dict[str, jax.Array],
                               rng: jax.Array, k: int, mesh: Mesh):
  """((loss, metrics), grads) of the whole batch, computed in k micro-batches, exactly.

  The cached-embedding method (Gao et al., 2021, "Scaling deep contrastive learning batch size
  under memory limited setup"): the objective splits its loss into a per-example part
  `embed(params, batch, rng)` and a batch-coupled part `loss_from_embeddings(params, e, rng)`.
  1. embed every micro-batch without keeping activations;
  2. the loss and its gradients w.r.t. the parameters (scale, bias) and the embeddings of the
     WHOLE batch: every example still meets every negative of the global batch;
  3. re-run each micro-batch's forward and pull its embedding gradients back through it.
  The result equals the k = 1 gradient up to floating-point summation order; a contrastive
  loss summed over micro-batches would see only 1/k of the negatives. Memory holds one
  micro-batch's activations; the cost is one extra forward pass per micro-batch.

  An objective with a gathered_loss (a term over pairs chosen from the whole batch's embeddings:
  VLMo's ITM hard negatives) draws the pairs after step 2 from the whole batch's embeddings
  (embedding_inputs), and step 3 also takes each micro-batch's share of that term, its value
  and its gradient (the partners' raw inputs gathered from the whole batch): the shares are
  normalised by the whole batch's counts, so they add up to the k = 1 term.

  Randomness: the objective's whole_batch_inputs (a masking) are drawn once, from the whole
  batch and `rng`, as its loss_fn draws them, and split with the batch: they are the k = 1
  values. Dropout is not: micro-batch j draws it from fold_in(rng, j), so its masks differ from
  the k = 1 step's (same distribution), and only a model without dropout gets the k = 1
  gradient to rounding.
  """
  leaves, treedef = jax.tree.flatten(params)
  is_frozen = jax.tree.leaves(frozen)
  trainable = [x for x, f in zip(leaves, is_frozen) if not f]

  def full(trainable_leaves):
    it = iter(trainable_leaves)
    return jax.tree.unflatten(treedef, [x if f else next(it) for x, f in zip(leaves, is_frozen)])

  batch = objective.with_whole_batch_inputs(batch, rng)
  micro = _micro_batches(batch, k, mesh)
  index = jnp.arange(k)

  def embed(trainable_leaves, micro_batch, j):
    return objective.embed(full(trainable_leaves), micro_batch, jax.random.fold_in(rng, j))

  embedded = jax.lax.map(lambda xs: embed(trainable, *xs), (micro, index))
  embeddings = _merge_micro_batches(embedded)
  (loss, metrics), (grads, embedding_grads) = jax.value_and_grad(
      lambda t, e: objective.loss_from_embeddings(full(t), e, rng), argnums=(0, 1),
      has_aux=True)(trainable, embeddings)
  chosen = objective.embedding_inputs(full(trainable), embeddings, rng)
  batch = {**batch, **chosen}
  micro = {**micro, **_micro_batches(chosen, k, mesh)}

  def micro_outputs(t, micro_batch, j):
    """(embeddings, gathered share of the loss) of micro-batch j, and the share's metrics."""
    share = objective.gathered_loss(full(t), micro_batch, batch, jax.random.fold_in(rng, j))
    share = (jnp.zeros((), jnp.float32), {}) if share is None else share
    return (embed(t, micro_batch, j), share[0]), share[1]

  def pull_back(total, xs):
    micro_batch, micro_grads, j = xs
    (_, share), vjp, share_metrics = jax.vjp(lambda t: micro_outputs(t, micro_batch, j),
                                             trainable, has_aux=True)
    step = vjp((micro_grads, jnp.ones_like(share)))[0]
    return jax.tree.map(jnp.add, total, step), (share, share_metrics)

  grads, (shares, share_metrics) = jax.lax.scan(
      pull_back, grads, (micro, _micro_batches(embedding_grads, k, mesh), index))
  # Each share is normalised by the whole batch's counts: their sum is the term.
  loss = loss + jnp.sum(shares)
  metrics = {**metrics, **jax.tree.map(lambda x: jnp.sum(x, axis=0), share_metrics)}
  it = iter(grads)
  grads = [jnp.zeros_like(x) if f else next(it) for x, f in zip(leaves, is_frozen)]
  return (loss, metrics), jax.tree.unflatten(treedef, grads)


def normalize_on_device(pixels: jax.Array, brightness: jax.Array,
                        opts: preprocess.ImageOptions) -> jax.Array:
  """uint8 [B, H, W, 3] pixels + per-image brightness delta [B] -> float32 model inputs.

  The device-side twin of vljax.data.preprocess.normalize (same operations in float32), so
  images cross to the device as uint8, a quarter of the bytes.
  """
  x = pixels.astype(jnp.float32)
  if opts.mean is None:
    out = x * jnp.float32(2.0 / 255.0) - jnp.float32(1.0)
  else:
    out = ((x / jnp.float32(255.0) - jnp.asarray(opts.mean, jnp.float32))
           / jnp.asarray(opts.std, jnp.float32))
  # Added even when brightness augmentation is off (the deltas are then zeros), so a
  # non-finite delta shows up in the loss as a non-finite input would.
  out = out + brightness.astype(jnp.float32)[:, None, None, None]
  if opts.brightness and opts.mean is None:
    out = jnp.clip(out, -1.0, 1.0)
  return out


def model_inputs(batch: dict[str, jax.Array], fields: dict[str, Any],
                 image_options: preprocess.ImageOptions) -> dict[str, jax.Array]:
  """The device batch as the objective sees it: declared pixel fields normalised to float32
  (their brightness fields consumed), everything else as it arrived."""
  batch = dict(batch)
  for name, field in fields.items():
    if field.pixels_with:
      batch[name] = normalize_on_device(batch[name], batch.pop(field.pixels_with),
                                        image_options)
  return batch


def make_train_step(setup: Setup, nan_policy: str = "stop") -> Callable:
  """The jitted train_step(state, batch, rng) -> (state, metrics), with donated state.

  The batch holds the objective's declared fields (pixels as uint8, normalised here). After the
  optimizer update the objective updates its non-gradient state (update_extra), once per step.
  setup.grad_accum_steps > 1 computes the same gradient in that many micro-batches
  (accumulated_value_and_grad).
  """
  grad_accum_steps = setup.grad_accum_steps
  objective, tx, schedule = setup.objective, setup.tx, setup.schedule
  frozen, image_options, fields = setup.frozen, setup.image_options, setup.batch_fields

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    batch = model_inputs(batch, fields, image_options)
    step_rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps > 1:
      (loss, aux), grads = accumulated_value_and_grad(objective, state.params, frozen, batch,
                                                      step_rng, grad_accum_steps, setup.mesh)
      outputs = None
    else:
      (loss, (aux, outputs)), grads = value_and_trainable_grad(
          lambda p, e, b, r: objective.loss_with_extra(p, e, b, r), state.params, frozen,
          state.extra, batch, step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = objective.update_rule_params(params, state.extra, outputs, state.step)
    extra = objective.update_extra(state.extra, params, outputs, state.step)
    # Frozen gradients are zeros: the norm is that of the trained parameters' gradient.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nan_policy == "skip":
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      extra = keep(extra, state.extra)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/lr": schedule(state.step), "train/finite": finite,
               "train/param_norm": optax.tree.norm(params)}
    metrics.update({f"train/{k}": v for k, v in aux.items()})
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
    return new_state, metrics

  replicated = NamedSharding(setup.mesh, P())
  return jax.jit(train_step,
                 in_shardings=(setup.state_shardings, setup.batch_shardings, replicated),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))


@dataclasses.dataclass
class StepCost:
  """What XLA says one compiled train step costs, per device."""
  compile_seconds: float
  argument_bytes: int | None = None  # the donated state and the batch shard
  output_bytes: int | None = None
  temp_bytes: int | None = None  # activations and other temporaries
  generated_code_bytes: int | None = None
  flops: float | None = None  # per device, XLA cost analysis (counts a loop body once)


def compile_step(setup: Setup, step_fn: Callable, batch_size: int):
  """Compiles the step for the objective's declared batch and logs XLA's memory analysis.

  Returns (compiled step, StepCost).
  """
  batch = batch_on_host_shapes(setup.batch_fields, batch_size)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  start = time.time()
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    compiled = step_fn.lower(setup.abstract_state, batch, rng).compile()
  cost = StepCost(compile_seconds=time.time() - start)
  logging.info("Compiled the train step in %.1f s.", cost.compile_seconds)
  memory = compiled.memory_analysis()
  if memory is not None:
    cost.argument_bytes = int(memory.argument_size_in_bytes)
    cost.output_bytes = int(memory.output_size_in_bytes)
    cost.temp_bytes = int(memory.temp_size_in_bytes)
    cost.generated_code_bytes = int(memory.generated_code_size_in_bytes)
    mib = lambda b: b / 2**20
    logging.info("Train step memory per device: arguments %.1f MiB, outputs %.1f MiB, "
                 "temporaries %.1f MiB, generated code %.1f MiB.",
                 mib(cost.argument_bytes), mib(cost.output_bytes), mib(cost.temp_bytes),
                 mib(cost.generated_code_bytes))
  try:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    cost.flops = float(analysis.get("flops", 0.0)) or None
  except Exception:  # cost analysis is best-effort and backend-dependent
    pass
  return compiled, cost


def enable_compilation_cache(config: ml_collections.ConfigDict) -> str | None:
  """Points JAX's persistent compilation cache at config.compilation_cache; returns the
  directory (None: off). The first directory a process sets is kept for its lifetime."""
  setting = config.get("compilation_cache", "")
  if setting == "none":
    return None
  directory = setting or os.path.join(configlib.cache_root(), "jax_compilation")
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  jax.config.update("jax_compilation_cache_dir", directory)
  # The train step of even a small model takes seconds to compile; cache everything slower
  # than one second (JAX's default), whatever its size.
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def model_flops(config: ml_collections.ConfigDict, vocab_size: int
                ) -> tuple[float | None, float | None]:
  """(analytic training FLOPs per example, this device's peak FLOP/s), None where unknown."""
  from vljax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  try:
    example_flops = flops_lib.train_flops_per_example(config, vocab_size)
  except ConfigError:  # a family vljax.flops does not count (e.g. a test's toy objective)
    return None, None
  peak = flops_lib.peak_flops(jax.devices()[0].device_kind, config.dtype,
                              jax.config.jax_default_matmul_precision)
  return example_flops, peak


def compiled_step_flops(config: ml_collections.ConfigDict, tokenizer, mesh: Mesh) -> float | None:
  """XLA's cost-analysis FLOPs of `config`'s compiled train step on `mesh` (nothing runs)."""
  setup = build(config, tokenizer, mesh, epoch_size=None)
  _, cost = compile_step(setup, make_train_step(setup), config.batch_size)
  return cost.flops


@dataclasses.dataclass(frozen=True)
class VocabularyStandIn:
  """Stands in for a tokenizer of `vocab_size` pieces where only its size matters (dry runs)."""
  vocab_size: int
  pad_id: int = tokenizer_lib.PAD_ID
  eos_id: int = tokenizer_lib.EOS_ID
  model_path: str = "(stand-in vocabulary)"


def resolved_for_compile(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with durations in epochs replaced, so its step builds without reading data.

  A schedule in epochs needs the dataset's size; the step's cost does not depend on it.
  """
  if config.get("total_epochs") is not None:
    config = configlib.apply_overrides(config.copy_and_resolve_references(), ["total_steps=1"])
  if config.optim.get("warmup_epochs") is not None:
    config = configlib.apply_overrides(config.copy_and_resolve_references(),
                                       ["optim.warmup_steps=0"])
  return config


def dry_run(config: ml_collections.ConfigDict, workdir: str,
            vocab_size: int | None = None) -> dict[str, Any]:
  """Builds and compiles `config`'s train step for its mesh, writes WORKDIR/compile.json, and
  trains nothing. Returns what it wrote.

  The mesh is the configured one over the devices present, so the per-device memory of a pod
  recipe can be read on a CPU with fake devices
  (XLA_FLAGS=--xla_force_host_platform_device_count=N). No data is read: a duration in epochs
  is not resolved (the step's cost does not depend on it). `vocab_size` sizes the text
  embedding without a tokenizer file (e.g. 32000 for the paper recipes).
  """
  validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  enable_compilation_cache(config)
  tokenizer = (VocabularyStandIn(vocab_size) if vocab_size
               else run_tokenizer(config, workdir))
  config = resolved_for_compile(config)
  setup = build(config, tokenizer, mesh, epoch_size=None)
  _, cost = compile_step(setup, make_train_step(setup), config.batch_size)
  params = jax.tree.leaves(setup.abstract_state.params)
  frozen = jax.tree.leaves(setup.frozen)
  report = {
      "devices": mesh.size, "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
      "global_batch": config.batch_size,
      # The batch splits over the batch axes only (not tensor).
      "per_device_batch": config.batch_size // int(np.prod(
          [mesh.shape[a] for a in sharding.BATCH_AXES])),
      "image_size": config.data.image_size, "max_len": config.data.max_len,
      "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.model_path,
      "dtype": config.dtype,
      "parameters": sum(int(np.prod(x.shape)) for x in params),
      "locked_parameters": sum(int(np.prod(x.shape)) for x, f in zip(params, frozen) if f),
      **dataclasses.asdict(cost),
  }
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "compile.json"), "w") as f:
      json.dump(report, f, indent=2)
  if not config.tokenizer.path and not vocab_size:
    logging.warning("Dry run with the synthetic tokenizer's %d-piece vocabulary; set "
                    "config.tokenizer.path or --dry_run_vocab_size to count the real "
                    "embedding table.", tokenizer.vocab_size)
  logging.info("Dry run: %.2fM parameters, %.2f GFLOP per step per device, wrote %s.",
               report["parameters"] / 1e6, (cost.flops or 0) / 1e9,
               os.path.join(workdir, "compile.json"))
  return report


def train_source(config):
  """The training source named by config.data.train (a spec string, see vljax.data.sources)."""
  return sources.get_source(config.data.train, "train", config.data.image_size,
                            config.data.seed, config.data)


def make_iterator(config, source, tokenizer, objective):
  """This process's checkpointable iterator of training batches (with '_'-prefixed extras),
  collated into the objective's declared fields (objective.batch_from_examples)."""
  data = config.data
  return data_pipeline.make_train_iterator(
      source, tokenizer, batch_size=config.batch_size // jax.process_count(),
      image_size=data.image_size, max_len=data.max_len, seed=data.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=data.worker_count,
      image_options=preprocess.image_options_from_config(data, data.image_size, train=True),
      text_options=preprocess.text_options_from_config(data),
      normalize=False,  # uint8 to the device; the step normalises (normalize_on_device)
      fields_fn=objective.batch_from_examples)


def make_evaluator(config, objective, tokenizer, mesh, rules):
  """The evaluations that fit the objective, over the config's held-out data."""
  from vljax import evals  # pylint: disable=g-import-not-at-top
  eval_sets = evalsets.load_eval_sets(config.data, tokenizer, config.eval)
  return evals.build_evaluator(config, objective, eval_sets, tokenizer, mesh, rules)


def run_tokenizer(config: ml_collections.ConfigDict, directory: str | None = None):
  """The tokenizer of a run: the one saved in `directory` (a workdir or export), if any, else
  config.tokenizer.path (or, on the synthetic data, the synthetic-caption tokenizer).

  A workdir keeps the tokenizer it was trained with, so evaluation, prediction and resumption
  never depend on the original file; naming a different one for an existing workdir is an error.
  """
  saved = tokenizer_lib.load_from_dir(directory) if directory else None
  path = config.tokenizer.path
  if saved is None:
    if path and not os.path.exists(path):
      raise ConfigError(f"config.tokenizer.path={path!r}: no such file. Name a sentencepiece "
                        f".model file (docs/tokenizer.md).")
    # On the synthetic data, a run that asks synthetic questions (synthetic?task=vqa) gets the
    # synthetic tokenizer that knows them; every other run the caption-only one.
    return tokenizer_lib.get_tokenizer(
        path or None, synthetic_vqa=not path and any(
            tokenizer_lib.uses_synthetic_vqa(config.data.get(key) or "")
            for key in ("train", "eval", "eval_vqa")))
  if path and os.path.exists(path):
    with open(path, "rb") as f:
      if f.read() != saved.serialized_model:
        raise ConfigError(
            f"config.tokenizer.path={path!r} differs from the tokenizer this workdir was "
            f"trained with ({os.path.join(directory, tokenizer_lib.TOKENIZER_FILENAME)}); leave "
            f"config.tokenizer.path unchanged, or use a new --workdir.")
  return saved


def load_latest(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh):
  """Builds `config`'s objective and restores WORKDIR's latest checkpoint onto `mesh`.

  Returns (setup, tokenizer, step, state); used by evaluation and prediction.
  """
  tokenizer = run_tokenizer(config, workdir)
  config = objectives.prepare_run(config, workdir)  # what the run derived from its data
  # The training source is only opened when a duration in epochs needs its size.
  epoch_size = (None if config.get("total_epochs") is None else len(train_source(config)))
  setup = build(config, tokenizer, mesh, epoch_size=epoch_size)
  checkpointer = ckpt_lib.Checkpointer(workdir, 0, 1, async_save=False)
  try:
    restored = checkpointer.restore(setup.abstract_state,
                                    on_error=config.checkpoint.get("on_restore_error", "stop"))
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(
        f"No checkpoint under {os.path.join(os.path.abspath(workdir), 'checkpoints')}: train "
        f"first with python -m vljax.main --config=... --workdir={workdir}.")
  step, state, _ = restored
  return setup, tokenizer, step, state


def load_for_inference(config: ml_collections.ConfigDict, directory: str, mesh: Mesh):
  """Builds `config`'s objective and loads the weights in `directory` onto `mesh`: a workdir's
  latest checkpoint, else the params of an export directory (DIR/params, e.g. one written by
  `python -m vljax.interop import`) or of a workdir's export (DIR/export/params).

  Returns (setup, tokenizer, params, step): step is the checkpoint's, None for an export.
  """
  checkpoints = os.path.join(directory, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    setup, tokenizer, step, state = load_latest(config, directory, mesh)
    return setup, tokenizer, state.params, int(step)
  for params_dir in (directory, os.path.join(directory, "export")):
    if os.path.isdir(os.path.join(params_dir, "params")):
      tokenizer = run_tokenizer(config, directory)
      config = objectives.prepare_run(config, directory)
      setup = build(config, tokenizer, mesh, epoch_size=None)
      params = ckpt_lib.load_exported_params(params_dir, setup.abstract_state.params)
      return setup, tokenizer, params, None
  raise FileNotFoundError(
      f"{os.path.abspath(directory)} has no checkpoints/ (a workdir), params/ (an export "
      f"directory) or export/params/: train first with python -m vljax.main --config=... "
      f"--workdir={directory}, or import weights with python -m vljax.interop import.")


class DeviceBatches:
  """The training batches, placed on the devices `ahead` steps before the step takes them.

  The host→device copies of the next batches overlap the running step. Data-only keys
  ('_skipped', '_skipped_keys', ...) stay on the host and come back with their batch. Because
  the underlying iterator runs ahead, `get_state()` is the state right after the last batch
  handed out (what a checkpoint of that step must hold), not the iterator's own.
  """

  def __init__(self, iterator, mesh: Mesh, shardings: dict[str, NamedSharding], ahead: int = 2):
    self._iterator, self._mesh, self._shardings = iterator, mesh, shardings
    self._ahead = max(1, ahead)
    self._queue: collections.deque = collections.deque()
    self._state = iterator.get_state()

  def fill(self) -> None:
    """Reads and places batches until `ahead` wait on the devices. Called right after a step
    is dispatched, so the host prepares the next batches while the devices compute."""
    while len(self._queue) < self._ahead:
      host = next(self._iterator)
      extras = {k: host.pop(k) for k in [k for k in host if k.startswith("_")]}
      batch = sharding.global_batch_from_host(host, self._mesh, self._shardings)
      self._queue.append((batch, extras, self._iterator.get_state()))

  def __next__(self) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """(device batch, its host-only extras)."""
    if not self._queue:
      self.fill()
    batch, extras, self._state = self._queue.popleft()
    return batch, extras

  def get_state(self) -> dict[str, Any]:
    return self._state


class PreemptionNotice:
  """Remembers a SIGTERM so the loop can save at the next step boundary and exit cleanly.

  In a multi-process run every process must stop at the same step, so the flag is agreed on
  (any process signalled = all stop) at log steps, where the loop synchronises anyway.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    if not self.received:
      logging.warning("SIGTERM received: saving a checkpoint at the end of this step, then "
                      "exiting.")
    self.received = True

  def should_stop(self, at_sync_point: bool) -> bool:
    if jax.process_count() == 1:
      return self.received
    if not at_sync_point:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self.received))
    return bool(np.any(flags))

  def restore_handler(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _restore_or_init(config, setup: Setup, checkpointer, iterator):
  """(start step, state): the latest checkpoint, else a fresh state (with config.init loaded)."""
  restored = checkpointer.restore(setup.abstract_state,
                                  on_error=config.checkpoint.get("on_restore_error", "stop"))
  if restored is not None:
    start_step, state, data_state = restored
    if data_state:
      iterator.set_state(data_state)
    logging.info("Resuming from step %d.", start_step)
    return start_step, state
  state = init_state(setup, config.seed)
  if config.init.get("path"):
    from vljax import init_weights  # pylint: disable=g-import-not-at-top
    params, loaded = init_weights.load_initial_params(config.init, state.params)
    # State derived from the weights (a momentum copy) starts from the loaded ones.
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      extra = jax.jit(setup.init_extra_fn, out_shardings=setup.state_shardings.extra)(params)
    state = state.replace(params=params, extra=extra)
    # Only what config.optim.freeze locks must come from config.init (an objective's
    # rule-updated parameters may start fresh).
    frozen = set(optim.param_path(p) for p, f in jax.tree_util.tree_flatten_with_path(
        optim.frozen_mask(config.optim, state.params))[0] if f)
    unloaded_frozen = sorted(frozen - set(loaded))
    if unloaded_frozen:
      raise ConfigError(
          f"config.optim.freeze locks {len(unloaded_frozen)} parameters that config.init does "
          f"not load (e.g. {unloaded_frozen[0]!r}): they would stay at their random "
          f"initialisation. Extend config.init.mapping or narrow config.optim.freeze.")
  return 0, state


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) according to `config` in `workdir`; returns the last metrics."""
  validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  logging.info("Mesh %s over %d devices (%s).", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform)
  cache = enable_compilation_cache(config)
  if cache:
    logging.info("Compilation cache: %s.", cache)
  tokenizer = run_tokenizer(config, workdir)
  # Every data and eval source is opened and a few of its records decoded before anything
  # compiles: a wrong path or unusable data is a ConfigError naming its config key now.
  checked = sources.check_config_sources(config.data, evaluate=config.eval.every_steps >= 0)
  source = checked["config.data.train"]
  # What the model's shape takes from the training data (an answer vocabulary) is fixed now,
  # and kept in the workdir: a resumed run reads it back rather than deriving it again.
  config = objectives.prepare_run(config, workdir, source)
  setup = build(config, tokenizer, mesh, epoch_size=len(source))
  total = setup.total_steps
  evaluator = None
  if config.eval.every_steps >= 0:
    evaluator = make_evaluator(config, setup.objective, tokenizer, mesh, setup.rules)

  ckpt_lib.write_config(workdir, config.to_json(indent=2))
  ckpt_lib.write_tokenizer(workdir, tokenizer)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint.every_steps,
                                       config.checkpoint.keep, config.checkpoint.async_save)
  iterator = make_iterator(config, source, tokenizer, setup.objective)
  start_step, state = _restore_or_init(config, setup, checkpointer, iterator)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.tensorboard,
                                    resumed_from=start_step if start_step else None)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  n_frozen = sum(int(np.prod(x.shape)) for x, f in
                 zip(jax.tree.leaves(state.params), jax.tree.leaves(setup.frozen)) if f)
  logging.info("Model has %.2fM parameters (%.2fM locked); training for %d steps.",
               n_params / 1e6, n_frozen / 1e6, total)

  step_fn = make_train_step(setup, config.nan_policy)
  compiled, cost = compile_step(setup, step_fn, config.batch_size)
  # MFU from an analytic count (vljax.flops: XLA's cost analysis counts a loop body once).
  example_flops, peak = model_flops(config, tokenizer.vocab_size)
  rng = jax.random.key(config.seed + 1)

  last = {}
  skipped_records, skipped_sample = 0, []  # bad input records of this process
  pending = None  # (step, finite flag) of the previous step, checked one step late
  t_last, step_last = time.time(), start_step
  preemption = PreemptionNotice()
  preempted_at = None

  def check_finite(step_and_flag):
    step, flag, loss = step_and_flag
    if not bool(flag):
      if config.nan_policy == "stop":
        raise FloatingPointError(
            f"Non-finite loss or gradient at step {step} (loss={float(loss)}). The run stops "
            f"without saving this step; set config.nan_policy='skip' to skip such updates.")
      logging.warning("Skipped the update of step %d: non-finite loss or gradient.", step)

  batches = DeviceBatches(iterator, mesh, setup.batch_shardings)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
      for step in range(start_step + 1, total + 1):
        # The step sees the objective's declared fields; data-only extras stay on the host.
        batch, extras = next(batches)
        skipped_records += int(extras.get("_skipped", 0))
        skipped_sample.extend(extras.get("_skipped_keys", ()))
        del skipped_sample[:-8]
        state, step_metrics = compiled(state, batch, rng)
        batches.fill()
        if pending is not None:
          check_finite(pending)
        pending = (step, step_metrics["train/finite"], step_metrics["train/loss"])
        log_now = step % config.log_every_steps == 0 or step == total
        stop_now = preemption.should_stop(at_sync_point=log_now)
        save_now = checkpointer.should_save(step) or step == total or stop_now
        if log_now or save_now:
          check_finite(pending)
          pending = None
        if log_now:
          now = time.time()
          step_time = (now - t_last) / max(step - step_last, 1)
          t_last, step_last = now, step
          perf = {"perf/step_time_s": step_time,
                  "perf/examples_per_s": config.batch_size / step_time,
                  "perf/examples_per_s_per_device": config.batch_size / step_time / mesh.size}
          if example_flops:
            per_device = example_flops * perf["perf/examples_per_s_per_device"]
            perf["perf/tflops_per_device"] = per_device / 1e12
            if peak:
              perf["perf/mfu"] = per_device / peak
          if skipped_sample:
            logging.warning("Skipped %d bad records so far (this process); recent: %s",
                            skipped_records, "; ".join(skipped_sample))
            skipped_sample.clear()
          perf["data/skipped_records"] = skipped_records
          scalars = writer.write(step, {**step_metrics, **perf})
          metrics_lib.log_progress(step, total, scalars)
          last.update(scalars)
        if save_now:
          checkpointer.save(step, state, batches.get_state())
        if stop_now:
          preempted_at = step
          break
        eval_every = config.eval.every_steps
        if evaluator is not None and (step == total or (eval_every > 0 and
                                                        step % eval_every == 0)):
          eval_metrics = evaluator(state.params)
          writer.write(step, eval_metrics)
          logging.info("eval at step %d: %s", step,
                       ", ".join(f"{k} {v:.4g}" for k, v in sorted(eval_metrics.items())))
          last.update(eval_metrics)
          t_last, step_last = time.time(), step  # evaluation time is not step time
  finally:
    # Also on errors: an asynchronous save in flight must finish before the process moves on.
    checkpointer.close()
    preemption.restore_handler()
  writer.close()
  if preempted_at is not None:
    logging.info("Stopped at step %d on SIGTERM with a checkpoint saved; run the same command "
                 "again to resume.", preempted_at)
    last["preempted_at_step"] = preempted_at
    return last
  ckpt_lib.export_params(workdir, state.params, config.to_json(indent=2), tokenizer)
  return last
