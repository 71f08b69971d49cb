"""experiments/cifar10_strong: its scan and sweep as data, and their smoke forms run by dtvit.sweep."""

import importlib.util
import json
import os
import sys

import pytest

from dtvit import sweep as dtvit_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "cifar10_strong", "config.py")


def _recipe():
  spec = importlib.util.spec_from_file_location("cifar10_strong_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


recipe = _recipe()


def _points(arg=""):
  return {dtvit_sweep.point_name(p): p for p in recipe.get_sweep(arg)}


def test_the_scan_and_the_sweep_as_data():
  scan = _points("scan")
  assert list(scan) == [f"scan_{s}" for s in recipe.SIZES]
  for name, point in scan.items():   # each size is what SIZES says, ANN only, on the short schedule
    c = dtvit_sweep.point_config(recipe, "scan", point, "/r")
    depth, dim, heads, mlp_ratio, pools = recipe.SIZES[name[len("scan_"):]]
    assert (c.model.depth, c.model.dim, c.model.num_heads, c.model.mlp_ratio) == (depth, dim, heads, mlp_ratio)
    assert tuple(c.model.stem_pools) == pools and c.phases == "ann"
    assert c.ann.train_steps == recipe.SCAN_EPOCHS * recipe.NUM_TRAIN // recipe.BATCH_SIZE
  points = _points()
  names = list(points)
  assert names[:2] == ["ann", f"learned_skip_{recipe.COSTS[0]:g}"]   # the twin, then the headline run
  assert {f"fixed_T{t}" for t in range(1, 5)} <= set(names)
  assert sum(n.startswith(f"learned_skip_{recipe.COSTS[0]:g}") for n in names) == 3   # 3 seeds at the headline
  assert {"fixed_T2_seed1", "fixed_T3_seed1", "fixed_T4_every_step", "learned_skip_0.03"} <= set(names)
  for name in names[1:]:   # every SNN run: from the twin, skip masks, T_max 4, distilled
    c = dtvit_sweep.point_config(recipe, "", points[name], "/r")
    assert c.snn.init_from == "/r/ann/ann/checkpoints" and c.model.mask.semantics == "skip"
    assert c.snn.distill_weight > 0 and c.phases == "snn" and c.data.placement == "device"
  every = dtvit_sweep.point_config(recipe, "", points["fixed_T4_every_step"], "/r")
  assert every.snn.loss == "every_step" and not every.model.mask.enabled and every.model.max_time_steps == 4


def test_recipe_rejects_bad_arguments():
  with pytest.raises(ValueError, match="size='9-999'"):
    recipe.get_config("size=9-999")
  with pytest.raises(ValueError, match="unknown argument 'huge'"):
    recipe.get_sweep("huge")


@pytest.mark.slow
def test_smoke_scan_and_sweep_run_on_digits(tmp_path):
  """The scan's and the sweep's smoke forms on digits, by dtvit.sweep: the scan's two points, then the twin and
  the headline learned run from it (distilled from the twin, resident data)."""
  scan_root, root = str(tmp_path / "scan"), str(tmp_path / "runs")
  assert dtvit_sweep.main([f"--config={CONFIG}:scan,smoke,digits", f"--root={scan_root}"]) == 0
  table = dtvit_sweep.read_table(scan_root)
  assert [r["state"] for r in table["rows"]] == ["done", "done"]
  assert all(r["cpu_time_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in table["rows"])
  argv = [f"--config={CONFIG}:smoke,digits", f"--root={root}"]
  assert dtvit_sweep.main(argv + ["--only=ann", "--only=learned_skip_0.01"]) == 0
  summary = json.load(open(os.path.join(root, "learned_skip_0.01", "summary.json")))
  assert summary["snn"]["steps"] == 6 and "distill" in summary["snn"]


@pytest.mark.slow
def test_runner_trains_then_evaluates_exit_and_skips_what_is_done(tmp_path):
  """experiments.cifar10_strong.run on the smoke form: the twin, then the headline run followed by its per-sample
  exit evaluation; a rerun trains and evaluates nothing again."""
  from experiments.cifar10_strong import run as runner
  root = str(tmp_path / "runs")
  argv = [f"--root={root}", "--config_arg=smoke,digits", "--only=ann", "--only=learned_skip_0.01"]
  assert runner.main(argv) == 0
  run = os.path.join(root, "learned_skip_0.01")
  exit_record = json.load(open(os.path.join(run, "early_exit", "early_exit.json")))
  assert {r["criterion"] for r in exit_record["rows"]} == {"confidence", "entropy"}
  assert not os.path.exists(os.path.join(root, "ann", "early_exit"))   # the twin has no time steps to exit from
  logs = {n: os.path.getmtime(os.path.join(root, n)) for n in ("ann.log", "learned_skip_0.01.log",
                                                              "learned_skip_0.01.exit.log")}
  assert runner.main(argv) == 0
  assert {n: os.path.getmtime(os.path.join(root, n)) for n in logs} == logs
  assert runner.main([f"--root={root}", "--config_arg=smoke,digits", "--only=no_such_run"]) == 2
