"""Dual-encoder contrastive objective: CLIP/ALIGN (softmax), SigLIP (sigmoid), LiT (locked tower)."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vljax.models import two_towers
from vljax.objectives import base
from vljax.objectives import contrastive


class TwoTowersObjective(base.Objective):
  """Contrastive loss between the L2-normalised image and text embeddings of a batch."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.loss_cfg = config.loss
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.tokenizer = tokenizer
    self.model = two_towers.TwoTowers(**contrastive.model_kwargs(config, tokenizer))

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def embed(self, params: Any, batch: dict[str, jax.Array],
            rng: jax.Array) -> dict[str, jax.Array]:
    """The per-example part of the loss: unit-norm image and text embeddings [B, D]."""
    zimg, ztxt, _ = self.model.apply({"params": params}, batch["image"], batch["text"],
                                     train=True, rngs={"dropout": rng})
    return {"zimg": zimg, "ztxt": ztxt}

  def loss_from_embeddings(self, params: Any, embeddings: dict[str, jax.Array],
                           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch-coupled part: the contrastive loss over every pair of the batch."""
    del rng
    out = self.model.apply({"params": params}, None, None)[2]
    return contrastive.contrastive_loss(self.loss_cfg, embeddings["zimg"], embeddings["ztxt"],
                                        out["scale"], out.get("bias"))

  def embed_images(self, params: Any, images: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, images, None)[0]

  def embed_texts(self, params: Any, texts: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, None, texts)[1]

  def logit_scalars(self, params: Any) -> dict[str, jax.Array]:
    """The contrastive logit 'scale' (as the loss uses it) and, for sigmoid, 'bias'."""
    out = self.model.apply({"params": params}, None, None)[2]
    scalars = {"scale": contrastive.capped_scale(self.loss_cfg, out["scale"])}
    if "bias" in out:
      scalars["bias"] = out["bias"]
    return scalars
