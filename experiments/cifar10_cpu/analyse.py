"""The CIFAR-10 CPU sweep's analysis: learned masks against fixed T, from the table dtvit.sweep writes.

  python -m dtvit.sweep --config=experiments/cifar10_cpu/config.py --root=experiments/cifar10_cpu/runs
  python -m experiments.cifar10_cpu.analyse --root=experiments/cifar10_cpu/runs [--no_report]

dtvit.sweep runs the sweep (`config.py`'s get_sweep: each run in its own workdir `<root>/<name>`, finished runs
skipped, unfinished ones resumed) and writes its table `<root>/sweep.json` (one row per run: the swept values,
accuracy, time steps, energy, wall time). From that table this writes `<root>/results.md` + `results.json` +
`accuracy_vs_steps.png` (runs without a summary are listed as pending), and `dtvit.report` over the runs
(sensitivity, histograms, learned steps, spike rates, early exit) into `<root>/report/` (primary run: the first
learned run, the middle cost under 'skip'), and for the largest fixed-T run (its block sensitivity against the ANN
twin) into `<root>/report_fixed_T<T>/`.

The analysis compares learned masks with fixed T at equal *simulated* steps (what a run computes) and at equal
energy, separately for the 'skip' and 'filter' mask semantics, against the fixed-T curve (mean over the seeds at
each T), and judges each gain against the largest seed-to-seed spread (runs that differ only in `seed`); the
gain at equal *active* steps is reported too, labelled as such. See the Analysis section below.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from typing import Sequence

from dtvit import loader
from dtvit import sweep as dtvit_sweep

HERE = os.path.dirname(os.path.abspath(__file__))


def _save_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------
# Analysis.
#
# What a learned run costs is its *simulated* steps (T_sim: the steps whose work any output depends on) and its
# energy, not its active steps (T_avg: the steps at which it emits). Under 'skip' the two agree; under 'filter' a
# module integrates at every step up to its last active one, so T_sim >= T_avg. The comparison with fixed T is
# therefore made at equal T_sim and at equal energy, separately for each semantics; the gain at equal T_avg is
# reported too, labelled as such. The noise level is the largest observed seed-to-seed spread (pairs
# `<run>` / `<run>_seed1`); the binomial standard error of a test accuracy is stated beside it.

SEMANTICS = ("skip", "filter")   # the mask semantics judged apart
N_TEST = 10_000   # CIFAR-10 test images (a run's config.eval_examples when it evaluates a subset)
_SETTING = ("phases", "model.max_time_steps", "model.mask.enabled", "snn.time_cost", "snn.cost_kind",
            "model.mask.semantics")


def variant_of(row: dict) -> bool:
  """True for the runs of the per-sample exit comparison (`exit_compare.py`): trained with another loss, with
  distillation, or a rerun kept for evaluation under exit (`exit_*`). They are neither the fixed-T curve nor the
  learned runs judged here."""
  return ((row.get("snn.loss") or "final") != "final" or float(row.get("snn.distill_weight") or 0.0) > 0
          or row.get("name", "").startswith("exit_"))


def kind_of(row: dict) -> str:
  """'ann' (the twin), 'fixed' (masks off) or 'learned', from a row of the sweep's table."""
  if row.get("phases") == "ann":
    return "ann"
  return "learned" if row.get("model.mask.enabled") else "fixed"


def _setting(row: dict) -> tuple:
  """What a run is, but its seed: the runs of one setting differ only in seed."""
  return tuple(str(row.get(k)) for k in _SETTING)


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float | None:
  """Piecewise-linear interpolation of the fixed-T curve; None outside [min(xs), max(xs)]."""
  pts = sorted(zip(xs, ys))
  for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
    if x0 <= x <= x1:
      return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
  if pts and x == pts[0][0]:
    return pts[0][1]
  return None


def binomial_se(p: float, n: int) -> float:
  """One binomial standard error of an accuracy p measured on n test images."""
  return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def collect(root: str, table: dict, variant=variant_of) -> list[dict]:
  """One row per finished run of the sweep's table but the `variant` ones (default `variant_of`), in sweep order
  with the seeds of a setting after its first:
  the table's results (accuracy, accuracy_all_steps, T_max, T_avg active, T_avg_op, T_sim simulated, T_sim_op,
  energy_ratio, steps, train_time_s, wall_time_s) plus name, base (the setting's first run), seed, kind ('ann' |
  'fixed' | 'learned'), masks, semantics, cost_kind, cost, per-module active and simulated steps, n_test."""
  rows, first, order = [], {}, {}
  for i, t in enumerate(table["rows"]):
    if variant(t):
      continue
    first.setdefault(_setting(t), t["name"])
    order[t["name"]] = i
    if t["state"] != "done":
      continue
    kind = kind_of(t)
    workdir = os.path.join(root, t["name"])
    s = (loader.read_summary(workdir) or {}).get("ann" if kind == "ann" else "snn", {})
    config = loader.read_config(workdir)
    eval_examples = config.get("eval_examples") or 0
    from_config = lambda key: t.get(key) or (config.get(key.split(".")[0]) or {}).get(key.split(".")[1])
    row = {k: t.get(k) for k in ("workdir", "phase", "ann_accuracy", "accuracy", "accuracy_all_steps", "T_max",
                                 "T_avg", "T_avg_op", "T_sim", "T_sim_op", "energy_ratio", "steps",
                                 "train_time_s", "wall_time_s")}
    row.update(name=t["name"], base=first[_setting(t)], seed=int(t.get("seed") or 0), kind=kind,
               masks={"ann": None, "fixed": "fixed T", "learned": "learned"}[kind],
               semantics=(t.get("model.mask.semantics") or config["model"]["mask"]["semantics"]
                          if kind == "learned" else None),
               cost_kind=from_config("snn.cost_kind") if kind == "learned" else None,
               cost=t.get("snn.time_cost") if kind == "learned" else None,
               n_test=int(eval_examples) or N_TEST,
               per_module=s.get("per_module_time_steps"), per_module_sim=s.get("per_module_simulated_steps"))
    if kind == "ann":
      row["T_max"] = None
    rows.append(row)
  return sorted(rows, key=lambda r: (order[r["base"]], r["seed"]))


def pending(table: dict, variant=variant_of) -> list[dict]:
  """The runs without a complete summary.json: 'started' (a workdir, no summary yet: running, or interrupted and
  resumable) or 'not started'."""
  return [{"name": t["name"], "state": "started" if t["state"] == "started" else "not started"}
          for t in table["rows"] if t["state"] != "done" and not variant(t)]


def fixed_curve(rows: Sequence[dict]) -> list[dict]:
  """The fixed-T curve, one point per T: the mean accuracy (and mean energy ratio) over the seeds finished at
  that T, with each seed's value and the spread (max - min; None with one seed)."""
  by_t: dict[int, list[dict]] = {}
  for r in rows:
    if r["kind"] == "fixed" and r.get("accuracy") is not None and r.get("T_max") is not None:
      by_t.setdefault(int(r["T_max"]), []).append(r)
  out = []
  for t in sorted(by_t):
    rs = sorted(by_t[t], key=lambda r: r.get("seed", 0))
    accs = [r["accuracy"] for r in rs]
    energies = [r["energy_ratio"] for r in rs if r.get("energy_ratio") is not None]
    out.append({"T": t, "runs": [r["name"] for r in rs], "seeds": [r.get("seed", 0) for r in rs],
                "accuracies": accs, "accuracy": sum(accs) / len(accs),
                "spread": max(accs) - min(accs) if len(accs) > 1 else None,
                "energy_ratios": energies,
                "energy_ratio": sum(energies) / len(energies) if len(energies) == len(rs) else None})
  return out


def seed_pairs(rows: Sequence[dict]) -> list[dict]:
  """Every setting finished with more than one seed: its runs, accuracies and spread |max - min|."""
  by_base: dict[str, list[dict]] = {}
  for r in rows:
    if r["kind"] != "ann" and r.get("accuracy") is not None:
      by_base.setdefault(r["base"], []).append(r)
  out = []
  for base, rs in by_base.items():
    if len(rs) < 2:
      continue
    rs = sorted(rs, key=lambda r: r.get("seed", 0))
    accs = [r["accuracy"] for r in rs]
    out.append({"base": base, "kind": rs[0]["kind"], "semantics": rs[0].get("semantics"),
                "runs": [r["name"] for r in rs], "accuracies": accs, "spread": max(accs) - min(accs)})
  return out


def noise(rows: Sequence[dict], pairs: Sequence[dict]) -> dict:
  """The noise level the gains are judged against: the largest observed seed-to-seed spread (the threshold);
  with no pair finished, the binomial standard error of a difference of two runs stands in (and says so). The
  binomial standard error at the mean SNN accuracy is given either way."""
  accs = [r["accuracy"] for r in rows if r["kind"] != "ann" and r.get("accuracy") is not None]
  p = sum(accs) / len(accs) if accs else 0.65
  n = min([r.get("n_test") or N_TEST for r in rows if r["kind"] != "ann"] or [N_TEST])
  se = binomial_se(p, n)
  largest = max(pairs, key=lambda q: q["spread"]) if pairs else None
  return {"p": p, "n_test": n, "binomial_se": se, "binomial_se_diff": math.sqrt(2) * se,
          "largest_seed_spread": largest["spread"] if largest else None,
          "largest_seed_spread_of": largest["base"] if largest else None, "pairs": len(pairs),
          "threshold": largest["spread"] if largest else math.sqrt(2) * se,
          "threshold_source": "largest seed-to-seed spread" if largest else
                              "binomial standard error of a difference of two runs (no seed pair finished)"}


def compare(rows: Sequence[dict]) -> list[dict]:
  """For each finished learned run: the fixed-T accuracy (mean over seeds at each T) interpolated at its
  simulated steps T_sim, at its op-weighted simulated steps, at its energy ratio (energy counts the unmasked stem:
  T_max steps in a learned run, T in a fixed one) and, labelled as active steps, at T_avg; the gains are the run's
  accuracy minus those. A run below the cheapest fixed T (fewer simulated steps, or less energy) is not
  interpolated; its accuracy minus the cheapest fixed T's is given instead (`*_vs_cheapest`: positive means it
  is better with less work, assuming accuracy does not fall with T)."""
  curve = fixed_curve(rows)
  ts, accs = [c["T"] for c in curve], [c["accuracy"] for c in curve]
  e_pts = [(c["energy_ratio"], c["accuracy"]) for c in curve if c["energy_ratio"] is not None]
  es, e_accs = [e for e, _ in e_pts], [a for _, a in e_pts]
  out = []

  def at(x, xs, ys):
    return None if x is None or not xs else _interp(x, xs, ys)

  def below(x, xs, ys):
    if x is None or not xs or x >= min(xs):
      return None
    return ys[xs.index(min(xs))]

  for r in rows:
    if r["kind"] != "learned" or r.get("accuracy") is None:
      continue
    acc = r["accuracy"]
    gain = lambda ref: None if ref is None else acc - ref
    c = {k: r.get(k) for k in ("name", "base", "seed", "semantics", "cost_kind", "cost", "accuracy", "T_avg",
                               "T_avg_op", "T_sim", "T_sim_op", "energy_ratio")}
    for key, x, xs, ys in (("T_sim", r.get("T_sim"), ts, accs), ("T_sim_op", r.get("T_sim_op"), ts, accs),
                           ("energy", r.get("energy_ratio"), es, e_accs), ("T_avg", r.get("T_avg"), ts, accs),
                           ("T_avg_op", r.get("T_avg_op"), ts, accs)):
      ref = at(x, xs, ys)
      c[f"fixed_at_{key}"], c[f"gain_at_{key}"] = ref, gain(ref)
      c[f"gain_at_{key}_vs_cheapest"] = gain(below(x, xs, ys))
    out.append(c)
  return out


def _pts(x, scale=100.0, spec="+.2f"):
  return format(x * scale, spec)


def _by_setting(comparison: Sequence[dict], semantics: str, key: str) -> list[tuple[str, float, list[float]]]:
  """(setting, mean gain over its seeds, each seed's gain) for the runs of `semantics` with a gain at `key`."""
  groups: dict[str, list[float]] = {}
  for c in comparison:
    if c.get("semantics") == semantics and c.get(key) is not None:
      groups.setdefault(c["base"], []).append(c[key])
  return [(b, sum(g) / len(g), g) for b, g in groups.items()]


def _judge(gains: Sequence[float], thr: float) -> str:
  above = sum(g > thr for g in gains)
  below = sum(g < -thr for g in gains)
  if above == len(gains):
    return "beat"
  if below == len(gains):
    return "lose"
  if above == below == 0:
    return "tie"
  return "mixed"


_JUDGEMENT = {
    "beat": "YES: learned masks beat fixed T (every gain exceeds the {thr} pts noise level)",
    "lose": "NO: learned masks are worse than fixed T (every gain is below -{thr} pts)",
    "tie": "NO CLEAR DIFFERENCE: every gain lies within ±{thr} pts (the noise level)",
    "mixed": "MIXED: {above} of {n} settings gain more than {thr} pts, {below} lose more than {thr} pts, "
             "the rest lie within the noise",
}


def verdict_parts(comparison: Sequence[dict], pairs: Sequence[dict] = (), noise_level: dict | None = None,
                  pending_runs: Sequence[dict] = (), semantics: Sequence[str] = SEMANTICS) -> dict:
  """The verdict as data: for each semantics and each measure ('T_sim': equal simulated steps, 'energy': equal
  energy) the judgement ('beat' | 'lose' | 'tie' | 'mixed' | None without a comparable run) and the gains per
  setting (mean over seeds); and the text (see `verdict`)."""
  nz = noise_level or noise([], pairs)
  thr = nz["threshold"]
  lines = []
  if pending_runs:
    lines.append(f"Provisional: {len(pending_runs)} run(s) not finished yet "
                 f"({', '.join(p['name'] for p in pending_runs)}).")
  if nz["largest_seed_spread"] is not None:
    spreads = ", ".join(f"{q['base']} {_pts(q['spread'], spec='.2f')}" for q in pairs)
    lines.append(f"Noise: the largest seed-to-seed spread is {_pts(thr, spec='.2f')} pts "
                 f"({nz['largest_seed_spread_of']}; {len(pairs)} pair(s): {spreads} pts).")
  else:
    lines.append(f"Noise: no seed pair has finished, so the seed-to-seed spread is unknown; the binomial standard "
                 f"error of a difference of two runs, {_pts(thr, spec='.2f')} pts, stands in for it.")
  lines.append(f"One binomial standard error of a test accuracy on {nz['n_test']:,} images is "
               f"{_pts(nz['binomial_se'], spec='.2f')} pts at {_pts(nz['p'], spec='.0f')}% "
               f"({_pts(nz['binomial_se_diff'], spec='.2f')} pts for a difference of two independent runs). "
               f"A gain counts as real only beyond ±{_pts(thr, spec='.2f')} pts.")
  judgements: dict[str, dict] = {}
  thr_s = _pts(thr, spec=".2f")
  for sem in semantics:
    judgements[sem] = {}
    runs_sem = [c for c in comparison if c.get("semantics") == sem]
    if not runs_sem:
      lines.append(f"Learned '{sem}': no run finished yet; no verdict.")
      judgements[sem] = {"T_sim": None, "energy": None}
      continue
    for key, what in (("T_sim", "equal simulated steps"), ("energy", "equal energy")):
      settings = _by_setting(comparison, sem, f"gain_at_{key}")
      cheap = _by_setting(comparison, sem, f"gain_at_{key}_vs_cheapest")
      head = f"Learned '{sem}' at {what}: "
      if not settings:
        judgements[sem][key] = None
        text = head + "no finished run lies within the fixed-T range; no verdict."
      else:
        gains = [g for _, g, _ in settings]
        j = _judge(gains, thr)
        judgements[sem][key] = j
        listed = "; ".join(
            f"{b} {_pts(g)} pts" + (f" (seeds {', '.join(_pts(x) for x in each)})" if len(each) > 1 else "")
            + (" > spread" if g > thr else " < -spread" if g < -thr else " within spread")
            for b, g, each in settings)
        text = (head + _JUDGEMENT[j].format(thr=thr_s, n=len(gains), above=sum(g > thr for g in gains),
                                            below=sum(g < -thr for g in gains))
                + f". {sum(g > 0 for g in gains)} of {len(gains)} settings above the fixed-T curve: {listed} "
                f"(mean {_pts(sum(gains) / len(gains))} pts; noise ±{thr_s} pts).")
      if cheap:
        text += (" Below the fixed-T range (less work than the cheapest fixed T; not interpolated), accuracy "
                 "against the cheapest fixed T: " + "; ".join(
                     f"{b} {_pts(g)} pts" + (" (more accurate with less work)" if g > thr else "")
                     for b, g, _ in cheap) + ".")
      lines.append(text)
    active = _by_setting(comparison, sem, "gain_at_T_avg")
    if active:
      why = ("active steps understate what a 'filter' run computes, as it integrates up to each module's last "
             "active step: not a comparison at equal cost" if sem == "filter" else
             "under 'skip' a module works only at its active steps, so T_avg and T_sim differ only where an "
             "active step's output is never used")
      lines.append(f"For reference only, '{sem}' at equal ACTIVE steps T_avg ({why}): "
                   + "; ".join(f"{b} {_pts(g)} pts" for b, g, _ in active) + ".")
  return {"judgements": judgements, "threshold": thr, "lines": lines, "text": "\n".join(lines)}


def verdict(comparison: Sequence[dict], pairs: Sequence[dict] = (), noise_level: dict | None = None,
            pending_runs: Sequence[dict] = ()) -> str:
  """Plain words: for 'skip' and for 'filter', whether learned masks beat fixed T at equal simulated steps and at
  equal energy, with the gains (mean over seeds per setting), the seed spread and the binomial error."""
  return verdict_parts(comparison, pairs, noise_level, pending_runs)["text"]


def _fmt(x, spec=".2f", scale=1.0):
  return "–" if x is None else format(x * scale, spec)


def _short(module: str) -> str:
  return module.replace("blocks_", "b").replace("embedding", "emb")


def _per_module(r: dict) -> str:
  """'b0/attn 1/3, ...': active / simulated steps per masked module (active only where simulated is unknown)."""
  if r["kind"] != "learned":
    return ""
  active, sim = r.get("per_module") or {}, r.get("per_module_sim") or {}
  return ", ".join(f"{_short(k)} {v:g}" + (f"/{sim[k]:g}" if k in sim else "") for k, v in active.items())


def results_markdown(rows: Sequence[dict], comparison: Sequence[dict], *, pending_runs: Sequence[dict] = (),
                     curve: Sequence[dict] = (), pairs: Sequence[dict] = ()) -> str:
  lines = ["| run | masks | semantics | seed | T_max | test acc. (%) | acc. all steps on (%) | T_avg (active) "
           "| T_sim (simulated) | T_avg op-w. | T_sim op-w. | steps per module (active/simulated) | energy / ANN "
           "| optimizer steps | wall time (min) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    snn = r["kind"] != "ann"
    lines.append(
        f"| {r['name']} | {r['masks'] if snn else '–'} | {r.get('semantics') or '–'} | {r.get('seed', 0)} "
        f"| {r['T_max'] if snn else '–'} | {_fmt(r['accuracy'], '.2f', 100)} "
        f"| {_fmt(r.get('accuracy_all_steps'), '.2f', 100)} | {_fmt(r.get('T_avg')) if snn else '–'} "
        f"| {_fmt(r.get('T_sim')) if snn else '–'} | {_fmt(r.get('T_avg_op')) if snn else '–'} "
        f"| {_fmt(r.get('T_sim_op')) if snn else '–'} | {_per_module(r)} | {_fmt(r.get('energy_ratio'), '.3f')} "
        f"| {r.get('steps')} | {_fmt(r.get('wall_time_s'), '.1f', 1 / 60)} |")
  if pending_runs:
    lines += ["", f"Pending ({len(pending_runs)} run(s) without a summary.json yet): "
              + ", ".join(f"{p['name']} ({p['state']})" for p in pending_runs) + "."]
  if curve:
    lines += ["", "Fixed-T curve (mean over the seeds finished at each T; the comparison interpolates it):", "",
              "| T | runs | acc. per seed (%) | mean acc. (%) | seed spread (pts) | energy / ANN (mean) |",
              "|---|---|---|---|---|---|"]
    for c in curve:
      lines.append(f"| {c['T']} | {', '.join(c['runs'])} | {', '.join(_fmt(a, '.2f', 100) for a in c['accuracies'])} "
                   f"| {_fmt(c['accuracy'], '.2f', 100)} | {_fmt(c['spread'], '.2f', 100)} "
                   f"| {_fmt(c['energy_ratio'], '.3f')} |")
  if pairs:
    lines += ["", "Seed-to-seed spread (runs of one setting that differ only in the seed: data order, augmentation, "
              "score init; spread = highest minus lowest):", "",
              "| setting | runs | acc. (%) | spread (pts) |", "|---|---|---|---|"]
    for q in pairs:
      accs = ", ".join(_fmt(a, ".2f", 100) for a in q["accuracies"])
      lines.append(f"| {q['base']} | {', '.join(q['runs'])} | {accs} | {_fmt(q['spread'], '.2f', 100)} |")
  if comparison:
    lines += ["", "Learned masks against the fixed-T curve (fixed-T accuracy linearly interpolated between the "
              "neighbouring T at the learned run's simulated steps, op-weighted simulated steps and energy; '–' "
              "outside the fixed-T range). The last two columns use ACTIVE steps T_avg, which is not the cost "
              "under 'filter':", "",
              "| learned run | semantics | seed | acc. (%) | T_sim | fixed T at T_sim (%) | gain (pts) "
              "| T_sim op-w. | fixed T there (%) | gain (pts) | energy / ANN | fixed T at that energy (%) "
              "| gain (pts) | T_avg (active) | gain at T_avg (pts) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparison:
      lines.append(
          f"| {c['name']} | {c.get('semantics') or '–'} | {c.get('seed', 0)} | {_fmt(c['accuracy'], '.2f', 100)} "
          f"| {_fmt(c.get('T_sim'))} | {_fmt(c.get('fixed_at_T_sim'), '.2f', 100)} "
          f"| {_fmt(c.get('gain_at_T_sim'), '+.2f', 100)} | {_fmt(c.get('T_sim_op'))} "
          f"| {_fmt(c.get('fixed_at_T_sim_op'), '.2f', 100)} | {_fmt(c.get('gain_at_T_sim_op'), '+.2f', 100)} "
          f"| {_fmt(c.get('energy_ratio'), '.3f')} | {_fmt(c.get('fixed_at_energy'), '.2f', 100)} "
          f"| {_fmt(c.get('gain_at_energy'), '+.2f', 100)} | {_fmt(c.get('T_avg'))} "
          f"| {_fmt(c.get('gain_at_T_avg'), '+.2f', 100)} |")
  return "\n".join(lines) + "\n"


_COLORS = {"skip": "#dd8452", "filter": "#55a868"}
_FIXED = "#4c72b0"


def plot(rows: Sequence[dict], path: str, *, noise_level: dict | None = None) -> None:
  """Two panels: accuracy vs simulated steps (fixed T: mean over seeds, each seed a dot, a band of ± the
  largest seed spread; learned 'skip' and 'filter' filled at their simulated steps, a hollow marker at their
  active steps joined by a dotted line) and accuracy vs energy / ANN."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, ax_e) = plt.subplots(1, 2, figsize=(14, 5.5))
  curve = fixed_curve(rows)
  spread = (noise_level or {}).get("largest_seed_spread")
  seen: set[str] = set()

  def label(text):
    if text in seen:
      return None
    seen.add(text)
    return text

  if curve:
    ts, accs = [c["T"] for c in curve], [100 * c["accuracy"] for c in curve]
    ax.plot(ts, accs, "s-", color=_FIXED, label=label("fixed T (masks off), mean over seeds"))
    if spread:
      ax.fill_between(ts, [a - 100 * spread for a in accs], [a + 100 * spread for a in accs], color=_FIXED,
                      alpha=0.12, lw=0, label=label(f"± largest seed spread ({100 * spread:.2f} pts)"))
  for r in rows:
    if r["kind"] == "fixed" and r.get("accuracy") is not None:
      ax.plot([r["T_max"]], [100 * r["accuracy"]], "o", ms=4, color=_FIXED, mfc="white" if r.get("seed") else _FIXED,
              label=label("fixed T, one seed (hollow: seed 1)"))
  learned = [r for r in rows if r["kind"] == "learned" and r.get("accuracy") is not None]
  for r in learned:
    sem = r.get("semantics") or "filter"
    color = _COLORS.get(sem, "0.3")
    marker = "^" if r.get("cost_kind") == "op_weighted" else "o"
    y = 100 * r["accuracy"]
    tag = f"{'op ' if marker == '^' else ''}{r['cost']:g}" if r.get("cost") is not None else r["name"]
    tag += " s1" if r.get("seed") else ""
    x = r.get("T_sim")
    if x is None:   # a summary from before simulated steps were counted: shown at its active steps only
      x = r.get("T_avg")
      tag += " (T_sim unknown)"
    if x is None:
      continue
    ax.plot([x], [y], marker, ms=7, color=color, mec="black" if r.get("seed") else color,
            label=label(f"learned '{sem}' (T_max {r['T_max']}) at simulated steps"
                        + (", ^ op-weighted cost" if marker == "^" else "")))
    if r.get("T_avg") is not None and r.get("T_sim") is not None and abs(r["T_avg"] - r["T_sim"]) > 1e-9:
      ax.plot([r["T_avg"], x], [y, y], ":", color=color, lw=1)
      ax.plot([r["T_avg"]], [y], marker, ms=7, mfc="none", color=color,
              label=label("the same run at its active steps T_avg (hollow)"))
    ax.annotate(tag, (x, y), textcoords="offset points", xytext=(5, -11), fontsize=7, color=color)
  _plot_energy(ax_e, rows, curve)
  ann = [r for r in rows if r["kind"] == "ann" and r.get("accuracy")]
  for a in (ax, ax_e):
    if ann:
      a.axhline(100 * ann[0]["accuracy"], ls="--", color="0.4", lw=1, label="ANN twin")
    a.set_ylabel("test accuracy (%)")
    a.grid(alpha=0.3)
    a.legend(fontsize=7, loc="lower right")
  ax.set_xlabel("simulated time steps per masked module (T_sim; fixed T: T)")
  ax.set_xlim(0, max([r["T_max"] for r in rows if r.get("T_max")] or [4]) + 0.5)
  ax.set_title("Accuracy vs simulated steps (what a run computes)")
  fig.suptitle("Spikformer-2-64, CIFAR-10: fixed T vs learned time steps ('skip' and 'filter' masks)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot_energy(ax, rows: Sequence[dict], curve: Sequence[dict] | None = None) -> None:
  """Accuracy vs estimated energy per image relative to the ANN twin (counts the unmasked stem's steps too)."""
  curve = [c for c in (fixed_curve(rows) if curve is None else curve) if c["energy_ratio"] is not None]
  if curve:
    ax.plot([c["energy_ratio"] for c in curve], [100 * c["accuracy"] for c in curve], "s-", color=_FIXED,
            label="fixed T (masks off), mean over seeds")
    for c in curve:
      ax.annotate(f"T={c['T']}", (c["energy_ratio"], 100 * c["accuracy"]), textcoords="offset points",
                  xytext=(5, -11), fontsize=7, color=_FIXED)
  for r in rows:
    if r["kind"] == "fixed" and r.get("accuracy") is not None and r.get("energy_ratio") is not None:
      ax.plot([r["energy_ratio"]], [100 * r["accuracy"]], "o", ms=4, color=_FIXED,
              mfc="white" if r.get("seed") else _FIXED)
  seen = set()
  for r in rows:
    if r["kind"] != "learned" or r.get("accuracy") is None or r.get("energy_ratio") is None:
      continue
    sem = r.get("semantics") or "filter"
    color = _COLORS.get(sem, "0.3")
    marker = "^" if r.get("cost_kind") == "op_weighted" else "o"
    lab = f"learned '{sem}' (T_max {r['T_max']})"
    ax.plot([r["energy_ratio"]], [100 * r["accuracy"]], marker, ms=7, color=color,
            mec="black" if r.get("seed") else color, label=None if lab in seen else lab)
    seen.add(lab)
    tag = (f"{'op ' if marker == '^' else ''}{r['cost']:g}" if r.get("cost") is not None else r["name"])
    ax.annotate(tag + (" s1" if r.get("seed") else ""), (r["energy_ratio"], 100 * r["accuracy"]),
                textcoords="offset points", xytext=(5, -11), fontsize=7, color=color)
  ax.set_xlabel("estimated energy per image / ANN twin's (dtvit.energy; includes the unmasked stem)")
  ax.set_title("Accuracy vs energy")


def analyse(root: str, *, report: bool = True) -> dict:
  """Writes results.md / results.json / accuracy_vs_steps.png (and dtvit.report's report/) into root from the
  sweep's table `<root>/sweep.json`. Runs not finished are listed as pending (the sweep lands over more than one
  session)."""
  table = dtvit_sweep.read_table(root)
  rows = collect(root, table)
  todo = pending(table)
  curve = fixed_curve(rows)
  pairs = seed_pairs(rows)
  nz = noise(rows, pairs)
  comparison = compare(rows)
  parts = verdict_parts(comparison, pairs, nz, todo)
  text = (results_markdown(rows, comparison, pending_runs=todo, curve=curve, pairs=pairs)
          + "\nVerdict (learned masks vs fixed T; gains in accuracy points):\n\n"
          + "".join(f"- {line}\n" for line in parts["lines"]))
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(text)
  out = {"rows": rows, "pending": todo, "fixed_curve": curve, "seed_pairs": pairs, "noise": nz,
         "comparison": comparison, "judgements": parts["judgements"], "verdict": parts["text"],
         "verdict_lines": parts["lines"]}
  _save_json(os.path.join(root, "results.json"), out)
  plot(rows, os.path.join(root, "accuracy_vs_steps.png"), noise_level=nz)
  if report:
    _reports(root, rows)
  print(text, flush=True)
  return out


def _reports(root: str, rows: Sequence[dict]) -> None:
  """dtvit.report over the SNN runs (primary: the first learned run in sweep order, the middle cost under
  'skip'), and the block-sensitivity analysis of the SNN trained with every step (the largest fixed T)."""
  snn = [r["name"] for r in rows if r["kind"] != "ann"]
  learned = [r["name"] for r in rows if r["kind"] == "learned"]
  if learned:
    workdirs = [os.path.join(root, n) for n in [learned[0]] + [n for n in snn if n != learned[0]]]
    subprocess.run([sys.executable, "-m", "dtvit.report", *[f"--workdir={w}" for w in workdirs],
                    f"--out={os.path.join(root, 'report')}", "--num_batches=4"], check=True)
  fixed = [r for r in rows if r["kind"] == "fixed" and r["seed"] == 0]
  if fixed:
    last = max(fixed, key=lambda r: r["T_max"])["name"]
    subprocess.run([sys.executable, "-m", "dtvit.report", f"--workdir={os.path.join(root, last)}",
                    f"--out={os.path.join(root, 'report_' + last)}", "--num_batches=4", "--early_exit_batches=4"],
                   check=True)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default=os.path.join(HERE, "runs"), help="The sweep's root (dtvit.sweep --root).")
  p.add_argument("--no_report", action="store_true", help="Skip dtvit.report.")
  a = p.parse_args(argv)
  analyse(a.root, report=not a.no_report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
