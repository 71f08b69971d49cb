"""dtvit.report: the sensitivity measures against hand values and a direct computation; the command's files and
numbers on a tiny run plus a fixed-T run of a sweep."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import dtvit
from dtvit import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  return tiny_run


def test_activation_error_against_hand_values():
  ann = np.full((3, 2, 4), 0.5, np.float32)
  snn = np.zeros((4, 3, 2, 4), np.float32)
  snn[0::2] = 1.0  # spikes at steps 1 and 3: rates r(1..4) = 1, 1/2, 2/3, 1/2
  snn[:, 2] = 7.0  # the third sample is padding: weight 0, so it must not count
  err_T, ref = report.activation_error_sums(ann, snn, np.array([1.0, 1.0, 0.0]))
  e = np.sqrt(np.asarray(err_T) / float(ref))
  np.testing.assert_allclose(e, [1.0, 0.0, 1.0 / 3.0, 0.0], atol=1e-6)


def test_sensitivity_table_against_hand_values():
  table = report.sensitivity_table({"blocks_0": [0.8, 0.4, 0.2, 0.2], "blocks_1": [0.5, 0.45, 0.42, 0.4],
                                    "blocks_2": [0.3, 0.3, 0.3, 0.3]})
  assert table["blocks_0"]["sensitivity"] == pytest.approx(0.6)
  assert table["blocks_0"]["T90"] == 3  # 0.6 of 0.6 removed at T = 3
  assert table["blocks_1"]["sensitivity"] == pytest.approx(0.1)
  assert table["blocks_1"]["T90"] == 4  # 0.08 of 0.1 at T = 3 is short of 90%
  assert table["blocks_2"]["sensitivity"] == 0.0 and table["blocks_2"]["T90"] == 1
  assert table["blocks_0"]["e_1"] == 0.8 and table["blocks_0"]["e_T"] == 0.2


def test_analysis_matches_a_direct_computation(run_dir):
  snn = dtvit.load(run_dir, "snn")
  ann = dtvit.load(run_dir, "ann")
  analysis = report.analyse_activations(snn, ann, num_batches=1, batch_size=16, hist_examples=4)
  images = next(snn.batches(batch_size=16))["image"]
  a = np.asarray(ann.apply(images)[1]["block_outputs"]["blocks_0"])  # [B, N, D]
  s = np.asarray(snn.variant(masks="off").apply(images)[1]["block_outputs"]["blocks_0"])  # [T*B, N, D]
  s = s.reshape(3, 16, *a.shape[1:])
  expected = [np.linalg.norm(s[:t].mean(0) - a) / np.linalg.norm(a) for t in (1, 2, 3)]
  np.testing.assert_allclose(analysis.errors["blocks_0"], expected, rtol=1e-4)
  masked = np.asarray(snn.apply(images)[1]["block_outputs"]["blocks_0"]).reshape(s.shape).mean(0)
  assert analysis.masked_errors["blocks_0"] == pytest.approx(np.linalg.norm(masked - a) / np.linalg.norm(a),
                                                             rel=1e-4)
  assert analysis.num_examples == 16 and analysis.values["blocks_0"]["ann"].size == 4 * a[0].size
  np.testing.assert_allclose(analysis.values["blocks_0"]["snn"], s[:, :4].mean(0).reshape(-1), rtol=1e-6)
  assert "ANN phase" in analysis.ann_source


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
