"""Loss building blocks of the fusion families, ALBEF (Li et al., 2021) and BLIP (Li et al., 2022).

Three objectives, each as pure functions on *global* arrays (sharded or not):

1. ITC with momentum distillation (`itc_mod_loss`) and its queues (`init_queue`, `enqueue`),
   the soft-target weight ramp (`alpha_ramp`) and the temperature clamp (`clamp_temperature`).
2. ITM hard-negative mining (`sample_hard_negatives`), the pair layout (`itm_layout`) and the
   2-way cross-entropy (`itm_loss`).
3. MLM masking (`mask_tokens`) and the (optionally distilled) masked-token loss (`mlm_loss`).

Semantics follow salesforce/ALBEF models/model_pretrain.py (see docs/fusion.md for the list),
with one deliberate generalisation: ALBEF scores each GPU's rows against that GPU's own batch
(++ the queue), while here the in-batch part is the *global* batch, so the loss does not depend
on how the batch is split over devices (on one device the two coincide).

Where to compute follows vljax.losses.contrastive: no mesh (or batch axes of total size one) is
a dense computation; otherwise an explicit `jax.shard_map` over the batch axes in which each
device holds b = N / D rows and all-gathers the *other* side (b x (N + Q) similarities, never
N x N on one device). The other side is always momentum features or samples without gradient,
so the all-gathers carry no gradient and the only cross-device gradient term is the
temperature's (summed by the transpose of the replicated input).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vljax.losses.captioning import per_example_token_terms
from vljax.losses.contrastive import (_as_scalar, _batch_mesh, _check_divisible,
                                      _check_embeddings, _dot_t, _place, _sharded)

# ALBEF configs/Pretrain.yaml (the same values in BLIP's pretrain config unless noted).
TEMP_INIT = 0.07
TEMP_MIN = 0.001  # ALBEF: self.temp.clamp_(0.001, 0.5) at the start of every forward.
TEMP_MAX = 0.5
ALPHA = 0.4  # weight of the momentum soft targets (ITC and MLM), after the first-epoch ramp.
QUEUE_SIZE = 65536  # ALBEF; BLIP pretrains with 57600.
MOMENTUM = 0.995  # EMA decay of the momentum model (not used here; for the family configs).
EMBED_DIM = 256  # projection width of the ITC features.
MLM_PROB = 0.15
MASK_TOKEN_PROB = 0.8  # of the chosen tokens: -> mask id
RANDOM_TOKEN_PROB = 0.1  # of the chosen tokens: -> a random id (the remaining 0.1 are kept)
IGNORE = -1  # MLM label of positions that are not scored.
ITM_MATCH = 1  # ITM class of a matching pair (column 1 of the ITM logits), 0 = no match.


# ---------------------------------------------------------------------------------------------
# Schedules and the temperature.
# ---------------------------------------------------------------------------------------------


def alpha_ramp(step, steps_per_epoch: int, alpha: float = ALPHA) -> jax.Array:
  """The distillation weight at a (0-based, global) step: alpha * min(1, step / steps_per_epoch).

  ALBEF ramps alpha linearly from 0 over the first epoch (`alpha * min(1, i / len(loader))` in
  epoch 0, `alpha` afterwards); with step = epoch * steps_per_epoch + i this is the same.
  `step` may be traced. Returns a float32 scalar.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
  step = jnp.asarray(step, jnp.float32)
  return jnp.float32(alpha) * jnp.minimum(1.0, step / steps_per_epoch)


def clamp_temperature(temp: jax.Array) -> jax.Array:
  """Clamps a temperature parameter to [TEMP_MIN, TEMP_MAX].

  ALBEF clamps the parameter itself, in place, before every forward pass; a train step does the
  same by applying this to the parameter (outside the gradient) before calling the losses.
  """
  return jnp.clip(temp, TEMP_MIN, TEMP_MAX)


@jax.custom_jvp
def _clamped(temp: jax.Array) -> jax.Array:
  """The clamped value with the identity gradient.

  This is what ALBEF differentiates: its clamp happens under no_grad on the parameter, so the
  forward sees the clamped value and the gradient is that of 1/t there, also at the bounds.
  (jnp.clip would give 0 outside and 1/2 exactly at a bound.) Inside the range it is plain t.
  """
  return jnp.clip(temp, TEMP_MIN, TEMP_MAX)


@_clamped.defjvp
def _clamped_jvp(primals, tangents):
  return _clamped(primals[0]), tangents[0]


# ---------------------------------------------------------------------------------------------
# ITC with momentum distillation.
# ---------------------------------------------------------------------------------------------


def itc_mod_loss(image_feat: jax.Array, text_feat: jax.Array, image_feat_m: jax.Array,
                 text_feat_m: jax.Array, image_queue: jax.Array, text_queue: jax.Array,
                 temp: jax.Array, alpha: jax.Array | float = ALPHA) -> jax.Array:
  """ALBEF's image-text contrastive loss with momentum distillation.

  With T = [text_feat_m ++ text_queue] and I = [image_feat_m ++ image_queue] ([N + Q, d], the
  global batch first, then the queue in storage order) and t = the clamped temperature:

    sim_i2t   = image_feat   @ T.T / t      sim_t2i   = text_feat   @ I.T / t      [N, N + Q]
    sim_i2t_m = image_feat_m @ T.T / t      sim_t2i_m = text_feat_m @ I.T / t
    targets   = alpha * softmax(sim_m) + (1 - alpha) * one_hot(row i -> column i)
    loss      = (CE(sim_i2t, targets_i2t) + CE(sim_t2i, targets_t2i)) / 2,

  each CE a mean over the N rows of -sum_j targets_ij log_softmax(sim)_ij. The targets are
  constants (momentum features, queues, alpha and the temperature in them carry no gradient);
  gradients flow into the online features and the temperature of the online similarities.

  Args:
    image_feat, text_feat: [N, d] L2-normalised online features of the global batch.
    image_feat_m, text_feat_m: [N, d] L2-normalised momentum (EMA model) features.
    image_queue, text_queue: [Q, d] momentum features of earlier batches (Q >= 0).
    temp: scalar temperature (not its log); clamped to [TEMP_MIN, TEMP_MAX] with the identity
      gradient (see `_clamped`).
    alpha: scalar weight of the soft targets; `alpha_ramp(step, steps_per_epoch)` in ALBEF.

  Returns:
    The global loss, a float32 scalar (replicated when a mesh is in context).
  """
  _check_embeddings(image_feat, text_feat)
  for name, x in (("image_feat_m", image_feat_m), ("text_feat_m", text_feat_m)):
    if jnp.shape(x) != jnp.shape(image_feat):
      raise ValueError(f"{name} must have the online features' shape {jnp.shape(image_feat)}, "
                       f"got {jnp.shape(x)}.")
  d = image_feat.shape[1]
  if (jnp.ndim(image_queue) != 2 or jnp.shape(image_queue) != jnp.shape(text_queue)
      or image_queue.shape[1] != d):
    raise ValueError(f"image_queue and text_queue must both be [Q, {d}], got "
                     f"{jnp.shape(image_queue)} and {jnp.shape(text_queue)}.")
  temp = _as_scalar(temp, "temp")
  alpha = jax.lax.stop_gradient(_as_scalar(alpha, "alpha"))
  consts = [jax.lax.stop_gradient(x) for x in (image_feat_m, text_feat_m, image_queue,
                                               text_queue)]
  bm = _batch_mesh()
  if bm is None:
    return _itc_dense(image_feat, text_feat, *consts, temp, alpha)
  _check_divisible(image_feat.shape[0], bm)
  return _itc_sharded(image_feat, text_feat, *consts, temp, alpha)


def _itc_direction_sum(q, q_m, keys_m, offset, temp, alpha):
  """Sum over rows of CE(q @ keys_m.T / t, soft targets); row r's positive is column r + offset.

  q, q_m: [b, d] online / momentum queries; keys_m: [K, d] momentum keys (batch ++ queue).
  """
  t = _clamped(temp.astype(jnp.float32))
  logits = _dot_t(q, keys_m) / t  # [b, K]
  logits_m = _dot_t(q_m, keys_m) / t
  rows = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  one_hot = (cols == rows + offset).astype(jnp.float32)
  a = alpha.astype(jnp.float32)
  # ALBEF builds the targets under no_grad: no gradient into t through the momentum softmax.
  targets = jax.lax.stop_gradient(a * jax.nn.softmax(logits_m, axis=-1) + (1 - a) * one_hot)
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1))


def _itc_dense(zi, zt, zi_m, zt_m, qi, qt, temp, alpha):
  keys_t = jnp.concatenate([zt_m, qt.astype(zt_m.dtype)], axis=0)
  keys_i = jnp.concatenate([zi_m, qi.astype(zi_m.dtype)], axis=0)
  total = (_itc_direction_sum(zi, zi_m, keys_t, 0, temp, alpha)
           + _itc_direction_sum(zt, zt_m, keys_i, 0, temp, alpha))
  return total / (2 * zi.shape[0])


@_sharded
def _itc_sharded(zi, zt, zi_m, zt_m, qi, qt, temp, alpha):
  """Per device: b local rows of each direction against [gathered momentum batch ++ queue]."""
  bm = _batch_mesh()
  n = zi.shape[0]
  axes = bm.axes
  row = P(axes, None)

  def local(zi, zt, zi_m, zt_m, qi, qt, t, a):
    # Gathered without gradient (the inputs are stop_gradient-ed): the keys are constants.
    keys_t = jnp.concatenate(
        [jax.lax.all_gather(zt_m, axes, tiled=True), qt.astype(zt_m.dtype)], axis=0)
    keys_i = jnp.concatenate(
        [jax.lax.all_gather(zi_m, axes, tiled=True), qi.astype(zi_m.dtype)], axis=0)
    offset = jax.lax.axis_index(axes) * zi.shape[0]  # global index of local row 0
    total = (_itc_direction_sum(zi, zi_m, keys_t, offset, t, a)
             + _itc_direction_sum(zt, zt_m, keys_i, offset, t, a))
    return jax.lax.psum(total, axes) / (2 * n)

  return jax.shard_map(
      local, mesh=bm.mesh, in_specs=(row, row, row, row, P(), P(), P(), P()), out_specs=P())(
          _place(zi, row, bm), _place(zt, row, bm), _place(zi_m, row, bm),
          _place(zt_m, row, bm), _place(qi, P(), bm), _place(qt, P(), bm),
          _place(temp, P(), bm), _place(alpha, P(), bm))


# ---------------------------------------------------------------------------------------------
# Queues.
# ---------------------------------------------------------------------------------------------


def init_queue(key: jax.Array, size: int, dim: int, dtype=jnp.float32) -> jax.Array:
  """A [size, dim] queue of random unit vectors (ALBEF starts its queues like this)."""
  q = jax.random.normal(key, (size, dim), jnp.float32)
  return (q / jnp.linalg.norm(q, axis=-1, keepdims=True)).astype(dtype)


def enqueue(queue: jax.Array, ptr: jax.Array | int,
            features: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes the global batch's features at rows [ptr, ptr + N) and advances the pointer.

  The features are those of the *global* batch (all devices' rows, in batch order, as ALBEF's
  concat_all_gather gives them); on a mesh, pass the batch-sharded array as it is. The queue
  replaces its oldest N rows, so it always holds the last Q / N batches.

  Args:
    queue: [Q, d]; Q must be a multiple of N (as ALBEF asserts), so a write never wraps
      inside a batch.
    ptr: int scalar, the row the next batch goes to: 0 initially, then what this returns
      (always a multiple of N; any other value is the caller's bug and is not checked).
    features: [N, d], e.g. the momentum features; stored without gradient, cast to the
      queue's dtype.

  Returns:
    (the new queue [Q, d], the new pointer (ptr + N) % Q as an int32 scalar).
  """
  if jnp.ndim(queue) != 2 or jnp.ndim(features) != 2 or queue.shape[1] != features.shape[1]:
    raise ValueError(f"queue must be [Q, d] and features [N, d] with the same d, got "
                     f"{jnp.shape(queue)} and {jnp.shape(features)}.")
  size, n = queue.shape[0], features.shape[0]
  if n == 0 or size % n:
    raise ValueError(
        f"The queue size ({size}) must be a multiple of the global batch size ({n}) "
        f"(ALBEF's requirement: each batch fills whole slots). Choose queue_size = k * {n}.")
  ptr = jnp.asarray(ptr, jnp.int32).reshape(())
  feats = jax.lax.stop_gradient(features).astype(queue.dtype)
  queue = jax.lax.dynamic_update_slice(queue, feats, (ptr, jnp.int32(0)))
  return queue, (ptr + n) % size


# ---------------------------------------------------------------------------------------------
# ITM: hard negatives, pair layout, loss.
# ---------------------------------------------------------------------------------------------


def sample_hard_negatives(key: jax.Array, image_feat: jax.Array, text_feat: jax.Array,
                          temp: jax.Array, *, image_feat_m: jax.Array | None = None,
                          text_feat_m: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """One hard negative text per image and one hard negative image per text, from the batch.

  For image i, text j != i is drawn with probability softmax(sim_i2t[i]) renormalised without
  column i (ALBEF: softmax weights, diagonal set to 0, torch.multinomial), where
  sim_i2t = image_feat @ text_keys.T / t over the GLOBAL batch, text_keys = text_feat_m if
  given else text_feat, and t the clamped temperature. Likewise for texts with
  sim_t2i = text_feat @ image_keys.T / t. ALBEF's sim[:, :bs] is online query vs *momentum*
  keys, so pass image_feat_m / text_feat_m to reproduce it.

  Sampling is the Gumbel-max trick with one key per (direction, global row):
    k_i2t, k_t2i = jax.random.split(key)
    neg_text[i]  = argmax_j (sim_i2t[i, j] + gumbel(fold_in(k_i2t, i), (N,))[j]), j != i
    neg_image[i] = argmax_j (sim_t2i[i, j] + gumbel(fold_in(k_t2i, i), (N,))[j]), j != i
  so the result does not depend on how rows are spread over devices, and a dense reference with
  the same keys reproduces it exactly. Nothing here carries gradient.

  Args:
    key: a PRNG key.
    image_feat, text_feat: [N, d] features of the global batch (N >= 2).
    temp: scalar temperature.
    image_feat_m, text_feat_m: optional [N, d] keys for the other side (see above).

  Returns:
    (neg_text_idx [N] int32: for each image, a text index into the global batch;
     neg_image_idx [N] int32: for each text, an image index), never the positive.
  """
  _check_embeddings(image_feat, text_feat)
  text_keys = text_feat if text_feat_m is None else text_feat_m
  image_keys = image_feat if image_feat_m is None else image_feat_m
  for name, x in (("image_feat_m", image_keys), ("text_feat_m", text_keys)):
    if jnp.shape(x) != jnp.shape(image_feat):
      raise ValueError(f"{name} must have the shape {jnp.shape(image_feat)}, got "
                       f"{jnp.shape(x)}.")
  n = image_feat.shape[0]
  if n < 2:
    raise ValueError(f"Hard negatives need a global batch of at least 2, got {n}.")
  temp = jax.lax.stop_gradient(_as_scalar(temp, "temp"))
  args = [jax.lax.stop_gradient(x) for x in (image_feat, text_feat, image_keys, text_keys)]
  k_i2t, k_t2i = jax.random.split(key)
  bm = _batch_mesh()
  if bm is None:
    return (_sample_rows(k_i2t, args[0], args[3], temp, 0),
            _sample_rows(k_t2i, args[1], args[2], temp, 0))
  _check_divisible(n, bm)
  return _sample_sharded(k_i2t, k_t2i, *args, temp)


def _sample_rows(key, queries, keys, temp, offset):
  """Samples one column per query row; row r is global row r + offset (its positive column).

  queries: [b, d]; keys: [N, d] (the global batch). Returns [b] int32.
  """
  logits = _dot_t(queries, keys) / _clamped(temp.astype(jnp.float32))  # [b, N]
  rows = offset + jnp.arange(queries.shape[0], dtype=jnp.int32)
  noise = jax.vmap(
      lambda r: jax.random.gumbel(jax.random.fold_in(key, r), (keys.shape[0],), jnp.float32)
  )(rows)
  cols = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  # -inf, not a weight of 0 after the softmax: the positive can never win, whatever its score.
  scores = jnp.where(cols == rows[:, None], -jnp.inf, logits + noise)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


@_sharded
def _sample_sharded(k_i2t, k_t2i, zi, zt, zi_keys, zt_keys, temp):
  """Per device: b rows of each direction against the all-gathered keys ([b, N])."""
  bm = _batch_mesh()
  axes = bm.axes
  row = P(axes, None)

  def local(k1, k2, zi, zt, zi_keys, zt_keys, t):
    offset = jax.lax.axis_index(axes) * zi.shape[0]
    neg_text = _sample_rows(k1, zi, jax.lax.all_gather(zt_keys, axes, tiled=True), t, offset)
    neg_image = _sample_rows(k2, zt, jax.lax.all_gather(zi_keys, axes, tiled=True), t, offset)
    return neg_text, neg_image

  return jax.shard_map(
      local, mesh=bm.mesh, in_specs=(P(), P(), row, row, row, row, P()),
      out_specs=(P(axes), P(axes)))(
          _place(k_i2t, P(), bm), _place(k_t2i, P(), bm), _place(zi, row, bm),
          _place(zt, row, bm), _place(zi_keys, row, bm), _place(zt_keys, row, bm),
          _place(temp, P(), bm))


def itm_layout(neg_text_idx: jax.Array, neg_image_idx: jax.Array, num_blocks: int = 1,
               rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The 3N (image, text, label) pairs ALBEF feeds its fusion encoder and ITM head.

  Within a block of b = N / num_blocks examples (rows i of the block):
    b positives        (image i,                text i)                 label 1
    b negative images  (image neg_image_idx[i], text i)                 label 0
    b negative texts   (image i,                text neg_text_idx[i])   label 0
  which is ALBEF's order (output_pos, then output_neg = [text ++ text_neg] against
  [image_neg ++ image]; labels ones(bs) ++ zeros(2 bs)). num_blocks=1 is that order over the
  global batch; num_blocks = D (the batch-axis device count) repeats it per device, so on a
  batch-sharded [3N] array each device's 3b pairs are its own b examples and their negatives
  (only the sampled negatives come from other devices).

  Args:
    neg_text_idx, neg_image_idx: [N] int, from `sample_hard_negatives`.
    num_blocks: a divisor of N.
    rows: [N] int, the batch rows of these examples where they are part of a larger batch
      that the negatives index (a micro-batch of gradient accumulation); default arange(N).

  Returns:
    (image_idx [3N] int32, text_idx [3N] int32, labels [3N] int32), indices into the batch.
  """
  n = jnp.shape(neg_text_idx)[0]
  if jnp.shape(neg_text_idx) != (n,) or jnp.shape(neg_image_idx) != (n,):
    raise ValueError(f"neg_text_idx and neg_image_idx must both be [N], got "
                     f"{jnp.shape(neg_text_idx)} and {jnp.shape(neg_image_idx)}.")
  if num_blocks < 1 or n % num_blocks:
    raise ValueError(f"num_blocks ({num_blocks}) must divide the batch size ({n}).")
  ar = jnp.arange(n, dtype=jnp.int32) if rows is None else jnp.asarray(rows, jnp.int32)
  neg_t = jnp.asarray(neg_text_idx, jnp.int32)
  neg_i = jnp.asarray(neg_image_idx, jnp.int32)
  ones, zeros = jnp.full((n,), ITM_MATCH, jnp.int32), jnp.full((n,), 1 - ITM_MATCH, jnp.int32)

  def blocked(pos, neg_img_part, neg_txt_part):
    # [3, N] -> [3, blocks, b] -> [blocks, 3, b] -> [3N]
    x = jnp.stack([pos, neg_img_part, neg_txt_part]).reshape(3, num_blocks, n // num_blocks)
    return jnp.transpose(x, (1, 0, 2)).reshape(3 * n)

  return blocked(ar, neg_i, ar), blocked(ar, ar, neg_t), blocked(ones, zeros, zeros)


def itm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean 2-way cross-entropy of the ITM head (F.cross_entropy in ALBEF).

  Args:
    logits: [M, 2] (M = 3N in ALBEF); column ITM_MATCH (1) scores "the pair matches".
    labels: [M] int, 1 for matching pairs, 0 otherwise (see `itm_layout`).

  Returns:
    A float32 scalar, the mean over the M pairs (global when the arrays are sharded).
  """
  if jnp.ndim(logits) != 2 or logits.shape[1] != 2 or jnp.shape(labels) != logits.shape[:1]:
    raise ValueError(f"itm_loss takes logits [M, 2] and labels [M], got {jnp.shape(logits)} "
                     f"and {jnp.shape(labels)}.")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels.astype(jnp.int32)[:, None], axis=-1))


# ---------------------------------------------------------------------------------------------
# MLM.
# ---------------------------------------------------------------------------------------------


def mask_tokens(key: jax.Array, tokens: jax.Array, *, mask_id: int, vocab_size: int,
                random_low: int, special_ids: Sequence[int], mask_prob: float = MLM_PROB,
                mask_token_prob: float = MASK_TOKEN_PROB,
                random_token_prob: float = RANDOM_TOKEN_PROB) -> tuple[jax.Array, jax.Array]:
  """BERT/ALBEF masking: choose tokens, corrupt them 80/10/10, label them with the originals.

  Each token whose id is not in `special_ids` is chosen independently with probability
  mask_prob (ALBEF: torch.bernoulli(0.15), then pad and [CLS] unchosen; so 15% of the real
  tokens in expectation). A chosen token becomes mask_id with probability mask_token_prob, a
  uniform id from [random_low, vocab_size) with probability random_token_prob, and stays as it
  is otherwise. (ALBEF draws its random ids from the whole vocabulary; `random_low` lets the
  caller keep specials out.)

  Args:
    key: a PRNG key; the result is a function of the key and the token values only (the
      threefry bits of a global array do not depend on its sharding).
    tokens: [..., L] int ids (e.g. [B, L]).
    mask_id: the id written at masked positions.
    vocab_size, random_low: random replacements are drawn from [random_low, vocab_size).
    special_ids: ids never chosen: pad, EOS, BOS / [CLS]-like tokens (vljax's tokenizer:
      pad 0 and EOS 1).

  Returns:
    (inputs: tokens with the chosen positions corrupted, same shape and dtype;
     labels: int32, the original id at chosen positions and IGNORE (-1) elsewhere).
  """
  if not 0 <= random_low < vocab_size:
    raise ValueError(f"Need 0 <= random_low < vocab_size, got {random_low}, {vocab_size}.")
  if not (0 <= mask_prob <= 1 and mask_token_prob >= 0 and random_token_prob >= 0
          and mask_token_prob + random_token_prob <= 1):
    raise ValueError(f"Bad masking probabilities: mask_prob={mask_prob}, "
                     f"mask_token_prob={mask_token_prob}, random_token_prob={random_token_prob}.")
  tokens = jnp.asarray(tokens)
  k_choose, k_kind, k_random = jax.random.split(key, 3)
  special = jnp.asarray(sorted(set(int(i) for i in special_ids)), tokens.dtype)
  eligible = ~jnp.isin(tokens, special)
  chosen = eligible & (jax.random.uniform(k_choose, tokens.shape) < mask_prob)
  # One uniform splits the chosen tokens into [mask | random | keep].
  u = jax.random.uniform(k_kind, tokens.shape)
  to_mask = chosen & (u < mask_token_prob)
  to_random = chosen & (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
  random_ids = jax.random.randint(k_random, tokens.shape, random_low, vocab_size, tokens.dtype)
  inputs = jnp.where(to_mask, jnp.asarray(mask_id, tokens.dtype),
                     jnp.where(to_random, random_ids, tokens))
  labels = jnp.where(chosen, tokens.astype(jnp.int32), IGNORE)
  return inputs, labels


def per_example_mlm_terms(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Each example's masked-token sums, float32 [B]: 'loss' the cross-entropy summed over its
  chosen positions (label >= 0), 'count' their number, 'hits' those the argmax gets right.
  Sums add up over any split of the batch (gradient accumulation); the hard part of mlm_loss is
  sum(loss) / max(sum(count), 1) over the batch.

  Args:
    logits: [B, L, V]; labels: [B, L] int, negative (IGNORE) where not chosen.
  """
  terms = per_example_token_terms(logits, jnp.maximum(labels, 0), labels >= 0)
  return {"loss": terms["nll"], "count": terms["tokens"], "hits": terms["correct"]}


def mlm_loss(logits: jax.Array, labels: jax.Array, soft_targets: jax.Array | None = None,
             alpha: jax.Array | float = ALPHA) -> jax.Array:
  """Masked-token cross-entropy, optionally distilled from the momentum model (ALBEF).

    hard = mean over chosen positions of -log softmax(logits)[label]
    soft = mean over chosen positions of -sum_v soft_targets_v log softmax(logits)_v
    loss = hard                               if soft_targets is None
           (1 - alpha) * hard + alpha * soft  otherwise

  (ALBEF's BertForMaskedLM with soft_labels = softmax(momentum logits).) Means run over the
  chosen positions of the whole (global) batch; with none chosen the loss is 0, not NaN.

  Args:
    logits: [..., L, V] online MLM logits.
    labels: [..., L] int, the original id at chosen positions, negative (IGNORE) elsewhere.
    soft_targets: optional [..., L, V] probabilities (e.g. softmax of the momentum model's
      logits on the same masked input); constants, no gradient.
    alpha: scalar weight of the soft part; `alpha_ramp(...)` in ALBEF.

  Returns:
    A float32 scalar.
  """
  if jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(f"labels {jnp.shape(labels)} must be logits' shape without the vocabulary "
                     f"axis, {jnp.shape(logits)[:-1]}.")
  if soft_targets is not None and jnp.shape(soft_targets) != jnp.shape(logits):
    raise ValueError(f"soft_targets must have the logits' shape {jnp.shape(logits)}, got "
                     f"{jnp.shape(soft_targets)}.")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = labels.astype(jnp.int32)
  chosen = (labels >= 0).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(chosen), 1.0)
  safe = jnp.maximum(labels, 0)  # any valid index; the unchosen terms are multiplied by 0
  hard = -jnp.sum(jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0] * chosen) / count
  if soft_targets is None:
    return hard
  soft_targets = jax.lax.stop_gradient(soft_targets).astype(jnp.float32)
  a = jax.lax.stop_gradient(_as_scalar(alpha, "alpha")).astype(jnp.float32)
  soft = -jnp.sum(jnp.sum(soft_targets * logp, axis=-1) * chosen) / count
  return (1 - a) * hard + a * soft
