"""The paper's settings (issue 7), each named as (name, recipe module, recipe argument), and one config file for all.

The recipes in configs/ hold every training choice; a setting only says which recipe and which argument give the
paper's model, dataset and T_max = 8, so that the paper's runs have one name each:

  python -m dtvit.main --config=experiments/paper_scale/settings.py:cifar10_4_384 --workdir=workdirs/c10_4_384
  python -m dtvit.main --config=experiments/paper_scale/settings.py:cifar10_4_384,direct --workdir=workdirs/c10_d
  python -m dtvit.main --config=experiments/paper_scale/settings.py:imagenet_8_768 \
      --config.data.data_dir=/data/tfds --workdir=/mnt/shared/in1k_8_768
  # the same code paths in seconds (tests):
  python -m dtvit.main --config=experiments/paper_scale/settings.py:cifar10_4_384,tiny --workdir=/tmp/t

Argument: `<setting>[,<recipe argument>...]`; anything after the setting's name is appended to the recipe's own
argument: the mode (`hybrid`, the default: ANN twin then SNN; `direct`: the SNN from scratch), `tiny`, or
`local` for CIFAR-10's JPEG copy. This file is named settings.py, not configs.py, so
that it never shadows the repository's `configs` package when a script in this folder runs.
"""

from __future__ import annotations

import dataclasses
import importlib

import ml_collections

# The recipes are the `configs` package that `pip install -e .` (make venv) installs beside dtvit.


@dataclasses.dataclass(frozen=True)
class Setting:
  """One paper setting: `importlib.import_module(recipe).get_config(arg)` is its config."""
  name: str
  recipe: str        # module of the recipe, e.g. 'configs.cifar10_spikformer'
  arg: str           # the recipe's config argument
  description: str   # what the paper calls it


SETTINGS = (
    Setting("cifar10_4_384", "configs.cifar10_spikformer", "T=8", "CIFAR10, Spikformer-4-384, T_max 8"),
    Setting("cifar100_4_384", "configs.cifar100_spikformer", "T=8", "CIFAR100, Spikformer-4-384, T_max 8"),
    Setting("imagenet_8_384", "configs.imagenet_spikformer", "variant=8-384,T=8",
            "ImageNet-1k, Spikformer-8-384, T_max 8"),
    Setting("imagenet_8_512", "configs.imagenet_spikformer", "variant=8-512,T=8",
            "ImageNet-1k, Spikformer-8-512, T_max 8"),
    Setting("imagenet_8_768", "configs.imagenet_spikformer", "variant=8-768,T=8",
            "ImageNet-1k, Spikformer-8-768, T_max 8"),
)
BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What a stock dataset's config does not hold and the op count and step count need without the data."""
  num_classes: int
  num_train: int
  num_test: int
  image_side: int    # the side the model sees (the recipe's data.image_size, or the native one)


DATASETS = {
    "cifar10": Dataset(10, 50_000, 10_000, 32),
    "cifar10_local": Dataset(10, 50_000, 10_000, 32),
    "cifar100": Dataset(100, 50_000, 10_000, 32),
    "imagenet2012": Dataset(1000, 1_281_167, 50_000, 224),
}


def setting(name: str) -> Setting:
  """The setting called `name`, or an error listing the names."""
  if name not in BY_NAME:
    raise ValueError(f"paper_scale: unknown setting {name!r}; choose one of {', '.join(BY_NAME)}.")
  return BY_NAME[name]


def dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The facts of the config's dataset (classes, train/test sizes, image side)."""
  name = config.data.name
  if name not in DATASETS:
    raise ValueError(f"paper_scale: no dataset facts for data.name={name!r}; known: {', '.join(DATASETS)}.")
  d = DATASETS[name]
  if config.data.image_size and config.data.image_size != d.image_side:
    d = dataclasses.replace(d, image_side=int(config.data.image_size))
  return d


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`<setting>[,<recipe argument>...]` -> the recipe's config for that setting."""
  items = [a.strip() for a in (arg or "").split(",") if a.strip()]
  if not items:
    raise ValueError("paper_scale: name a setting in the config argument, e.g. "
                     f"--config=experiments/paper_scale/settings.py:{SETTINGS[0].name}; "
                     f"settings: {', '.join(BY_NAME)}.")
  s = setting(items[0])
  recipe_arg = ",".join([s.arg] + items[1:]) if s.arg else ",".join(items[1:])
  return importlib.import_module(s.recipe).get_config(recipe_arg)
