"""The paper's settings (experiments/paper_scale): their configs say what the paper ran, their tiny variants train,
and compute.py's figures are what its formulas give.

The stock datasets (cifar10, cifar100, imagenet2012) cannot be had here, so the tiny runs use a small synthetic
image folder (tests/configs_test.py's helper) with the setting's class count (4 for ImageNet, whose head width is
the only thing 1000 classes would change) and 32x32 images. Settings whose tiny configs are identical (the three
ImageNet ones) share one run.
"""

import importlib
import json

import pytest

from dtvit import energy
from dtvit import models
from dtvit import train
from experiments.paper_scale import compute
from experiments.paper_scale import settings

# name -> (recipe module, variant, (depth, dim, heads, tokens), dataset, batch, ANN epochs, SNN epochs, image side)
PAPER = {
    "cifar10_4_384": ("configs.cifar10_spikformer", "4-384", (4, 384, 12, 64), "cifar10", 128, 300, 100, 32),
    "cifar100_4_384": ("configs.cifar100_spikformer", "4-384", (4, 384, 12, 64), "cifar100", 128, 300, 100, 32),
    "imagenet_8_384": ("configs.imagenet_spikformer", "8-384", (8, 384, 12, 196), "imagenet2012", 1024, 300, 30,
                       224),
    "imagenet_8_512": ("configs.imagenet_spikformer", "8-512", (8, 512, 8, 196), "imagenet2012", 1024, 300, 30,
                       224),
    "imagenet_8_768": ("configs.imagenet_spikformer", "8-768", (8, 768, 12, 196), "imagenet2012", 1024, 300, 30,
                       224),
}
T_MAX = 8


def test_every_paper_setting_is_listed_once():
  assert [s.name for s in settings.SETTINGS] == list(PAPER)


@pytest.mark.parametrize("name", list(PAPER))
def test_setting_config_is_the_papers(name):
  recipe, variant, (depth, dim, heads, tokens), data_name, batch, ep_ann, ep_snn, side = PAPER[name]
  config = settings.get_config(name)
  s = settings.setting(name)
  assert s.recipe == recipe
  # A thin wrapper: the setting's config is the recipe's, nothing added.
  assert config.to_dict() == importlib.import_module(recipe).get_config(s.arg).to_dict()
  assert config.model.arch == "spikformer" and config.model.variant == variant
  assert config.model.num_steps == T_MAX
  assert config.model.mask.enabled and config.snn.time_cost > 0
  assert config.data.name == data_name and config.phases == "ann,snn"
  data = settings.dataset(config)
  assert data.image_side == side
  for phase, epochs in (("ann", ep_ann), ("snn", ep_snn)):
    assert config[phase].batch_size == batch
    assert config[phase].num_steps == epochs * data.num_train // batch
  model = models.build_model(config.model, data.num_classes, phase="ann")
  assert (model.depth, model.dim, model.num_heads) == (depth, dim, heads)
  assert model.num_steps == T_MAX
  assert (side // 2 ** sum(model.stem_pools)) ** 2 == tokens


def test_setting_arguments_are_checked():
  with pytest.raises(ValueError, match="unknown setting 'cifar10'; choose one of cifar10_4_384"):
    settings.get_config("cifar10")
  with pytest.raises(ValueError, match="name a setting"):
    settings.get_config("")
  with pytest.raises(ValueError, match="unknown argument 'tiyn'"):  # the recipe checks what is passed on
    settings.get_config("cifar10_4_384,tiyn")


def _tiny_groups() -> list[list[str]]:
  """The settings grouped by identical tiny configs up to the dataset name (the ImageNet recipe's tiny variant
  replaces the model by 'tiny-imagenet' whatever the variant, so its three settings share one tiny config;
  CIFAR10 and CIFAR100 differ only in the data, which these runs replace by a synthetic folder): one run per
  group, with the group's first setting's class count."""
  groups = {}
  for name in PAPER:
    config = settings.get_config(f"{name},tiny").to_dict()
    config["data"].pop("name")
    key = json.dumps(config, sort_keys=True, default=str)
    groups.setdefault(key, []).append(name)
  return list(groups.values())


TINY_GROUPS = _tiny_groups()


def test_tiny_groups_cover_every_setting():
  assert sorted(n for g in TINY_GROUPS for n in g) == sorted(PAPER)
  assert ["imagenet_8_384", "imagenet_8_512", "imagenet_8_768"] in TINY_GROUPS
  assert ["cifar10_4_384", "cifar100_4_384"] in TINY_GROUPS


@pytest.mark.slow
@pytest.mark.parametrize("group", TINY_GROUPS, ids=["+".join(g) for g in TINY_GROUPS])
def test_setting_tiny_variant_trains(group, tmp_path, image_folder):
  name = group[0]
  config = settings.get_config(f"{name},tiny")
  full = settings.get_config(name)
  assert config.model.arch == full.model.arch and config.phases == full.phases
  assert config.data.name == full.data.name and config.snn.time_cost == full.snn.time_cost
  classes = 4 if full.data.name == "imagenet2012" else settings.dataset(full).num_classes
  config.data.name = "image_folder"
  config.data.archive = image_folder(str(tmp_path / "images"), 32, classes)
  config.data.data_dir = str(tmp_path / "data_dir")
  config.data.image_size = 32
  config.data.augment.randaugment_ops = 0
  config.ann.num_steps = config.snn.num_steps = 1
  config.ann.batch_size = config.snn.batch_size = 8
  config.eval_batch_size = 64
  config.eval_fixed_steps = False
  summary = train.run(config, str(tmp_path / "run"))
  assert summary["phases"] == ["ann", "snn"]
  assert summary["ann"]["steps"] == 1 and summary["snn"]["steps"] == 1
  assert 0 <= summary["ann"]["test_accuracy"] <= 1 and 0 <= summary["snn"]["test_accuracy"] <= 1
  snn = summary["snn"]
  assert snn["T_max"] == config.model.num_steps
  assert 0 <= snn["average_time_steps"] <= snn["T_max"]
  assert all(0 <= v <= snn["T_max"] for v in snn["per_module_time_steps"].values())


def test_compute_flops_match_a_hand_computation():
  row = compute.setting_compute("cifar10_4_384")
  config = settings.get_config("cifar10_4_384")
  macs = energy.ann_macs(models.build_model(config.model, 10, phase="ann"), (32, 32, 3))
  assert row["ann_macs"] == macs and row["T_max"] == 8
  # 3 (forward + backward) x 2 FLOPs per MAC x MACs x images; the SNN's BPTT runs T_max = 8 steps.
  assert row["ann"]["train_flops"] == 3 * 2 * macs * 117_187 * 128
  assert row["snn"]["train_flops"] == 3 * 2 * macs * 8 * 39_062 * 128
  assert row["ann"]["epochs"] == pytest.approx(300, abs=0.01)
  est = compute.estimates(row, ann_util=0.5, snn_util=0.25)
  h200 = est["snn"]["1x H200"]
  assert h200["images_per_s_per_chip"] == pytest.approx(0.25 * 989e12 / (3 * 2 * macs * 8))
  assert h200["hours"] == pytest.approx(row["snn"]["train_flops"] / (0.25 * 989e12) / 3600)
  assert est["ann"]["8x H200 (one host)"]["hours"] == pytest.approx(
      row["ann"]["train_flops"] / (8 * 0.5 * 989e12) / 3600)


def test_min_devices_divides_the_batch_and_fits():
  # 1024 images of 3 GB in 85% of 141 GB: 47 images a device at most -> 32 devices (the first divisor >= 22).
  assert compute.min_devices(1024, 3e9, 141.0) == 32
  assert compute.min_devices(128, 1e6, 141.0) == 1
  assert compute.min_devices(8, 200e9, 141.0) is None


def test_compute_script_prints_every_setting(capsys):
  out = compute.main(["--only=cifar10_4_384,imagenet_8_384"])
  text = capsys.readouterr().out
  assert "| cifar10_4_384 |" in text and "| imagenet_8_384 |" in text and "ESTIMATED" in text
  assert [r["setting"] for r in out["rows"]] == ["cifar10_4_384", "imagenet_8_384"]
  with pytest.raises(SystemExit):
    compute.main(["--only=imagenet"])
