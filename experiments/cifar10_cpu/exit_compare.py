"""Per-sample early exit against learned module masks, at equal energy, on the CPU CIFAR-10 twin.

  python -m dtvit.sweep --config=experiments/cifar10_cpu/config.py --root=experiments/cifar10_cpu/runs
  python -m experiments.cifar10_cpu.exit_compare --root=experiments/cifar10_cpu/runs

Two ways to save time steps, on the same ANN twin (`<root>/ann`):
- learned module masks (`learned_skip_<cost>`): each module learns which steps it works at, for every input;
- per-sample exit: a fixed-T = 4 SNN stops an image once its accumulated output is confident enough, SEENN-I's
  max-softmax criterion ('confidence', threshold theta) or DT-SNN's entropy criterion ('entropy'). The run trained
  for it is `fixed_T4_every_step` (the cross-entropy of the accumulated logits at every step); `fixed_T4_distill`
  (trained on the final output, with distillation) under the same exit shows what that training buys;
- the combination: the learned-mask run under per-sample exit (`exit_learned_skip_0.03`: `learned_skip_0.03`
  trained again with its checkpoint kept, and `learned_skip_0.03_distill`);
- distillation from the twin (`*_distill`) beside the same runs without it.

For each run under exit this reads `<run>/early_exit/early_exit.json` (written by `python -m dtvit.evaluate
--workdir=<run> --early_exit=confidence,entropy`, run here when missing): for each threshold, the accuracy on the
10,000 test images, the steps each image ran and its energy (`dtvit.energy.energy_by_exit`: the stem at the
steps the image ran, each module at its working steps up to the exit, the head at the steps run). Energies are
ratios to the ANN twin's energy, as in `results.md`.

At equal energy, a curve's accuracy is read off its Pareto frontier (the points no other point of the curve beats
in both accuracy and energy), linearly interpolated; no value outside the curve's energy range. Gains are judged
against the sweep's largest seed-to-seed spread (`analyse.noise`). Writes `<root>/exit_results.md`,
`exit_results.json` and `exit_vs_energy.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Sequence

from dtvit import loader
from dtvit import sweep as dtvit_sweep
from experiments.cifar10_cpu import analyse

HERE = os.path.dirname(os.path.abspath(__file__))
# Runs evaluated under per-sample exit, with what each stands for.
EXIT_RUNS = {
    "fixed_T4_every_step": "fixed T = 4, every-step loss",
    "fixed_T4_distill": "fixed T = 4, final loss + distillation",
    "exit_learned_skip_0.03": "learned masks (skip, 0.03) + exit",
    "learned_skip_0.03_distill": "learned masks (skip, 0.03), distilled, + exit",
}
CRITERIA = {"confidence": "SEENN-I (max softmax >= theta)", "entropy": "DT-SNN (entropy <= theta)"}
# Distilled runs and the runs they differ from only in distillation.
DISTILLED = {"learned_skip_0.03_distill": "learned_skip_0.03", "fixed_T4_distill": "fixed_T4"}


def ensure_exit_eval(workdir: str) -> dict:
  """`<workdir>/early_exit/early_exit.json`, made by `dtvit.evaluate --early_exit` when missing."""
  path = os.path.join(workdir, "early_exit", "early_exit.json")
  if not os.path.exists(path):
    subprocess.run([sys.executable, "-m", "dtvit.evaluate", f"--workdir={workdir}",
                    "--early_exit=" + ",".join(CRITERIA)], check=True)
  with open(path) as f:
    return json.load(f)


def exit_curves(root: str, name: str, result: dict, what: str | None = None) -> list[dict]:
  """One curve per criterion of a run's early-exit table: points with threshold, accuracy, steps run, energy
  ratio (the image's energy up to its exit over the ANN twin's energy). `what`: the run's label (default
  `EXIT_RUNS[name]`)."""
  summary = loader.read_summary(os.path.join(root, name)) or {}
  ann_energy = summary["snn"]["energy"]["totals"]["ann_energy_j"]
  curves = []
  for criterion in CRITERIA:
    rows = [r for r in result["rows"] if r["criterion"] == criterion]
    if not rows:
      continue
    points = [{"threshold": r["threshold"], "accuracy": r["accuracy"], "steps": r["avg_steps"],
               "module_steps": r.get("avg_module_steps"), "sim_steps": r.get("avg_simulated_steps"),
               "energy_ratio": r["avg_energy_j"] / ann_energy}
              for r in rows]
    curves.append({"run": name, "criterion": criterion, "label": f"{what or EXIT_RUNS[name]}, {CRITERIA[criterion]}",
                    "points": points})
  return curves


def frontier(points: Sequence[dict]) -> list[dict]:
  """The Pareto frontier in (energy_ratio, accuracy): sorted by energy, each point more accurate than every
  cheaper one."""
  out = []
  for p in sorted(points, key=lambda p: (p["energy_ratio"], -p["accuracy"])):
    if not out or p["accuracy"] > out[-1]["accuracy"]:
      out.append(p)
  return out


def accuracy_at(points: Sequence[dict], energy: float) -> float | None:
  """The curve's accuracy at `energy` (its frontier, linearly interpolated); None outside its energy range."""
  f = frontier(points)
  return analyse._interp(energy, [p["energy_ratio"] for p in f], [p["accuracy"] for p in f])


def compare(rows: Sequence[dict], curves: Sequence[dict], fixed: Sequence[dict]) -> dict:
  """Gains at equal energy: every exit curve against the fixed-T curve and against each learned 'skip' run;
  each distilled run against its undistilled sibling."""
  fixed_pts = [{"energy_ratio": c["energy_ratio"], "accuracy": c["accuracy"]} for c in fixed
               if c.get("energy_ratio") is not None]
  learned = [r for r in rows if r["kind"] == "learned" and r["semantics"] == "skip"]
  out = {"exit_vs_fixed": [], "learned_vs_exit": [], "distill": []}
  for c in curves:
    gains = []
    for p in c["points"]:
      at = accuracy_at(fixed_pts, p["energy_ratio"])
      gains.append(None if at is None else p["accuracy"] - at)
    out["exit_vs_fixed"].append({"run": c["run"], "criterion": c["criterion"], "gains": gains})
  for r in learned:
    for c in curves:
      if c["run"] == r["name"]:
        continue
      at = accuracy_at(c["points"], r["energy_ratio"])
      out["learned_vs_exit"].append({"learned": r["name"], "energy_ratio": r["energy_ratio"],
                                     "accuracy": r["accuracy"], "run": c["run"], "criterion": c["criterion"],
                                     "exit_accuracy": at, "gain": None if at is None else r["accuracy"] - at})
  return out


def _cell(x, spec=".2f", scale=100.0) -> str:
  return "–" if x is None else format(x * scale, spec)


def headline(comparison: dict, curves: Sequence[dict], thr: float,
             baselines: Sequence[str] = ("fixed_T4_every_step", "fixed_T4_distill")) -> list[str]:
  """The verdict: learned masks against per-sample exit at equal energy, per exit curve of a run without masks
  (`baselines`); and, per run with masks under exit, the cheapest threshold whose accuracy stays within the noise
  of no exit."""
  lines = []
  for run in baselines:
    for criterion in CRITERIA:
      g = [e["gain"] for e in comparison["learned_vs_exit"]
           if e["run"] == run and e["criterion"] == criterion and e["gain"] is not None]
      if g:
        lines.append(f"**Learned masks vs {CRITERIA[criterion]} on {run}**, at equal energy: {min(g) * 100:+.2f} to "
                     f"{max(g) * 100:+.2f} pts (mean {100 * sum(g) / len(g):+.2f}) over {len(g)} learned 'skip' runs; "
                     f"{sum(x > thr for x in g)} beyond the noise, {sum(x < -thr for x in g)} below it.")
  for c in curves:
    if not c["run"].startswith(("exit_learned", "learned")):
      continue
    full = max(c["points"], key=lambda p: p["steps"])
    ok = [p for p in c["points"] if p["accuracy"] >= full["accuracy"] - thr]
    best = min(ok, key=lambda p: p["energy_ratio"])
    lines.append(f"**Combination** {c['run']} + {c['criterion']} exit: threshold {best['threshold']:g} keeps "
                 f"{100 * best['accuracy']:.2f}% (no exit: {100 * full['accuracy']:.2f}%) at energy "
                 f"{best['energy_ratio']:.3f} instead of {full['energy_ratio']:.3f} "
                 f"({100 * (1 - best['energy_ratio'] / full['energy_ratio']):.0f}% less), {best['steps']:.2f} steps "
                 f"run per image.")
  return lines


def markdown(rows, curves, fixed, comparison, variants, nz) -> str:
  """The tables and the verdict, in Markdown."""
  thr = nz["threshold"]
  md = ["| series | run | threshold | test acc. (%) | steps run | energy / ANN |", "|---|---|---|---|---|---|"]
  for c in fixed:
    md.append(f"| fixed T (mean of {len(c['runs'])} seed(s)) | {', '.join(c['runs'])} | – | {_cell(c['accuracy'])} "
              f"| {c['T']} | {_cell(c['energy_ratio'], '.3f', 1)} |")
  for r in rows:
    if r["kind"] == "learned" and r["semantics"] == "skip":
      md.append(f"| learned masks (skip) | {r['name']} | – | {_cell(r['accuracy'])} | {r['T_sim']:.2f} "
                f"| {_cell(r['energy_ratio'], '.3f', 1)} |")
  for v in variants:
    md.append(f"| {v['what']} | {v['name']} | – | {_cell(v['accuracy'])} | {v['T_sim']:.2f} "
              f"| {_cell(v['energy_ratio'], '.3f', 1)} |")
  for c in curves:
    for p in c["points"]:
      md.append(f"| {c['label']} | {c['run']} | {p['threshold']:g} | {_cell(p['accuracy'])} | {p['steps']:.2f} "
                f"| {_cell(p['energy_ratio'], '.3f', 1)} |")
  lines = [f"Noise: gains count as real only beyond ±{100 * thr:.2f} pts ({nz['threshold_source']})."]
  lines += headline(comparison, curves, thr)
  for e in comparison["exit_vs_fixed"]:
    g = [x for x in e["gains"] if x is not None]
    if g:
      lines.append(f"{e['run']} under {e['criterion']} exit against the fixed-T curve at equal energy: "
                   f"{min(g) * 100:+.2f} to {max(g) * 100:+.2f} pts over the {len(g)} thresholds inside the fixed-T "
                   f"energy range.")
  for e in comparison["learned_vs_exit"]:
    if e["gain"] is not None:
      verdict = ("learned masks ahead" if e["gain"] > thr else "exit ahead" if e["gain"] < -thr
                 else "level within the noise")
      lines.append(f"{e['learned']} ({_cell(e['accuracy'])}% at {e['energy_ratio']:.3f}) against {e['run']} "
                   f"under {e['criterion']} exit at the same energy ({_cell(e['exit_accuracy'])}%): "
                   f"{e['gain'] * 100:+.2f} pts, {verdict}.")
  for d in comparison["distill"]:
    verdict = ("distillation helps" if d["gain"] > thr else "distillation hurts" if d["gain"] < -thr
               else "within the noise")
    lines.append(f"{d['run']} against {d['base']}: {d['gain'] * 100:+.2f} pts at energy {d['energy_ratio']:.3f} "
                 f"vs {d['base_energy_ratio']:.3f}, {verdict}.")
  return "\n".join(md) + "\n\n" + "".join(f"- {line}\n" for line in lines)


def plot(rows, curves, fixed, variants, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for ax, x, xlabel in ((axes[0], "energy_ratio", "energy / ANN twin"), (axes[1], "steps", "time steps run")):
    ax.plot([c["energy_ratio" if x == "energy_ratio" else "T"] for c in fixed], [100 * c["accuracy"] for c in fixed],
            "k-o", label="fixed T = 1..4")
    learned = [r for r in rows if r["kind"] == "learned" and r["semantics"] == "skip"]
    ax.plot([r["energy_ratio" if x == "energy_ratio" else "T_sim"] for r in learned],
            [100 * r["accuracy"] for r in learned], "bs", label="learned masks (skip)")
    for v in variants:
      ax.plot(v["energy_ratio" if x == "energy_ratio" else "T_sim"], 100 * v["accuracy"], "m^")
      ax.annotate(v["name"], (v["energy_ratio" if x == "energy_ratio" else "T_sim"], 100 * v["accuracy"]),
                  fontsize=7)
    for c in curves:
      pts = sorted(c["points"], key=lambda p: p[x])
      ax.plot([p[x] for p in pts], [100 * p["accuracy"] for p in pts], ".--", label=c["label"], alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="lower right")
  fig.suptitle("CIFAR-10 (2-core CPU twin): per-sample exit vs learned module masks")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def exit_compare(root: str) -> dict:
  table = dtvit_sweep.read_table(root)
  rows = analyse.collect(root, table)
  fixed = analyse.fixed_curve(rows)
  nz = analyse.noise(rows, analyse.seed_pairs(rows))
  done = {t["name"]: t for t in table["rows"] if t["state"] == "done"}
  curves = []
  for name in EXIT_RUNS:
    if name in done:
      curves += exit_curves(root, name, ensure_exit_eval(os.path.join(root, name)))
  variants = []
  for t in table["rows"]:
    if t["name"] in done and analyse.variant_of(t):
      what = "every-step loss" if (t.get("snn.loss") or "final") != "final" else "distilled from the twin"
      variants.append({"name": t["name"], "what": what, "accuracy": t["accuracy"], "T_sim": t["T_sim"],
                       "energy_ratio": t["energy_ratio"]})
  comparison = compare(rows, curves, fixed)
  for name, base in DISTILLED.items():
    if name in done and base in done:
      comparison["distill"].append({"run": name, "base": base, "gain": done[name]["accuracy"] - done[base]["accuracy"],
                                    "energy_ratio": done[name]["energy_ratio"],
                                    "base_energy_ratio": done[base]["energy_ratio"]})
  text = markdown(rows, curves, fixed, comparison, variants, nz)
  with open(os.path.join(root, "exit_results.md"), "w") as f:
    f.write(text)
  out = {"fixed_curve": fixed, "curves": curves, "variants": variants, "comparison": comparison, "noise": nz}
  analyse._save_json(os.path.join(root, "exit_results.json"), out)
  plot(rows, curves, fixed, variants, os.path.join(root, "exit_vs_energy.png"))
  print(text, flush=True)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default=os.path.join(HERE, "runs"), help="The sweep's root (dtvit.sweep --root).")
  a = p.parse_args(argv)
  exit_compare(a.root)
  return 0


if __name__ == "__main__":
  sys.exit(main())
