"""experiments/cifar10_cpu: its sweep as data (run by dtvit.sweep), the analysis
(learned masks vs fixed T at equal simulated steps and at equal energy, per mask semantics, against the seed
spread; pending runs)."""

import importlib.util
import json
import math
import os
import sys

import pytest

from dtvit import sweep as dtvit_sweep
from dtvit import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(f"cifar10_cpu_{name}",
                                                os.path.join(ROOT, "experiments", "cifar10_cpu", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


analyse = _load("analyse")
recipe = _load("config")
RUNS = os.path.join(ROOT, "experiments", "cifar10_cpu", "runs")


def _points(arg=""):
  return {dtvit_sweep.point_name(p): p for p in recipe.get_sweep(arg)}


def test_the_sweep_as_data():
  points = _points()
  names = list(points)
  # ann, 4 fixed T, 3 costs x 2 semantics, the op-weighted cost x 2 semantics, 4 second seeds, then the exit
  # comparison's 4 runs; the twin first.
  assert names[0] == "ann" and len(names) == len(set(names)) == 1 + 4 + 6 + 2 + 4 + 4
  assert names[-4:] == list(EXIT_RUNS)
  assert {"learned_skip_0.03", "learned_filter_op_0.03", "fixed_T3_seed1", "learned_filter_0.03_seed1"} <= set(names)
  assert all(p["snn.init_from"] == "{root}/ann/ann/checkpoints" for n, p in points.items() if n != "ann")
  deps = dtvit_sweep.dependencies(list(points.values()), "/r")
  assert deps["ann"] == set() and all(deps[n] == {"ann"} for n in names[1:])
  config = lambda name, arg="": dtvit_sweep.point_config(recipe, arg, points[name], "/r")
  ann, fixed, learned = config("ann"), config("fixed_T3"), config("learned_filter_op_0.03")
  assert ann.phases == "ann" and ann.data.name == "cifar10_local"
  assert ann.ann.train_steps == recipe.ANN_EPOCHS * 50_000 // recipe.BATCH_SIZE
  assert fixed.phases == "snn" and fixed.model.max_time_steps == 3 and not fixed.model.mask.enabled
  assert fixed.snn.time_cost == 0.0 and fixed.snn.init_from == "/r/ann/ann/checkpoints"
  assert learned.model.max_time_steps == 4 and learned.model.mask.enabled
  assert (learned.snn.time_cost, learned.snn.cost_kind, learned.model.mask.semantics) == (0.03, "op_weighted",
                                                                                         "filter")
  assert config("fixed_T2_seed1").seed == 1 and config("fixed_T2").seed == 0
  # Every SNN run trains the same number of steps from the same twin: only T / the masks differ.
  assert fixed.snn.train_steps == learned.snn.train_steps == recipe.SNN_EPOCHS * 50_000 // recipe.BATCH_SIZE
  # T_max is an argument: fixed T = 1..T_max, learned at T_max.
  small = _points("T_max=2")
  assert [n for n in small if n.startswith("fixed_T") and n[len("fixed_T"):].isdigit()] == ["fixed_T1", "fixed_T2"]
  assert list(small)[-4:] == ["fixed_T2_every_step", "learned_skip_0.03_distill", "fixed_T2_distill",
                              "exit_learned_skip_0.03"]
  assert dtvit_sweep.point_config(recipe, "T_max=2", small["learned_skip_0.1"], "/r").model.max_time_steps == 2


# The per-sample exit comparison's runs (exit_compare.py), checked against their records once committed.
EXIT_RUNS = ("fixed_T4_every_step", "learned_skip_0.03_distill", "fixed_T4_distill", "exit_learned_skip_0.03")


def test_exit_comparison_points_are_their_base_runs_with_one_option():
  from dtvit import train
  points = _points()
  config = lambda name, arg="": dtvit_sweep.point_config(recipe, arg, points[name], "/r")
  flat = lambda name: dtvit_sweep.flatten(config(name).to_dict())
  def diff(a, b):
    fa, fb = flat(a), flat(b)
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}
  assert diff("fixed_T4_every_step", "fixed_T4") == {"snn.loss": ("every_step", "final")}
  distill = {"snn.distill_weight": (1.0, 0.0), "snn.distill_temperature": (2.0, 1.0)}
  assert diff("learned_skip_0.03_distill", "learned_skip_0.03") == distill
  assert diff("fixed_T4_distill", "fixed_T4") == distill
  assert diff("exit_learned_skip_0.03", "learned_skip_0.03") == {}   # the same run, its checkpoint kept
  for name in EXIT_RUNS:  # valid, also at smoke size (the twin: snn.init_from)
    train.validate_config(config(name))
    train.validate_config(dtvit_sweep.point_config(recipe, "smoke,digits", points[name], "/r"))


# Config keys added to dtvit since the committed runs were recorded, each at the value that keeps what the code
# did then (what the runs did): a recorded run lacks them, today's config has them at exactly this value.
ADDED_SINCE_RECORDED = {
    **{f"{p}.{k}": v for p in ("ann", "snn", "finetune") for k, v in (
        ("loss", "final"), ("distill_weight", 0.0), ("distill_temperature", 1.0), ("distill_from", ""),
        ("eval_every", 0), ("sync_every", 10), ("max_consecutive_skips", 100), ("mixup_off_step", 0),
        ("optimizer.clip_scores", True), ("optimizer.cooldown_steps", 0), ("optimizer.score_momentum", 0.9))},
    "data.val_examples": 0, "data.periodic_eval_split": "val", "data.placement": "host", "data.eval_crop_pct": 0.875,
    "data.augment.rrc_max_scale": 1.0, "data.augment.rrc_min_ratio": 0.75, "data.augment.rrc_max_ratio": 4 / 3,
    "data.augment.randaugment_magnitude_std": 0.0, "data.augment.randaugment_op_set": "dtvit",
    "data.augment.randaugment_prob": 1.0, "data.augment.random_erasing": 0.0,
    "model.pre_bn_bias": [], "model.dense_init": "lecun_normal", "model.conv_init": "lecun_normal",
    "model.head_init": "lecun_normal", "model.kernels": "fused", "model.neuron.surrogate_input": "normalized",
    "model.mask.score_init_spread": 0.0, "model.mask.semantics": "skip",
}
# Keys the runs recorded that dtvit has since dropped, with the value they had: the neuron scan's unroll factor (a
# compile-time choice: the same numbers).
REMOVED_SINCE_RECORDED = {"model.neuron.unroll": 1}


def test_the_sweep_reproduces_the_recorded_runs():
  """The port: each point's config is, key for key, the config its committed run recorded (read as dtvit reads
  a record: today's names, paths resolved against the workdir), but for the keys added since, each at the value
  the run had; the exit comparison's runs once committed."""
  for name, point in _points().items():
    if name in EXIT_RUNS and not os.path.exists(os.path.join(RUNS, name, "config.json")):
      continue
    saved = dtvit_sweep.flatten(workdir_lib.read_config(os.path.join(RUNS, name)))
    now = dtvit_sweep.flatten(dtvit_sweep.point_config(recipe, "", point, RUNS).to_dict())
    norm = lambda x: json.loads(json.dumps(x))  # noqa: E731
    removed = {k: saved[k] for k in saved.keys() - now.keys()}
    assert removed == {k: REMOVED_SINCE_RECORDED[k] for k in removed}, (name, removed)
    added = {k: now[k] for k in now.keys() - saved.keys()}
    assert not added.keys() - ADDED_SINCE_RECORDED.keys(), (name, added.keys() - ADDED_SINCE_RECORDED.keys())
    assert {k: norm(v) for k, v in added.items()} == {k: ADDED_SINCE_RECORDED[k] for k in added}, name
    diffs = {k: (saved[k], now[k]) for k in saved.keys() & now.keys() if norm(saved[k]) != norm(now[k])}
    assert not diffs, (name, diffs)


@pytest.mark.parametrize("arg,match", [
    ("T_max=0", "give 1 or more"),
    ("learned,cost=0.1", "unknown argument 'learned'"),
])
def test_recipe_rejects_bad_arguments(arg, match):
  with pytest.raises(ValueError, match=match):
    recipe.get_config(arg)
  with pytest.raises(ValueError, match=match):
    recipe.get_sweep(arg)


def test_interpolation():
  assert analyse._interp(2.5, [1, 2, 3, 4], [0.5, 0.6, 0.8, 0.9]) == pytest.approx(0.7)
  assert analyse._interp(4.0, [1, 2, 3, 4], [0.5, 0.6, 0.8, 0.9]) == pytest.approx(0.9)
  assert analyse._interp(1.0, [1, 2], [0.5, 0.6]) == pytest.approx(0.5)
  assert analyse._interp(0.5, [1, 2], [0.5, 0.6]) is None
  assert analyse._interp(4.5, [1, 2], [0.5, 0.6]) is None
  assert analyse.binomial_se(0.65, 10_000) == pytest.approx(0.00477, abs=1e-5)


# ------------------------------------------------------------------------------------------------------------
# A synthetic sweep: fake workdirs (config.json + summary.json, what dtvit.report.run_rows reads).

MODULES = ("blocks_0/attn", "blocks_0/mlp", "blocks_1/attn", "blocks_1/mlp")


def _write_run(root, name, *, acc, T=4, semantics=None, T_avg=None, T_sim=None, energy=None, kind="expected",
               cost=0.03, summary=True):
  """A finished (summary=True) or started (summary=False: config only) run in `root/name`. A learned run has
  masks (semantics set); a fixed one has T steps; 'ann' is the twin."""
  wd = os.path.join(root, name)
  os.makedirs(wd, exist_ok=True)
  learned = semantics is not None
  config = {"phases": "ann" if name == "ann" else "snn", "seed": int(name.endswith("_seed1")), "eval_examples": 0,
            "model": {"max_time_steps": T, "mask": {"enabled": learned, "semantics": semantics or "skip"}},
            "snn": {"init_from": "" if name == "ann" else os.path.join(root, "ann", "ann", "checkpoints"),
                    "time_cost": cost if learned else 0.0, "cost_kind": kind}}
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(config, f)
  if not summary:
    return
  if name == "ann":
    s = {"phases": ["ann"], "ann": {"steps": 100, "test_accuracy": acc}, "wall_time_s": 1.0}
  else:
    T_avg = float(T) if T_avg is None else T_avg
    T_sim = T_avg if T_sim is None else T_sim
    snn = {"steps": 50, "train_time_s": 1.0, "test_accuracy": acc, "T_max": T,
           "average_time_steps": T_avg, "op_weighted_time_steps": T_avg,
           "energy": {"totals": {"snn_energy_j": energy * 1e-5, "ann_energy_j": 1e-5, "energy_ratio": energy}}}
    if learned:
      snn.update(mask_semantics=semantics, average_simulated_steps=T_sim, op_weighted_simulated_steps=T_sim,
                 test_accuracy_fixed_T=acc - 0.1,
                 per_module_time_steps={m: T_avg for m in MODULES},
                 per_module_simulated_steps={m: T_sim for m in MODULES})
    else:   # what a fixed-T summary has: every unit active and simulated at every step
      snn.update(mask_semantics="skip", average_simulated_steps=float(T), op_weighted_simulated_steps=float(T))
    s = {"phases": ["snn"], "snn": snn, "wall_time_s": 1.0}
  with open(os.path.join(wd, "summary.json"), "w") as f:
    json.dump(s, f)


# Fixed-T curve: T=2 and T=3 have two seeds (means 0.602 and 0.6185; spreads 0.4 and 0.3 pts).
FIXED = {"fixed_T1": (1, 0.55, 0.10), "fixed_T2": (2, 0.600, 0.17), "fixed_T2_seed1": (2, 0.604, 0.17),
         "fixed_T3": (3, 0.620, 0.24), "fixed_T3_seed1": (3, 0.617, 0.24), "fixed_T4": (4, 0.63, 0.30)}


def write_synthetic_sweep(root):
  """A partial sweep in `root`: the twin, the fixed-T runs, four learned runs (both semantics, one seed pair),
  one started run; the rest of the recipe's sweep not started; and the sweep's table (what dtvit.sweep writes)."""
  _write_run(root, "ann", acc=0.70)
  for name, (t, acc, e) in FIXED.items():
    _write_run(root, name, T=t, acc=acc, energy=e)
  # 'skip': active = simulated steps. Two seeds of cost 0.03 (spread 0.5 pts: the largest).
  _write_run(root, "learned_skip_0.03", semantics="skip", acc=0.630, T_avg=2.0, energy=0.20)
  _write_run(root, "learned_skip_0.03_seed1", semantics="skip", acc=0.625, T_avg=2.0, energy=0.19)
  # 'filter': simulated > active. Cost 0.1 lies below fixed T=1 in simulated steps.
  _write_run(root, "learned_filter_0.03", semantics="filter", acc=0.605, T_avg=1.5, T_sim=3.0, energy=0.26)
  _write_run(root, "learned_filter_0.1", semantics="filter", acc=0.560, T_avg=0.5, T_sim=0.75, energy=0.12,
             cost=0.1)
  _write_run(root, "learned_skip_0.01", semantics="skip", acc=0.6, summary=False, cost=0.01)   # started
  points = recipe.get_sweep("")
  configs = [dtvit_sweep.point_config(recipe, "", p, root) for p in points]
  dtvit_sweep.write_table(root, dtvit_sweep.table(root, points, configs), dtvit_sweep.swept_keys(points))
  return root


@pytest.fixture
def synthetic_root(tmp_path):
  return write_synthetic_sweep(str(tmp_path / "runs"))


def test_analysis_of_a_synthetic_sweep(synthetic_root):
  root = synthetic_root
  all_runs = list(recipe.get_sweep(""))
  out = analyse.analyse(root, report=False)
  rows = {r["name"]: r for r in out["rows"]}
  assert set(rows) == {"ann", *FIXED, "learned_skip_0.03", "learned_skip_0.03_seed1", "learned_filter_0.03",
                       "learned_filter_0.1"}
  f = rows["learned_filter_0.03"]
  assert (f["semantics"], f["seed"], f["kind"], f["T_avg"], f["T_sim"], f["cost"]) == ("filter", 0, "learned", 1.5,
                                                                                        3.0, 0.03)
  assert f["per_module"]["blocks_0/mlp"] == 1.5 and f["per_module_sim"]["blocks_0/mlp"] == 3.0
  assert (rows["fixed_T3_seed1"]["seed"], rows["fixed_T3_seed1"]["semantics"], rows["fixed_T3_seed1"]["T_sim"]) == (
      1, None, 3.0)

  # Pending: every run without a summary; a workdir without one is 'started'.
  pending = {p["name"]: p["state"] for p in out["pending"]}
  assert pending["learned_skip_0.01"] == "started" and pending["learned_filter_op_0.03"] == "not started"
  assert len(pending) == len(all_runs) - len(rows) - len(EXIT_RUNS)   # the exit-comparison runs are not pending

  # The fixed-T curve: the mean over seeds at each T, with the spread.
  curve = {c["T"]: c for c in out["fixed_curve"]}
  assert curve[2]["accuracy"] == pytest.approx(0.602) and curve[2]["spread"] == pytest.approx(0.004)
  assert curve[1]["spread"] is None and curve[3]["runs"] == ["fixed_T3", "fixed_T3_seed1"]

  # Seed spread: |acc difference| per pair; the largest (learned_skip_0.03, 0.5 pts) is the threshold.
  spreads = {q["base"]: q["spread"] for q in out["seed_pairs"]}
  assert spreads == {"fixed_T2": pytest.approx(0.004), "fixed_T3": pytest.approx(0.003),
                     "learned_skip_0.03": pytest.approx(0.005)}
  assert out["noise"]["threshold"] == pytest.approx(0.005)
  assert out["noise"]["largest_seed_spread_of"] == "learned_skip_0.03" and out["noise"]["n_test"] == 10_000

  # Interpolation at SIMULATED steps (and energy), with the fixed curve's seed means; active steps labelled apart.
  c = {x["name"]: x for x in out["comparison"]}
  assert c["learned_skip_0.03"]["fixed_at_T_sim"] == pytest.approx(0.602)
  assert c["learned_skip_0.03"]["gain_at_T_sim"] == pytest.approx(0.028)
  assert c["learned_skip_0.03"]["gain_at_energy"] == pytest.approx(0.630 - (0.602 + 0.0165 * 3 / 7))
  assert c["learned_filter_0.03"]["fixed_at_T_sim"] == pytest.approx(0.6185)    # at T_sim = 3, not T_avg = 1.5
  assert c["learned_filter_0.03"]["gain_at_T_sim"] == pytest.approx(0.605 - 0.6185)
  assert c["learned_filter_0.03"]["gain_at_T_avg"] == pytest.approx(0.605 - 0.576)    # positive, but not the cost
  assert c["learned_filter_0.03"]["gain_at_energy"] == pytest.approx(0.605 - (0.6185 + 0.0115 / 3))
  # Below fixed T=1 in simulated steps: not interpolated; its accuracy against the cheapest fixed T instead.
  assert c["learned_filter_0.1"]["gain_at_T_sim"] is None
  assert c["learned_filter_0.1"]["gain_at_T_sim_vs_cheapest"] == pytest.approx(0.01)
  assert c["learned_filter_0.1"]["gain_at_energy"] == pytest.approx(0.56 - (0.55 + 0.052 * 2 / 7))

  # Verdicts per semantics, at equal simulated steps and at equal energy, against the 0.5-pt seed spread.
  assert out["judgements"] == {"skip": {"T_sim": "beat", "energy": "beat"},
                               "filter": {"T_sim": "lose", "energy": "mixed"}}
  text = out["verdict"]
  assert "largest seed-to-seed spread is 0.50 pts (learned_skip_0.03" in text
  assert "binomial standard error of a test accuracy on 10,000 images" in text
  assert "Learned 'skip' at equal simulated steps: YES" in text
  assert "learned_skip_0.03 +2.55 pts (seeds +2.80, +2.30) > spread" in text   # mean over the two seeds
  assert "Learned 'filter' at equal simulated steps: NO: learned masks are worse" in text
  # Fewer simulated steps than fixed T=1: its accuracy against T=1's instead.
  assert "against the cheapest fixed T: learned_filter_0.1 +1.00 pts (more accurate with less work)" in text
  assert "Learned 'filter' at equal energy: MIXED" in text and "learned_filter_0.1 -0.49 pts within spread" in text
  assert "'filter' at equal ACTIVE steps T_avg (active steps understate what" in text
  # The every-step and distillation runs are exit_compare.py's, neither pending nor judged here.
  assert "Provisional: 6 run(s) not finished" in text and not any(n in text for n in EXIT_RUNS)

  md = open(os.path.join(root, "results.md")).read()
  assert "| T_avg (active) | T_sim (simulated) |" in md
  assert "| learned_filter_0.03 | learned | filter | 0 | 4 | 60.50 |" in md
  assert "b0/attn 1.5/3" in md and "learned_skip_0.01 (started)" in md
  assert "| 2 | fixed_T2, fixed_T2_seed1 | 60.00, 60.40 | 60.20 | 0.40 |" in md
  assert all(f"- {line}\n" in md for line in text.split("\n"))
  assert [r["name"] for r in out["rows"]][:4] == ["ann", "fixed_T1", "fixed_T2", "fixed_T2_seed1"]
  saved = json.load(open(os.path.join(root, "results.json")))
  assert saved["verdict"] == text and saved["judgements"] == out["judgements"]
  assert os.path.getsize(os.path.join(root, "accuracy_vs_steps.png")) > 10_000


def test_verdict_without_seed_pairs_or_comparable_runs():
  """No seed pair: the binomial SE of a difference stands in for the spread (and says so); a semantics with no
  finished run, or none in the fixed-T range, gets no verdict; a summary without simulated steps (from before
  they were counted) is compared at active steps only."""
  rows = [{"kind": "fixed", "name": f"fixed_T{t}", "base": f"fixed_T{t}", "seed": 0, "T_max": t, "accuracy": a,
           "energy_ratio": 0.1 * t, "n_test": 10_000} for t, a in ((1, 0.5), (2, 0.6), (3, 0.8), (4, 0.9))]
  rows.append({"kind": "learned", "name": "learned_skip_0.1", "semantics": "skip", "accuracy": 0.75, "T_avg": 2.5,
               "T_sim": 2.5, "T_sim_op": 2.0, "T_avg_op": 2.0, "energy_ratio": 0.05, "n_test": 10_000})
  rows.append({"kind": "learned", "name": "learned_0.03", "semantics": "filter", "accuracy": 0.7, "T_avg": 2.0,
               "T_sim": None, "energy_ratio": None, "n_test": 10_000})
  comparison = analyse.compare(rows)
  assert comparison[0]["gain_at_T_sim"] == pytest.approx(0.05)
  assert comparison[0]["gain_at_T_sim_op"] == pytest.approx(0.15)
  assert comparison[0]["gain_at_energy"] is None and comparison[0]["gain_at_energy_vs_cheapest"] == pytest.approx(0.25)
  assert comparison[1]["gain_at_T_sim"] is None and comparison[1]["gain_at_T_avg"] == pytest.approx(0.1)
  nz = analyse.noise(rows, [])
  assert nz["largest_seed_spread"] is None
  assert nz["threshold"] == pytest.approx(math.sqrt(2) * analyse.binomial_se(nz["p"], 10_000))
  parts = analyse.verdict_parts(comparison, [], nz)
  assert parts["judgements"] == {"skip": {"T_sim": "beat", "energy": None}, "filter": {"T_sim": None,
                                                                                      "energy": None}}
  assert "no seed pair has finished" in parts["text"]
  assert "Learned 'filter' at equal simulated steps: no finished run lies within" in parts["text"]
  assert "Learned 'skip' at equal energy: no finished run lies within" in parts["text"]
  empty = analyse.verdict_parts([], [], nz)
  assert empty["judgements"]["skip"] == {"T_sim": None, "energy": None}
  assert "Learned 'skip': no run finished yet" in empty["text"]


@pytest.mark.slow
def test_sweep_runs_resumes_and_tabulates(tmp_path):
  """A smoke sweep on digits, run by dtvit.sweep: the ANN twin alone first, then a learned run from it in a child
  process (--parallel); a rerun skips what is done; the analysis has one row per finished run and lists the rest
  as pending. (The comparison with fixed T is tested above on synthetic summaries.)"""
  root = str(tmp_path / "runs")
  argv = [f"--config={os.path.join(ROOT, 'experiments', 'cifar10_cpu', 'config.py')}:smoke,digits,T_max=2",
          f"--root={root}"]
  assert dtvit_sweep.main(argv + ["--only=ann"]) == 0
  assert dtvit_sweep.state(os.path.join(root, "ann")) == "done"
  assert dtvit_sweep.state(os.path.join(root, "learned_skip_0.03")) == "pending"
  assert dtvit_sweep.main(argv + ["--only=ann", "--only=learned_skip_0.03", "--parallel=2"]) == 0
  learned = json.load(open(os.path.join(root, "learned_skip_0.03", "config.json")))
  assert learned["snn"]["init_from"] == "{workdir}/../ann/ann/checkpoints"   # no path of this machine
  assert learned["snn"]["time_cost"] == 0.03 and learned["model"]["max_time_steps"] == 2
  assert learned["model"]["mask"]["semantics"] == "skip"
  assert "dtvit.sweep point learned_skip_0.03" in open(os.path.join(root, "learned_skip_0.03.log")).read()
  timings = json.load(open(os.path.join(root, "timings.json")))
  assert {k: len(v) for k, v in timings.items()} == {"ann": 1, "learned_skip_0.03": 1}
  results = analyse.analyse(root, report=False)
  rows = {r["name"]: r for r in results["rows"]}
  assert set(rows) == {"ann", "learned_skip_0.03"}
  r = rows["learned_skip_0.03"]
  assert r["semantics"] == "skip" and r["seed"] == 0 and r["cost_kind"] == "expected" and r["T_max"] == 2
  assert 0.0 <= r["T_avg"] <= 2 and 0.0 <= r["T_sim"] <= 2
  assert set(r["per_module"]) == set(r["per_module_sim"])
  assert all(0.0 <= rows[n]["accuracy"] <= 1.0 for n in rows)
  assert len(results["pending"]) == len(list(recipe.get_sweep("T_max=2"))) - 2 - len(EXIT_RUNS)
  assert results["comparison"][0]["fixed_at_T_sim"] is None   # no fixed-T run to compare with
  assert results["judgements"]["skip"] == {"T_sim": None, "energy": None}
  text = open(os.path.join(root, "results.md")).read()
  assert "| learned_skip_0.03 | learned | skip | 0 | 2 |" in text and "learned_filter_0.03 (not started)" in text
  assert os.path.exists(os.path.join(root, "accuracy_vs_steps.png"))


def test_snn_run_before_the_twin_is_not_run(tmp_path, capsys):
  argv = [f"--config={os.path.join(ROOT, 'experiments', 'cifar10_cpu', 'config.py')}:smoke,digits",
          f"--root={tmp_path}", "--only=fixed_T1"]
  assert dtvit_sweep.main(argv) == 1
  out = capsys.readouterr()
  assert "fixed_T1: not run: it starts from ['ann'], not done" in out.out
  assert "not finished: fixed_T1" in out.err
  assert not os.path.exists(tmp_path / "fixed_T1" / "config.json")


def test_exit_comparison_reads_energy_off_each_curves_pareto_frontier():
  from experiments.cifar10_cpu import exit_compare
  pts = [{"energy_ratio": e, "accuracy": a} for e, a in ((0.1, 0.50), (0.2, 0.58), (0.15, 0.49), (0.3, 0.60),
                                                          (0.25, 0.55))]
  # (0.15, 0.49) and (0.25, 0.55) are beaten by cheaper points: off the frontier.
  assert [(p["energy_ratio"], p["accuracy"]) for p in exit_compare.frontier(pts)] == [(0.1, 0.5), (0.2, 0.58),
                                                                                      (0.3, 0.6)]
  assert exit_compare.accuracy_at(pts, 0.25) == pytest.approx(0.59)
  assert exit_compare.accuracy_at(pts, 0.05) is None and exit_compare.accuracy_at(pts, 0.31) is None
  rows = [{"name": "l", "kind": "learned", "semantics": "skip", "energy_ratio": 0.15, "accuracy": 0.56},
          {"name": "f", "kind": "learned", "semantics": "filter", "energy_ratio": 0.15, "accuracy": 0.9}]
  curves = [{"run": "e", "criterion": "confidence", "points": pts}]
  fixed = [{"energy_ratio": 0.1, "accuracy": 0.52}, {"energy_ratio": 0.3, "accuracy": 0.56}]
  c = exit_compare.compare(rows, curves, fixed)
  # Every exit point against the fixed-T curve at its energy (0.52 + 0.04 * (e - 0.1) / 0.2).
  assert c["exit_vs_fixed"][0]["gains"] == pytest.approx([-0.02, 0.04, -0.04, 0.04, 0.0])
  # Only the 'skip' learned run is compared, at its energy on the exit curve's frontier (0.54 at 0.15).
  assert [(e["learned"], e["gain"]) for e in c["learned_vs_exit"]] == [("l", pytest.approx(0.02))]
