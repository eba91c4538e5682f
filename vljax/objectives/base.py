"""The objective contract: what the one trainer asks of a model family.

An objective is a flax model plus a loss. The trainer (vljax.train) derives everything else from
what the objective declares, and never names a batch key or a family:

  batch_fields()               {name: BatchField}: the arrays of one training batch, per example
                               (shape, dtype as they cross to the device, logical axes). The
                               trainer builds the init dummy, the step's input shardings and the
                               ahead-of-time compile shapes from it.
  batch_from_examples(exs)     host-side collation of decoded examples ({'caption', 'label',
                               and 'question'/'answers' where the record has them}) into the
                               declared non-pixel fields; runs in the input pipeline.
  init(rng, batch)             the parameters (boxed with logical partitioning metadata).
  init_extra(rng, params, batch)
                               non-gradient state the objective owns (a momentum copy of the
                               weights, feature queues, its own counters, a frozen network):
                               boxed or plain arrays; {} = none. Lives in TrainState.extra, is
                               sharded (leaves without logical names are replicated),
                               checkpointed and restored with the rest. `params` may be boxed or
                               plain: the trainer calls it again with the loaded weights when a
                               run starts from config.init, so a momentum copy starts from them.
  loss_fn(params, batch, rng)  (scalar loss, {name: scalar metric}) for objectives without state.
  embed(params, batch, rng), loss_from_embeddings(params, embeddings, rng)
                               optional: the split that config.grad_accum_steps > 1 needs
                               (vljax.train.accumulated_value_and_grad). `embed` gives the
                               per-example outputs (float arrays with a leading batch dimension:
                               embeddings, summed losses and their counts), the other the
                               batch-coupled rest as (loss, metrics); the default loss_fn is the
                               pieces composed (composed_loss).
  whole_batch_inputs(batch, rng)
                               {name: pytree of per-example arrays} drawn once per step from the
                               WHOLE batch and the step's key (a random masking). Accumulation
                               draws them before it splits the batch and merges them into it
                               (with_whole_batch_inputs), so they are split with it; loss_fn
                               draws them the same way, so they do not depend on
                               grad_accum_steps. The default draws nothing ({}).
  embedding_inputs(params, embeddings, rng), gathered_loss(params, micro_batch, batch, rng)
                               optional, for a loss term that pairs examples chosen from the
                               whole batch's embeddings (VLMo's ITM hard negatives).
                               embedding_inputs draws per-example arrays from the WHOLE batch's
                               embeddings (the chosen partners' rows; no gradient), merged into
                               the batch like whole_batch_inputs. gathered_loss is a micro-batch's
                               share of that term, (loss, metrics) normalised by the whole
                               batch's counts so that the shares add up to the term: its
                               examples' pairs, with the partners' raw inputs gathered from
                               `batch` (the whole batch). Defaults: {} and None (no such term).
                               composed_loss(params, batch, rng) is the k = 1 loss of all these
                               pieces, what the default loss_fn returns.
  loss_with_extra(params, extra, batch, rng)
                               (loss, (metrics, outputs)): the general form the trainer calls;
                               `extra` enters as a constant (no gradient flows into it) and
                               `outputs` is any pytree handed to update_extra.
  update_extra(extra, params, outputs, step)
                               the new state, called once per step inside the jitted step AFTER
                               the optimizer update (`params` are the updated weights, as an EMA
                               needs; `step` is the index of the step just taken).
  rule_updated_params          regexes (optim.param_path, as config.optim.freeze) of parameters
                               a rule sets instead of the gradient (an EMA codebook): the
                               optimizer treats them as frozen (no gradient, no optimizer state,
                               no decay), but they are exported and loaded like any parameter.
  update_rule_params(params, extra, outputs, step)
                               the params with those parameters' new values, called once per
                               step right after the optimizer update and before update_extra
                               (which sees the result).
  prepare_run(config, directory, train_source)
                               (classmethod) the config completed with what the model's shape
                               depends on and the objective derives from the training data (an
                               answer vocabulary), before anything is built; kept in
                               `directory` (the workdir) so that a resumed run reads it back
                               instead of deriving it again. `train_source` is None where no
                               training runs (evaluation): then only what `directory` holds is
                               read. The default returns `config` as it is.

A field whose BatchField has `pixels_with` set is uint8 pixels on the host; the step normalises
it on the device with the image options and the brightness deltas of the named field before the
objective sees it (as float32).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from vljax.data import pipeline


@dataclasses.dataclass(frozen=True)
class BatchField:
  """One array of a training batch.

  Attributes:
    shape: per-example shape (the batch dimension excluded).
    dtype: numpy dtype as the array crosses to the device.
    axes: logical axis names of the per-example dimensions (vljax.sharding.LOGICAL_AXES or
      None); the batch dimension is always 'act_batch'.
    pixels_with: for uint8 images: the name of the field holding their brightness deltas; the
      step turns the pair into float32 model inputs (train.normalize_on_device).
  """
  shape: tuple[int, ...]
  dtype: Any
  axes: tuple[str | None, ...] = ()
  pixels_with: str | None = None

  def __post_init__(self):
    if self.axes and len(self.axes) != len(self.shape):
      raise ValueError(f"BatchField axes {self.axes} do not match its shape {self.shape}.")

  def logical_axes(self) -> tuple[str | None, ...]:
    return ("act_batch",) + (tuple(self.axes) or (None,) * len(self.shape))

  def model_dtype(self) -> Any:
    """The dtype the objective sees (pixels are normalised to float32 on the device)."""
    return np.float32 if self.pixels_with else self.dtype


def image_fields(image_size: int) -> dict[str, BatchField]:
  """'image' (uint8 pixels, normalised on the device) and its 'brightness' deltas."""
  return {
      "image": BatchField((image_size, image_size, 3), np.uint8, (None, None, None),
                          pixels_with="brightness"),
      "brightness": BatchField((), np.float32),
  }


class Objective:
  """Defaults of the contract for families trained on (image, caption, label) batches.

  Subclasses set `self.model`, `self.image_size`, `self.max_len` and `self.tokenizer` (or
  override the methods that use them) and implement init and loss_fn (or loss_with_extra).
  """

  image_size: int
  max_len: int
  tokenizer: Any

  def batch_fields(self) -> dict[str, BatchField]:
    return {**image_fields(self.image_size),
            "text": BatchField((self.max_len,), np.int32, ("act_len",)),
            "label": BatchField((), np.int32)}

  def batch_from_examples(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    return pipeline.caption_fields(examples, self.tokenizer, self.max_len)

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    raise NotImplementedError

  def init_extra(self, rng: jax.Array, params: Any, batch: dict[str, Any]) -> Any:
    del rng, params, batch
    return {}

  def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    """An objective that splits its loss into embed / loss_from_embeddings (and the optional
    pieces) gets composed_loss; any other implements loss_fn (or loss_with_extra) itself."""
    if not hasattr(self, "embed"):
      raise NotImplementedError(f"{type(self).__name__} implements neither loss_fn nor embed.")
    return self.composed_loss(params, batch, rng)

  def whole_batch_inputs(self, batch: dict[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
    del batch, rng
    return {}

  def with_whole_batch_inputs(self, batch: dict[str, jax.Array],
                              rng: jax.Array) -> dict[str, Any]:
    """`batch` with whole_batch_inputs(batch, rng) added: what embed sees, in one batch or
    split into micro-batches."""
    drawn = self.whole_batch_inputs(batch, rng)
    clash = sorted(set(drawn) & set(batch))
    if clash:
      raise ValueError(f"{type(self).__name__}.whole_batch_inputs returns {clash}, which the "
                       "batch already has.")
    return {**batch, **drawn}

  def embedding_inputs(self, params: Any, embeddings: Any, rng: jax.Array) -> dict[str, Any]:
    del params, embeddings, rng
    return {}

  def gathered_loss(self, params: Any, micro_batch: dict[str, jax.Array],
                    batch: dict[str, jax.Array], rng: jax.Array):
    del params, micro_batch, batch, rng
    return None

  def composed_loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    """(loss, metrics) of the whole batch from the accumulation pieces, as one micro-batch:
    whole_batch_inputs, embed, loss_from_embeddings, then embedding_inputs and gathered_loss.
    The accumulated step (vljax.train) runs the same pieces on k micro-batches."""
    batch = self.with_whole_batch_inputs(batch, rng)
    embeddings = self.embed(params, batch, rng)
    loss, metrics = self.loss_from_embeddings(params, embeddings, rng)
    batch = {**batch, **self.embedding_inputs(params, embeddings, rng)}
    share = self.gathered_loss(params, batch, batch, rng)
    if share is not None:
      loss = loss + share[0]
      metrics = {**metrics, **share[1]}
    return loss, metrics

  def loss_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array],
                      rng: jax.Array):
    del extra
    loss, metrics = self.loss_fn(params, batch, rng)
    return loss, (metrics, None)

  def update_extra(self, extra: Any, params: Any, outputs: Any, step: jax.Array) -> Any:
    del params, outputs, step
    return extra

  @classmethod
  def prepare_run(cls, config: Any, directory: str, train_source: Any = None) -> Any:
    del directory, train_source
    return config

  rule_updated_params: tuple[str, ...] = ()

  def update_rule_params(self, params: Any, extra: Any, outputs: Any, step: jax.Array) -> Any:
    del extra, outputs, step
    return params
