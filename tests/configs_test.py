"""Every recipe builds, and its tiny variant trains both phases for a few steps.

Recipes whose dataset cannot be had here (stock cifar10/cifar100/imagenet2012) run on a small synthetic image
folder of the same image size and class count, so their model, optimizer and phase settings are exercised.
"""

import importlib

import pytest

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
  config.ann.train_steps = config.snn.train_steps = 1
  config.ann.batch_size = config.snn.batch_size = 8
  config.eval_batch_size = 64
  config.eval_fixed_steps = False
  config.phases = phases
  summary = train.run(config, str(tmp_path / "run"))
  assert summary["ann"]["steps"] == 1
  if "snn" in phases:
    assert summary["snn"]["steps"] == 1
    assert 0 <= summary["snn"]["average_time_steps"] <= config.model.max_time_steps


@pytest.mark.parametrize("name", ["quickstart", "cifar100_spikformer"] + [r[0] for r in RECIPES])
def test_full_recipe_builds_its_model(name):
  from dtvit import models
  config = importlib.import_module(f"configs.{name}").get_config("")
  model = models.build_model(config.model, 10)
  model.validate()
  assert model.max_time_steps == config.model.max_time_steps


def test_recipe_arguments_are_checked():
  from configs import cifar10_spikformer
  with pytest.raises(ValueError, match="unknown argument 'tiyn'"):
    cifar10_spikformer.get_config("tiyn")


def test_remat_blocks_reaches_the_model_from_the_config():
  """model.neuron.remat takes the string modes (the field is not typed bool) and the model gets them."""
  from dtvit import models
  config = importlib.import_module("configs.quickstart").get_config("tiny")
  assert models.build_model(config.model, 10).neuron.remat is False
  config.model.neuron.remat = "blocks"
  assert models.build_model(config.model, 10).neuron.remat == "blocks"
  config.model.neuron.remat = "everything"
  with pytest.raises(ValueError, match="remat"):
    models.build_model(config.model, 10)


# ------------------------------------------------------------------------------------------------------------
# Renamed config names (dtvit.config_lib.RENAMED): old records load under today's names.

def test_every_renamed_name_names_a_field_of_todays_config():
  from dtvit import config_lib
  from dtvit import recipes
  base = config_lib.flatten(recipes.get_base_config().to_dict())
  for old, new in config_lib.RENAMED.items():
    key, sep, _ = new.partition("=")
    assert key in base and old.partition("=")[0].rsplit(".", 1)[0] == key.rsplit(".", 1)[0], (old, new)
    assert sep or old not in base, old
  assert {base["model.neuron.neuron"], "spikingjelly_lif"} <= {"lif", "if", "spikingjelly_lif"}


def test_upgrade_maps_old_names_and_values_and_leaves_todays_alone():
  from dtvit import config_lib
  old = {"model": {"num_steps": 4, "arch": "spikformer", "neuron": {"neuron": "spikformer"}},
         "data": {"augment": {"randaugment_op_set": "spikformer"}},
         "ann": {"num_steps": 10, "optimizer": {"lr": 0.1}}, "snn": {"num_steps": 5}, "finetune": {"num_steps": 0},
         "seed": 0}
  new = {"model": {"max_time_steps": 4, "arch": "spikformer", "neuron": {"neuron": "spikingjelly_lif"}},
         "data": {"augment": {"randaugment_op_set": "spikformer_official"}},
         "ann": {"train_steps": 10, "optimizer": {"lr": 0.1}}, "snn": {"train_steps": 5},
         "finetune": {"train_steps": 0}, "seed": 0}
  assert config_lib.upgrade(old) == new
  assert config_lib.upgrade(new) == new
  assert old["model"]["num_steps"] == 4  # the record itself is not edited
  assert config_lib.renamed("snn.num_steps", 3) == ("snn.train_steps", 3)


def test_old_neuron_and_op_set_values_are_refused_in_one_line_and_load_from_records(tmp_path):
  import json
  import dtvit
  from configs import quickstart
  config = quickstart.get_config("tiny")
  config.model.neuron.neuron = "spikformer"
  with pytest.raises(ValueError, match=r"^model.neuron.neuron='spikformer' was renamed: it is now "
                                       r"'spikingjelly_lif'.$"):
    train.validate_config(config)
  config.model.neuron.neuron = "lif"
  config.data.augment.randaugment_op_set = "spikformer"
  with pytest.raises(ValueError, match="randaugment_op_set='spikformer' was renamed: it is now "
                                       "'spikformer_official'"):
    train.validate_config(config)
  record = config.to_dict()
  record["model"]["neuron"]["neuron"] = "spikformer"
  record["model"]["num_steps"] = record["model"].pop("max_time_steps")
  (tmp_path / "config.json").write_text(json.dumps(record))
  loaded = dtvit.loader.read_config(str(tmp_path))
  assert loaded.model.max_time_steps == 3 and loaded.model.neuron.neuron == "spikingjelly_lif"
  assert loaded.data.augment.randaugment_op_set == "spikformer_official"
