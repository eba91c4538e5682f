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

No non-gradient state. Gradient accumulation is refused (ITC and the hard negatives couple the
batch and the loss is not split into embed / loss_from_embeddings).

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

  def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    return {"image": self.image_stage_loss, "text": self.text_stage_loss,
            "image_text": self.image_text_loss}[self.stage](params, batch, rng)

  def image_stage_loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    k_mask, k_drop = jax.random.split(rng)
    images = batch["image"]
    mask = masked_modeling.blockwise_patch_masks(k_mask, images.shape[0], self.grid,
                                                 self.num_masked)
    predictions = self._apply(params, vlmo.Vlmo.mim_predictions, images, mask, rng=k_drop,
                              train=True)
    targets = masked_modeling.patch_pixel_targets(images, self.patch)
    mim = masked_modeling.masked_patch_loss(predictions, targets, mask)
    return mim, {"mim_loss": mim, "masked_fraction": jnp.mean(mask.astype(jnp.float32))}

  def text_stage_loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    k_mask, k_drop = jax.random.split(rng)
    masked, labels = self.mlm_inputs(k_mask, batch["text"])
    logits = self._apply(params, vlmo.Vlmo.text_mlm_logits, masked, rng=k_drop, train=True)
    mlm = fusion_losses.mlm_loss(logits, labels)
    return mlm, {"mlm_loss": mlm, "mlm_accuracy": masked_accuracy(logits, labels)}

  def image_text_loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    k_neg, k_mask, k_drop = jax.random.split(rng, 3)
    d_img, d_txt, d_itm, d_mlm = jax.random.split(k_drop, 4)
    images, tokens = batch["image"], batch["text"]
    zimg = self._apply(params, vlmo.Vlmo.encode_image, images, rng=d_img, train=True)
    ztxt = self._apply(params, vlmo.Vlmo.encode_text, tokens, rng=d_txt, train=True)
    scale = self._apply(params, vlmo.Vlmo.scale)
    itc = losses.softmax_loss(zimg, ztxt, scale)

    embeds = self._apply(params, vlmo.Vlmo.embed_image, images)
    neg_text, neg_image = fusion_losses.sample_hard_negatives(k_neg, zimg, ztxt, 1.0 / scale)
    image_idx, text_idx, labels = fusion_losses.itm_layout(neg_text, neg_image)
    itm_logits = self._apply(params, vlmo.Vlmo.itm_logits, jnp.take(embeds, image_idx, axis=0),
                             jnp.take(tokens, text_idx, axis=0), rng=d_itm, train=True)
    itm = fusion_losses.itm_loss(itm_logits, labels)

    masked, mlm_labels = self.mlm_inputs(k_mask, tokens)
    mlm_logits = self._apply(params, vlmo.Vlmo.mlm_logits, embeds, masked, rng=d_mlm,
                             train=True)
    mlm = fusion_losses.mlm_loss(mlm_logits, mlm_labels)

    w = self.weights
    loss = w["itc"] * itc + w["itm"] * itm + w["mlm"] * mlm
    metrics = {"itc_loss": itc, "itm_loss": itm, "mlm_loss": mlm, "scale": scale,
               "itm_accuracy": jnp.mean((jnp.argmax(itm_logits, -1) == labels)
                                        .astype(jnp.float32)),
               "mlm_accuracy": masked_accuracy(mlm_logits, mlm_labels)}
    return loss, metrics

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


def masked_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Argmax accuracy over the chosen (label >= 0) positions, float32."""
  chosen = labels >= 0
  hits = jnp.sum((jnp.argmax(logits, -1) == labels) & chosen)
  return (hits / jnp.maximum(jnp.sum(chosen), 1)).astype(jnp.float32)
