"""Cost curves: train-step time and peak memory of dtvit (default and remat='blocks') and SpikingJelly against
T, batch and width, the other sizes at the benchmark model's (Spikformer depth 2, dim 128, batch 32, T 4).

Run (after `bash experiments/benchmarks/setup_torch_venv.sh`):
  .venv/bin/python experiments/benchmarks/benchmark.py --curves                # ~15 min on 2 CPU cores
  .venv/bin/python experiments/benchmarks/benchmark.py --curves --curve-sweeps=T --curve-rounds=1
Writes results/curves.json, curves.png and the block between the CURVES markers of README.md.

Each point builds both frameworks afresh (`benchmark.time_point`: SpikingJelly in a new worker, its peak memory
measured first) and times them in alternating rounds; the curves plot medians. Few rounds per point: the
curves are for shapes (how cost grows), the ratios are the main benchmark's.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import benchmark as bm

SWEEPS = {
    "T": [(t, {}) for t in (1, 2, 4, 8, 16)],
    "batch": [(4, {"batch": b}) for b in (8, 32, 128)],
    "width": [(4, {"dim": d, "heads": d // 32}) for d in (128, 256, 384)],
}
SIDES = ("dtvit", "dtvit[remat:blocks]", "sj")
LABELS = {"dtvit": "dtvit", "dtvit[remat:blocks]": "dtvit remat:blocks", "sj": "SpikingJelly"}


def x_of(sweep: str, T: int, size: dict, args) -> int:
  return {"T": T, "batch": size.get("batch", args.batch), "width": size.get("dim", args.dim)}[sweep]


def run(args, argv=None) -> dict:
  t_start = time.perf_counter()
  log = lambda *a: print(f"[{time.perf_counter() - t_start:6.0f}s]", *a, flush=True)
  sweeps = [s for s in args.curve_sweeps.split(",") if s]
  res = {"command": " ".join([".venv/bin/python", "experiments/benchmarks/benchmark.py"] + list(argv or [])),
         "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": bm.machine_info(),
         "rounds": args.curve_rounds, "base": {k: getattr(args, k) for k in ("batch", "dim", "depth", "heads")},
         "sj_analog_once": not args.sj_analog_per_step, "points": {}}
  log("machine", res["machine"])
  done = {}  # the base point lies on every sweep: measured once
  for sweep in sweeps:
    rows = []
    for T, size in SWEEPS[sweep]:
      key = (T,) + tuple(size.get(k, getattr(args, k)) for k in ("batch", "dim", "depth", "heads"))
      if key not in done:
        done[key] = bm.time_point(args, T, size, rounds=args.curve_rounds, variants=("fast", "remat:blocks"),
                                  log=log)
      pt = done[key]
      row = {"x": x_of(sweep, T, size, args), "T": T, **size}
      for side in SIDES:
        if side in pt:
          t = pt[side]["times"]["train"]
          row[side] = {"s": bm.med(t["wall"]), "min_s": min(t["wall"]), "cpu_s": bm.med(t["cpu"]),
                       "peak_MB": bm.peak_mb(pt[side])}
      rows.append(row)
      log(f"{sweep}={row['x']}: " + ", ".join(f"{s} {row[s]['s']:.2f} s {row[s]['peak_MB']:.0f} MB"
                                              for s in SIDES if s in row) + f"; load {os.getloadavg()[0]:.1f}")
    res["points"][sweep] = rows
  res["machine"]["load_average_end"] = os.getloadavg()
  res["wall_s"] = time.perf_counter() - t_start
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "curves.json").write_text(json.dumps(res, indent=1))
  png = bm.HERE / "curves.png"
  plot(res, png)
  table = render(res)
  print(table)
  if not args.no_readme:
    bm.write_readme(Path(args.readme), "curves", table)
  log(f"wrote {out / 'curves.json'} and {png}")
  return res


def plot(res: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sweeps = list(res["points"])
  fig, axes = plt.subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 7), squeeze=False)
  for j, sweep in enumerate(sweeps):
    rows = res["points"][sweep]
    xs = [r["x"] for r in rows]
    for i, (key, ylabel) in enumerate((("s", "train step s (median)"), ("peak_MB", "train peak MB"))):
      ax = axes[i][j]
      for side in SIDES:
        pts = [(r["x"], r[side][key]) for r in rows if side in r]
        if pts:
          ax.plot(*zip(*pts), marker="o", label=LABELS[side])
      # A line through the first point growing linearly with x: where a curve bends above it, cost grows
      # faster than linearly.
      if "dtvit" in rows[0]:
        y0 = rows[0]["dtvit"][key]
        ax.plot(xs, [y0 * x / xs[0] for x in xs], "k:", lw=1, label="linear from dtvit's first point")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xticks(xs, [str(x) for x in xs])
      ax.set_xlabel({"T": "T (time steps)", "batch": "batch", "width": "width (dim)"}[sweep])
      ax.set_ylabel(ylabel)
      ax.grid(True, which="both", alpha=0.3)
  axes[0][0].legend(fontsize=8)
  m = res["machine"]
  fig.suptitle(f"Spikformer train step, dtvit vs SpikingJelly ({m['cpu']}, {m['cores']} cores; medians of "
               f"{res['rounds']} rounds; {res['date']})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def render(res: dict) -> str:
  m = res["machine"]
  lines = [f"### curves: {res['date']}", "",
           f"Command: `{res['command']}` ({res['wall_s'] / 60:.1f} min). Machine: {m['cpu']}, {m['cores']} cores; "
           f"load average {m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end. "
           f"Base size {res['base']}, T 4; medians of {res['rounds']} rounds per point.", "",
           "![cost curves](curves.png)", "",
           "| sweep | x | dtvit s (per T) | remat:blocks s | SJ s (per T) | dtvit / SJ | peak MB dtvit / remat / SJ |",
           "|---|---|---|---|---|---|---|"]
  nan = {"s": float("nan"), "peak_MB": float("nan")}
  for sweep, rows in res["points"].items():
    for r in rows:
      d, rb, sj = r.get("dtvit", nan), r.get("dtvit[remat:blocks]", nan), r.get("sj", nan)
      per = lambda v: f" ({v / r['T']:.3f})" if sweep == "T" else ""  # noqa: E731
      lines.append(f"| {sweep} | {r['x']} | {d['s']:.2f}{per(d['s'])} | {rb['s']:.2f} | {sj['s']:.2f}{per(sj['s'])} | "
                   f"{d['s'] / sj['s']:.2f} | {d['peak_MB']:.0f} / {rb['peak_MB']:.0f} / {sj['peak_MB']:.0f} |")
  return "\n".join(lines)
