"""Training end to end on tiny configs: both phases, sharding, resume, ANN -> SNN restore, clear errors."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cifar10_spikformer
from dtvit import checkpointing
from dtvit import data
from dtvit import events
from dtvit import models
from dtvit import sharding
from dtvit import state as state_lib
from dtvit import steps
from dtvit import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg.tar.gz")


def load_params(phase_dir):
  ckpt = checkpointing.Checkpointer(os.path.join(phase_dir, "checkpoints"))
  step = ckpt.latest_step()
  path = os.path.join(phase_dir, "checkpoints", str(step), "state")
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(path)
  ckpt.close()
  return step, state["params"]


@pytest.fixture(scope="module")
def ann_run(tiny_config, tmp_path_factory):
  """One tiny ANN phase shared by the SNN tests."""
  workdir = str(tmp_path_factory.mktemp("ann"))
  config = tiny_config(**{"phases": "ann", "ann.train_steps": 30, "ann.optimizer.lr": 3e-3})
  summary = train.run(config, workdir)
  return workdir, summary


@pytest.mark.slow
def test_ann_then_snn_on_8_devices_with_summary(tiny_config, tmp_path):
  assert jax.device_count() == 8
  workdir = str(tmp_path)
  config = tiny_config(**{"ann.train_steps": 20, "ann.optimizer.lr": 3e-3, "snn.train_steps": 6,
                          "eval_fixed_steps": True})
  summary = train.run(config, workdir)
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk["devices"] == 8
  assert on_disk["phases"] == ["ann", "snn"]
  assert on_disk["ann"]["train_loss_last"] < on_disk["ann"]["train_loss_first"]
  snn = on_disk["snn"]
  for key in ("test_accuracy", "test_accuracy_fixed_T", "average_time_steps", "op_weighted_time_steps",
              "per_module_time_steps", "spike_rates", "energy"):
    assert key in snn, key
  assert sorted(snn["per_module_time_steps"]) == ["blocks_0/attn", "blocks_0/mlp"]
  assert 0 <= snn["average_time_steps"] <= config.model.max_time_steps
  energy = snn["energy"]["totals"]
  assert 0 < energy["snn_energy_j"] and 0 < energy["ann_energy_j"]
  assert 0.0 <= summary["ann"]["test_accuracy"] <= 1.0
  # Both phases keep their own checkpoints.
  assert load_params(os.path.join(workdir, "ann"))[0] == 20
  assert load_params(os.path.join(workdir, "snn"))[0] == 6


@pytest.mark.slow
def test_time_step_cost_lowers_learned_steps(tiny_config, ann_run, tmp_path):
  ann_dir, _ = ann_run
  steps = {}
  for cost in (0.0, 1.0):
    config = tiny_config(**{"phases": "snn", "snn.train_steps": 12, "snn.time_cost": cost,
                            "snn.optimizer.score_lr": 0.3,
                            "snn.init_from": os.path.join(ann_dir, "ann", "checkpoints")})
    s = train.run(config, str(tmp_path / f"cost{cost}"))
    steps[cost] = s["snn"]["average_time_steps"]
  assert steps[0.0] == config.model.max_time_steps  # nothing pushes the open masks down
  assert steps[1.0] < steps[0.0]


@pytest.mark.slow
def test_ann_checkpoint_restores_into_snn_with_converted_thresholds(tiny_config, ann_run, tmp_path):
  ann_dir, _ = ann_run
  config = tiny_config(**{"phases": "ann,snn", "snn.threshold_scale": 0.5})
  info = data.get_info(config.data)
  model = models.phase_model(config.model, info.num_classes, "snn")
  variables = state_lib.initial_variables(config, ann_dir, ["ann", "snn"], "snn", model, info, jax.random.key(0),
                                          mesh=sharding.make_mesh(-1))
  _, ann_params = load_params(os.path.join(ann_dir, "ann"))
  flat_ann = {"/".join(p): v for p, v in _flatten(ann_params).items()}
  flat_snn = {"/".join(p): v for p, v in _flatten(variables["params"]).items()}
  assert flat_ann.keys() == flat_snn.keys()
  for k, v in flat_ann.items():
    expected = 0.5 * np.asarray(v) if k.endswith("/threshold") else np.asarray(v)
    np.testing.assert_allclose(np.asarray(flat_snn[k]), expected, rtol=1e-6, err_msg=k)
  assert any(k.endswith("/threshold") for k in flat_ann)


def test_ann_checkpoint_of_another_t_max_starts_the_scores_fresh(tiny_config, ann_run):
  ann_dir, _ = ann_run
  config = tiny_config(**{"phases": "ann,snn", "model.max_time_steps": 4})  # the ANN twin was saved with T_max = 3
  info = data.get_info(config.data)
  model = models.phase_model(config.model, info.num_classes, "snn")
  mesh = sharding.make_mesh(-1)
  variables = state_lib.initial_variables(config, ann_dir, ["ann", "snn"], "snn", model, info, jax.random.key(0),
                                          mesh=mesh)
  _, ann_params = load_params(os.path.join(ann_dir, "ann"))
  flat_ann = {"/".join(p): v for p, v in _flatten(ann_params).items()}
  flat_snn = {"/".join(p): v for p, v in _flatten(variables["params"]).items()}
  assert flat_ann.keys() == flat_snn.keys()
  for k, v in flat_snn.items():
    if k.endswith("/time_scores"):
      assert v.shape == (4,) and flat_ann[k].shape == (3,), k
    else:
      np.testing.assert_array_equal(v, flat_ann[k], err_msg=k)
    assert v.sharding == sharding.replicated(mesh), k


def _flatten(tree):
  import flax
  return flax.traverse_util.flatten_dict(tree)


@pytest.mark.slow
def test_sharded_training_matches_single_device(tiny_config, tmp_path):
  results = {}
  for n in (1, 8):
    # SGD: Adam turns float noise in near-zero gradients into full-size steps, hiding real differences.
    config = tiny_config(**{"phases": "ann", "ann.train_steps": 4, "mesh.num_devices": n,
                            "ann.optimizer.name": "sgd", "ann.optimizer.lr": 0.05})
    train.run(config, str(tmp_path / f"dev{n}"))
    results[n] = load_params(str(tmp_path / f"dev{n}" / "ann"))[1]
  # Reductions split over 8 devices sum in another order; a clip value's gradient also changes where an
  # element sits right at the clip boundary, so after 4 steps leaves agree to ~1e-3, not bitwise.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=5e-4), results[1], results[8])
  # And the runs did move the params (the comparison is not between two untouched inits).
  init = models.init(models.phase_model(tiny_config().model, 10, "ann"), jax.random.key(0), (8, 8, 1))["params"]
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), results[1], init)
  assert max(jax.tree.leaves(moved)) > 1e-2


@pytest.mark.slow
def test_resume_gives_the_same_params(tiny_config, tmp_path):
  config = tiny_config(**{"phases": "snn", "snn.train_steps": 6, "snn.time_cost": 0.1})
  train.run(config, str(tmp_path / "straight"))
  stopped = train.run(config, str(tmp_path / "resumed"), stop_at_step=3)
  assert stopped["snn"]["stopped_at"] == 3
  assert load_params(str(tmp_path / "resumed" / "snn"))[0] == 3
  train.run(config, str(tmp_path / "resumed"))
  a = load_params(str(tmp_path / "straight" / "snn"))
  b = load_params(str(tmp_path / "resumed" / "snn"))
  assert a[0] == b[0] == 6
  jax.tree.map(np.testing.assert_array_equal, a[1], b[1])


@pytest.mark.slow
def test_every_step_loss_and_distillation_resume_bitwise(tiny_config, ann_run, tmp_path):
  """snn.loss='every_step' with distillation from the ANN twin (the init_from checkpoint): a run stopped and
  resumed ends bitwise equal to an uninterrupted one; the summary records the twin and its cost."""
  twin_dir = os.path.join(ann_run[0], "ann", "checkpoints")
  config = tiny_config(**{"phases": "snn", "snn.train_steps": 6, "snn.time_cost": 0.1, "snn.init_from": twin_dir,
                          "snn.loss": "every_step", "snn.distill_weight": 1.0, "snn.distill_temperature": 2.0})
  straight = train.run(config, str(tmp_path / "straight"))
  assert train.run(config, str(tmp_path / "resumed"), stop_at_step=3)["snn"]["stopped_at"] == 3
  resumed = train.run(config, str(tmp_path / "resumed"))
  a = load_params(str(tmp_path / "straight" / "snn"))
  b = load_params(str(tmp_path / "resumed" / "snn"))
  assert a[0] == b[0] == 6
  jax.tree.map(np.testing.assert_array_equal, a[1], b[1])
  d = straight["snn"]["distill"]
  assert d == resumed["snn"]["distill"]
  assert d["source"] == twin_dir and d["weight"] == 1.0 and d["temperature"] == 2.0
  assert d["twin_forward_flops_per_step"] > 0 and d["twin_macs_per_image"] > 0
  # The twin's forward pass is in the step: the step's matmul work grows by exactly it.
  assert d["train_step_flops_with_twin"] - d["train_step_flops_without_twin"] == d["twin_forward_flops_per_step"]
  # The distillation changed training: without it the params differ.
  config.snn.distill_weight = 0.0
  train.run(config, str(tmp_path / "plain"))
  c = load_params(str(tmp_path / "plain" / "snn"))
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(c[1])))


def test_a_run_older_than_the_loss_options_resumes_at_their_defaults(tiny_config, tmp_path):
  from dtvit import workdir as workdir_lib
  keys = ("loss", "distill_weight", "distill_temperature", "distill_from")
  older = tiny_config().to_dict()
  for p in ("ann", "snn", "finetune"):
    for k in keys:
      del older[p][k]
  workdir = str(tmp_path / "run")
  workdir_lib.record_launch(workdir_lib.plan_launch(workdir, older))
  os.makedirs(os.path.join(workdir, "snn", "checkpoints", "2"))   # the SNN has started: its keys are fixed
  launch = workdir_lib.plan_launch(workdir, tiny_config().to_dict(), defaults=train._base_defaults())
  assert launch.allowed == () and set(launch.changes) == {f"{p}.{k}" for p in ("ann", "snn", "finetune") for k in keys}
  with pytest.raises(ValueError, match="snn.loss"):
    workdir_lib.plan_launch(workdir, tiny_config(**{"snn.loss": "every_step"}).to_dict(),
                            defaults=train._base_defaults())


def test_loss_option_errors(tiny_config, tmp_path):
  for overrides, message in (({"snn.loss": "every"}, r"snn.loss='every'; choose one of"),
                             ({"phases": "snn", "snn.distill_weight": 1.0}, "needs an ANN twin"),
                             ({"ann.distill_weight": 1.0}, "cannot distil from itself"),
                             ({"snn.distill_weight": 1.0, "snn.distill_temperature": 0.0}, "must be > 0"),
                             ({"snn.distill_weight": -1.0}, "must be >= 0")):
    with pytest.raises(ValueError, match=message):
      train.run(tiny_config(**overrides), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(ARCHIVE), reason=f"CIFAR-10 archive not found at {ARCHIVE}")
def test_cifar10_archive_tiny_training(tmp_path):
  config = cifar10_spikformer.get_config("tiny,local")
  config.data.data_dir = str(tmp_path / "data_dir")
  config.data.archive = ARCHIVE
  config.phases = "ann"
  config.data.augment.randaugment_ops = 0
  config.eval_batch_size = 200
  config.eval_examples = 1000
  summary = train.run(config, str(tmp_path / "run"))
  assert summary["ann"]["steps"] == config.ann.train_steps
  info = data.get_info(config.data)
  assert (info.num_train, info.num_test, info.num_classes) == (50000, 10000, 10)
  assert 0.0 <= summary["ann"]["test_accuracy"] <= 1.0


def test_bad_input_errors(tiny_config, ann_run, tmp_path):
  with pytest.raises(ValueError, match="model.max_time_steps \\(T_max\\) must be >= 1"):
    train.run(tiny_config(**{"model.max_time_steps": 0}), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="time_cost must be >= 0"):
    train.run(tiny_config(**{"snn.time_cost": -1.0}), str(tmp_path / "b"))
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    train.run(tiny_config(**{"ann.batch_size": 12}), str(tmp_path / "c"))
  with pytest.raises(ValueError, match="Unknown neuron 'adex'"):
    train.run(tiny_config(**{"model.neuron.neuron": "adex"}), str(tmp_path / "d"))
  # Missing data: the message says how to provide an offline copy.
  with pytest.raises(FileNotFoundError, match="cifar10_local"):
    train.run(tiny_config(**{"data.name": "cifar10", "data.data_dir": str(tmp_path / "empty")}),
              str(tmp_path / "e"))
  # init_from pointing nowhere, or to an incompatible checkpoint.
  with pytest.raises(FileNotFoundError, match="does not exist"):
    train.run(tiny_config(**{"phases": "snn", "snn.init_from": str(tmp_path / "nowhere")}), str(tmp_path / "f"))
  ann_dir, _ = ann_run
  with pytest.raises(ValueError, match="[Ss]hape mismatch"):
    train.run(tiny_config(**{"phases": "snn", "model.dim": 32,
                             "snn.init_from": os.path.join(ann_dir, "ann", "checkpoints")}), str(tmp_path / "g"))
  # A workdir holding another config's run is refused, and nothing in it is touched.
  before = sorted(os.listdir(ann_dir))
  with pytest.raises(ValueError, match="model.depth"):
    train.run(tiny_config(**{"phases": "ann", "ann.train_steps": 30, "model.depth": 2}), ann_dir)
  assert sorted(os.listdir(ann_dir)) == before


@pytest.mark.parametrize("args, message", [
    (["--config=configs/quickstart.py:tiny", "--config.snn.time_csot=0.1"],
     'error: --config.snn.time_csot: config.snn has no key \'time_csot\'; did you mean "time_cost" '
     '(--config.snn.time_cost)?'),
    (["--config=configs/quickstart.py:tiny", "--config.optimizer.lr=0.1"],
     "error: --config.optimizer.lr: the config has no top-level 'optimizer.lr'; it is a key of a section: did you "
     "mean --config.ann.optimizer.lr or --config.finetune.optimizer.lr or --config.snn.optimizer.lr?"),
    (["--config=configs/quickstrat.py:tiny"],
     f"error: config file 'configs/quickstrat.py' not found (relative to {ROOT}); give the path of a recipe, e.g. "
     "configs/cifar100_spikformer.py, configs/cifar10_spikformer.py, configs/cifar10_vit.py, "
     "configs/imagenet_spikformer.py, configs/quickstart.py."),
    (["--config=configs/quickstart.py:tiny", "--config.model.num_steps=2"],
     "error: --config.model.num_steps was renamed: it is now --config.model.max_time_steps."),
], ids=["mistyped", "misplaced", "missing_file", "renamed_key"])
def test_cli_user_errors_are_one_line_without_traceback(tmp_path, args, message):
  proc = subprocess.run([sys.executable, "-m", "dtvit.main", *args, f"--workdir={tmp_path / 'run'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if not l.startswith(("W0", "I0", "WARNING:"))]  # absl/XLA logs
  assert lines == [message]
  assert not os.path.exists(tmp_path / "run")


def test_a_renamed_value_on_the_command_line_names_the_new_one(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dtvit.main", "--config=configs/quickstart.py:tiny",
                         "--config.model.neuron.neuron=spikformer", f"--workdir={tmp_path / 'run'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert ("error: ValueError: model.neuron.neuron='spikformer' was renamed: it is now 'spikingjelly_lif'."
          in proc.stderr.splitlines())
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_nothing_is_written_until_the_data_and_init_from_checks_pass(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  missing = {"phases": "ann", "data.name": "cifar10_local", "data.archive": str(tmp_path / "cifar.tar.gz"),
             "data.data_dir": str(tmp_path / "data_dir")}
  with pytest.raises(FileNotFoundError, match="cifar.tar.gz does not exist"):
    train.run(tiny_config(**missing), workdir)
  with pytest.raises(FileNotFoundError, match="snn.init_from: checkpoint directory .* does not exist"):
    train.run(tiny_config(**{"phases": "snn", "snn.init_from": str(tmp_path / "nowhere")}), workdir)
  assert not os.path.exists(workdir)
  # The corrected command is a new run, not a resume refused for its "different config".
  corrected = tiny_config(**{"phases": "ann"})
  assert train.run(corrected, workdir, stop_at_step=0)["ann"]["stopped_at"] == 0
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["name"] == "digits"


def _slow_then_crash(crash_at=None, delay=0.5):
  def hook(phase, step, local):
    del phase
    if step == crash_at:
      raise RuntimeError("killed")
    time.sleep(delay)
    return local
  return hook


def _meta(workdir, step):
  with open(os.path.join(workdir, "ann", "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)


def _files(workdir):
  """{path: bytes} of every file under `workdir` but the lock (`dtvit.workdir_lock`: it names its last holder)."""
  out = {}
  for d, _, names in os.walk(workdir):
    for n in names:
      if d == workdir and n == ".lock":
        continue
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), workdir)] = f.read()
  return out


@pytest.mark.slow
def test_crash_resume_rerun_and_extension_keep_one_record(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"phases": "ann", "ann.train_steps": 4, "ann.checkpoint_every": 2, "ann.log_every": 1})
  # Launch 1 logs steps 1-3, checkpoints step 2 and dies before step 4; launch 2 resumes from step 2.
  with pytest.raises(RuntimeError, match="killed"):
    train.run(config, workdir, batch_hook=_slow_then_crash(crash_at=3))
  t = time.time()
  summary = train.run(config, workdir, batch_hook=_slow_then_crash())
  second_launch_s = time.time() - t
  # train_time_s adds up: launch 1's time up to its checkpoint (in the meta) plus launch 2's (2 sleeps >= 1 s).
  before = _meta(workdir, 2)["train_time_s"]
  assert before >= 1.0
  assert before + 1.0 <= summary["ann"]["train_time_s"] <= before + second_launch_s + 0.1
  assert summary["ann"]["train_time_s"] == round(_meta(workdir, 4)["train_time_s"], 1)
  # cpu_time_s adds up the same way: launch 1's CPU time (compiling, at least) carries into the summary.
  cpu_before = _meta(workdir, 2)["cpu_time_s"]
  assert cpu_before > 0.1
  assert summary["ann"]["cpu_time_s"] == round(_meta(workdir, 4)["cpu_time_s"], 1) > cpu_before
  scalars = events.read_scalars(os.path.join(workdir, "ann"))
  assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]  # step 3, logged by both launches, is in once
  assert [s for s, _ in scalars["test_accuracy"]] == [4]

  # A rerun of the finished run, even with another log cadence, prints its summary and changes no file.
  files = _files(workdir)
  rerun = train.run(tiny_config(**{"phases": "ann", "ann.train_steps": 4, "ann.checkpoint_every": 2,
                                   "ann.log_every": 3}), workdir)
  assert rerun == json.loads(files["summary.json"])
  assert _files(workdir) == files

  # More steps and other cadences extend the run: steps 5 and 6 follow, recorded in the history.
  extended = tiny_config(**{"phases": "ann", "ann.train_steps": 6, "ann.checkpoint_every": 3, "ann.log_every": 2})
  summary = train.run(extended, workdir)
  assert summary["ann"]["steps"] == 6 and summary["ann"]["train_time_s"] >= before + 1.0
  scalars = events.read_scalars(os.path.join(workdir, "ann"))
  assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 6]
  assert [s for s, _ in scalars["test_accuracy"]] == [4, 6]
  assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "ann", "checkpoints"))) == [4, 6]  # keeps 2
  with open(os.path.join(workdir, "config_history.json")) as f:
    history = json.load(f)
  assert [h["resumed_from"] for h in history] == [{}, {"ann": 2}, {"ann": 4}]
  assert sorted(history[-1]["changes"]) == ["ann.checkpoint_every", "ann.log_every", "ann.train_steps"]
  assert "recomputed for 6 steps and followed from step 4 on" in history[-1]["notes"][0]


@pytest.mark.slow
def test_train_step_applies_an_on_device_augmentation_given_the_step(tiny_config):
  """`augment_fn(step, batch)` runs inside the step on the batch, with the state's step counter."""
  config = tiny_config(**{"phases": "ann"})
  info = data.get_info(config.data)
  model = models.phase_model(config.model, info.num_classes, "ann")
  tx = optax.sgd(0.1)
  state = state_lib.create_state(model, tx, jax.random.key(0), info.image_shape, sharding.make_mesh(1))
  state["step"] = jnp.int32(5)
  local = next(data.train_batches(config.data, global_batch_size=8, seed=0, num_classes=info.num_classes))
  batch = {k: jnp.asarray(local[k]) for k in ("image", "label", "target")}

  def noise(step, b):
    return dict(b, image=b["image"] + jax.random.normal(jax.random.key(step), b["image"].shape))

  def make(**kw):
    return jax.jit(steps.make_train_step(model, tx, config.ann, phase="ann", op_weights=None, **kw))

  augmented = make(augment_fn=noise)(state, batch)[0]["params"]
  plain = make()
  # The same program but for where the noise is drawn: equal up to float32 rounding of a fused computation.
  want = plain(state, noise(5, batch))[0]["params"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), augmented, want)
  other_step = plain(state, noise(6, batch))[0]["params"]
  assert not np.allclose(augmented["head"]["kernel"], other_step["head"]["kernel"], rtol=1e-5, atol=1e-6)
