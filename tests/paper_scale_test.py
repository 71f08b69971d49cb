"""The paper's settings (experiments/paper_scale): their configs say what the paper ran, their tiny variants train,
and compute.py's figures are what its formulas give.

The stock datasets (cifar10, cifar100, imagenet2012) cannot be had here, so the tiny runs use a small synthetic
image folder (tests/configs_test.py's helper) with the setting's class count (4 for ImageNet, whose head width is
the only thing 1000 classes would change) and 32x32 images. Settings whose tiny configs are identical (the three
ImageNet ones) share one run.
"""

import importlib
import json

import numpy as np
import pytest

from dtvit import recipes
from dtvit import energy
from dtvit import models
from dtvit import optim
from dtvit import train
from experiments.paper_scale import compute
from experiments.paper_scale import reference
from experiments.paper_scale import score_dynamics
from experiments.paper_scale import settings

# name -> (recipe module, variant, (depth, dim, heads, tokens), dataset, batch, ANN epochs, SNN epochs, image side)
# Epochs count the official 10 cooldown epochs (300 + 10); the hybrid SNN phase is ours (100 / 30 epochs).
PAPER = {
    "cifar10_4_384": ("configs.cifar10_spikformer", "4-384", (4, 384, 12, 64), "cifar10", 128, 310, 100, 32),
    "cifar100_4_384": ("configs.cifar100_spikformer", "4-384", (4, 384, 12, 64), "cifar100", 128, 310, 100, 32),
    "imagenet_8_384": ("configs.imagenet_spikformer", "8-384", (8, 384, 12, 196), "imagenet2012", 192, 310, 30,
                       224),
    "imagenet_8_512": ("configs.imagenet_spikformer", "8-512", (8, 512, 8, 196), "imagenet2012", 192, 310, 30,
                       224),
    "imagenet_8_768": ("configs.imagenet_spikformer", "8-768", (8, 768, 12, 196), "imagenet2012", 192, 310, 30,
                       224),
}
T_MAX = 8


def test_every_paper_setting_is_listed_once():
  assert [s.name for s in settings.SETTINGS] == list(PAPER)


@pytest.mark.parametrize("name", list(PAPER))
def test_setting_config_is_the_papers(name):
  recipe, variant, (depth, dim, heads, tokens), data_name, batch, ep_ann, ep_snn, side = PAPER[name]
  s = settings.setting(name)
  assert s.recipe == recipe
  for mode, phases in (("", "ann,snn"), (",hybrid", "ann,snn"), (",direct", "snn")):
    config = settings.get_config(name + mode)
    # A thin wrapper: the setting's config is the recipe's, nothing added.
    assert config.to_dict() == importlib.import_module(recipe).get_config(s.arg + mode).to_dict()
    assert config.model.arch == "spikformer" and config.model.variant == variant
    assert config.model.max_time_steps == T_MAX
    assert config.model.mask.enabled and config.snn.time_cost > 0 and config.snn.target_steps == 4.97
    assert config.data.name == data_name and config.phases == phases
    data = settings.dataset(config)
    assert data.image_side == side
    snn_epochs = ep_ann if mode == ",direct" else ep_snn
    for phase, epochs in (("ann", ep_ann), ("snn", snn_epochs)):
      assert config[phase].batch_size == batch
      assert config[phase].train_steps == epochs * data.num_train // batch
  model = models.build_model(config.model, data.num_classes, phase="ann")
  assert (model.depth, model.dim, model.num_heads) == (depth, dim, heads)
  assert model.max_time_steps == T_MAX
  assert (side // 2 ** sum(model.stem_pools)) ** 2 == tokens


def test_setting_arguments_are_checked():
  with pytest.raises(ValueError, match="unknown setting 'cifar10'; choose one of cifar10_4_384"):
    settings.get_config("cifar10")
  with pytest.raises(ValueError, match="name a setting"):
    settings.get_config("")
  with pytest.raises(ValueError, match="unknown argument 'tiyn'"):  # the recipe checks what is passed on
    settings.get_config("cifar10_4_384,tiyn")
  with pytest.raises(ValueError, match="one of 'direct' and 'hybrid'"):
    settings.get_config("imagenet_8_384,direct,hybrid")


def _tiny_groups() -> list[list[str]]:
  """The settings grouped by identical tiny configs up to the dataset name (the ImageNet recipe's tiny variant
  replaces the model by 'tiny-imagenet' whatever the variant, so its three settings share one tiny config;
  CIFAR10 and CIFAR100 differ only in the data, which these runs replace by a synthetic folder): one run per
  group, with the group's first setting's class count."""
  groups = {}
  for name in PAPER:
    for mode in ("hybrid", "direct"):
      config = settings.get_config(f"{name},{mode},tiny").to_dict()
      config["data"].pop("name")
      for k in ("mean", "std"):  # CIFAR-10's official statistics vs CIFAR-100's own: replaced below anyway
        config["data"].pop(k)
      key = json.dumps(config, sort_keys=True, default=str)
      groups.setdefault(key, []).append(f"{name},{mode}")
  return list(groups.values())


TINY_GROUPS = _tiny_groups()


def test_tiny_groups_cover_every_setting():
  assert sorted(n for g in TINY_GROUPS for n in g) == sorted(f"{p},{m}" for p in PAPER for m in ("hybrid", "direct"))
  for mode in ("hybrid", "direct"):
    assert [f"imagenet_8_384,{mode}", f"imagenet_8_512,{mode}", f"imagenet_8_768,{mode}"] in TINY_GROUPS
    assert [f"cifar10_4_384,{mode}", f"cifar100_4_384,{mode}"] in TINY_GROUPS


@pytest.mark.slow
@pytest.mark.parametrize("group", TINY_GROUPS, ids=["+".join(g) for g in TINY_GROUPS])
def test_setting_tiny_variant_trains(group, tmp_path, image_folder):
  name, mode = group[0].split(",")
  config = settings.get_config(f"{name},{mode},tiny")
  full = settings.get_config(f"{name},{mode}")
  assert config.model.arch == full.model.arch and config.phases == full.phases
  assert config.data.name == full.data.name and config.snn.time_cost == full.snn.time_cost
  classes = 4 if full.data.name == "imagenet2012" else settings.dataset(full).num_classes
  config.data.name = "image_folder"
  config.data.archive = image_folder(str(tmp_path / "images"), 32, classes)
  config.data.data_dir = str(tmp_path / "data_dir")
  config.data.image_size = 32
  config.data.mean = config.data.std = ()
  config.ann.train_steps = config.snn.train_steps = 2
  config.ann.batch_size = config.snn.batch_size = 8
  config.snn.mixup_off_step = 1  # mixes at step 0 only: both branches of the schedule run
  config.eval_batch_size = 64
  config.eval_fixed_steps = False
  summary = train.run(config, str(tmp_path / "run"))
  phases = full.phases.split(",")
  assert summary["phases"] == phases
  assert all(summary[p]["steps"] == 2 and 0 <= summary[p]["test_accuracy"] <= 1 for p in phases)
  snn = summary["snn"]
  assert snn["T_max"] == config.model.max_time_steps
  assert 0 <= snn["average_time_steps"] <= snn["T_max"]
  assert all(0 <= v <= snn["T_max"] for v in snn["per_module_time_steps"].values())


def test_compute_flops_match_a_hand_computation():
  row = compute.setting_compute("cifar10_4_384")
  config = settings.get_config("cifar10_4_384")
  macs = energy.ann_macs(models.build_model(config.model, 10, phase="ann"), (32, 32, 3))
  assert row["ann_macs"] == macs and row["T_max"] == 8
  # 3 (forward + backward) x 2 FLOPs per MAC x MACs x images; the SNN's BPTT runs T_max = 8 steps.
  assert row["ann"]["train_flops"] == 3 * 2 * macs * 121_093 * 128
  assert row["snn"]["train_flops"] == 3 * 2 * macs * 8 * 39_062 * 128
  assert row["ann"]["epochs"] == pytest.approx(310, abs=0.01)
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


# ------------------------------------------------------------------------------------------------------------
# The reference table (experiments/paper_scale/reference.py): README and recipes agree with it.


def test_readme_holds_the_generated_reference_table():
  with open(reference.README) as f:
    readme = f.read()
  assert reference.section() in readme  # regenerate with: python experiments/paper_scale/reference.py --write


@pytest.mark.parametrize("name", list(PAPER))
def test_every_resolved_recipe_equals_the_reference_table(name):
  checked = 0
  for column in reference.COLUMNS:
    config, phase = reference.config_for(name, column)
    for row in reference.ROWS:
      if row.get is None:  # a fact of the code, not of a config: named as a difference
        assert row.why and reference.expected(row, name, column) != row.official[reference.FAMILY[name]]
        continue
      want = reference.expected(row, name, column)
      got = row.get(config, phase)
      assert got == (pytest.approx(want) if isinstance(want, float) else want), (row.name, column)
      checked += 1
  assert checked >= 3 * 35


def test_reference_table_is_the_official_recipe_where_it_says_so():
  """The table's official values are the recipes' SPIKFORMER dicts (two independent copies of the facts)."""
  rows = {r.name: r for r in reference.ROWS}
  for family, o in recipes.SPIKFORMER.items():
    assert rows["global batch"].official[family] == o["batch_size"]
    assert rows["peak lr"].official[family] == o["lr"]
    assert rows["weight decay"].official[family] == o["weight_decay"]
    assert rows["mixup alpha"].official[family] == o["mixup"]
    assert rows["cutmix alpha"].official[family] == o["cutmix"]
    assert rows["random erasing probability"].official[family] == o["random_erasing"]
    assert rows["epochs (incl. cooldown)"].official[family] == o["epochs"] + o["cooldown_epochs"]


# ------------------------------------------------------------------------------------------------------------
# Parameter counts: the official ones exactly (with the pre-BN biases).


def _official_params(depth: int, dim: int, classes: int, family: str) -> int:
  """The official Spikformer's parameters that its forward pass uses (cifar10/model.py, imagenet/model.py):
  SPS convs (no bias) + BN, per block q, k, v (bias on CIFAR only), proj, fc1, fc2 (bias) + BN, the head.
  The unused LayerNorms norm1/norm2 are left out, as in the Spikformer paper's counts."""
  chans = (3, dim // 8, dim // 4, dim // 2, dim)
  stem = sum(9 * a * b + 2 * b for a, b in zip(chans[:-1], chans[1:])) + 9 * dim * dim + 2 * dim
  qkv_bias = dim if family == "cifar" else 0
  attn = 3 * (dim * dim + qkv_bias + 2 * dim) + (dim * dim + dim + 2 * dim)
  mlp = (dim * 4 * dim + 4 * dim + 8 * dim) + (4 * dim * dim + dim + 2 * dim)
  return stem + depth * (attn + mlp) + dim * classes + classes


def _counts(config, classes, side):
  import flax
  import jax
  import jax.numpy as jnp
  from dtvit.models import paths
  model = models.build_model(config.model, classes, phase="ann")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False))
  flat = flax.traverse_util.flatten_dict(shapes["params"])
  own = sum(v.size for p, v in flat.items() if paths.param_group(p) == "weights")  # no thresholds, leaks, scores
  return own, sum(v.size for v in flat.values())


@pytest.mark.parametrize("name,official", [("cifar10_4_384", 9_324_730), ("cifar100_4_384", 9_359_380),
                                           ("imagenet_8_384", 16_816_024), ("imagenet_8_512", 29_689_384),
                                           ("imagenet_8_768", 66_338_632)])
def test_parameter_counts_equal_the_official_ones(name, official):
  config = settings.get_config(name)
  data = settings.dataset(config)
  model = models.build_model(config.model, data.num_classes, phase="ann")
  family = reference.FAMILY[name]
  assert _official_params(model.depth, model.dim, data.num_classes, family) == official
  own, total = _counts(config, data.num_classes, data.image_side)
  assert own == official
  # Without the option (dtvit's default) the biases, which BN cancels, are the only difference.
  config.model.pre_bn_bias = ()
  bias = model.depth * ((3 * model.dim if family == "cifar" else 0) + 2 * model.dim + 4 * model.dim)
  assert _counts(config, data.num_classes, data.image_side) == (official - bias, total - bias)
  if name == "cifar10_4_384":
    assert total - bias == 9_311_036  # the count dtvit reported before (thresholds, leaks, 8 x 8 scores included)


def test_pre_bn_bias_changes_no_output_and_gets_no_gradient():
  import jax
  import jax.numpy as jnp
  plain = models.spikformer("tiny", 4, max_time_steps=2, phase="snn")
  biased = models.spikformer("tiny", 4, max_time_steps=2, phase="snn",
                             layer_cfg=models.LayerConfig(pre_bn_bias=("q", "proj", "fc1")))
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  v = models.init(biased, jax.random.key(0), (32, 32, 3))
  params = jax.tree.map(lambda x: x, v["params"])
  params["blocks_0"]["attn"]["q"]["bias"] = jnp.full_like(params["blocks_0"]["attn"]["q"]["bias"], 0.7)

  def loss(p, model, bs):
    logits, _ = model.apply({"params": p, "batch_stats": bs}, images, train=True, mutable=["batch_stats"])
    return jnp.sum(logits ** 2)

  without = jax.tree.map(lambda x: x, params)
  for layer in ("q", "proj"):
    del without["blocks_0"]["attn"][layer]["bias"]
  del without["blocks_0"]["mlp"]["fc1"]["bias"]
  loss_biased = jax.value_and_grad(lambda p, bs: loss(p, biased, bs))
  value, grads = jax.jit(loss_biased)(params, v["batch_stats"])
  np.testing.assert_allclose(value, jax.jit(lambda p, bs: loss(p, plain, bs))(without, v["batch_stats"]),
                             rtol=1e-5)
  assert float(jnp.max(jnp.abs(grads["blocks_0"]["attn"]["q"]["bias"]))) < 1e-4 * float(
      jnp.max(jnp.abs(grads["blocks_0"]["attn"]["q"]["kernel"])))


def test_initialisers_follow_their_definitions():
  import jax
  from dtvit.models import settings as model_settings
  cfg = model_settings.LayerConfig(dense_init="trunc_normal_0.02", conv_init="torch_default")
  w = np.asarray(cfg.init("dense_init")(jax.random.key(0), (384, 1536)))
  assert abs(w.std() - 0.02) < 0.001 and abs(w.mean()) < 0.001
  k = np.asarray(cfg.init("conv_init")(jax.random.key(0), (3, 3, 48, 96)))
  bound = 1 / np.sqrt(3 * 3 * 48)  # PyTorch: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert k.max() <= bound and k.min() >= -bound and abs(k.std() - bound / np.sqrt(3)) < 0.02 * bound
  default = model_settings.LayerConfig()
  np.testing.assert_array_equal(default.init("head_init")(jax.random.key(0), (16, 10)),
                                jax.nn.initializers.lecun_normal()(jax.random.key(0), (16, 10)))
  with pytest.raises(ValueError, match="Unknown model.dense_init 'xavier'"):
    model_settings.LayerConfig(dense_init="xavier").validate()
  with pytest.raises(ValueError, match="pre_bn_bias names unknown layers"):
    model_settings.LayerConfig(pre_bn_bias=("qkv",)).validate()


# ------------------------------------------------------------------------------------------------------------
# The mask phase reaches its target: the cost, the optimizer, the calibration, the simulated dynamics.


def test_hinge_hard_is_the_reported_average_above_the_target():
  import jax
  import jax.numpy as jnp
  from dtvit import masks
  scores = {"a": jnp.array([1.0, -0.5, 0.3, 2.0]), "b": jnp.array([-1.0, 0.2, 0.4, -0.1])}  # 3 and 2 steps on
  for semantics, t_avg in (("skip", 2.5), ("filter", 3.5)):  # 'filter' counts b's steps up to its last active
    counts = masks.step_counts({n: masks.hard_mask(s) for n, s in scores.items()}, {"a": (masks.OUTPUT,),
                                                                                   "b": (masks.OUTPUT,)}, semantics)
    key = "active_steps" if semantics == "skip" else "simulated_steps"
    assert masks.average_steps(counts, key) == t_avg
    cost = lambda s, target: masks.time_step_cost(s, kind="hinge_hard", target=target, semantics=semantics)
    assert float(cost(scores, 2.0)) == pytest.approx(t_avg - 2.0)
    assert float(cost(scores, 4.0)) == 0.0
    grad_above, grad_below = jax.grad(cost)(scores, 2.0), jax.grad(cost)(scores, 4.0)
    soft = jax.grad(lambda s: jnp.mean(jnp.stack([masks.expected_steps(v, semantics=semantics)
                                                   for v in s.values()])))(scores)
    for n in scores:
      np.testing.assert_allclose(grad_above[n], soft[n], rtol=1e-6)  # straight through: the soft gradient
      assert not np.any(grad_below[n])
  with pytest.raises(ValueError, match="'hinge_hard' cost needs a target"):
    masks.time_step_cost(scores, kind="hinge_hard")


def test_clip_except_scores_leaves_the_scores_alone():
  import jax.numpy as jnp
  from dtvit import optim
  grads = {"blocks_0": {"attn": {"q": {"kernel": jnp.full((2, 2), 3.0)},
                                 "time_mask": {"time_scores": jnp.full((4,), 50.0)}}},
           "head": {"bias": jnp.array([4.0])}}
  out, _ = optim.clip_except_scores(1.0).update(grads, None)
  np.testing.assert_array_equal(out["blocks_0"]["attn"]["time_mask"]["time_scores"], 50.0)
  norm = np.sqrt(np.sum(np.square(out["blocks_0"]["attn"]["q"]["kernel"])) + out["head"]["bias"][0] ** 2)
  assert norm == pytest.approx(1.0)
  np.testing.assert_allclose(out["head"]["bias"], 4.0 / np.sqrt(4 * 9 + 16))
  small, _ = optim.clip_except_scores(100.0).update(grads, None)
  np.testing.assert_array_equal(small["head"]["bias"], 4.0)


def test_cooldown_holds_the_final_rate():
  from dtvit import recipes as c
  from dtvit import optim
  pc = c.phase_config(steps=100, lr=1.0, batch_size=8)
  pc.optimizer.update(warmup_steps=10, cooldown_steps=20, end_lr_factor=0.1)
  sched = optim.learning_rate_schedule(pc.optimizer, 100)
  assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
  assert float(sched(80)) == pytest.approx(0.1) and float(sched(99)) == pytest.approx(0.1)
  assert float(sched(79)) > 0.1
  pc.optimizer.cooldown_steps = 0  # the schedule as it was
  plain = optim.learning_rate_schedule(pc.optimizer, 100)
  assert float(plain(80)) > 0.1 and float(plain(100)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="cooldown_steps=100 must be in"):
    pc.optimizer.cooldown_steps = 100
    optim.learning_rate_schedule(pc.optimizer, 100)


def test_calibration_rejects_what_it_does_not_model():
  config = settings.get_config("cifar10_4_384")
  config.snn.temperature_end = 0.1
  with pytest.raises(ValueError, match="constant mask temperature"):
    recipes.calibrate_masks(config)
  config = settings.get_config("cifar10_4_384")
  config.model.mask.granularity = "layer"
  with pytest.raises(ValueError, match="granularity='layer'"):
    recipes.calibrate_masks(config)
  config = settings.get_config("cifar10_4_384")
  config.snn.optimizer.score_optimizer = "adam"
  with pytest.raises(ValueError, match="for the 'sgd' score optimizer"):
    recipes.calibrate_masks(config)


PHASES = list(score_dynamics.unique_phases().values())


def test_score_dynamics_groups_cover_every_setting_and_mode():
  assert sorted(m for _, members in PHASES for m in members) == sorted(
      (s, m) for s in PAPER for m in ("hybrid", "direct"))
  assert len(PHASES) == 4  # CIFAR-10 = CIFAR-100; the three ImageNet variants have the same 16 masked modules


@pytest.mark.parametrize("phase,members", [
    pytest.param(ph, members, id="+".join(f"{s}:{m}" for s, m in members),
                 marks=[pytest.mark.slow] if ph.steps > 1_000_000 else [])
    for ph, members in PHASES])
def test_score_dynamics_reach_the_target_before_60_percent(phase, members):
  """At the recipe's real step count, with its cost and optimizer: the cost alone reaches the target when the
  closed form says (the score that must cross 0 for T_avg <= target is the k-th lowest at the start), near the
  calibration's 25%; with the modelled cross-entropy before 60% of the phase."""
  del members
  alone = score_dynamics.simulate(phase, pull=0.0, noise=0.0)
  k = int(np.ceil(phase.modules * (phase.t_max - phase.pc.target_steps)))  # crossings for T_avg <= target
  travel = lambda s0: optim.score_travel_steps(score_lr=phase.pc.optimizer.score_lr, num_modules=phase.modules,
                                               time_cost=phase.pc.time_cost, score_init=float(s0),
                                               temperature=phase.pc.temperature_start,
                                               momentum=phase.pc.optimizer.score_momentum)
  assert alone["reached_step"] == pytest.approx(travel(alone["initial_scores"][k - 1]), rel=0.01)
  assert travel(phase.mask.score_init) == pytest.approx(recipes.SCORE_REACH_FRACTION * phase.steps, rel=1e-6)
  assert 0.1 < alone["reached_fraction"] < 0.4
  modelled = score_dynamics.simulate(phase, pull=0.9, noise=2.0)
  assert modelled["reached_fraction"] is not None and modelled["reached_fraction"] < score_dynamics.DEADLINE


def test_score_dynamics_hold_the_target_after_reaching_it():
  ph = next(p for p, members in PHASES if ("cifar10_4_384", "hybrid") in members)
  for pull, noise in score_dynamics.SCENARIOS.values():
    r = score_dynamics.simulate(ph, pull=pull, noise=noise, full=True)
    for at in (0.6, 1.0):  # within one module-step of the target: the hinge stops pushing there, CE pulls back
      assert abs(r["T_avg_at"][at] - ph.pc.target_steps) < 1 / ph.modules, (pull, at, r["T_avg_at"])
