"""experiments/cifar10_strong: its scan and sweep as data, and their smoke forms run by dtvit.sweep."""

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

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
  seeds = [n for n in names if n.startswith(f"learned_skip_{recipe.COSTS[0]:g}") and not n.endswith("ep")]
  assert len(seeds) == 3   # 3 seeds at the headline
  assert {"fixed_T2_seed1", "fixed_T3_seed1", "fixed_T4_every_step", "learned_skip_0.03"} <= set(names)
  for name in names[1:]:   # every SNN run: from the twin, skip masks, T_max 4, distilled
    c = dtvit_sweep.point_config(recipe, "", points[name], "/r")
    assert c.snn.init_from == "/r/ann/ann/checkpoints" and c.model.mask.semantics == "skip"
    assert c.snn.distill_weight > 0 and c.phases == "snn" and c.data.placement == "device"
  every = dtvit_sweep.point_config(recipe, "", points["fixed_T4_every_step"], "/r")
  assert every.snn.loss == "every_step" and not every.model.mask.enabled and every.model.max_time_steps == 4
  # last: the headline, then its fixed-T controls, each fine-tuned longer and otherwise as their 2-epoch runs
  ep = f"_{recipe.LONG_EPOCHS}ep"
  longs = [names[1], *recipe.LONG_CONTROLS]
  assert names[-len(longs):] == [n + ep for n in longs]
  for name in longs:
    short = dtvit_sweep.point_config(recipe, "", points[name], "/r")
    long = dtvit_sweep.point_config(recipe, "", points[name + ep], "/r")
    assert short.snn.train_steps == recipe.SNN_EPOCHS * recipe.NUM_TRAIN // recipe.BATCH_SIZE
    assert long.snn.train_steps == recipe.LONG_EPOCHS * recipe.NUM_TRAIN // recipe.BATCH_SIZE
    assert long.snn.optimizer.warmup_steps == long.snn.train_steps // 20
    for key in ("snn.time_cost", "seed", "model.max_time_steps", "model.mask.enabled", "snn.loss"):
      get = lambda c: functools.reduce(getattr, key.split("."), c)
      assert get(long) == get(short), (name, key)


def test_recipe_rejects_bad_arguments():
  with pytest.raises(ValueError, match="size='9-999'"):
    recipe.get_config("size=9-999")
  with pytest.raises(ValueError, match="unknown argument 'huge'"):
    recipe.get_sweep("huge")
  with pytest.raises(ValueError, match="steps='ten'"):
    recipe.get_config("steps=ten")
  assert recipe.get_config("smoke,digits,steps=7").snn.train_steps == 7


def _alive_with(text: str) -> list[int]:
  """The pids whose command line contains `text`."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
      continue
    if text in cmdline:
      pids.append(int(pid))
  return pids


@pytest.mark.slow
def test_runner_stops_on_sigterm_with_its_point_checkpointed(tmp_path):
  """SIGTERM to the runner reaches the point it is training: the point checkpoints its current step and stops,
  and the runner exits 143 (preempted) without starting anything else."""
  root = str(tmp_path / "runs")
  cmd = [sys.executable, "-m", "experiments.cifar10_strong.run", f"--root={root}",
         "--config_arg=smoke,digits,steps=100000", "--only=ann", "--only=fixed_T1"]
  runner = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  checkpoints = os.path.join(root, "ann", "ann", "checkpoints")
  deadline = time.time() + 300
  while not (os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))):
    assert runner.poll() is None and time.time() < deadline, runner.communicate()[0]
    time.sleep(0.5)
  runner.send_signal(signal.SIGTERM)
  out, _ = runner.communicate(timeout=120)
  assert runner.returncode == 143, out
  log = open(os.path.join(root, "ann.log")).read()
  assert "preempted: SIGTERM during ann: checkpoint saved at step" in log, log
  step = int(log.split("checkpoint saved at step ")[1].split(";")[0])
  assert 0 < step < 100000 and str(step) in os.listdir(checkpoints)
  assert not _alive_with(root)                                    # the point's process is gone too
  assert not os.path.exists(os.path.join(root, "fixed_T1"))       # nothing after the stopped point started


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


SMOKE_RUNS = ("ann", "learned_skip_0.01", "learned_skip_0.01_seed1", "fixed_T1", "fixed_T2", "fixed_T4_every_step",
              f"learned_skip_0.01_{recipe.LONG_EPOCHS}ep", f"fixed_T2_{recipe.LONG_EPOCHS}ep")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """experiments.cifar10_strong.run on the smoke form (digits): the twin, two seeds of the headline learned run,
  fixed T = 1 and 2, the every-step T = 4 run and the longer headline run, each SNN run followed by its exit
  evaluation."""
  from experiments.cifar10_strong import run as runner
  root = str(tmp_path_factory.mktemp("strong") / "runs")
  argv = [f"--root={root}", "--config_arg=smoke,digits", *[f"--only={n}" for n in SMOKE_RUNS]]
  assert runner.main(argv) == 0
  return root, argv


@pytest.mark.slow
def test_runner_trains_then_evaluates_exit_and_skips_what_is_done(smoke_runs):
  """Every SNN run is evaluated under exit right after it trains, its cost recorded; a rerun trains and
  evaluates nothing again; an unknown point is refused."""
  from experiments.cifar10_strong import run as runner
  root, argv = smoke_runs
  for name in SMOKE_RUNS[1:]:
    exit_record = json.load(open(os.path.join(root, name, "early_exit", "early_exit.json")))
    assert {r["criterion"] for r in exit_record["rows"]} == {"confidence", "entropy"}
  assert not os.path.exists(os.path.join(root, "ann", "early_exit"))   # the twin has no time steps to exit from
  costs = json.load(open(os.path.join(root, runner.EXIT_COSTS)))
  assert set(costs) == set(SMOKE_RUNS[1:]) and all(c["cpu_time_s"] > 0 for c in costs.values())
  logs = {n: os.path.getmtime(os.path.join(root, n)) for n in os.listdir(root) if n.endswith(".log")}
  assert runner.main(argv) == 0
  assert {n: os.path.getmtime(os.path.join(root, n)) for n in logs} == logs
  assert runner.main([f"--root={root}", "--config_arg=smoke,digits", "--only=no_such_run"]) == 2


@pytest.mark.slow
def test_analysis_of_the_smoke_runs(smoke_runs):
  """The analysis reads what the runs recorded: accuracies and CPU time from their summaries, the fixed-T curve
  as the mean over seeds, equal-energy accuracies that are the curves' own values at their own energies, exit
  curves from each run's early_exit.json, the winner as the best approach at each energy."""
  from experiments.cifar10_strong import analyse
  from experiments.cifar10_strong import run as runner
  root, _ = smoke_runs
  out = analyse.analyse(root)
  summaries = {n: json.load(open(os.path.join(root, n, "summary.json"))) for n in SMOKE_RUNS}
  rows = {r["name"]: r for r in out["rows"]}
  long, long_fixed = SMOKE_RUNS[-2:]   # the longer fine-tuning: apart, against its settings, the twin, each other
  assert set(rows) == set(SMOKE_RUNS) - {"fixed_T4_every_step", long, long_fixed}   # exit baseline: a series
  for name, r in rows.items():
    phase = "ann" if name == "ann" else "snn"
    assert r["accuracy"] == summaries[name][phase]["test_accuracy"]
  assert out["targets"]["twin"] == summaries["ann"]["ann"]["test_accuracy"]
  seeds = [summaries[n]["snn"]["test_accuracy"] for n in ("learned_skip_0.01", "learned_skip_0.01_seed1")]
  assert out["targets"]["accuracy"] == pytest.approx(sum(seeds) / 2)
  assert out["targets"]["spread"] == pytest.approx(abs(seeds[0] - seeds[1]))
  assert out["noise"]["threshold"] == pytest.approx(abs(seeds[0] - seeds[1]))   # the only seed pair
  (lr,) = out["targets"]["long"]
  assert lr["name"] == long and lr["steps"] == 3 * recipe.SMOKE_STEPS
  assert lr["accuracy"] == summaries[long]["snn"]["test_accuracy"]
  assert lr["gap"] == pytest.approx(out["targets"]["twin"] - lr["accuracy"])
  assert lr["gain"] == pytest.approx(lr["accuracy"] - sum(seeds) / 2)
  assert lr["gap_met"] == (lr["gap"] <= analyse.GAP_TARGET and lr["T_sim"] <= analyse.T_SIM_TARGET)
  fixed = {c["T"]: c for c in out["fixed_curve"]}
  assert sorted(fixed) == [1, 2] and fixed[1]["accuracy"] == summaries["fixed_T1"]["snn"]["test_accuracy"]
  for g in out["equal_energy"]:   # at a fixed T's own energy: the best fixed T at that energy or less
    for c in fixed.values():
      if g["energy_ratio"] == c["energy_ratio"]:
        best = max(f["accuracy"] for f in fixed.values() if f["energy_ratio"] <= c["energy_ratio"])
        assert g["accuracy"]["fixed T"] == pytest.approx(best, abs=1e-9)
    ranked = sorted((a, k) for k, a in g["accuracy"].items() if a is not None)
    if len(ranked) >= 2:
      assert g["winner"] == ranked[-1][1] and g["margin"] == pytest.approx(ranked[-1][0] - ranked[-2][0])
  every = json.load(open(os.path.join(root, "fixed_T4_every_step", "early_exit", "early_exit.json")))
  seenn = out["exit_curves"]["SEENN-I on fixed_T4_every_step"][0]["points"]
  assert [p["accuracy"] for p in seenn] == [r["accuracy"] for r in every["rows"] if r["criterion"] == "confidence"]
  costs = json.load(open(os.path.join(root, runner.EXIT_COSTS)))
  cpu = out["cpu"]["approaches"]
  assert cpu["ANN twin (shared by every SNN)"]["cpu_h"] == pytest.approx(summaries["ann"]["ann"]["cpu_time_s"] / 3600)
  assert cpu["SEENN-I / DT-SNN (every-step T = 4 + exit evaluation)"]["cpu_h"] == pytest.approx(
      (summaries["fixed_T4_every_step"]["snn"]["cpu_time_s"] + costs["fixed_T4_every_step"]["cpu_time_s"]) / 3600)
  text = open(os.path.join(root, "results.md")).read()
  assert "Published, not our run" in text and "At equal energy" in text and f"| {long} | 18 |" in text
  assert cpu["learned masks, longer fine-tuning"]["cpu_h"] == pytest.approx(
      summaries[long]["snn"]["cpu_time_s"] / 3600)
  assert cpu["fixed T, longer fine-tuning"]["runs"] == [long_fixed]
  # the longer runs against each other, at the same budget: the fixed one is the curve; learned is read off it
  lg = out["longer"]
  by = {r["name"]: r for r in lg["runs"]}
  assert list(by) == [long, long_fixed]
  acc_fixed = summaries[long_fixed]["snn"]["test_accuracy"]
  assert by[long_fixed]["accuracy"] == acc_fixed and by[long_fixed]["T_sim"] == 2
  assert by[long_fixed]["gain"] == pytest.approx(acc_fixed - fixed[2]["accuracy"])   # over fixed T = 2, 2 epochs
  assert by[long]["gain"] == pytest.approx(lr["gain"])
  assert [c["T"] for c in lg["curve"]] == [2] and lg["curve"][0]["accuracy"] == acc_fixed
  (c,) = lg["comparison"]
  assert c["name"] == long
  t_sim = summaries[long]["snn"]["average_simulated_steps"]
  assert c["gain_at_T_sim"] == (pytest.approx(lr["accuracy"] - acc_fixed) if t_sim == 2 else None)
  e_fixed = lg["curve"][0]["energy_ratio"]
  assert (c["fixed_below_energy"] is not None) == (e_fixed <= c["energy_ratio"])
  assert (c["fixed_above_energy"] is not None) == (e_fixed > c["energy_ratio"])
  assert f"| {long_fixed} | 18 |" in text
  assert os.path.getsize(os.path.join(root, "results.png")) > 10_000
