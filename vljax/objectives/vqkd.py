"""VQ-KD objective (BEiT v2): train a visual tokenizer to reconstruct a frozen teacher's features.

  loss = rec + commitment
  rec         mean over patches of 1 - cos(decoder output, the teacher's patch feature)
  commitment  config.loss.commitment (BEiT v2's beta, 1.0) * mean((sg[z_q] - z)^2)

The encoder learns through the quantiser's straight-through estimator; the teacher is frozen
(config.optim.freeze, loaded by config.init); the codebook is a rule-updated parameter
(`rule_updated_params`): after each optimizer step

  1. the norm-EMA moves every chosen code towards the mean of its vectors
     (config.loss.codebook_decay, BEiT v2's 0.99; vljax.models.quantizer);
  2. each code's usage, an EMA (config.loss.usage_decay) of the fraction of the step's vectors
     that chose it, is updated; a code whose usage fell below config.loss.dead_below / K (a
     fraction of the uniform share 1/K) is dead: it restarts on a vector of the batch drawn at
     random and its usage resets to 1/K. At the first step every code restarts so: the codebook
     starts on the data (BEiT v2 runs 10 k-means iterations on the first batch instead).

Non-gradient state: extra['usage'] [K]. Metrics: rec_loss, commitment_loss, teacher_cosine
(1 - rec_loss), codebook_usage (the fraction of codes the batch chose), codebook_perplexity and
dead_codes (codes dead before this step's restarts); on the held-out images the same usage and
cosine (vljax.evals.tokenizer, through tokenizer_outputs).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vljax.configlib import ConfigError
from vljax.models import quantizer
from vljax.models import stacks
from vljax.models import vqkd
from vljax.objectives import base
from vljax.objectives import contrastive


class VqKdObjective(base.Objective):
  """VQ-KD training of a visual tokenizer (module docstring)."""

  rule_updated_params = ("^codebook$",)

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.tokenizer = tokenizer
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.seed = int(config.seed)
    model, loss = config.model, config.loss
    self.num_codes, self.code_dim = int(model.num_codes), int(model.code_dim)
    if self.num_codes < 2 or self.code_dim < 1:
      raise ConfigError(f"config.model.num_codes={self.num_codes} and code_dim={self.code_dim} "
                        "must be >= 2 and >= 1.")
    self.decay, self.usage_decay = float(loss.codebook_decay), float(loss.usage_decay)
    for key, value in (("codebook_decay", self.decay), ("usage_decay", self.usage_decay)):
      if not 0.0 <= value < 1.0:
        raise ConfigError(f"config.loss.{key}={value} must be in [0, 1).")
    self.dead_below = float(loss.dead_below)
    if not 0.0 <= self.dead_below < 1.0:
      raise ConfigError(f"config.loss.dead_below={self.dead_below} must be in [0, 1) (a "
                        "fraction of the uniform usage 1/K; 0 never restarts).")
    self.commitment = float(loss.commitment)
    self.teacher_width = vqkd.teacher_width(model.teacher)
    # config.layers (scan, remat) applies to all three ViTs: one layout per model (the frozen
    # teacher's remat saves nothing, it has no backward pass).
    options = stacks.check_layers_config(config.get("layers"))
    self.model = vqkd.VqKd(encoder=dict(model.encoder, **options),
                           decoder=dict(model.decoder, **options),
                           teacher=dict(model.teacher, **options), num_codes=self.num_codes,
                           code_dim=self.code_dim, dtype=contrastive.DTYPES[config.dtype])

  # The batch: images only.

  def batch_fields(self) -> dict[str, base.BatchField]:
    return base.image_fields(self.image_size)

  def batch_from_examples(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    del examples
    return {}

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"])["params"]

  def init_extra(self, rng: jax.Array, params: Any, batch: dict[str, Any]) -> Any:
    del rng, params, batch
    return {"usage": jnp.full((self.num_codes,), 1.0 / self.num_codes, jnp.float32)}

  # The loss.

  def loss_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array],
                      rng: jax.Array):
    """(rec + commitment, (metrics, {'z': [N, d] unit vectors, 'codes': [N]}))."""

    def forward(model, images):
      z = model.encode(images, train=True)
      flat = z.reshape(-1, self.code_dim)
      z_q, codes, commitment = quantizer.quantize(flat, model.codebook, self.commitment)
      return (model.decode(z_q.reshape(z.shape), train=True), model.teacher_features(images),
              flat, codes, commitment)

    reconstruction, target, z, codes, commitment = self.model.apply(
        {"params": params}, batch["image"], method=forward, rngs={"dropout": rng})
    cosine = jnp.sum(quantizer.l2_normalize(reconstruction) * quantizer.l2_normalize(target),
                     axis=-1)
    rec = jnp.mean(1.0 - cosine)
    metrics = {"rec_loss": rec, "commitment_loss": commitment, "teacher_cosine": 1.0 - rec,
               "dead_codes": jnp.sum(self._dead(extra["usage"])).astype(jnp.float32),
               **quantizer.usage_metrics(codes, self.num_codes)}
    outputs = {"z": jax.lax.stop_gradient(z), "codes": codes}
    return rec + commitment, (metrics, outputs)

  # The codebook's rule.

  def _dead(self, usage: jax.Array) -> jax.Array:
    return usage < self.dead_below / self.num_codes

  def usage_step(self, usage: jax.Array, codes: jax.Array,
                 step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(usage after step `step`, dead [K]: the codes that restart now) (module docstring, 2)."""
    share = quantizer.code_counts(codes, self.num_codes) / codes.shape[0]
    usage = self.usage_decay * usage + (1.0 - self.usage_decay) * share
    dead = self._dead(usage) | (step == 0)
    return jnp.where(dead, 1.0 / self.num_codes, usage), dead

  def update_rule_params(self, params: Any, extra: Any, outputs: Any, step: jax.Array) -> Any:
    """The codebook after the norm-EMA and the restarts of step `step`."""
    _, dead = self.usage_step(extra["usage"], outputs["codes"], step)
    codebook = quantizer.norm_ema_update(params["codebook"], outputs["z"], outputs["codes"],
                                         self.decay)
    rng = jax.random.fold_in(jax.random.key(self.seed + 1), step)
    codebook = quantizer.restart_dead_codes(codebook, dead, outputs["z"], rng)
    return {**params, "codebook": codebook}

  def update_extra(self, extra: Any, params: Any, outputs: Any, step: jax.Array) -> Any:
    del params
    return {"usage": self.usage_step(extra["usage"], outputs["codes"], step)[0]}

  # Tokens.

  def tokenizer_outputs(self, params: Any, images: jax.Array) -> jax.Array:
    """[B, n + 1 + teacher width] float32: each image's n codes, its reconstruction's mean
    cosine with the teacher's patch features, and the mean of its unit teacher features (for
    the constant-reconstruction baseline; vljax.evals.tokenizer)."""

    def run(model, images):
      z = model.encode(images)
      flat = z.reshape(-1, self.code_dim)
      codes = quantizer.nearest_codes(flat, model.codebook)
      reconstruction = model.decode(jnp.take(model.codebook, codes, axis=0).reshape(z.shape))
      target = quantizer.l2_normalize(model.teacher_features(images))
      cosine = jnp.sum(quantizer.l2_normalize(reconstruction) * target, axis=-1)
      return jnp.concatenate([codes.reshape(z.shape[:2]).astype(jnp.float32),
                              jnp.mean(cosine, axis=1, keepdims=True),
                              jnp.mean(target, axis=1)], axis=1)

    return self.model.apply({"params": params}, images, method=run)

  def tokenize(self, params: Any, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] (model inputs) -> visual tokens [B, n] int32."""
    return self.model.apply({"params": params}, images, method=vqkd.VqKd.tokenize)
