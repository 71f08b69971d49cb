"""Runs experiments/benchmarks/benchmark.py on the GPU (see run_gpu_check.sh), within a time budget.

  python3 experiments/gpu/gpu_check.py --out DIR [--budget-s 540]
  .venv/bin/python experiments/gpu/gpu_check.py --out /tmp/g --device cpu --smoke \
      --torch-python experiments/benchmarks/.venv-torch/bin/python      # a CPU check of this script

First the same configuration as the CPU table (batch 32, T in {1, 2, 4, 8}, SpikingJelly on cuda, dtvit
variants ref / remat:spikes / remat:blocks / bf16 at T=4 and 8); then, if time is left, batch 128 at T=4 for
throughput. Results and markdown tables go to DIR (nothing is written into the repo there: only $OUT comes back).
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "benchmarks"))

import benchmark  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--budget-s", type=float, default=540)
  p.add_argument("--device", default="cuda")
  p.add_argument("--torch-python", default=sys.executable)
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the script, not the GPU")
  args = p.parse_args()
  t0 = time.perf_counter()
  common = ["--device", args.device, "--torch-python", args.torch_python, "--out-dir", args.out, "--no-readme"]
  runs = [
      ["--name", "gpu", "--rounds", "10", "--variants", "ref,remat:spikes,remat:blocks,bf16"] + common,
      ["--name", "gpu-b128", "--batch", "128", "--steps", "4,8", "--rounds", "10", "--variants", "bf16"] + common,
  ]
  if args.smoke:
    tiny = ["--steps", "1,2", "--rounds", "1", "--dim", "32", "--heads", "2", "--depth", "1", "--batch", "4",
            "--image", "16"]
    runs = [r[:2] + tiny + ["--variants", "ref,remat:spikes,remat:blocks,bf16"] + common for r in runs]
  for i, argv in enumerate(runs):
    if i and time.perf_counter() - t0 > args.budget_s / 2:
      print(f"skipping {argv[1]}: {time.perf_counter() - t0:.0f}s used of {args.budget_s:.0f}s", flush=True)
      break
    res = benchmark.main(argv)
    (Path(args.out) / f"{argv[1]}.md").write_text(benchmark.render(res, argv[1]) + "\n")


if __name__ == "__main__":
  main()
