"""Every recipe builds, and its tiny variant trains both phases for a few steps.

Recipes whose dataset cannot be had here (stock cifar10/cifar100/imagenet2012) run on a small synthetic image
folder of the same image size and class count, so their model, optimizer and phase settings are exercised.
"""

import importlib
import os

import numpy as np
import pytest
from PIL import Image

from dtvit import train

# (recipe, argument, synthetic (image side, classes) or None, phases to train). quickstart's tiny variant is
# trained by tests/train_test.py; cifar100_spikformer is cifar10_spikformer with 100 classes, so it is only
# built (below); the ImageNet recipe's SNN phase runs the same code as CIFAR's, so only its ANN phase trains.
RECIPES = [
    ("cifar10_vit", "tiny", (32, 10), "ann,snn"),
]
# The Spikformer recipes' tiny variants (cifar10, cifar100, imagenet) train both phases in
# tests/paper_scale_test.py, through the paper settings that name them.


@pytest.mark.slow
@pytest.mark.parametrize("name,arg,synthetic,phases", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_tiny_variant_trains(name, arg, synthetic, phases, tmp_path, image_folder):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  full = importlib.import_module(f"configs.{name}").get_config("")
  assert full.model.arch == config.model.arch and full.phases == config.phases
  if synthetic:
    size, classes = synthetic
    config.data.name = "image_folder"
    config.data.archive = image_folder(str(tmp_path / "images"), size, classes)
    config.data.data_dir = str(tmp_path / "data_dir")
    config.data.image_size = size if name != "imagenet_spikformer" else 32
    config.data.augment.randaugment_ops = 0
  config.ann.num_steps = config.snn.num_steps = 1
  config.ann.batch_size = config.snn.batch_size = 8
  config.eval_batch_size = 64
  config.eval_fixed_steps = False
  config.phases = phases
  summary = train.run(config, str(tmp_path / "run"))
  assert summary["ann"]["steps"] == 1
  if "snn" in phases:
    assert summary["snn"]["steps"] == 1
    assert 0 <= summary["snn"]["average_time_steps"] <= config.model.num_steps


@pytest.mark.parametrize("name", ["quickstart", "cifar100_spikformer"] + [r[0] for r in RECIPES])
def test_full_recipe_builds_its_model(name):
  from dtvit import models
  config = importlib.import_module(f"configs.{name}").get_config("")
  model = models.build_model(config.model, 10)
  model.validate()
  assert model.num_steps == config.model.num_steps


def test_recipe_arguments_are_checked():
  from configs import cifar10_spikformer
  with pytest.raises(ValueError, match="unknown argument 'tiyn'"):
    cifar10_spikformer.get_config("tiyn")


def test_remat_blocks_reaches_the_model_from_the_config():
  """model.neuron.remat takes the string modes (the field is not typed bool) and the model gets them."""
  from dtvit import models  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.quickstart").get_config("tiny")
  assert models.build_model(config.model, 10).neuron.remat is False
  config.model.neuron.remat = "blocks"
  assert models.build_model(config.model, 10).neuron.remat == "blocks"
  config.model.neuron.remat = "everything"
  with pytest.raises(ValueError, match="remat"):
    models.build_model(config.model, 10)
