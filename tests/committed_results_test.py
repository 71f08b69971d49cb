"""The committed experiment results are what today's analysis makes of the committed runs.

Each `experiments/<name>/runs/results.md` is written by that experiment's `analyse.py` from the runs' records
(the sweep table, summaries, configs, exit evaluations). When the code or the table's column names move on
and the committed file does not, a reader sees figures the code no longer produces; this regenerates each one
from a copy of its runs (records only: no checkpoints, no dataset) and compares it byte for byte.
"""

import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_records(name: str, dst: str) -> str:
  src = os.path.join(ROOT, "experiments", name, "runs")
  out = os.path.join(dst, "runs")
  shutil.copytree(src, out, ignore=shutil.ignore_patterns("checkpoints", "events.out.tfevents.*", "report*"))
  return out


def _regenerated(name: str, tmp_path, analyse) -> tuple[str, str]:
  runs = _copy_records(name, str(tmp_path))
  with open(os.path.join(runs, "results.md")) as f:
    committed = f.read()
  os.remove(os.path.join(runs, "results.md"))
  analyse(runs)
  with open(os.path.join(runs, "results.md")) as f:
    return committed, f.read()


def test_cifar10_cpu_results_regenerate_from_its_runs(tmp_path):
  from experiments.cifar10_cpu import analyse
  committed, now = _regenerated("cifar10_cpu", tmp_path, lambda root: analyse.analyse(root, report=False))
  assert now == committed


def test_cifar10_strong_results_regenerate_from_its_runs(tmp_path):
  if not os.path.exists(os.path.join(ROOT, "experiments", "cifar10_strong", "runs", "results.md")):
    pytest.skip("no results.md committed yet")
  from experiments.cifar10_strong import analyse
  committed, now = _regenerated("cifar10_strong", tmp_path, analyse.analyse)
  assert now == committed
