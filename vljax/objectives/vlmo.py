"""VLMo objective (Bao et al., 2022): the three pre-training stages of one Multiway transformer.

config.loss.stage picks the stage (VLMo trains them in this order, each starting from the
previous one's weights: configs/vlmo.py):

  image       masked image modelling, image-only mode: 40% of the patches, in blocks
              (losses.masked_modeling.blockwise_patch_mask), replaced by the mask token; the
              mim_head predicts each masked patch's normalised pixels (the fallback target of
              the issue: no visual tokenizer yet), mean squared error over the masked patches.
  text        masked language modelling, text-only mode (15% of the real tokens, 80/10/10),
              with the self-attention and the V experts frozen by the config (optim.freeze).
  image_text  the loss below.

The image-text stage:

  loss = itc_weight * itc + itm_weight * itm + mlm_weight * mlm        (config.loss.*_weight)

  itc  the dual-encoder mode: image-only and text-only [CLS] features, CLIP's softmax loss over
       the global batch (vljax.losses.softmax_loss, all-gathered on a mesh) at the learned
       scale exp(logit_scale).
  itm  one hard negative text per image and one hard negative image per text, sampled with
       probability softmax(scale * ITC similarity) over the GLOBAL batch with the positive
       excluded (losses.fusion.sample_hard_negatives at temperature 1 / scale), the 3N pairs of
       losses.fusion.itm_layout through the fused mode, a binary head on the pooled text [CLS].
  mlm  losses.fusion.mask_tokens (15%; 80/10/10; mask id = vocab_size, pad and EOS never
       chosen), the masked caption fused with its own image, cross-entropy at the chosen
       positions.

No non-gradient state. Gradient accumulation (config.grad_accum_steps=K) is exact in every stage
(the loss is split into the pieces of vljax.objectives.base): the masks are drawn once for the
whole batch, ITC and every mean run over the whole batch, and ITM's hard negatives are drawn
from the whole batch's ITC features and fused with their partners' inputs gathered from it.

For retrieval, encode_image_tokens (the image embeddings the fused mode takes) and itm_scores
let the evaluator re-rank the dual encoder's candidates in fused mode (vljax.evals.rerank).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vljax import losses
from vljax.configlib import ConfigError
from vljax.losses import fusion as fusion_losses
from vljax.losses import masked_modeling
from vljax.models import stacks
from vljax.models import vlmo
from vljax.objectives import base
from vljax.objectives import contrastive


def transformer_kwargs(config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
  """config.model.transformer as multiway.Multiway keyword arguments, with the tokenizer's ids,
  the data's sizes and the scan / remat options (VLMo and BEiT-3 share the stack)."""
  transformer = dict(config.model.transformer.to_dict(), vocab_size=tokenizer.vocab_size,
                     pad_id=tokenizer.pad_id, max_len=config.data.max_len,
                     image_size=config.data.image_size)
  transformer.update(stacks.check_layers_config(config.get("layers")))
  return transformer


def model_kwargs(config: ml_collections.ConfigDict, tokenizer) -> dict[str, Any]:
  """config.model as Vlmo keyword arguments, with the tokenizer's ids and the data's sizes."""
  return dict(transformer=transformer_kwargs(config, tokenizer),
              embed_dim=config.model.embed_dim,
              temperature_init=config.model.temperature_init,
              dtype=contrastive.DTYPES[config.dtype])


STAGES = ("image", "text", "image_text")


class VlmoObjective(base.Objective):
  """VLMo pre-training (any stage) on the default (image, caption) batch."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.loss_cfg = config.loss
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.tokenizer = tokenizer
    self.model = vlmo.Vlmo(**model_kwargs(config, tokenizer))
    self.vocab_size = tokenizer.vocab_size
    self.special_ids = (tokenizer.pad_id, tokenizer.eos_id)
    self.weights = {name: float(config.loss.get(f"{name}_weight", 1.0))
                    for name in ("itc", "itm", "mlm")}
    self.stage = config.loss.get("stage", "image_text")
    if self.stage not in STAGES:
      raise ConfigError(f"config.loss.stage={self.stage!r}; choose one of {list(STAGES)}.")
    self.patch = int(config.model.transformer.patch_size)
    self.grid = (self.image_size // self.patch,) * 2
    self.num_masked = masked_modeling.num_masked_patches(
        self.grid[0] * self.grid[1], float(config.loss.get("mim_ratio",
                                                            masked_modeling.MASK_RATIO)))

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def _apply(self, params, method, *args, rng=None, **kwargs):
    rngs = {} if rng is None else {"dropout": rng}
    return self.model.apply({"params": params}, *args, rngs=rngs, method=method, **kwargs)

  def mlm_inputs(self, key: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(masked tokens, labels) [B, L] (80/10/10 of config.loss.mlm_prob of the real tokens)."""
    return mask_text(key, tokens, self.vocab_size, self.special_ids, self.loss_cfg.mlm_prob)

  # The loss, in the pieces exact gradient accumulation needs (vljax.objectives.base): the
  # masks are drawn for the whole batch, each example's MIM / MLM sums and its ITC features
  # are per-example, ITC and the means over the batch's masked positions are batch-wide, and
  # ITM's hard negatives, drawn from the whole batch's ITC features, are the gathered term.
  # The keys are those the stage has always used: k_mask, k_drop = split(rng) in the unimodal
  # stages, k_neg, k_mask, k_drop = split(rng, 3) in the image-text stage.

  def _keys(self, rng: jax.Array) -> dict[str, jax.Array]:
    if self.stage == "image_text":
      k_neg, k_mask, k_drop = jax.random.split(rng, 3)
      return {"neg": k_neg, "mask": k_mask,
              **dict(zip(("img", "txt", "itm", "mlm"), jax.random.split(k_drop, 4)))}
    k_mask, k_drop = jax.random.split(rng)
    return {"mask": k_mask, "drop": k_drop}

  def whole_batch_inputs(self, batch: dict[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
    """The step's masking of the whole batch: the image stage's patch masks [B, n], else the
    masked captions and their MLM labels [B, L]."""
    key = self._keys(rng)["mask"]
    if self.stage == "image":
      return {"patch_mask": masked_modeling.blockwise_patch_masks(
          key, batch["image"].shape[0], self.grid, self.num_masked)}
    masked, labels = self.mlm_inputs(key, batch["text"])
    return {"mlm_tokens": masked, "mlm_labels": labels}

  def embed(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
    """Per example: the masked-prediction sums ('mim' or 'mlm': loss, count[, hits]) and, in
    the image-text stage, the ITC features 'zimg', 'ztxt'."""
    keys = self._keys(rng)
    images = batch.get("image")
    if self.stage == "image":
      predictions = self._apply(params, vlmo.Vlmo.mim_predictions, images, batch["patch_mask"],
                                rng=keys["drop"], train=True)
      return {"mim": masked_modeling.per_example_patch_terms(
          predictions, masked_modeling.patch_pixel_targets(images, self.patch),
          batch["patch_mask"])}
    if self.stage == "text":
      logits = self._apply(params, vlmo.Vlmo.text_mlm_logits, batch["mlm_tokens"],
                           rng=keys["drop"], train=True)
      return {"mlm": fusion_losses.per_example_mlm_terms(logits, batch["mlm_labels"])}
    embeds = self._apply(params, vlmo.Vlmo.embed_image, images)
    mlm_logits = self._apply(params, vlmo.Vlmo.mlm_logits, embeds, batch["mlm_tokens"],
                             rng=keys["mlm"], train=True)
    return {"zimg": self._apply(params, vlmo.Vlmo.encode_image, images, rng=keys["img"],
                                train=True),
            "ztxt": self._apply(params, vlmo.Vlmo.encode_text, batch["text"], rng=keys["txt"],
                                train=True),
            "mlm": fusion_losses.per_example_mlm_terms(mlm_logits, batch["mlm_labels"])}

  def loss_from_embeddings(self, params: Any, embeddings: dict[str, Any],
                           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch-wide part: means over the whole batch's masked positions and, in the
    image-text stage, ITC over every pair of the batch (weighted; ITM is gathered_loss)."""
    del rng
    if self.stage == "image":
      sums = embeddings["mim"]
      mim = jnp.sum(sums["loss"]) / jnp.maximum(jnp.sum(sums["count"]), 1.0)
      return mim, {"mim_loss": mim,
                   "masked_fraction": jnp.mean(sums["count"]) / (self.grid[0] * self.grid[1])}
    sums = embeddings["mlm"]
    count = jnp.maximum(jnp.sum(sums["count"]), 1.0)
    mlm, metrics = jnp.sum(sums["loss"]) / count, {"mlm_accuracy": jnp.sum(sums["hits"]) / count}
    metrics["mlm_loss"] = mlm
    if self.stage == "text":
      return mlm, metrics
    scale = self._apply(params, vlmo.Vlmo.scale)
    itc = losses.softmax_loss(embeddings["zimg"], embeddings["ztxt"], scale)
    metrics.update(itc_loss=itc, scale=scale)
    return self.weights["itc"] * itc + self.weights["mlm"] * mlm, metrics

  def embedding_inputs(self, params: Any, embeddings: dict[str, Any],
                       rng: jax.Array) -> dict[str, jax.Array]:
    """The image-text stage's ITM partners, drawn from the whole batch's ITC similarities:
    'neg_text', 'neg_image' [B] (rows of the batch) and each example's own 'row'."""
    if self.stage != "image_text":
      return {}
    scale = self._apply(params, vlmo.Vlmo.scale)
    neg_text, neg_image = fusion_losses.sample_hard_negatives(
        self._keys(rng)["neg"], embeddings["zimg"], embeddings["ztxt"], 1.0 / scale)
    rows = jnp.arange(neg_text.shape[0], dtype=jnp.int32)
    return {"neg_text": neg_text, "neg_image": neg_image, "row": rows}

  def gathered_loss(self, params: Any, micro_batch: dict[str, jax.Array],
                    batch: dict[str, jax.Array], rng: jax.Array):
    """This micro-batch's share of ITM: its positives, its images with their hard negative
    texts and its texts with their hard negative images (ALBEF's order), the partners' pixels
    and tokens taken from the whole batch, cross-entropy and hits summed and divided by the
    whole batch's 3N pairs (weighted by itm_weight)."""
    if self.stage != "image_text":
      return None
    image_idx, text_idx, labels = fusion_losses.itm_layout(
        micro_batch["neg_text"], micro_batch["neg_image"], rows=micro_batch["row"])
    embeds = self._apply(params, vlmo.Vlmo.embed_image, jnp.take(batch["image"], image_idx, 0))
    logits = self._apply(params, vlmo.Vlmo.itm_logits, embeds,
                         jnp.take(batch["text"], text_idx, 0), rng=self._keys(rng)["itm"],
                         train=True)
    pairs = 3.0 * batch["row"].shape[0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    itm = -jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1)) / pairs
    hits = jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32)) / pairs
    return self.weights["itm"] * itm, {"itm_loss": itm, "itm_accuracy": hits}

  def embed_images(self, params: Any, images: jax.Array) -> jax.Array:
    return self._apply(params, vlmo.Vlmo.encode_image, images)

  def embed_texts(self, params: Any, texts: jax.Array) -> jax.Array:
    return self._apply(params, vlmo.Vlmo.encode_text, texts)

  def encode_image_tokens(self, params: Any, images: jax.Array) -> jax.Array:
    """[B, 1 + n, W] image embeddings (before any block), what the fused mode takes."""
    return self._apply(params, vlmo.Vlmo.embed_image, images)

  def itm_scores(self, params: Any, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
    """[P] float32 ITM 'match' logits (column 1) of the pairs, in fused mode."""
    logits = self._apply(params, vlmo.Vlmo.itm_logits, image_tokens, tokens)
    return logits[:, fusion_losses.ITM_MATCH]

  def logit_scalars(self, params: Any) -> dict[str, jax.Array]:
    return {"scale": self._apply(params, vlmo.Vlmo.scale)}


def mask_text(key: jax.Array, tokens: jax.Array, vocab_size: int, special_ids: tuple[int, ...],
              prob: float) -> tuple[jax.Array, jax.Array]:
  """(masked tokens, labels) [B, L]: losses.fusion.mask_tokens with the Multiway's [MASK] id
  (= vocab_size, the extra row of its token table), `prob` of the tokens that are not special
  ids chosen, 80/10/10, random ids drawn above the special ones."""
  return fusion_losses.mask_tokens(
      key, tokens, mask_id=vocab_size, vocab_size=vocab_size,
      random_low=max(special_ids) + 1, special_ids=special_ids, mask_prob=prob)
