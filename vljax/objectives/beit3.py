"""BEiT-3 objective (Wang et al., 2023): masked data modelling on images, texts and image-text
pairs with one Multiway transformer, the image targets being a frozen VQ-KD tokenizer's codes.

Each step sees three views of the batch of (image, caption) pairs (the paper draws monomodal
images and texts from their own corpora; the data here has pairs only):

  image  image-only mode, block-wise config.loss.mim_ratio (40%) of the patches replaced by the
         mask token (losses.masked_modeling); predict each masked patch's visual token.
  text   text-only mode, config.loss.text_mlm_prob (15%) of the real tokens masked 80/10/10
         (losses.fusion.mask_tokens; pad and EOS never); predict them.
  pair   fused mode over [caption ++ image], config.loss.pair_mlm_prob (50%, BEiT-3's ratio for
         pairs) of the tokens and, block-wise, 40% of the patches masked; predict both.

  loss = image_mim_weight * image_mim + text_mlm_weight * text_mlm
         + pair_mlm_weight * pair_mlm + pair_mim_weight * pair_mim        (1 each by default)

every term the mean cross-entropy over its masked positions of the whole batch. The visual
tokens are the codes VqKd.tokenize gives for the unmasked images, computed once per step and
shared by both image views; the tokenizer (params tokenizer/...) is frozen by the config and
its output is a constant, so the step runs its forward once and no backward through it.

Without a tokenizer (no config.model.tokenizer: configs/beit3.py without tokenizer=DIR) the two
MIM terms fall back to normalised-pixel targets: the mean squared error of each masked patch's
per-patch-normalised pixels (losses.masked_modeling, as VLMo's image stage), with no accuracy
metric; a warning says so when the objective is built.

Metrics: {image_mim, text_mlm, pair_mlm, pair_mim}_{loss, accuracy} (accuracy: argmax over the
masked positions). No non-gradient state. Held-out: masked_modelling_hits gives the evaluator
(vljax.evals.masked_modeling) each pair's hits and masked positions under fixed masks.

Gradient accumulation (config.grad_accum_steps=K) is exact: the masks are drawn once per step
for the whole batch (whole_batch_inputs, one key per example) and split with it, `embed` gives
each example's summed losses, hits and masked-position counts (term_sums), and
`loss_from_embeddings` divides by the whole batch's counts. The tokenizer's codes are computed
per micro-batch, twice (the embedding pass and the pass that pulls the gradients back), still
without a backward pass.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vljax.configlib import ConfigError
from vljax.losses import fusion as fusion_losses
from vljax.losses import masked_modeling
from vljax.models import beit3
from vljax.models import two_towers
from vljax.objectives import base
from vljax.objectives import contrastive
from vljax.objectives import vlmo

TERMS = ("image_mim", "text_mlm", "pair_mlm", "pair_mim")
MIM_PATCHES = {"image_mim": "image_patches", "pair_mim": "pair_patches"}  # term -> its mask
EVAL_SEED = 0  # the held-out masks' key


def tokenizer_patch_size(encoder: dict[str, Any]) -> int:
  """The patch size of a VQ-KD encoder's kwargs (patch_size or its variant's)."""
  patch = two_towers.tower_kwargs(encoder, None, None)["patch_size"]
  return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def check_tokenizer_fits(config: ml_collections.ConfigDict) -> None:
  """The tokenizer must cut the images the model sees into the same patches: its codes are the
  targets of the model's patch positions. One-line ConfigErrors naming the key and the fix."""
  tok = config.model.tokenizer
  if tok.image_size != config.data.image_size:
    raise ConfigError(
        f"config.data.image_size={config.data.image_size} but the visual tokenizer was trained "
        f"at {tok.image_size} px (config.model.tokenizer.image_size, from its run): use "
        f"--config.data.image_size={tok.image_size} or a tokenizer trained at "
        f"{config.data.image_size} px.")
  patch = tokenizer_patch_size(dict(tok.encoder))
  if patch != config.model.transformer.patch_size:
    raise ConfigError(
        f"config.model.transformer.patch_size={config.model.transformer.patch_size} but the "
        f"visual tokenizer's patches are {patch} px (config.model.tokenizer.encoder, from its "
        f"run): its codes must be the targets of the model's patches; use "
        f"--config.model.transformer.patch_size={patch} or a tokenizer with "
        f"{config.model.transformer.patch_size} px patches.")


class Beit3Objective(base.Objective):
  """BEiT-3 masked data modelling on the default (image, caption) batch (module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    tok = config.model.get("tokenizer")
    self.pixel_targets = not tok
    if self.pixel_targets:
      logging.warning("BEiT-3 without a visual tokenizer (config.model.tokenizer): the masked "
                      "patches predict normalised pixels, the fallback targets; pass "
                      "tokenizer=DIR (a configs/vqkd.py run) for VQ-KD codes.")
    else:
      check_tokenizer_fits(config)
    # The terms the held-out evaluation counts hits of (masked_modelling_hits' columns, in
    # order): pixel regression has no hits.
    self.TERMS = tuple(t for t in TERMS if not (self.pixel_targets and t in MIM_PATCHES))
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.patch = int(config.model.transformer.patch_size)
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size
    self.special_ids = (tokenizer.pad_id, tokenizer.eos_id)
    self.model = beit3.Beit3(
        transformer=vlmo.transformer_kwargs(config, tokenizer),
        tokenizer=None if self.pixel_targets else dict(
            encoder=dict(tok.encoder), num_codes=int(tok.num_codes), code_dim=int(tok.code_dim)),
        dtype=contrastive.DTYPES[config.dtype])
    loss = config.loss
    self.text_mlm_prob, self.pair_mlm_prob = float(loss.text_mlm_prob), float(loss.pair_mlm_prob)
    for key, value in (("text_mlm_prob", self.text_mlm_prob),
                       ("pair_mlm_prob", self.pair_mlm_prob), ("mim_ratio", loss.mim_ratio)):
      if not 0.0 < value < 1.0:
        raise ConfigError(f"config.loss.{key}={value} must be in (0, 1).")
    self.weights = {term: float(loss.get(f"{term}_weight", 1.0)) for term in TERMS}
    grid = self.image_size // int(config.model.transformer.patch_size)
    self.grid = (grid, grid)
    self.num_masked = masked_modeling.num_masked_patches(grid * grid, float(loss.mim_ratio))

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def _apply(self, params, method, *args, rng=None, **kwargs):
    rngs = {} if rng is None else {"dropout": rng}
    return self.model.apply({"params": params}, *args, rngs=rngs, method=method, **kwargs)

  def visual_tokens(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """[B, n] int32: the tokenizer's codes of batch['image'] (the MIM targets)."""
    return self._apply(params, beit3.Beit3.visual_tokens, batch["image"])

  def masks(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The step's masking, one key per example of the (global) batch (example_masks)."""
    return self.example_masks(jax.random.split(rng, batch["text"].shape[0]), batch["text"])

  def example_masks(self, keys: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
    """Each example's masking from its own key (keys [B], tokens [B, L]): patch masks [B, n]
    bool of the image and pair views, and (masked tokens, labels) [B, L] of the text and pair
    views. Per example, so a held-out example is masked the same way in any batch."""

    def one(key, row):
      k_image, k_pair_image, k_text, k_pair_text = jax.random.split(key, 4)
      patches = lambda k: masked_modeling.blockwise_patch_mask(k, self.grid, self.num_masked)
      text_tokens, text_labels = vlmo.mask_text(k_text, row, self.vocab_size,
                                                self.special_ids, self.text_mlm_prob)
      pair_tokens, pair_labels = vlmo.mask_text(k_pair_text, row, self.vocab_size,
                                                self.special_ids, self.pair_mlm_prob)
      return {"image_patches": patches(k_image), "pair_patches": patches(k_pair_image),
              "text_tokens": text_tokens, "text_labels": text_labels,
              "pair_tokens": pair_tokens, "pair_labels": pair_labels}

    return jax.vmap(one)(keys, tokens)

  def logits(self, params: Any, batch: dict[str, jax.Array], masks: dict[str, jax.Array],
             rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """{term: float32 logits} of the four predictions (train mode when `rng` is given)."""
    train = rng is not None
    d_image, d_text, d_pair = jax.random.split(rng, 3) if train else (None,) * 3
    images = batch["image"]
    pair_mlm, pair_mim = self._apply(params, beit3.Beit3.pair_logits, images,
                                     masks["pair_patches"], masks["pair_tokens"], rng=d_pair,
                                     train=train)
    return {"image_mim": self._apply(params, beit3.Beit3.image_mim_logits, images,
                                     masks["image_patches"], rng=d_image, train=train),
            "text_mlm": self._apply(params, beit3.Beit3.text_mlm_logits, masks["text_tokens"],
                                    rng=d_text, train=train),
            "pair_mlm": pair_mlm, "pair_mim": pair_mim}

  def labels(self, codes: jax.Array | None, masks: dict[str, jax.Array]
             ) -> dict[str, jax.Array]:
    """{term: int32 labels}: the target at masked positions, fusion.IGNORE elsewhere (the MIM
    terms only with visual tokens, `codes`)."""
    labels = {"text_mlm": masks["text_labels"], "pair_mlm": masks["pair_labels"]}
    if codes is not None:
      for term, patches in MIM_PATCHES.items():
        labels[term] = jnp.where(masks[patches], codes, fusion_losses.IGNORE)
    return labels

  def _codes(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array | None:
    return None if self.pixel_targets else self.visual_tokens(params, batch)

  def term_sums(self, params: Any, batch: dict[str, jax.Array], masks: dict[str, jax.Array],
                rng: jax.Array | None = None) -> dict[str, dict[str, jax.Array]]:
    """{term: {name: float32 [B]}}: each example's masked positions of the term ('count'), the
    summed cross-entropy over them ('loss'; the pixel fallback: the summed per-patch squared
    error) and, for token targets, the positions the argmax predicts ('hits'). Train mode when
    `rng` is given. Sums, so they add up over any split of the batch."""
    logits = self.logits(params, batch, masks, rng)
    labels = self.labels(self._codes(params, batch), masks)
    pixels = (masked_modeling.patch_pixel_targets(batch["image"], self.patch)
              if self.pixel_targets else None)
    sums = {}
    for term in TERMS:
      if term in labels:
        sums[term] = fusion_losses.per_example_mlm_terms(logits[term], labels[term])
      else:  # the pixel fallback
        sums[term] = masked_modeling.per_example_patch_terms(logits[term], pixels,
                                                             masks[MIM_PATCHES[term]])
    return sums

  def whole_batch_inputs(self, batch: dict[str, jax.Array],
                         rng: jax.Array) -> dict[str, Any]:
    """{'masks': the step's masking of the whole batch}, from the first half of `rng`'s split
    (the second is embed's dropout): the same masks in one batch or in micro-batches."""
    return {"masks": self.masks(jax.random.split(rng)[0], batch)}

  def embed(self, params: Any, batch: dict[str, jax.Array],
            rng: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """The per-example part of the loss, term_sums under batch['masks'] (whole_batch_inputs;
    the batch must hold them)."""
    return self.term_sums(params, batch, batch["masks"], jax.random.split(rng)[1])

  def loss_from_embeddings(self, params: Any, embeddings: dict[str, dict[str, jax.Array]],
                           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the terms, each a mean over its masked positions of the whole
    batch, and their accuracies."""
    del params, rng
    loss, metrics = 0.0, {}
    for term in TERMS:
      sums = embeddings[term]
      count = jnp.maximum(jnp.sum(sums["count"]), 1.0)
      value = jnp.sum(sums["loss"]) / count
      if "hits" in sums:  # pixel regression has no accuracy
        metrics[f"{term}_accuracy"] = jnp.sum(sums["hits"]) / count
      loss += self.weights[term] * value
      metrics[f"{term}_loss"] = value
    return loss, metrics

  # Held-out evaluation (vljax.evals.masked_modeling).

  def masked_modelling_hits(self, params: Any, images: jax.Array, tokens: jax.Array,
                            example_ids: jax.Array) -> jax.Array:
    """[B, 2 * len(self.TERMS)] float32: per (image, caption) pair, for each term in
    self.TERMS order, the masked positions predicted right and the masked positions, the masks
    drawn from a fixed key folded with each example's id (the same masking at every
    evaluation, in any batch)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(EVAL_SEED), i))(example_ids)
    batch = {"image": images, "text": tokens}
    sums = self.term_sums(params, batch, self.example_masks(keys, tokens))
    return jnp.stack([sums[term][key] for term in self.TERMS for key in ("hits", "count")],
                     axis=1)
