"""Fine-tuning a fusion model (ALBEF, or VLMo's Multiway transformer) on SNLI-VE (visual
entailment) or NLVR2.

config.task picks the task:
  snli_ve  an image and a hypothesis -> 3 classes (0 entailment, 1 neutral, 2 contradiction)
  nlvr2    two images and a statement -> 2 classes (0 False, 1 True); the statement is fused
           with each image and the two fused [CLS] states are concatenated (left, right)

  loss = cross-entropy of cls_head's logits (vljax.models.fusion_heads.FusionClassifier)

The encoders (img/, txt/, fusion/; or the Multiway transformer mw/ and VLMo's pooler/ when
config.model has a `transformer`) come from an ALBEF (VLMo, BEiT-3) run through config.init
(configs/snli_ve.py, configs/nlvr2.py, `family=`); cls_head/ trains from scratch. No momentum
model and no queues: ALBEF's fine-tuning also distils from a momentum copy, which this objective
leaves out (docs/fusion.md). VQA as classification over an answer vocabulary is the sibling
vljax.objectives.vqa_classifier (it shares classifier_model).

Batch: 'image' (+ 'brightness'), for nlvr2 'image2' (+ 'brightness2'), 'text' [max_len] int32
(the hypothesis or statement) and 'label' int32 (a label outside [0, num_classes) is left out
of the loss and the accuracy).

The loss is split into a per-example `embed` and the batch-wide mean `loss_from_embeddings`, so
config.grad_accum_steps=K gives the whole batch's gradient (vljax.train); the mean runs over the
counted labels of the whole batch, not of each micro-batch.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vljax.configlib import ConfigError
from vljax.data import synthetic
from vljax.models import fusion_heads
from vljax.objectives import base
from vljax.objectives import contrastive
from vljax.objectives import momentum_queues
from vljax.objectives import vlmo

# task -> (class names in id order, two images per example)
TASKS: dict[str, tuple[tuple[str, ...], bool]] = {
    "snli_ve": (synthetic.ENTAILMENT_LABELS, False),
    "nlvr2": (synthetic.NLVR2_LABELS, True),
}


def classifier_model(config: ml_collections.ConfigDict, tokenizer, num_classes: int,
                     pair: bool, head: str = "albef"):
  """The classifier on the pre-trained encoders config.model describes: MultiwayClassifier on a
  Multiway transformer (VLMo, BEiT-3: config.model.transformer) with cls_head `head`, else
  FusionClassifier on ALBEF's encoders (ALBEF's head only)."""
  if "transformer" in config.model:
    return fusion_heads.MultiwayClassifier(
        transformer=vlmo.transformer_kwargs(config, tokenizer), num_classes=num_classes,
        pair=pair, head=head, dtype=contrastive.DTYPES[config.dtype])
  if head != "albef":
    raise ConfigError(f"The {head!r} classification head is built on a Multiway transformer "
                      "(family=vlmo or beit3); config.model has no transformer.")
  kwargs = momentum_queues.model_kwargs(config, tokenizer)
  for unused in ("embed_dim", "temperature_init"):  # ALBEF's ITC settings
    kwargs.pop(unused, None)
  return fusion_heads.FusionClassifier(num_classes=num_classes, pair=pair, **kwargs)


class FusionClassifierObjective(base.Objective):
  """Cross-entropy fine-tuning of FusionClassifier for config.task."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.task = config.get("task")
    if self.task not in TASKS:
      raise ConfigError(f"config.task={self.task!r}; the fusion classifier fine-tunes one of "
                        f"{', '.join(TASKS)} (VQA: objective='vqa_classifier', configs/vqa.py).")
    self.label_names, self.pair = TASKS[self.task]
    self.num_classes = len(self.label_names)
    self.image_size, self.max_len = config.data.image_size, config.data.max_len
    self.tokenizer = tokenizer
    self.model = classifier_model(config, tokenizer, self.num_classes, self.pair)

  def batch_fields(self) -> dict[str, base.BatchField]:
    fields = super().batch_fields()
    if self.pair:
      fields["image2"] = base.BatchField((self.image_size, self.image_size, 3), np.uint8,
                                         (None, None, None), pixels_with="brightness2")
      fields["brightness2"] = base.BatchField((), np.float32)
    return fields

  def batch_from_examples(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    missing = [i for i, e in enumerate(examples) if "statement" not in e]
    if missing:
      raise ValueError(f"config.task={self.task!r} needs records with a hypothesis or "
                       f"statement; example {missing[0]} of the batch has none (its source "
                       f"is not a {self.task} source, docs/fusion.md).")
    return {"text": self.tokenizer.encode([e["statement"] for e in examples], self.max_len),
            "label": np.asarray([e["label"] for e in examples], np.int32)}

  def _images2(self, batch: Mapping[str, Any]) -> jax.Array | None:
    return batch["image2"] if self.pair else None

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    return self.model.init(rng, batch["image"], batch["text"], self._images2(batch))["params"]

  def classify(self, params: Any, images: jax.Array, tokens: jax.Array,
               images2: jax.Array | None = None) -> jax.Array:
    """[B, num_classes] float32 logits (no dropout); `images2` for nlvr2."""
    return self.model.apply({"params": params}, images, tokens, images2)

  def embed(self, params: Any, batch: dict[str, jax.Array],
            rng: jax.Array) -> dict[str, jax.Array]:
    """The per-example part of the loss, float32 [B]: 'loss' the cross-entropy (0 for a label
    left out), 'valid' 1 where the label counts, 'correct' 1 where it counts and the argmax
    hits it."""
    logits = self.model.apply({"params": params}, batch["image"], batch["text"],
                              self._images2(batch), train=True, rngs={"dropout": rng})
    labels = batch["label"]
    valid = (labels >= 0) & (labels < self.num_classes)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    correct = (jnp.argmax(logits, axis=-1) == labels) & valid
    return {"loss": jnp.where(valid, losses, 0.0), "valid": valid.astype(jnp.float32),
            "correct": correct.astype(jnp.float32)}

  def loss_from_embeddings(self, params: Any, embeddings: dict[str, jax.Array],
                           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The means over every counted label of the batch: loss and accuracy."""
    del params, rng
    count = jnp.maximum(jnp.sum(embeddings["valid"]), 1.0)
    return (jnp.sum(embeddings["loss"]) / count,
            {"accuracy": jnp.sum(embeddings["correct"]) / count})
