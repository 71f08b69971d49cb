"""`python -m dtvit.evaluate --early_exit`: a trained run under per-image early exit, its table and curves in the
workdir, and `dtvit.report`'s section for them."""

import json
import os
import shutil

import pytest

from dtvit import evaluate
from dtvit import report


@pytest.fixture(scope="module")
def exit_run(tiny_run, tmp_path_factory):
  """A copy of the tiny run (the shared one stays without early-exit files), evaluated under exit."""
  workdir = str(tmp_path_factory.mktemp("exit") / "run")
  shutil.copytree(tiny_run, workdir)
  evaluate.main([f"--workdir={workdir}", "--early_exit=confidence,entropy"])
  return workdir


@pytest.mark.slow
def test_early_exit_command_writes_table_and_curves(exit_run, capsys):
  out = os.path.join(exit_run, "early_exit")
  for name in ("early_exit.json", "early_exit.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, "early_exit.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out, "early_exit.json")) as f:
    result = json.load(f)
  with open(os.path.join(exit_run, "summary.json")) as f:
    snn = json.load(f)["snn"]
  for c in ("confidence", "entropy"):
    rows = [r for r in result["rows"] if r["criterion"] == c]
    assert [r["threshold"] for r in rows] == list(evaluate.EXIT_THRESHOLDS[c])
    # The last threshold never exits early: the run's own accuracy and energy report.
    last = rows[-1]
    assert last["avg_steps"] == result["T_max"] == snn["T_max"]
    assert last["accuracy"] == pytest.approx(snn["test_accuracy"])
    assert last["avg_energy_j"] == pytest.approx(snn["energy"]["totals"]["snn_energy_j"], rel=1e-5)
    # Looser thresholds stop no later and spend no more (the tiny run is barely confident: see below for exits).
    steps = [r["avg_steps"] for r in rows]
    energy = [r["avg_energy_j"] for r in rows]
    assert steps == sorted(steps) and energy == sorted(energy)
  assert result["no_exit"]["accuracy"] == pytest.approx(snn["test_accuracy"])
  md = open(os.path.join(out, "early_exit.md")).read()
  criteria = ("confidence", "entropy")
  assert [md.count(f"| {c} |") for c in criteria] == [len(evaluate.EXIT_THRESHOLDS[c]) for c in criteria]
  # The report draws it beside the run's other results.
  rep = {"plots": {}}
  report_dir = os.path.join(exit_run, "report_out")
  os.makedirs(report_dir)
  section = report._exit_eval_section(exit_run, rep, report_dir)
  assert f"![accuracy vs energy and steps]({report.EXIT_PLOT}.png)" in section
  assert rep["early_exit_evaluation"] == result and os.path.exists(os.path.join(report_dir, f"{report.EXIT_PLOT}.png"))
  no_exit_eval = os.path.dirname(exit_run)
  assert report._exit_eval_section(no_exit_eval, {"plots": {}}, report_dir) == []
  # Given thresholds apply to every criterion.
  small = evaluate.early_exit_workdir(exit_run, criteria=("entropy",), thresholds=(0.0, 1.0), write=False)
  assert [r["threshold"] for r in small["rows"]] == [0.0, 1.0] and small["rows"][1]["avg_steps"] == 1.0
  # Stopping every image after step 1 costs the stem and head of one step (its masks are all off): less energy.
  assert small["rows"][1]["avg_energy_j"] < small["rows"][0]["avg_energy_j"]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--early_exit=margin"], "unknown criteria"),
    (["--early_exit=entropy", "--thresholds=0.5,2"], "must lie in [0, 1]"),
    (["--early_exit=confidence", "--phase=ann"], "needs an SNN phase"),
])
def test_early_exit_command_errors_are_one_line(exit_run, args, message, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate.main([f"--workdir={exit_run}", *args])
  assert e.value.code == 1   # a user's mistake: one line, status 1, as every command after training
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
