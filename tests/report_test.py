"""dtvit.report: the command's files and numbers on a tiny run plus a fixed-T run of a sweep; clear errors.
(The numbers themselves: tests/analysis_test.py.)"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dtvit import plots
from dtvit import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  return tiny_run


def _fixed_t_run(run_dir, path):
  """A sweep member trained with masks disabled: its config.json and summary.json (all the sweep reads)."""
  os.makedirs(path)
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  config["model"]["mask"]["enabled"] = False
  summary = {"phases": ["ann", "snn"], "ann": {"test_accuracy": 0.25},
             "snn": {"test_accuracy": 0.125, "average_time_steps": 3.0, "op_weighted_time_steps": 3.0, "T_max": 3,
                     "energy": {"totals": {"snn_energy_j": 2e-6, "ann_energy_j": 4e-6, "energy_ratio": 0.5}}}}
  for name, value in (("config.json", config), ("summary.json", summary)):
    with open(os.path.join(path, name), "w") as f:
      json.dump(value, f)


@pytest.mark.slow
def test_report_command_on_a_sweep(run_dir, tmp_path):
  fixed = str(tmp_path / "sweep" / "fixed")
  _fixed_t_run(run_dir, fixed)
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", "dtvit.report", f"--workdir={run_dir}", f"--workdir={fixed}",
                  f"--out={out}", "--num_batches=1", "--thresholds=0,0.5,1"], cwd=ROOT, check=True,
                 env={**os.environ, "PYTHONPATH": ROOT},  # the XLA flags of the run: same numerics
                 capture_output=True, text=True)
  md = (out / "report.md").read_text()
  pngs = re.findall(r"\]\(([^)]+\.png)\)", md)
  assert sorted(pngs) == sorted(f"{p}.png" for p in report.PLOTS)
  for p in pngs:
    assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p

  result = json.loads((out / "report.json").read_text())
  with open(os.path.join(run_dir, "summary.json")) as f:
    snn = json.load(f)["snn"]
  main_row, fixed_row = result["runs"]
  assert main_row["masks"] == "learned" and main_row["accuracy"] == snn["test_accuracy"]
  assert main_row["T_avg"] == snn["average_time_steps"]
  assert main_row["snn_energy_uj"] == pytest.approx(snn["energy"]["totals"]["snn_energy_j"] * 1e6)
  assert fixed_row["masks"] == "fixed T" and fixed_row["accuracy"] == 0.125 and fixed_row["energy_ratio"] == 0.5
  # Masks off: no semantics, and every step simulated (T_avg = simulated steps = T).
  assert f"| {fixed_row['name']} | fixed T | - | 3 | 3.00 | 3.00 | 3.00 | 12.50 | - | 25.00 | 2 | 4 | 0.500 |  |" in md

  assert result["primary"]["steps_per_module"] == snn["per_module_time_steps"]
  assert result["primary"]["simulated_steps_per_module"] == snn["per_module_simulated_steps"]
  assert result["primary"]["average_time_steps"] == pytest.approx(snn["average_time_steps"])
  assert result["primary"]["average_simulated_steps"] == pytest.approx(snn["average_simulated_steps"])
  rows = {r["threshold"]: r for r in result["early_exit"]["rows"]}
  assert rows[1.0]["accuracy"] == pytest.approx(snn["test_accuracy"], abs=1e-9)  # no exit = the evaluation
  assert rows[1.0]["avg_steps"] == 3.0 and rows[0.0]["avg_steps"] == 1.0
  sens = result["sensitivity"]["blocks_0"]
  assert len(sens["errors"]) == 3 and all(np.isfinite(sens["errors"]))
  assert sens["sensitivity"] == pytest.approx(sens["errors"][0] - sens["errors"][-1])
  assert "S_b = e_b(1) - e_b(3)" in md  # the definition is in the report


def test_report_errors_for_a_missing_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    report.write_report([str(tmp_path / "nowhere")], str(tmp_path / "out"))
  with pytest.raises(ValueError, match="ann_params"):
    report.write_report([str(tmp_path)], ann_params="bogus")


def test_training_curves_section_reads_the_event_files(tmp_path):
  from dtvit import metrics
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"phases": "ann,snn,finetune"}))
  with metrics.MetricWriter(str(workdir / "ann")) as w:
    for step, loss in ((2, 2.0), (4, 1.0), (4, 1.0)):  # step 4 written twice (a resumed run)
      w.write_scalars(step, {"loss": loss, "accuracy": 0.5, "learning_rate": 1e-3})
    w.write_scalars(4, {"val_accuracy": 0.4, "test_accuracy": 0.45})
  with metrics.MetricWriter(str(workdir / "snn")) as w:
    w.write_scalars(3, {"loss": 0.5, "accuracy": 0.75, "average_time_steps": 2.5})
  curves = plots.training_curves(str(workdir), ["ann", "snn", "finetune"])
  assert list(curves) == ["ann", "snn"]  # finetune never ran: no event files
  assert curves["ann"]["loss"][0].tolist() == [2, 4] and curves["ann"]["loss"][1].tolist() == [2.0, 1.0]
  assert "learning_rate" not in curves["ann"]
  result = {"plots": {}}
  md = report._curves_section(str(workdir), result, str(tmp_path))
  assert "![training curves](training_curves.png)" in md
  assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert result["curves"]["snn"]["average_time_steps"] == {"steps": [3], "values": [2.5]}
  assert result["curves"]["ann"]["val_accuracy"]["values"] == [pytest.approx(0.4)]
  fig = plots.plot_training_curves(curves)
  (loss_ax, acc_ax, steps_ax) = fig.axes
  snn_loss = [line for line in loss_ax.lines if line.get_label() == "snn loss"][0]
  assert snn_loss.get_xdata().tolist() == [4 + 3]  # after the ANN's 4 steps
  assert [l.get_label() for l in steps_ax.lines if not l.get_label().startswith("_")] == ["snn average_time_steps"]


@pytest.mark.slow
def test_an_unfinished_run_is_refused_unless_asked_and_then_named_with_its_step(unfinished_run, tmp_path):
  out = tmp_path / "out"
  command = [sys.executable, "-m", "dtvit.report", f"--workdir={unfinished_run}", f"--out={out}"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 1 and proc.stdout == "" and len(err) == 1, proc.stderr[-3000:]
  assert err[0].startswith(f"error: dtvit.report: UnfinishedRunError: dtvit.load: the run in {unfinished_run} is "
                           f"unfinished (ann at step 16 of 16, snn not started)"), err
  assert "--allow_unfinished" in err[0]
  assert not (out / "report.md").exists()
  proc = subprocess.run(command + ["--allow_unfinished"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"dtvit.report: phase 'ann' at step 16 of 16 (UNFINISHED run {unfinished_run})" in proc.stderr
  assert "The primary run's latest phase is 'ann': no SNN to analyse." in (out / "report.md").read_text()
