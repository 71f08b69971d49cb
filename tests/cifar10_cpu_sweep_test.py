"""experiments/cifar10_cpu: the recipe's arguments, the runner (resumable, one process per run), the table."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(f"cifar10_cpu_{name}",
                                                os.path.join(ROOT, "experiments", "cifar10_cpu", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


sweep = _load("sweep")
recipe = _load("config")


def test_recipe_runs_are_what_the_sweep_names():
  ann = recipe.get_config("ann")
  assert ann.phases == "ann" and ann.data.name == "cifar10_local"
  assert ann.ann.num_steps == recipe.ANN_EPOCHS * 50_000 // recipe.BATCH_SIZE
  fixed = recipe.get_config("fixed,T=3")
  assert fixed.phases == "snn" and fixed.model.num_steps == 3 and not fixed.model.mask.enabled
  assert fixed.snn.time_cost == 0.0
  learned = recipe.get_config("learned,cost=0.03,kind=op_weighted")
  assert learned.model.num_steps == recipe.T_MAX and learned.model.mask.enabled
  assert (learned.snn.time_cost, learned.snn.cost_kind) == (0.03, "op_weighted")
  # Every SNN run trains the same number of steps from the same twin: only T / the masks differ.
  assert fixed.snn.num_steps == learned.snn.num_steps == recipe.SNN_EPOCHS * 50_000 // recipe.BATCH_SIZE
  names = [r.name for r in sweep.runs()]
  assert names[0] == "ann" and len(names) == len(set(names)) == 1 + 4 + 3 + 1
  assert all(r.from_ann for r in sweep.runs() if r.name != "ann")


@pytest.mark.parametrize("arg,match", [
    ("", "exactly one of ann, fixed, learned"),
    ("ann,fixed,T=2", "exactly one"),
    ("fixed", "T=<steps>"),
    ("learned", "cost=<weight>"),
    ("learned,cost=0.1,T=2", "T_max is fixed"),
    ("ann,T=2", "takes no T"),
    ("learned,cost=0.1,bogus=1", "unknown argument 'bogus'"),
])
def test_recipe_rejects_bad_arguments(arg, match):
  with pytest.raises(ValueError, match=match):
    recipe.get_config(arg)


def test_interpolation_and_verdict():
  assert sweep._interp(2.5, [1, 2, 3, 4], [0.5, 0.6, 0.8, 0.9]) == pytest.approx(0.7)
  assert sweep._interp(4.0, [1, 2, 3, 4], [0.5, 0.6, 0.8, 0.9]) == pytest.approx(0.9)
  assert sweep._interp(0.5, [1, 2], [0.5, 0.6]) is None
  rows = [{"kind": "fixed", "T_max": t, "accuracy": a, "name": f"fixed_T{t}", "energy_ratio": 0.1 * t}
          for t, a in ((1, 0.5), (2, 0.6), (3, 0.8), (4, 0.9))]
  rows += [{"kind": "learned", "name": "learned_a", "accuracy": 0.75, "T_avg": 2.5, "T_avg_op": 2.0,
            "energy_ratio": 0.35},
           {"kind": "learned", "name": "learned_b", "accuracy": 0.85, "T_avg": 3.0, "T_avg_op": 3.5,
            "energy_ratio": 0.05}]
  comparison = sweep.compare(rows)
  assert [c["gain_at_T_avg"] for c in comparison] == [pytest.approx(0.05), pytest.approx(0.05)]
  assert comparison[0]["gain_at_T_avg_op"] == pytest.approx(0.15)
  assert comparison[1]["gain_at_T_avg_op"] == pytest.approx(-0.0)
  assert comparison[0]["gain_at_energy"] == pytest.approx(0.75 - 0.85)   # fixed 0.8 at 0.3, 0.9 at 0.4
  assert comparison[1]["gain_at_energy"] is None   # below the cheapest fixed T: no interpolation
  text = sweep.verdict(comparison)
  assert "At equal average time steps, 2 of 2 learned-mask runs beat" in text
  assert "At equal energy, 0 of 1 learned-mask runs beat" in text


def test_sweep_runs_resumes_and_tabulates(tmp_path):
  """A smoke sweep on digits: every run in its own process and workdir, the ANN twin first; a rerun runs only
  what is missing; the table has one row per run. (The fixed-T comparison is tested above on given rows.)"""
  root = str(tmp_path / "runs")
  argv = [f"--root={root}", "--extra_arg=smoke,digits", "--fixed_t=", "--costs=0.05", "--op_costs=",
          "--no_report"]
  sweep.main(argv + ["--only=ann"])
  assert sweep.is_done(root, sweep.Run("ann", "ann", from_ann=False))
  assert not os.path.exists(os.path.join(root, "learned_0.05", "summary.json"))
  sweep.main(argv)   # resumes: runs only what is missing
  learned = json.load(open(os.path.join(root, "learned_0.05", "config.json")))
  assert learned["snn"]["init_from"].endswith(os.path.join("ann", "ann", "checkpoints"))
  assert learned["snn"]["time_cost"] == 0.05 and learned["model"]["num_steps"] == recipe.T_MAX
  timings = json.load(open(os.path.join(root, "timings.json")))
  assert {k: len(v) for k, v in timings.items()} == {"ann": 1, "learned_0.05": 1}
  results = json.load(open(os.path.join(root, "results.json")))
  rows = {r["name"]: r for r in results["rows"]}
  assert set(rows) == {"ann", "learned_0.05"}
  assert 0.0 <= rows["learned_0.05"]["T_avg"] <= recipe.T_MAX
  assert all(0.0 <= rows[n]["accuracy"] <= 1.0 for n in rows)
  assert results["comparison"][0]["fixed_at_T_avg"] is None   # no fixed-T run to compare with
  text = open(os.path.join(root, "results.md")).read()
  assert "| learned_0.05 | learned | 4 |" in text and os.path.exists(os.path.join(root, "accuracy_vs_steps.png"))


def test_snn_run_before_the_twin_is_refused(tmp_path):
  with pytest.raises(RuntimeError, match="run 'ann' first"):
    sweep.run_one(str(tmp_path), sweep.Run("fixed_T1", "fixed,T=1"))
