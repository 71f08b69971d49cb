"""The CIFAR-10 CPU sweep: which runs, a resumable runner, and the results table and plot.

  python experiments/cifar10_cpu/sweep.py --root=experiments/cifar10_cpu/runs            # run / resume all
  python experiments/cifar10_cpu/sweep.py --root=... --list                              # the runs, their state
  python experiments/cifar10_cpu/sweep.py --root=... --only=ann,fixed_T1                 # some runs
  python experiments/cifar10_cpu/sweep.py --root=... --analyse_only                      # table + plots only

Each run is one `python -m dtvit.main` process with its own workdir `<root>/<name>` (its log in
`<root>/<name>.log`). A run whose summary.json exists is done and skipped; an interrupted run resumes from its
latest checkpoint (dtvit.main does that when given the same config and workdir). The wall time of every
attempt is kept in `<root>/timings.json`, so a resumed run reports its total. When all runs are done:
`dtvit.report` over them (sensitivity, histograms, learned steps, spike rates, early exit) into
`<root>/report/` (primary run: the middle learned run), the same for the largest fixed-T run (its block
sensitivity against the ANN twin) in `<root>/report_fixed_T<T>/`, and `<root>/results.md` + `results.json` +
`accuracy_vs_steps.png` from `analyse`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Iterator, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(HERE, "config.py")
if REPO not in sys.path:
  sys.path.insert(0, REPO)

FIXED_T = (1, 2, 3, 4)
COST_WEIGHTS = (0.03, 0.01, 0.1)    # in run order: the middle cost first, so that it lands first
OP_WEIGHTED_COSTS = (0.03,)
SEMANTICS = ("skip", "filter")
# Second seeds (data order and augmentation; the same ANN twin): the seed-to-seed spread of the comparison.
SEED_RUNS = ("fixed_T2", "fixed_T3", "learned_skip_0.03", "learned_filter_0.03")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  arg: str                 # the config argument (see config.py)
  from_ann: bool = True    # starts from the ANN twin's checkpoint

  def command(self, root: str, *, extra_arg: str = "") -> list[str]:
    arg = ",".join(filter(None, (self.arg, extra_arg)))
    cmd = [sys.executable, "-m", "dtvit.main", f"--config={CONFIG}:{arg}",
           f"--workdir={os.path.join(root, self.name)}"]
    if self.from_ann:
      cmd.append(f"--config.snn.init_from={os.path.join(root, 'ann', 'ann', 'checkpoints')}")
    return cmd


def runs(fixed_t: Sequence[int] = FIXED_T, cost_weights: Sequence[float] = COST_WEIGHTS,
         op_weighted_costs: Sequence[float] = OP_WEIGHTED_COSTS, semantics: Sequence[str] = SEMANTICS,
         seed_runs: Sequence[str] = SEED_RUNS) -> Iterator[Run]:
  """The sweep, in the order it runs: the ANN twin first, as every SNN starts from it; then fixed T; then the
  learned runs, each cost under both mask semantics; then the second seeds of `seed_runs`."""
  yield Run("ann", "ann", from_ann=False)
  base = []
  for t in fixed_t:
    base.append(Run(f"fixed_T{t}", f"fixed,T={t}"))
  for w in cost_weights:
    for sem in semantics:
      base.append(Run(f"learned_{sem}_{w:g}", f"learned,cost={w:g},semantics={sem}"))
  for w in op_weighted_costs:
    for sem in semantics:
      base.append(Run(f"learned_{sem}_op_{w:g}", f"learned,cost={w:g},kind=op_weighted,semantics={sem}"))
  yield from base
  for run in base:
    if run.name in seed_runs:
      yield Run(f"{run.name}_seed1", f"{run.arg},seed=1")


def is_done(root: str, run: Run) -> bool:
  return os.path.exists(os.path.join(root, run.name, "summary.json"))


def _load_json(path: str, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _save_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def run_one(root: str, run: Run, *, extra_arg: str = "") -> None:
  """Runs (or resumes) one run to completion; raises if its process fails."""
  if run.from_ann and not is_done(root, Run("ann", "ann", from_ann=False)):
    raise RuntimeError(f"{run.name} starts from the ANN twin, which has not finished: run 'ann' first.")
  timings_path = os.path.join(root, "timings.json")
  cmd = run.command(root, extra_arg=extra_arg)
  print(f"[sweep] {run.name}: {' '.join(cmd)}", flush=True)
  t0 = time.time()
  with open(os.path.join(root, f"{run.name}.log"), "a") as log:
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
    log.flush()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH")))))
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
  elapsed = time.time() - t0
  timings = _load_json(timings_path, {})
  timings.setdefault(run.name, []).append({"start": t0, "seconds": round(elapsed, 1), "returncode": proc.returncode})
  _save_json(timings_path, timings)
  if proc.returncode != 0:
    raise RuntimeError(f"{run.name} failed (exit {proc.returncode}); see {os.path.join(root, run.name + '.log')}. "
                       "Rerun the sweep to resume it from its last checkpoint.")
  print(f"[sweep] {run.name}: done in {elapsed / 60:.1f} min", flush=True)


# ------------------------------------------------------------------------------------------------------------
# Analysis.


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float | None:
  """Piecewise-linear interpolation of the fixed-T curve; None outside [min(xs), max(xs)]."""
  pts = sorted(zip(xs, ys))
  for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
    if x0 <= x <= x1:
      return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
  if pts and x == pts[0][0]:
    return pts[0][1]
  return None


def collect(root: str, all_runs: Sequence[Run]) -> list[dict]:
  """One row per finished run, from its summary.json, config and timings."""
  from dtvit import report  # pylint: disable=g-import-not-at-top
  timings = _load_json(os.path.join(root, "timings.json"), {})
  done = [r for r in all_runs if is_done(root, r)]
  rows = []
  for run, row in zip(done, report.run_rows([os.path.join(root, r.name) for r in done])):
    summary = _load_json(os.path.join(root, run.name, "summary.json"), {})
    phase = "ann" if run.name == "ann" else "snn"
    s = summary.get(phase, {})
    row = dict(row, name=run.name, kind="ann" if run.name == "ann" else
               ("fixed" if run.name.startswith("fixed") else "learned"),
               steps=s.get("steps"), train_time_s=s.get("train_time_s"),
               wall_time_s=round(sum(a["seconds"] for a in timings.get(run.name, [])), 1),
               per_module=s.get("per_module_time_steps"))
    if run.name == "ann":
      row["accuracy"] = s.get("test_accuracy")
    rows.append(row)
  return rows


def compare(rows: Sequence[dict]) -> list[dict]:
  """For each learned run: the fixed-T accuracy interpolated at its average (and op-weighted) steps, and at its
  energy (which also counts the unmasked stem: T_max steps in a learned run, T in a fixed one)."""
  fixed = [r for r in rows if r["kind"] == "fixed" and r["accuracy"] is not None]
  xs, ys = [r["T_max"] for r in fixed], [r["accuracy"] for r in fixed]
  energies = [r["energy_ratio"] for r in fixed]
  out = []
  for r in rows:
    if r["kind"] != "learned" or r["accuracy"] is None:
      continue
    at_avg = _interp(r["T_avg"], xs, ys)
    at_op = _interp(r["T_avg_op"], xs, ys) if r["T_avg_op"] is not None else None
    at_e = (_interp(r["energy_ratio"], energies, ys)
            if r.get("energy_ratio") is not None and None not in energies else None)
    out.append({"name": r["name"], "T_avg": r["T_avg"], "T_avg_op": r["T_avg_op"], "accuracy": r["accuracy"],
                "fixed_at_T_avg": at_avg, "gain_at_T_avg": None if at_avg is None else r["accuracy"] - at_avg,
                "fixed_at_T_avg_op": at_op, "gain_at_T_avg_op": None if at_op is None else r["accuracy"] - at_op,
                "energy_ratio": r.get("energy_ratio"), "fixed_at_energy": at_e,
                "gain_at_energy": None if at_e is None else r["accuracy"] - at_e})
  return out


def _fmt(x, spec=".2f", scale=1.0):
  return "–" if x is None else format(x * scale, spec)


def results_markdown(rows: Sequence[dict], comparison: Sequence[dict]) -> str:
  lines = ["| run | masks | T_max | test acc. (%) | acc. all steps on (%) | T_avg | T_avg op-weighted | "
           "steps per module | energy / ANN | optimizer steps | wall time (min) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    per = ", ".join(f"{k.replace('blocks_', 'b').replace('embedding', 'emb')} {v:g}"
                    for k, v in (r.get("per_module") or {}).items()) if r["kind"] == "learned" else ""
    lines.append(
        f"| {r['name']} | {'–' if r['kind'] == 'ann' else r['masks']} | {r['T_max'] if r['kind'] != 'ann' else '–'} "
        f"| {_fmt(r['accuracy'], '.2f', 100)} | {_fmt(r.get('accuracy_all_steps'), '.2f', 100)} "
        f"| {_fmt(r['T_avg']) if r['kind'] != 'ann' else '–'} | {_fmt(r['T_avg_op']) if r['kind'] != 'ann' else '–'} "
        f"| {per} | {_fmt(r['energy_ratio'], '.3f')} | {r['steps']} | {_fmt(r['wall_time_s'], '.1f', 1 / 60)} |")
  if comparison:
    lines += ["", "Learned masks against the fixed-T curve (fixed-T accuracy linearly interpolated between the "
              "neighbouring fixed T runs at the learned run's steps):", "",
              "| learned run | T_avg | acc. (%) | fixed T at T_avg (%) | gain (pts) | T_avg op-weighted | "
              "fixed T at op-weighted (%) | gain (pts) | energy / ANN | fixed T at that energy (%) | gain (pts) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparison:
      lines.append(f"| {c['name']} | {_fmt(c['T_avg'])} | {_fmt(c['accuracy'], '.2f', 100)} "
                   f"| {_fmt(c['fixed_at_T_avg'], '.2f', 100)} | {_fmt(c['gain_at_T_avg'], '+.2f', 100)} "
                   f"| {_fmt(c['T_avg_op'])} | {_fmt(c['fixed_at_T_avg_op'], '.2f', 100)} "
                   f"| {_fmt(c['gain_at_T_avg_op'], '+.2f', 100)} | {_fmt(c['energy_ratio'], '.3f')} "
                   f"| {_fmt(c['fixed_at_energy'], '.2f', 100)} | {_fmt(c['gain_at_energy'], '+.2f', 100)} |")
  return "\n".join(lines) + "\n"


def verdict(comparison: Sequence[dict]) -> str:
  out = []
  for key, what in (("gain_at_T_avg", "average time steps"), ("gain_at_energy", "energy")):
    gains = [c[key] for c in comparison if c[key] is not None]
    if not gains:
      out.append(f"No learned run lies within the fixed-T range of {what}; no comparison at equal {what}.")
      continue
    better = sum(g > 0 for g in gains)
    out.append(f"At equal {what}, {better} of {len(gains)} learned-mask runs beat the fixed-T curve "
               f"(gains {', '.join(f'{100 * g:+.2f}' for g in gains)} pts; "
               f"mean {100 * sum(gains) / len(gains):+.2f}).")
  return " ".join(out)


def plot(rows: Sequence[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, ax_e) = plt.subplots(1, 2, figsize=(13, 5))
  fixed = sorted((r["T_max"], 100 * r["accuracy"]) for r in rows if r["kind"] == "fixed" and r["accuracy"])
  if fixed:
    ax.plot(*zip(*fixed), "s-", color="#4c72b0", label="fixed T (masks off), T = 1..4")
  _plot_energy(ax_e, rows)
  for kind, marker, color, label in (("expected", "o", "#dd8452", "learned masks, T_max 4 (expected-steps cost)"),
                                     ("op_weighted", "^", "#55a868", "learned masks, T_max 4 (op-weighted cost)")):
    pts = sorted((r["T_avg"], 100 * r["accuracy"], r["name"]) for r in rows if r["kind"] == "learned"
                 and r["accuracy"] and ("_op_" in r["name"]) == (kind == "op_weighted"))
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker + "-", color=color, label=label)
      for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -12), fontsize=7)
  ann = [r for r in rows if r["kind"] == "ann" and r["accuracy"]]
  if ann:
    ax.axhline(100 * ann[0]["accuracy"], ls="--", color="0.4", lw=1, label="ANN twin")
  ax.set_xlabel("average time steps per module (T_avg)")
  ax.set_ylabel("CIFAR-10 test accuracy (%)")
  ax.set_xlim(0, 4.5)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  ax.set_title("Spikformer-2-64, CIFAR-10: fixed T vs learned time steps")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot_energy(ax, rows: Sequence[dict]) -> None:
  """Accuracy vs estimated energy per image relative to the ANN twin (counts the stem's steps too)."""
  fixed = sorted((r["energy_ratio"], 100 * r["accuracy"], f"T={r['T_max']}") for r in rows
                 if r["kind"] == "fixed" and r["accuracy"] and r["energy_ratio"] is not None)
  learned = sorted((r["energy_ratio"], 100 * r["accuracy"], r["name"]) for r in rows
                   if r["kind"] == "learned" and r["accuracy"] and r["energy_ratio"] is not None)
  for pts, style, color, label in ((fixed, "s-", "#4c72b0", "fixed T (masks off)"),
                                   (learned, "o", "#dd8452", "learned masks, T_max 4")):
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label)
      for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -12), fontsize=7)
  ax.set_xlabel("estimated energy per image / ANN twin's (dtvit.energy)")
  ax.set_ylabel("CIFAR-10 test accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  ax.set_title("Accuracy vs energy (includes the unmasked stem)")


def analyse(root: str, all_runs: Sequence[Run], *, report: bool = True) -> dict:
  """Writes results.md / results.json / accuracy_vs_steps.png (and dtvit.report's report/) into root."""
  rows = collect(root, all_runs)
  comparison = compare(rows)
  text = results_markdown(rows, comparison) + "\n" + verdict(comparison) + "\n"
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(text)
  out = {"rows": rows, "comparison": comparison, "verdict": verdict(comparison)}
  _save_json(os.path.join(root, "results.json"), out)
  plot(rows, os.path.join(root, "accuracy_vs_steps.png"))
  snn = [r for r in all_runs if r.name != "ann" and is_done(root, r)]
  learned = [r for r in snn if r.name.startswith("learned")]
  if report and learned:
    # The primary run (first) is the learned run with the middle cost weight: its plots are the per-block ones.
    primary = learned[len(learned) // 2] if len(learned) < 3 else learned[1]
    workdirs = [os.path.join(root, primary.name)] + [os.path.join(root, r.name) for r in snn if r != primary]
    subprocess.run([sys.executable, "-m", "dtvit.report", *[f"--workdir={w}" for w in workdirs],
                    f"--out={os.path.join(root, 'report')}", "--num_batches=4"], cwd=REPO, check=True,
                   env=dict(os.environ, PYTHONPATH=REPO))
  fixed = [r for r in snn if r.name.startswith("fixed")]
  if report and fixed:
    # The block-sensitivity analysis on the SNN trained with every step (largest fixed T) against the twin.
    last = max(fixed, key=lambda r: int(r.name.rpartition("T")[2]))
    subprocess.run([sys.executable, "-m", "dtvit.report", f"--workdir={os.path.join(root, last.name)}",
                    f"--out={os.path.join(root, 'report_' + last.name)}", "--num_batches=4",
                    "--early_exit_batches=4"], cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=REPO))
  print(text, flush=True)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default=os.path.join(HERE, "runs"), help="Directory of the sweep's runs.")
  p.add_argument("--only", default="", help="Comma-separated run names (default: all).")
  p.add_argument("--list", action="store_true", help="List the runs and whether each is done.")
  p.add_argument("--analyse_only", action="store_true", help="Only write the table, plot and report.")
  p.add_argument("--no_report", action="store_true", help="Skip dtvit.report in the analysis.")
  p.add_argument("--extra_arg", default="", help="Appended to every run's config argument (e.g. 'smoke').")
  p.add_argument("--fixed_t", default=",".join(map(str, FIXED_T)), help="T of the fixed-T runs.")
  p.add_argument("--costs", default=",".join(map(str, COST_WEIGHTS)), help="Expected-steps cost weights.")
  p.add_argument("--op_costs", default=",".join(map(str, OP_WEIGHTED_COSTS)), help="Op-weighted cost weights.")
  a = p.parse_args(argv)
  floats = lambda s: tuple(float(x) for x in s.split(",") if x)
  all_runs = list(runs(fixed_t=[int(t) for t in a.fixed_t.split(",") if t], cost_weights=floats(a.costs),
                       op_weighted_costs=floats(a.op_costs)))
  names = [r.name for r in all_runs]
  only = [x for x in a.only.split(",") if x]
  unknown = [x for x in only if x not in names]
  if unknown:
    p.error(f"unknown run(s) {unknown}; the runs are: {', '.join(names)}")
  os.makedirs(a.root, exist_ok=True)
  if a.list:
    for r in all_runs:
      print(f"{r.name:18s} {'done' if is_done(a.root, r) else 'todo':5s} {' '.join(r.command(a.root))}")
    return 0
  if not a.analyse_only:
    for r in all_runs:
      if (not only or r.name in only) and not is_done(a.root, r):
        run_one(a.root, r, extra_arg=a.extra_arg)
  analyse(a.root, all_runs, report=not a.no_report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
