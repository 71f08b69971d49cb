"""The size scan of the strong CIFAR-10 twin: accuracy after SCAN_EPOCHS against training speed, per size.

  python -m dtvit.sweep --config=experiments/cifar10_strong/config.py:scan --root=experiments/cifar10_strong/scan
  python -m experiments.cifar10_strong.scan --measure     # images/s of each size's ANN train step (quiet machine)
  python -m experiments.cifar10_strong.scan               # scan/scan.md and scan/scan.json from both

`--measure` times each size alone: `dtvit.main` trains MEASURE_STEPS steps of the scan's ANN config (batch 128,
resident data) and the last logged `images_per_s` (the mean over the last LOG_EVERY steps, after compilation) is
kept in `scan/throughput.json` with the CPU model. Run it with nothing else on the machine: the scan's own
train_time_s is measured beside other work and is an upper bound. The table gives, per size, its parameter
count, the measured images/s, the scan's test accuracy, wall and CPU time, and the hours that ANN_EPOCHS would
take at the measured speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCAN = os.path.join(HERE, "scan")
CONFIG = os.path.join(HERE, "config.py")
MEASURE_STEPS, LOG_EVERY = 60, 20


def _recipe():
  from dtvit import sweep
  return sweep.load_config_module(CONFIG)[0]


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0]} x {len(names)}" if names else platform.processor()
  except OSError:
    return platform.processor()


def measure(sizes) -> dict:
  """images/s of each size's ANN train step, each size alone in a fresh process."""
  out = {"cpu": cpu_model(), "steps": MEASURE_STEPS, "sizes": {}}
  for size in sizes:
    with tempfile.TemporaryDirectory() as workdir:
      proc = subprocess.run(
          [sys.executable, "-m", "dtvit.main", f"--config={CONFIG}:scan,size={size}",
           f"--config.ann.train_steps={MEASURE_STEPS}", f"--config.ann.log_every={LOG_EVERY}",
           "--config.eval_examples=1000", f"--workdir={workdir}/run"], capture_output=True, text=True, check=True)
    rates = re.findall(r"images_per_s=([\d.]+)", proc.stdout + proc.stderr)
    out["sizes"][size] = float(rates[-1])
    print(f"{size}: {out['sizes'][size]:.0f} images/s", flush=True)
  return out


def param_count(size: str) -> int:
  import jax
  import jax.numpy as jnp
  from dtvit import models
  config = _recipe().get_config(f"scan,size={size}")
  model = models.phase_model(config.model, 10, "ann")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def table() -> dict:
  recipe = _recipe()
  from dtvit import sweep
  rows = {r["name"]: r for r in sweep.read_table(SCAN)["rows"]}
  speed_path = os.path.join(SCAN, "throughput.json")
  speed = json.load(open(speed_path)) if os.path.exists(speed_path) else {"sizes": {}}
  images = recipe.ANN_EPOCHS * recipe.NUM_TRAIN
  out = []
  for size, (depth, dim, heads, mlp, pools) in recipe.SIZES.items():
    r = rows.get(f"scan_{size}", {})
    ips = speed["sizes"].get(size)
    out.append({"size": size, "depth": depth, "dim": dim, "heads": heads, "mlp_ratio": mlp,
                "stem_pools": list(pools), "params": param_count(size), "images_per_s": ips,
                "accuracy": r.get("accuracy") if r.get("state") == "done" else None, "state": r.get("state"),
                "train_time_s": r.get("train_time_s"), "cpu_time_s": r.get("cpu_time_s"),
                "twin_hours_at_measured_speed": images / ips / 3600 if ips else None})
  how = speed.get("source") or f"`--measure`, each size alone, {speed.get('steps', '?')} steps"
  md = [f"Scan: ANN only, {recipe.SCAN_EPOCHS} epochs each (cosine schedule to 0), batch {recipe.BATCH_SIZE}, "
        f"test accuracy on the 10,000 JPEG test images. images/s on {speed.get('cpu', '?')}: {how}. Wall and "
        f"CPU time: the scan's own runs, beside other work (upper bounds).",
        "", "| size | depth | dim | stem pools | params (M) | images/s | acc. after "
        f"{recipe.SCAN_EPOCHS} epochs (%) | wall (min) | CPU (min) | {recipe.ANN_EPOCHS} epochs at that speed (h) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
  cell = lambda v, spec, scale=1.0: "–" if v is None else format(v * scale, spec)
  for r in out:
    pools = "".join("P" if p else "-" for p in r["stem_pools"])
    md.append(f"| {r['size']} | {r['depth']} | {r['dim']} | {pools} | {r['params'] / 1e6:.2f} "
              f"| {cell(r['images_per_s'], '.0f')} | {cell(r['accuracy'], '.2f', 100)} "
              f"| {cell(r['train_time_s'], '.1f', 1 / 60)} | {cell(r['cpu_time_s'], '.1f', 1 / 60)} "
              f"| {cell(r['twin_hours_at_measured_speed'], '.1f')} |")
  text = "\n".join(md) + "\n"
  with open(os.path.join(SCAN, "scan.md"), "w") as f:
    f.write(text)
  with open(os.path.join(SCAN, "scan.json"), "w") as f:
    json.dump({"rows": out, "throughput": speed}, f, indent=2)
  print(text)
  return {"rows": out}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--measure", action="store_true", help="time each size's train step (writes throughput.json)")
  a = p.parse_args(argv)
  if a.measure:
    result = measure(list(_recipe().SIZES))
    with open(os.path.join(SCAN, "throughput.json"), "w") as f:
      json.dump(result, f, indent=2)
  table()
  return 0


if __name__ == "__main__":
  sys.exit(main())
