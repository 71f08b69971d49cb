"""The GPU check script (experiments/gpu/gpu_check.py) runs at smoke size on the CPU, so that a lent GPU is never
spent on a broken script."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_runs_at_smoke_size_on_cpu_and_times_every_variant(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "experiments.gpu.gpu_check", "--out", str(out), "--device", "cpu",
                         "--smoke", "--no-sj"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  from experiments.gpu import gpu_check
  for name, variants in (("gpu", gpu_check.VARIANTS.split(",")), ("gpu-b128", ["bf16"])):
    res = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.md").read_text().strip()
    timed = res["summary"]["variants"]
    assert sorted({row["variant"] for row in timed}) == sorted(variants)
    assert all(row["train_s"] > 0 for row in timed), timed
