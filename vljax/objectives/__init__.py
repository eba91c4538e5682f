"""Training objectives: one per model family, all plugged into the one train step.

An objective owns a flax model and implements the contract of vljax.objectives.base (its batch,
init, loss, optional non-gradient state); contrastive families add embed_images / embed_texts,
generative ones generate(params, images, max_len, ...) for evaluation.
"""
from __future__ import annotations

import ml_collections

from vljax.configlib import ConfigError


def objective_class(config: ml_collections.ConfigDict) -> type:
  """The objective class config.objective names."""
  from vljax.objectives import two_towers  # pylint: disable=g-import-not-at-top
  from vljax.objectives import coca  # pylint: disable=g-import-not-at-top
  from vljax.objectives import pali  # pylint: disable=g-import-not-at-top
  from vljax.objectives import albef  # pylint: disable=g-import-not-at-top
  from vljax.objectives import blip  # pylint: disable=g-import-not-at-top
  from vljax.objectives import blip_vqa  # pylint: disable=g-import-not-at-top
  from vljax.objectives import fusion_tasks  # pylint: disable=g-import-not-at-top
  from vljax.objectives import vlmo  # pylint: disable=g-import-not-at-top
  from vljax.objectives import vqa_classifier  # pylint: disable=g-import-not-at-top
  from vljax.objectives import vqkd  # pylint: disable=g-import-not-at-top
  from vljax.objectives import beit3  # pylint: disable=g-import-not-at-top
  registry = {"two_towers": two_towers.TwoTowersObjective, "coca": coca.CocaObjective,
              "pali": pali.PaliObjective, "albef": albef.AlbefObjective,
              "blip": blip.BlipObjective, "blip_vqa": blip_vqa.BlipVqaObjective,
              "fusion_classifier": fusion_tasks.FusionClassifierObjective,
              "vqa_classifier": vqa_classifier.VqaClassifierObjective,
              "vlmo": vlmo.VlmoObjective, "vqkd": vqkd.VqKdObjective,
              "beit3": beit3.Beit3Objective}
  if config.objective not in registry:
    raise ConfigError(f"config.objective={config.objective!r}; known objectives: "
                      f"{sorted(registry)}.")
  return registry[config.objective]


def make_objective(config: ml_collections.ConfigDict, tokenizer):
  """Builds the objective named by config.objective."""
  return objective_class(config)(config, tokenizer)


def prepare_run(config: ml_collections.ConfigDict, directory: str,
                train_source=None) -> ml_collections.ConfigDict:
  """`config` completed by its objective's prepare_run (vljax.objectives.base) for the run in
  `directory`: what the model's shape depends on and comes from the training data (the
  classifier VQA's answer vocabulary). The trainer calls it before building anything."""
  return objective_class(config).prepare_run(config, directory, train_source)
