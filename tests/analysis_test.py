"""dtvit.analysis: the sensitivity measures against hand values and a direct computation; the table of runs from
hand-made summaries (fixed T, an old 'filter' summary, an ANN from another run, unfinished runs); block membership
of masked units; where spike rates come from."""

import json
import os
import types

import numpy as np
import pytest

import dtvit
from dtvit import analysis
from dtvit import runs_table
from dtvit import masks


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  return tiny_run


def test_activation_error_against_hand_values():
  ann = np.full((3, 2, 4), 0.5, np.float32)
  snn = np.zeros((4, 3, 2, 4), np.float32)
  snn[0::2] = 1.0  # spikes at steps 1 and 3: rates r(1..4) = 1, 1/2, 2/3, 1/2
  snn[:, 2] = 7.0  # the third sample is padding: weight 0, so it must not count
  err_T, ref = analysis.activation_error_sums(ann, snn, np.array([1.0, 1.0, 0.0]))
  e = np.sqrt(np.asarray(err_T) / float(ref))
  np.testing.assert_allclose(e, [1.0, 0.0, 1.0 / 3.0, 0.0], atol=1e-6)


def test_sensitivity_table_against_hand_values():
  table = analysis.sensitivity_table({"blocks_0": [0.8, 0.4, 0.2, 0.2], "blocks_1": [0.5, 0.45, 0.42, 0.4],
                                      "blocks_2": [0.3, 0.3, 0.3, 0.3]})
  assert table["blocks_0"]["sensitivity"] == pytest.approx(0.6)
  assert table["blocks_0"]["T90"] == 3  # 0.6 of 0.6 removed at T = 3
  assert table["blocks_1"]["sensitivity"] == pytest.approx(0.1)
  assert table["blocks_1"]["T90"] == 4  # 0.08 of 0.1 at T = 3 is short of 90%
  assert table["blocks_2"]["sensitivity"] == 0.0 and table["blocks_2"]["T90"] == 1
  assert table["blocks_0"]["e_1"] == 0.8 and table["blocks_0"]["e_T"] == 0.2


@pytest.mark.slow
def test_analysis_matches_a_direct_computation(run_dir):
  snn = dtvit.load(run_dir, "snn")
  ann = dtvit.load(run_dir, "ann")
  activations = analysis.analyse_activations(snn, ann, num_batches=1, batch_size=16, hist_examples=4)
  images = next(snn.batches(batch_size=16))["image"]
  a = np.asarray(ann.apply(images)[1]["block_outputs"]["blocks_0"])  # [B, N, D]
  s = np.asarray(snn.variant(masks="off").apply(images)[1]["block_outputs"]["blocks_0"])  # [T*B, N, D]
  s = s.reshape(3, 16, *a.shape[1:])
  expected = [np.linalg.norm(s[:t].mean(0) - a) / np.linalg.norm(a) for t in (1, 2, 3)]
  np.testing.assert_allclose(activations.errors["blocks_0"], expected, rtol=1e-4)
  masked = np.asarray(snn.apply(images)[1]["block_outputs"]["blocks_0"]).reshape(s.shape).mean(0)
  assert activations.masked_errors["blocks_0"] == pytest.approx(np.linalg.norm(masked - a) / np.linalg.norm(a),
                                                                rel=1e-4)
  assert activations.num_examples == 16 and activations.values["blocks_0"]["ann"].size == 4 * a[0].size
  np.testing.assert_allclose(activations.values["blocks_0"]["snn"], s[:, :4].mean(0).reshape(-1), rtol=1e-6)
  assert "ANN phase" in activations.ann_source


def _workdir(root, name, config, summary=None, **mask):
  """A sweep member as the table reads it: config.json (the tiny config, `mask` overrides) and summary.json."""
  path = os.path.join(root, name)
  os.makedirs(path)
  config = json.loads(config().to_json())
  config["model"]["mask"].update(mask)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  if summary is not None:
    with open(os.path.join(path, "summary.json"), "w") as f:
      json.dump(summary, f)
  return path


def test_run_rows_from_summaries(tiny_config, tmp_path):
  root = str(tmp_path)
  ann = _workdir(root, "ann_run", tiny_config, {"ann": {"test_accuracy": 0.5}})
  learned = _workdir(root, "learned", tiny_config, {"ann": {"test_accuracy": 0.4}, "snn": {
      "test_accuracy": 0.3, "test_accuracy_fixed_T": 0.35, "average_time_steps": 1.5, "average_simulated_steps": 2.0,
      "op_weighted_time_steps": 1.25, "T_max": 3,
      "energy": {"totals": {"snn_energy_j": 1e-6, "ann_energy_j": 4e-6, "energy_ratio": 0.25}}}})
  fixed = _workdir(root, "fixed", tiny_config, {"snn": {"test_accuracy": 0.2, "average_time_steps": 3.0}},
                   enabled=False)
  # From before simulated steps were reported: 'filter' simulates up to the last active step (3, 2, 0).
  old = _workdir(root, "old", tiny_config, {"snn": {"test_accuracy": 0.1, "masks": {
      "blocks_0/attn": [1, 0, 1], "blocks_0/mlp": [0, 1, 0], "blocks_1/attn": [0, 0, 0]}}}, semantics="filter")
  with open(os.path.join(old, "config.json")) as f:
    config = json.load(f)
  config["snn"]["init_from"] = os.path.join(ann, "ann", "checkpoints")
  with open(os.path.join(old, "config.json"), "w") as f:
    json.dump(config, f)
  unfinished = _workdir(root, "unfinished", tiny_config)
  rows = runs_table.run_rows([learned, fixed, old, unfinished, ann, os.path.join(root, "nowhere")])
  by_name = {r["name"]: r for r in rows}
  assert list(by_name) == ["learned", "fixed", "old", "unfinished", "ann_run", "nowhere"]
  r = by_name["learned"]
  assert (r["masks"], r["semantics"], r["phase"], r["T_max"]) == ("learned", "skip", "snn", 3)
  assert (r["T_avg"], r["T_sim"], r["T_avg_op"], r["accuracy"], r["accuracy_all_steps"], r["ann_accuracy"]) == (
      1.5, 2.0, 1.25, 0.3, 0.35, 0.4)
  assert r["snn_energy_uj"] == pytest.approx(1.0) and r["energy_ratio"] == 0.25 and r["note"] == ""
  r = by_name["fixed"]
  assert (r["masks"], r["semantics"], r["T_sim"], r["T_sim_op"]) == ("fixed T", None, 3.0, 3.0)
  r = by_name["old"]
  assert r["semantics"] == "filter" and r["T_sim"] == pytest.approx(5 / 3) and r["ann_accuracy"] == 0.5
  assert r["note"] == f"ANN: the run it started from ({ann}); T_sim from its masks ('filter')"
  assert by_name["unfinished"]["note"] == "no summary.json (run unfinished?)"
  assert by_name["ann_run"]["note"] == "no SNN phase in summary.json" and by_name["ann_run"]["ann_accuracy"] == 0.5
  assert "does not exist" in by_name["nowhere"]["note"] and by_name["nowhere"]["masks"] is None


def test_run_names():
  assert runs_table.run_names(["/a/runs/x"]) == ["x"]
  assert runs_table.run_names(["/a/runs/x", "/a/runs/y/z"]) == ["x", "y/z"]


def test_average_steps_over_units():
  counts = masks.step_counts({"a": np.array([1.0, 0.0, 1.0]), "b": np.array([0.0, 1.0, 0.0])},
                             {"a": (masks.OUTPUT,), "b": (masks.OUTPUT,)}, "filter")
  assert masks.average_steps(counts, "active_steps") == 1.5
  assert masks.average_steps(counts, "simulated_steps") == 2.5  # a: steps 1..3, b: steps 1..2
  assert masks.average_steps({}) is None


def test_steps_in_block():
  steps = {"blocks_0/attn": 2.0, "blocks_0/mlp": 1.0, "blocks_1/attn": 3.0, "blocks_10/mlp": 0.0, "embedding": 3.0}
  assert analysis.steps_in_block(steps, "blocks_0") == {"attn": 2.0, "mlp": 1.0}
  assert analysis.steps_in_block(steps, "blocks_1") == {"attn": 3.0}  # not blocks_10's
  neurons = {"blocks_0/attn/q_lif": 2.0, "blocks_0/mlp/fc1_lif": 1.0}  # granularity 'layer'
  assert analysis.steps_in_block(neurons, "blocks_0") == {"q_lif": 2.0, "fc1_lif": 1.0}


def test_spike_rates_prefer_the_whole_test_split():
  measured = types.SimpleNamespace(spike_rates={"blocks_0/attn/q_lif": np.array([0.5, 0.25])}, num_examples=8)
  rates, source = analysis.spike_rates(types.SimpleNamespace(summary=None), measured)
  assert rates == {"blocks_0/attn/q_lif": [0.5, 0.25]} and source.startswith("8 test images")
  summary = {"spike_rates": {"blocks_0/attn/q_lif": [0.1, 0.2]}}
  rates, source = analysis.spike_rates(types.SimpleNamespace(summary=summary), measured)
  assert rates == summary["spike_rates"] and "summary.json" in source


def test_ann_reference(run_dir):
  snn = dtvit.load(run_dir, "snn")
  assert analysis.ann_reference(snn, "snn") is None
  assert analysis.ann_reference(snn, "auto").phase == "ann"
  with pytest.raises(ValueError, match="ann_params"):
    analysis.ann_reference(snn, "bogus")


def test_a_sweep_root_expands_into_its_points(tmp_path):
  root = tmp_path / "sweep"
  for name in ("snn.time_cost=0.1", "snn.time_cost=0.03"):
    (root / name).mkdir(parents=True)
    (root / name / runs_table.SWEEP_RECORD).write_text("{}")
  (root / "notes").mkdir()  # not a point
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  assert runs_table.expand_sweeps([str(run), str(root)]) == [
      str(run), str(root / "snn.time_cost=0.03"), str(root / "snn.time_cost=0.1")]
  assert runs_table.expand_sweeps([str(tmp_path / "missing")]) == [str(tmp_path / "missing")]
