"""Runs experiments/benchmarks/benchmark.py on the GPU (see run_gpu_check.sh), within a time budget.

From the repository root:
  python3 -m experiments.gpu.gpu_check --out DIR [--budget-s 540]
  .venv/bin/python -m experiments.gpu.gpu_check --out /tmp/g --device cpu --smoke --no-sj  # the test suite's check

First the same configuration as the CPU table (batch 32, T in {1, 2, 4, 8}, SpikingJelly on cuda, dtvit
variants VARIANTS at the two largest T); then, if time is left, batch 128 at T=4 and 8 for throughput. Results
and markdown tables go to DIR (nothing is written into the repo there: only $OUT comes back).
tests/gpu_check_test.py runs `--smoke --no-sj` on the CPU, so the script a lent GPU runs is always one that works.
"""

import argparse
import sys
import time
from pathlib import Path

from experiments.benchmarks import benchmark

# dtvit variants timed beside the default kernels (benchmark.make_dtvit): XLA's own gradients, the backward
# recomputing each block, bf16 matmuls.
VARIANTS = "ref,remat:blocks,bf16"


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--budget-s", type=float, default=540)
  p.add_argument("--device", default="cuda")
  p.add_argument("--torch-python", default=sys.executable)
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the script, not the GPU")
  p.add_argument("--no-sj", action="store_true", help="dtvit only (no SpikingJelly in this python)")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  common = ["--device", args.device, "--torch-python", args.torch_python, "--out-dir", args.out, "--no-readme"]
  common += ["--no-sj"] if args.no_sj else []
  runs = [
      ["--name", "gpu", "--rounds", "10", "--variants", VARIANTS] + common,
      ["--name", "gpu-b128", "--batch", "128", "--steps", "4,8", "--rounds", "10", "--variants", "bf16"] + common,
  ]
  if args.smoke:
    tiny = ["--quick", "--steps", "2", "--rounds", "1", "--dim", "16", "--heads", "2", "--depth", "1", "--batch", "4",
            "--image", "8"]
    runs = [r[:2] + tiny + ["--variants", r[r.index("--variants") + 1]] + common for r in runs]
  for i, argv in enumerate(runs):
    if i and time.perf_counter() - t0 > args.budget_s / 2:
      print(f"skipping {argv[1]}: {time.perf_counter() - t0:.0f}s used of {args.budget_s:.0f}s", flush=True)
      break
    res = benchmark.main(argv)
    (Path(args.out) / f"{argv[1]}.md").write_text(benchmark.render(res, argv[1]) + "\n")


if __name__ == "__main__":
  main()
