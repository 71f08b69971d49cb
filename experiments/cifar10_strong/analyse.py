"""The strong CIFAR-10 sweep's analysis: every way of saving time steps, at equal energy and at equal steps.

  python -m experiments.cifar10_strong.run                  # trains the sweep; evaluates each SNN run under exit
  python -m experiments.cifar10_strong.analyse [--root=experiments/cifar10_strong/runs]

All SNN runs start from the one ANN twin (`ann`), use 'skip' masks with T_max = 4 and are distilled from the twin.
The series:
- fixed T = 1..4 (masks off), the mean over the seeds finished at each T;
- learned module masks at each time-step cost (`learned_skip_<cost>`, seeds at the headline cost), at their
  simulated steps T_sim and their energy;
- per-sample exit on `fixed_T4_every_step` (fixed T = 4 trained with the every-step loss): SEENN-I (max softmax
  >= theta) and DT-SNN (entropy <= theta), over theta;
- the same exit on `fixed_T4` (trained on the final output): what the every-step loss buys;
- the combination: each learned run under exit (curves averaged over the seeds of a setting, per threshold);
- apart from those (a longer training budget): the headline learned run fine-tuned longer (`<run>_<n>ep`), against
  the headline at the sweep's length, against the twin, and against fixed T fine-tuned as long (its controls,
  `fixed_T<T>_<n>ep`) at equal simulated steps and at equal energy.

Every accuracy is on the 10,000 JPEG test images; every energy is `dtvit.energy`'s estimate per image (the stem,
every module at its working steps, the head; under exit, up to each image's exit) over the ANN twin's. At equal
energy each approach's accuracy is read off its Pareto frontier, linearly interpolated, never outside its energy
range. A difference counts only beyond the noise: the largest seed-to-seed spread of the sweep.

Writes `<root>/results.md`, `results.json` and `results.png`; runs not finished yet are listed as pending.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from dtvit import sweep as dtvit_sweep
from experiments.cifar10_cpu import analyse as base
from experiments.cifar10_cpu import exit_compare
from experiments.cifar10_strong import config as recipe

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "config.py")
EXIT_COSTS = "exit_costs.json"   # written by run.py: each run's exit evaluation, wall and CPU seconds
TWIN_TARGET, GAP_TARGET, T_SIM_TARGET = 0.85, 0.03, 2.5
# Published figures, for orientation only (not our runs).
PUBLISHED = {"paper": (0.9597, 4.97, "Dynamic Spikformer (the paper), learned masks, T_max 8"),
             "spikformer": (0.9551, 4.0, "Spikformer-4-384, fixed T = 4")}
CRITERIA = exit_compare.CRITERIA
SHORT = {"confidence": "SEENN-I", "entropy": "DT-SNN"}


def is_exit_baseline(row: dict) -> bool:
  """The run trained for per-sample exit (every-step loss): an exit series, not a point of the fixed-T curve."""
  return (row.get("snn.loss") or "final") != "final"


def is_long(row: dict) -> bool:
  """The run fine-tuned longer than the sweep's other SNN runs (`<run>_<LONG_EPOCHS>ep`): reported apart."""
  return row["name"].endswith(f"_{recipe.LONG_EPOCHS}ep")


def is_variant(row: dict) -> bool:
  """Not a point of the equal-budget comparison: the exit baseline, or a longer fine-tuning."""
  return is_exit_baseline(row) or is_long(row)


def _mean(xs: Sequence[float]) -> float | None:
  xs = [x for x in xs if x is not None]
  return sum(xs) / len(xs) if xs else None


def exit_results(root: str, names: Sequence[str]) -> dict[str, dict]:
  """Each run's `early_exit/early_exit.json` (run.py writes it after the run), for the runs that have one."""
  out = {}
  for name in names:
    path = os.path.join(root, name, "early_exit", "early_exit.json")
    if os.path.isfile(path):
      with open(path) as f:
        out[name] = json.load(f)
  return out


def mean_curves(curves: Sequence[dict], runs: Sequence[str], label: str) -> list[dict]:
  """The exit curves of `runs` (seeds of one setting) averaged per criterion and threshold: accuracy, steps and
  energy ratio are means over the runs that have that threshold."""
  out = []
  for criterion in CRITERIA:
    mine = [c for c in curves if c["run"] in runs and c["criterion"] == criterion]
    if not mine:
      continue
    by_theta: dict[float, list[dict]] = {}
    for c in mine:
      for p in c["points"]:
        by_theta.setdefault(p["threshold"], []).append(p)
    points = [{"threshold": t, "accuracy": _mean([p["accuracy"] for p in ps]),
               "steps": _mean([p["steps"] for p in ps]), "sim_steps": _mean([p.get("sim_steps") for p in ps]),
               "energy_ratio": _mean([p["energy_ratio"] for p in ps]), "seeds": len(ps)}
              for t, ps in sorted(by_theta.items())]
    out.append({"run": runs[0], "runs": list(runs), "criterion": criterion,
                "label": f"{label}, {CRITERIA[criterion]}", "points": points})
  return out


def approaches(rows: Sequence[dict], fixed: Sequence[dict], curves: dict[str, list[dict]]) -> dict[str, list[dict]]:
  """Each approach as points (energy_ratio, accuracy, steps): 'fixed T' (the curve's means), 'learned masks' (each
  setting's mean over its seeds) and one entry per exit series (`curves`: name -> its curves, all criteria
  pooled when the name says so)."""
  out = {"fixed T": [{"energy_ratio": c["energy_ratio"], "accuracy": c["accuracy"], "steps": c["T"]}
                     for c in fixed if c.get("energy_ratio") is not None]}
  settings: dict[str, list[dict]] = {}
  for r in rows:
    if r["kind"] == "learned" and r.get("accuracy") is not None:
      settings.setdefault(r["base"], []).append(r)
  out["learned masks"] = [{"energy_ratio": _mean([r["energy_ratio"] for r in rs]),
                           "accuracy": _mean([r["accuracy"] for r in rs]), "steps": _mean([r["T_sim"] for r in rs]),
                           "setting": b} for b, rs in settings.items()]
  for name, cs in curves.items():
    out[name] = [{"energy_ratio": p["energy_ratio"], "accuracy": p["accuracy"],
                  "steps": p.get("sim_steps") or p["steps"]} for c in cs for p in c["points"]]
  return {k: v for k, v in out.items() if v}


def best_at(points: Sequence[dict], energy: float) -> float | None:
  """An approach's accuracy at `energy`: its Pareto frontier linearly interpolated, or the frontier's best where
  `energy` lies beyond the frontier but within the approach's points (a cheaper point does better); None outside
  the range of its points' energies."""
  energies = [p["energy_ratio"] for p in points]
  if not points or not min(energies) <= energy <= max(energies):
    return None
  at = exit_compare.accuracy_at(points, energy)
  return at if at is not None else max(p["accuracy"] for p in points if p["energy_ratio"] <= energy)


def equal_energy(series: dict[str, list[dict]], thr: float) -> list[dict]:
  """At the energy of every fixed T and of every learned setting: each approach's accuracy there (`best_at`),
  the winner and its margin over the runner-up, and whether that margin exceeds the noise `thr`."""
  levels = sorted({p["energy_ratio"] for k in ("fixed T", "learned masks") for p in series.get(k, [])})
  out = []
  for e in levels:
    accs = {k: best_at(pts, e) for k, pts in series.items()}
    ranked = sorted(((a, k) for k, a in accs.items() if a is not None), reverse=True)
    row = {"energy_ratio": e, "accuracy": accs, "winner": None, "margin": None, "beyond_noise": None}
    if len(ranked) >= 2:
      (a0, k0), (a1, _) = ranked[0], ranked[1]
      row.update(winner=k0, margin=a0 - a1, beyond_noise=a0 - a1 > thr)
    out.append(row)
  return out


def cpu_costs(root: str, rows: Sequence[dict], table: dict, long_rows: Sequence[dict] = ()) -> dict:
  """CPU hours: per run (training, from its summary's cpu_time_s; exit evaluation, from run.py's record) and per
  approach (what one model of it costs after the twin, and what the whole series cost)."""
  path = os.path.join(root, EXIT_COSTS)
  exits = json.load(open(path)) if os.path.isfile(path) else {}
  runs = {}
  for t in table["rows"]:
    if t["state"] == "done":
      runs[t["name"]] = {"train_cpu_h": (t.get("cpu_time_s") or 0) / 3600,
                         "train_wall_h": (t.get("train_time_s") or 0) / 3600,
                         "exit_cpu_h": exits.get(t["name"], {}).get("cpu_time_s", 0) / 3600}
  kinds = {r["name"]: r["kind"] for r in rows}
  every = [t["name"] for t in table["rows"] if is_exit_baseline(t) and t["name"] in runs]
  series = {
      "ANN twin (shared by every SNN)": [n for n, k in kinds.items() if k == "ann"],
      "fixed T (every T and seed)": [n for n, k in kinds.items() if k == "fixed"],
      "learned masks (every cost and seed)": [n for n, k in kinds.items() if k == "learned"],
      "SEENN-I / DT-SNN (every-step T = 4 + exit evaluation)": every,
      "learned masks, longer fine-tuning": [r["name"] for r in long_rows if r["kind"] == "learned"],
      "fixed T, longer fine-tuning": [r["name"] for r in long_rows if r["kind"] == "fixed"],
  }
  approach = {}
  for what, names in series.items():
    names = [n for n in names if n in runs]
    if names:
      total = sum(runs[n]["train_cpu_h"] + (runs[n]["exit_cpu_h"] if what.startswith("SEENN") else 0)
                  for n in names)
      approach[what] = {"runs": names, "cpu_h": total, "cpu_h_per_run": total / len(names)}
  return {"runs": runs, "approaches": approach}


def longer(rows: Sequence[dict], fixed: Sequence[dict], long_rows: Sequence[dict], headline: str | None) -> dict:
  """The longer fine-tuned runs against what they cost: each one's accuracy against its setting at the sweep's
  length (`short`: the headline's mean over its seeds for a learned run, the fixed-T curve's mean at its T for a
  fixed one) and the twin; the 4-epoch fixed-T curve (`curve`) and each longer learned run against it
  (`comparison`: `base.compare` on the longer runs alone, so at equal training budget)."""
  twin = next((r["accuracy"] for r in rows if r["kind"] == "ann"), None)
  headline_acc = _mean([r["accuracy"] for r in rows if r["kind"] == "learned" and r["base"] == headline])
  short_fixed = {c["T"]: c["accuracy"] for c in fixed}
  out = []
  for r in long_rows:
    learned = r["kind"] == "learned"
    short = headline_acc if learned else short_fixed.get(r["T_max"])
    out.append({"name": r["name"], "kind": r["kind"], "steps": r["steps"], "accuracy": r["accuracy"],
                "T_sim": r["T_sim"] if learned else r["T_max"], "energy_ratio": r["energy_ratio"],
                "short": short, "gain": None if short is None else r["accuracy"] - short,
                "gap": None if twin is None else twin - r["accuracy"]})
  curve = base.fixed_curve(long_rows)
  comparison = base.compare(long_rows) if curve else []
  for c in comparison:   # outside the curve's energies: the fixed T nearest below and above, as they are
    e = c["energy_ratio"]
    below = [f for f in curve if f["energy_ratio"] is not None and f["energy_ratio"] <= e]
    above = [f for f in curve if f["energy_ratio"] is not None and f["energy_ratio"] > e]
    c["fixed_below_energy"] = max(below, key=lambda f: f["energy_ratio"]) if below else None
    c["fixed_above_energy"] = min(above, key=lambda f: f["energy_ratio"]) if above else None
  return {"runs": out, "curve": curve, "comparison": comparison}


def _longer_lines(lg: dict, thr: float, long_epochs: int) -> list[str]:
  """Plain words for `longer`: each longer learned run against fixed T at the same training budget."""
  lines = []
  ts = [f["T"] for f in lg["curve"]]
  for c in lg["comparison"]:
    judge = lambda g: "beyond" if abs(g) > thr else "inside"
    if c["gain_at_T_sim"] is not None:
      lines.append(f"At equal simulated steps ({c['T_sim']:.2f}), {c['name']} is {_pct(c['gain_at_T_sim'], '+.2f')} "
                   f"pts from the {long_epochs}-epoch fixed-T curve (T = {', '.join(map(str, ts))}), "
                   f"{judge(c['gain_at_T_sim'])} the noise (±{_pct(thr)}).")
    else:
      lines.append(f"At equal simulated steps ({c['T_sim']:.2f}): outside the {long_epochs}-epoch fixed-T curve "
                   f"(T = {', '.join(map(str, ts)) or 'none yet'}); no reading.")
    if c["gain_at_energy"] is not None:
      lines.append(f"At equal energy ({c['energy_ratio']:.3f}), {c['name']} is {_pct(c['gain_at_energy'], '+.2f')} "
                   f"pts from that curve, {judge(c['gain_at_energy'])} the noise.")
    else:
      near = [(f, "less") for f in [c["fixed_below_energy"]] if f] + [(f, "more") for f in [c["fixed_above_energy"]]
                                                                        if f]
      said = "; ".join(f"fixed T = {f['T']} costs {f['energy_ratio']:.3f} ({what}) for {_pct(f['accuracy'])}% "
                       f"({_pct(c['accuracy'] - f['accuracy'], '+.2f')} pts to {c['name']})" for f, what in near)
      lines.append(f"At equal energy: {c['name']} ({c['energy_ratio']:.3f}) lies outside the {long_epochs}-epoch "
                   f"fixed-T curve's energies, so no interpolated reading; " + (said or "no fixed T yet") + ".")
  return lines


def _gap_met(gap: float | None, t_sim: float | None) -> bool | None:
  return None if gap is None or t_sim is None else (gap <= GAP_TARGET and t_sim <= T_SIM_TARGET)


def targets(rows: Sequence[dict], headline: str | None, long_rows: Sequence[dict] = ()) -> dict:
  """The issue's targets: the twin's accuracy (>= 85%) and the headline learned setting (mean over its seeds) at
  T_sim <= 2.5 within 3 points of the twin; the same gap for each longer fine-tuning of it (`long`)."""
  twin = next((r["accuracy"] for r in rows if r["kind"] == "ann"), None)
  seeds = [r for r in rows if r["kind"] == "learned" and r["base"] == headline]
  acc, t_sim = _mean([r["accuracy"] for r in seeds]), _mean([r["T_sim"] for r in seeds])
  spread = max(r["accuracy"] for r in seeds) - min(r["accuracy"] for r in seeds) if len(seeds) > 1 else None
  gap = None if twin is None or acc is None else twin - acc
  long = []
  for r in long_rows:
    g = None if twin is None else twin - r["accuracy"]
    long.append({"name": r["name"], "steps": r["steps"], "accuracy": r["accuracy"], "T_sim": r["T_sim"],
                 "energy_ratio": r["energy_ratio"], "gap": g, "gain": None if acc is None else r["accuracy"] - acc,
                 "gap_met": _gap_met(g, r["T_sim"])})
  return {"twin": twin, "twin_met": None if twin is None else twin >= TWIN_TARGET, "headline": headline,
          "seeds": [r["name"] for r in seeds], "steps": _mean([r["steps"] for r in seeds]), "accuracy": acc,
          "spread": spread, "T_sim": t_sim, "gap": gap, "gap_met": _gap_met(gap, t_sim), "long": long}


def _pct(x, spec=".2f") -> str:
  return "–" if x is None else format(100 * x, spec)


def _met(flag) -> str:
  return "pending" if flag is None else "met" if flag else "NOT met"


def markdown(rows, todo, fixed, pairs, nz, comparison, verdict_lines, curves, exit_cmp, grid, costs, tg,
             long_todo=(), lg=None) -> str:
  thr = nz["threshold"]
  md = ["# Results: the strong CIFAR-10 twin and its SNNs", ""]
  md.append(f"- Twin: {_pct(tg['twin'])}% on the 10,000 test images (target >= {_pct(TWIN_TARGET, '.0f')}%: "
            f"{_met(tg['twin_met'])}).")
  if tg["accuracy"] is not None:
    md.append(f"- Headline learned setting {tg['headline']} ({len(tg['seeds'])} seed(s)): {_pct(tg['accuracy'])}% "
              f"(seed spread {_pct(tg['spread'])} pts) at T_sim {tg['T_sim']:.2f}, {_pct(tg['gap'])} pts below "
              f"the twin (target: within {_pct(GAP_TARGET, '.0f')} pts at T_sim <= {T_SIM_TARGET}: "
              f"{_met(tg['gap_met'])}).")
  for lr in tg["long"]:
    md.append(f"- The same fine-tuned longer, {lr['name']} ({lr['steps']} steps): {_pct(lr['accuracy'])}% at T_sim "
              f"{lr['T_sim']:.2f}, {_pct(lr['gap'])} pts below the twin (target: {_met(lr['gap_met'])}).")
  for fig, steps, what in PUBLISHED.values():
    md.append(f"- Published, not our run: {what}: {_pct(fig)}% at {steps:g} steps"
              + (f"; our twin is {_pct(fig - tg['twin'])} pts below it." if tg["twin"] is not None else "."))
  md += ["", "## Every run", "", base.results_markdown(rows, comparison, pending_runs=todo, curve=fixed,
                                                       pairs=pairs)]
  md += ["## Verdict: learned masks against fixed T", ""] + [f"- {line}" for line in verdict_lines] + [""]
  md += ["## At equal energy: every approach", "",
         f"Accuracy (%) of each approach at the energy of each fixed T and each learned setting ('–': outside that "
         f"approach's energy range). A winner counts only beyond the noise, ±{_pct(thr)} pts.", ""]
  names = sorted({k for g in grid for k in g["accuracy"]}, key=lambda k: (k != "fixed T", k != "learned masks", k))
  md.append("| energy / ANN | " + " | ".join(names) + " | winner (margin, pts) |")
  md.append("|---" * (len(names) + 2) + "|")
  for g in grid:
    win = "–" if g["winner"] is None else (f"{g['winner']} ({_pct(g['margin'], '+.2f')})" if g["beyond_noise"]
                                           else f"none beyond the noise ({g['winner']} {_pct(g['margin'], '+.2f')})")
    md.append(f"| {g['energy_ratio']:.3f} | " + " | ".join(_pct(g["accuracy"][k]) for k in names) + f" | {win} |")
  lg = lg or {"runs": [], "curve": [], "comparison": []}
  md += ["", "## Longer fine-tuning", "",
         f"The headline learned setting {tg['headline']}, and fixed T around its simulated steps, each trained "
         f"{recipe.LONG_EPOCHS} epochs from the same twin instead of {recipe.SNN_EPOCHS}: apart from the comparison "
         f"above (every run there has the same budget), and compared among themselves (one seed each).", "",
         "| run | SNN steps | test acc. (%) | T_sim | energy / ANN | gain over the same setting at "
         f"{recipe.SNN_EPOCHS} epochs (pts) | gap to the twin (pts) |", "|---|---|---|---|---|---|---|"]
  if tg["accuracy"] is not None:
    md.append(f"| {tg['headline']} (mean of {len(tg['seeds'])} seed(s)) | {tg['steps']:.0f} | "
              f"{_pct(tg['accuracy'])} | {tg['T_sim']:.2f} | – | – | {_pct(tg['gap'])} |")
  for lr in lg["runs"]:
    md.append(f"| {lr['name']} | {lr['steps']} | {_pct(lr['accuracy'])} | {lr['T_sim']:.2f} | "
              f"{lr['energy_ratio']:.3f} | {_pct(lr['gain'], '+.2f')} | {_pct(lr['gap'])} |")
  for t in long_todo:
    md.append(f"| {t['name']} | – | {t['state']} | – | – | – | – |")
  lines = _longer_lines(lg, thr, recipe.LONG_EPOCHS)
  if not lg["comparison"] and any(r["kind"] == "learned" for r in lg["runs"]):
    lines = [f"No fixed T fine-tuned {recipe.LONG_EPOCHS} epochs has finished: no comparison at equal budget yet."]
  md += [""] + [f"- {line}" for line in lines]
  md += ["", "## Per-sample exit", ""]
  md += [f"- {line}" for line in exit_compare.headline(exit_cmp, [c for cs in curves.values() for c in cs], thr,
                                                        baselines=("fixed_T4_every_step", "fixed_T4"))]
  for e in exit_cmp["exit_vs_fixed"]:
    g = [x for x in e["gains"] if x is not None]
    if g:
      md.append(f"- {e['run']} under {e['criterion']} exit against the fixed-T curve at equal energy: "
                f"{100 * min(g):+.2f} to {100 * max(g):+.2f} pts over the {len(g)} thresholds inside its range.")
  md += ["", "| series | threshold | test acc. (%) | steps run | simulated steps | energy / ANN |",
         "|---|---|---|---|---|---|"]
  for cs in curves.values():
    for c in cs:
      for p in c["points"]:
        sim = "–" if p.get("sim_steps") is None else f"{p['sim_steps']:.2f}"
        md.append(f"| {c['label']} | {p['threshold']:g} | {_pct(p['accuracy'])} | {p['steps']:.2f} | {sim} "
                  f"| {p['energy_ratio']:.3f} |")
  md += ["", "## CPU hours", "", "| approach | runs | CPU hours in all | per run |", "|---|---|---|---|"]
  for what, a in costs["approaches"].items():
    md.append(f"| {what} | {len(a['runs'])} | {a['cpu_h']:.2f} | {a['cpu_h_per_run']:.2f} |")
  md += ["", "| run | training CPU h | training wall h | exit evaluation CPU h |", "|---|---|---|---|"]
  for name, r in costs["runs"].items():
    md.append(f"| {name} | {r['train_cpu_h']:.2f} | {r['train_wall_h']:.2f} | {r['exit_cpu_h']:.2f} |")
  return "\n".join(md) + "\n"


_STYLE = {"fixed T": ("s-", "#4c72b0"), "learned masks": ("o", "#dd8452")}


def plot(rows, fixed, curves, path: str, long_rows: Sequence[dict] = ()) -> None:
  """Two panels, accuracy against energy / ANN and against simulated steps: fixed T (mean, each seed a dot),
  each learned run, the exit curves, the longer fine-tuned runs (learned: stars; fixed T: open squares), the twin
  as a line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
  for ax, x in zip(axes, ("energy_ratio", "steps")):
    ax.plot([c["energy_ratio"] if x == "energy_ratio" else c["T"] for c in fixed],
            [100 * c["accuracy"] for c in fixed], "s-", color="#4c72b0", label="fixed T = 1..4 (mean over seeds)")
    for r in rows:
      if r["kind"] == "fixed":
        ax.plot(r["energy_ratio"] if x == "energy_ratio" else r["T_max"], 100 * r["accuracy"], "o", ms=3,
                color="#4c72b0")
    learned = [r for r in rows if r["kind"] == "learned"]
    ax.plot([r["energy_ratio"] if x == "energy_ratio" else r["T_sim"] for r in learned],
            [100 * r["accuracy"] for r in learned], "o", ms=7, color="#dd8452", ls="none",
            label="learned masks (each run)")
    for r in learned:
      ax.annotate(f"{r['cost']:g}" + (f" s{r['seed']}" if r["seed"] else ""),
                  (r["energy_ratio"] if x == "energy_ratio" else r["T_sim"], 100 * r["accuracy"]),
                  textcoords="offset points", xytext=(5, -10), fontsize=7, color="#dd8452")
    long_fixed = base.fixed_curve(long_rows)
    if long_fixed:
      ax.plot([c["energy_ratio"] if x == "energy_ratio" else c["T"] for c in long_fixed],
              [100 * c["accuracy"] for c in long_fixed], "s:", color="#8172b3", mfc="none",
              label=f"fixed T, {recipe.LONG_EPOCHS} epochs")
    for r in long_rows:
      if r["kind"] == "learned":
        ax.plot(r["energy_ratio"] if x == "energy_ratio" else r["T_sim"], 100 * r["accuracy"], "*", ms=12,
                color="#c44e52", ls="none", label=f"{r['name']} ({r['steps']} steps)")
    for cs in curves.values():
      for c in cs:
        pts = sorted(c["points"], key=lambda p: p["energy_ratio"])
        xs = [p["energy_ratio"] if x == "energy_ratio" else (p.get("sim_steps") or p["steps"]) for p in pts]
        ax.plot(xs, [100 * p["accuracy"] for p in pts], ".--" if c["criterion"] == "confidence" else ".:",
                label=c["label"], alpha=0.8)
    twin = [r for r in rows if r["kind"] == "ann"]
    if twin:
      ax.axhline(100 * twin[0]["accuracy"], ls="--", color="0.4", lw=1, label="ANN twin")
    ax.set_xlabel("estimated energy per image / ANN twin's" if x == "energy_ratio"
                  else "simulated time steps per masked module (exit: up to the exit)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="lower right")
  fig.suptitle("CIFAR-10, Spikformer-2-192 twin on 2 CPU cores: fixed T, learned masks, per-sample exit, both")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def analyse(root: str) -> dict:
  table = dtvit_sweep.read_table(root)
  rows = base.collect(root, table, variant=is_variant)
  todo = base.pending(table, variant=is_variant)
  long_rows = base.collect(root, table, variant=lambda t: not is_long(t))
  long_todo = base.pending(table, variant=lambda t: not is_long(t))
  fixed = base.fixed_curve(rows)
  pairs = base.seed_pairs(rows)
  nz = base.noise(rows, pairs)
  comparison = base.compare(rows)
  verdict = base.verdict_parts(comparison, pairs, nz, todo, semantics=("skip",))
  done = [t["name"] for t in table["rows"] if t["state"] == "done"]
  results = exit_results(root, done)
  every = [t["name"] for t in table["rows"] if is_exit_baseline(t) and t["name"] in results]
  curves: dict[str, list[dict]] = {}
  for name in every:
    for c in exit_compare.exit_curves(root, name, results[name], what=f"{name} (every-step loss)"):
      curves.setdefault(f"{SHORT[c['criterion']]} on {name}", []).append(c)
  if "fixed_T4" in results:
    curves["exit on fixed_T4 (final loss)"] = exit_compare.exit_curves(root, "fixed_T4", results["fixed_T4"],
                                                                        what="fixed_T4 (final loss)")
  learned_curves = []
  settings: dict[str, list[str]] = {}
  for r in rows:
    if r["kind"] == "learned" and r["name"] in results:
      settings.setdefault(r["base"], []).append(r["name"])
      learned_curves += exit_compare.exit_curves(root, r["name"], results[r["name"]], what=r["name"])
  for b, runs in settings.items():
    curves[f"{b} + exit"] = mean_curves(learned_curves, runs, f"{b} + exit (mean of {len(runs)} seed(s))")
  exit_cmp = exit_compare.compare(rows, [c for cs in curves.values() for c in cs], fixed)
  grid = equal_energy(approaches(rows, fixed, curves), nz["threshold"])
  costs = cpu_costs(root, rows, table, long_rows)
  headline = next((r["base"] for r in rows if r["kind"] == "learned"), None)
  tg = targets(rows, headline, [r for r in long_rows if r["kind"] == "learned"])
  lg = longer(rows, fixed, long_rows, headline)
  text = markdown(rows, todo, fixed, pairs, nz, comparison, verdict["lines"], curves, exit_cmp, grid, costs, tg,
                  long_todo, lg)
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(text)
  out = {"rows": rows, "pending": todo + long_todo, "long_rows": long_rows, "fixed_curve": fixed,
         "seed_pairs": pairs, "noise": nz,
         "comparison": comparison, "verdict": verdict["lines"], "exit_curves": curves, "exit_comparison": exit_cmp,
         "equal_energy": grid, "cpu": costs, "targets": tg, "longer": lg, "published": PUBLISHED}
  base._save_json(os.path.join(root, "results.json"), out)
  plot(rows, fixed, curves, os.path.join(root, "results.png"), long_rows)
  print(text, flush=True)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default=os.path.join(HERE, "runs"), help="the sweep's root")
  a = p.parse_args(argv)
  analyse(os.path.abspath(a.root))
  return 0


if __name__ == "__main__":
  sys.exit(main())
