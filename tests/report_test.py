"""dtvit.report: the command's files and numbers on a tiny run plus a fixed-T run of a sweep; clear errors.
(The numbers themselves: tests/analysis_test.py.)"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

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
