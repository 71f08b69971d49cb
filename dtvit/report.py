"""The run report: `report.md`, PNG plots and `report.json` for one training run or a sweep of runs.

  python -m dtvit.report --workdir=workdirs/quickstart                      # -> workdirs/quickstart/report/
  python -m dtvit.report --workdir=runs/cost0.01 --workdir=runs/cost0.05 --workdir=runs/fixedT --out=runs/report

The first workdir is the primary run: every plot below is made for it; with several workdirs the accuracy vs
time steps plot and the table of runs cover all of them (each read from its summary.json and config.json).

What it shows (the file of each plot in brackets):
- The runs (table): accuracy, average time steps and energy per image from each summary.json.
- Accuracy vs average time steps [accuracy_vs_steps.png]: each run's SNN test accuracy with its learned masks at
  its T_avg; runs with masks disabled (model.mask.enabled=False) at T_max; for runs evaluated with every step on
  as well (eval_fixed_steps), the same weights with masks off at T_max.
- Learned time steps [time_steps.png]: each masked module's active steps and mask pattern.
- Spike rates [spike_rates.png]: mean spike rate of every spiking layer at every step, with the learned masks
  (summary.json's test-set rates; masked steps hatched).
- ANN vs SNN activations [activation_histograms.png, sensitivity.png]: the paper's motivating analysis. An ANN
  and the SNN run on the same test images and each block's output (the residual stream, aux['block_outputs'])
  is compared. The ANN (`--ann_params`, see `ann_reference`) is by default the ANN phase the SNN was converted
  from, else the ANN twin of the SNN's own weights. Its neurons output clip(x / c, 0, 1), what an IF neuron's
  spike rate approximates, so the SNN's output averaged over steps is on the ANN's scale: no rescaling.
  With a_b the ANN output of block b and r_b(T) the SNN output of block b averaged over its first T steps, run
  with masks off (every block sees every step; the dynamics are causal, so the first T steps of a T_max run are
  a T-step run), both over all evaluated (image, token, channel) entries:
      e_b(T) = ||r_b(T) - a_b||_2 / ||a_b||_2        (normalised L2 error, T = 1..T_max)
      sensitivity S_b = e_b(1) - e_b(T_max)           (how much of the error more steps remove)
      T90_b = the fewest steps T with e_b(1) - e_b(T) >= 0.9 S_b   (how fast the error falls)
  A block with a large S_b needs its steps: with one step its activations are far from the ANN's and they
  approach them only as steps are added. S_b near 0: one step is as good as T_max. The errors compound over
  depth (block b sees the SNN outputs of blocks < b), as in the network itself. e_b(T_max) is what T_max steps
  leave: the rate error at finite T and, against the ANN phase, the weight changes of SNN training. Also
  reported: e_b with the learned masks (rate over T_max).
- Early exit [early_exit.png]: per-sample exit (`dtvit.inference.early_exit_over_batches`) on top of the
  learned masks for a range of confidence thresholds: accuracy vs steps run per image, and vs the paper's T_avg
  counted up to each image's exit step.

Library use (e.g. in a notebook): `analyse_activations`, `sensitivity_table`, `early_exit_rows`, `run_rows` and
the `plot_*` functions (each returns a matplotlib Figure); `write_report` does everything.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dtvit import loader

DEFAULT_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
PLOTS = ("accuracy_vs_steps", "time_steps", "spike_rates", "activation_histograms", "sensitivity", "early_exit")
_COLORS = {"ann": "#4c72b0", "snn": "#dd8452", "snn_masked": "#55a868", "attn": "#4c72b0", "mlp": "#dd8452",
           "other": "#8c8c8c"}


def _plt():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# ------------------------------------------------------------------------------------------------------------
# ANN vs SNN activations per block.


def activation_error_sums(ann_XND, snn_TXND, weights_X):
  """Sums for the normalised error of time-averaged SNN outputs against ANN outputs (plain jnp).

  Args:
    ann_XND: ANN block output [X, ...] (X = batch).
    snn_TXND: SNN block output per step [T, X, ...].
    weights_X: 1 for real examples, 0 for padding.
  Returns:
    (err_T, ref): err_T[t] = sum_w (r(t+1) - a)^2 with r(T) = mean of the first T steps; ref = sum_w a^2.
    e(T) = sqrt(err_T[T-1] / ref).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  T = snn_TXND.shape[0]
  s = snn_TXND.astype(jnp.float32)
  a = ann_XND.astype(jnp.float32)
  rate_TXND = jnp.cumsum(s, axis=0) / jnp.arange(1, T + 1, dtype=jnp.float32).reshape((T,) + (1,) * (s.ndim - 1))
  w = weights_X.astype(jnp.float32).reshape((1, -1) + (1,) * (s.ndim - 2))
  err_T = jnp.sum(w * (rate_TXND - a[None]) ** 2, axis=tuple(range(1, s.ndim)))
  ref = jnp.sum(w[0] * a ** 2)
  return err_T, ref


@dataclasses.dataclass
class ActivationAnalysis:
  """What `analyse_activations` measured on `num_examples` test images.

  errors: {block: e_b(T) [T_max]} (masks off); masked_errors: {block: e_b with the learned masks, rate over
  T_max}; values: {block: {'ann', 'snn', 'snn_masked': 1-D samples of the outputs (the first `hist_examples`
  images)}}; spike_rates: {neuron: [T_max]} with the learned masks; masks_enabled: whether the run learned masks;
  ann_source: which ANN the SNN was compared with, in words; hist_examples: images in `values`.
  """
  blocks: list
  num_steps: int
  errors: dict
  masked_errors: dict
  values: dict
  spike_rates: dict
  num_examples: int
  masks_enabled: bool
  ann_source: str
  hist_examples: int = 0


def analyse_activations(snn: loader.Loaded, ann: loader.Loaded | None = None, *, num_batches: int = 2,
                        batch_size: int | None = None, hist_examples: int = 64) -> ActivationAnalysis:
  """Runs an ANN and the SNN on the first `num_batches` test batches; see the module docstring.

  Args:
    snn: a loaded SNN phase (`dtvit.load(workdir, 'snn')`).
    ann: where the ANN's variables come from: None = the SNN's own (its ANN twin: same weights), or a loaded
      ANN phase (`dtvit.load(workdir, 'ann')`, see `ann_reference`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dtvit import models  # pylint: disable=g-import-not-at-top

  if not snn.is_snn:
    raise ValueError("analyse_activations needs an SNN phase (dtvit.load(workdir, phase='snn')).")
  if ann is None:
    ann, ann_source = snn.variant(phase="ann"), "the ANN twin of the SNN's own weights"
  else:
    ann, ann_source = ann.variant(phase="ann"), f"the ANN phase of {ann.workdir}"
  off = snn.variant(masks="off")
  hard = snn.variant(masks="hard")
  T = snn.num_steps

  def fn(ann_vars, snn_vars, images, w_B):
    _, a_aux = models.apply_model(ann.model, ann_vars, images)
    _, o_aux = models.apply_model(off.model, snn_vars, images)
    _, h_aux = models.apply_model(hard.model, snn_vars, images)
    if set(a_aux["block_outputs"]) != set(o_aux["block_outputs"]):
      raise ValueError(f"The ANN ({ann_source}) has blocks {sorted(a_aux['block_outputs'])}, the SNN "
                       f"{sorted(o_aux['block_outputs'])}: compare runs of one architecture.")
    out = {}
    h = min(images.shape[0], hist_examples)
    for name, a in a_aux["block_outputs"].items():
      o = o_aux["block_outputs"][name].reshape((T, -1) + a.shape[1:])
      m = h_aux["block_outputs"][name].reshape((T, -1) + a.shape[1:]).mean(axis=0)
      err_T, ref = activation_error_sums(a, o, w_B)
      masked_err = jnp.sum(w_B.reshape((-1,) + (1,) * (a.ndim - 1)) * (m - a) ** 2)
      out[name] = {"err": err_T, "ref": ref, "masked_err": masked_err,
                   "ann": a[:h], "snn": o.mean(axis=0)[:h], "snn_masked": m[:h]}
    return out, h_aux["spike_rates"]

  fn = jax.jit(fn)
  sums: dict = {}
  values: dict = {}
  batch_rates, count, taken = [], 0.0, 0
  for i, batch in enumerate(snn.batches(batch_size=batch_size)):
    if i >= num_batches:
      break
    w = np.asarray(batch["mask"], np.float32)
    out, rates = jax.device_get(fn(ann.variables, snn.variables, jnp.asarray(batch["image"]), jnp.asarray(w)))
    count += float(w.sum())
    batch_rates.append((rates, bool(w.all())))
    keep = int(min(hist_examples - taken, w[:hist_examples].sum()))
    for name, o in out.items():
      s = sums.setdefault(name, {"err": 0.0, "ref": 0.0, "masked_err": 0.0})
      for k in s:
        s[k] = s[k] + np.asarray(o[k], np.float64)
      v = values.setdefault(name, {"ann": [], "snn": [], "snn_masked": []})
      if keep > 0:
        for k in v:
          v[k].append(np.asarray(o[k][:keep]).reshape(-1))
    taken += max(keep, 0)
  if not sums:
    raise ValueError("analyse_activations: the test split gave no batches.")
  blocks = sorted(sums, key=_block_index)
  errors = {b: np.sqrt(sums[b]["err"] / max(sums[b]["ref"], 1e-30)) for b in blocks}
  masked_errors = {b: float(np.sqrt(sums[b]["masked_err"] / max(sums[b]["ref"], 1e-30))) for b in blocks}
  flat = {b: {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in values[b].items()}
          for b in blocks}
  # Spike rates average over whole batches (padding included), so use the full batches when there are any.
  used = [r for r, full in batch_rates if full] or [r for r, _ in batch_rates]
  spike_rates = {k: np.mean([np.asarray(r[k]) for r in used], axis=0) for k in sorted(used[0])}
  return ActivationAnalysis(blocks=blocks, num_steps=T, errors=errors, masked_errors=masked_errors, values=flat,
                            spike_rates=spike_rates, num_examples=int(count),
                            masks_enabled=bool(snn.config.model.mask.enabled),
                            ann_source=ann_source, hist_examples=taken)


def ann_reference(snn: loader.Loaded, ann_params: str = "auto") -> loader.Loaded | None:
  """The ANN to compare the SNN with: 'snn' -> None (the ANN twin of the SNN's own weights); 'ann' -> the ANN
  phase the SNN started from: its own workdir's, or that of the workdir its `snn.init_from` points into;
  'auto' -> that ANN phase if there is one, else None."""
  if ann_params not in ("auto", "ann", "snn"):
    raise ValueError(f"ann_params must be 'auto', 'ann' or 'snn', got {ann_params!r}.")
  if ann_params == "snn":
    return None
  candidates = [snn.workdir] + [w for w in [_init_from_workdir(snn.config)] if w]
  errors = []
  for wd in candidates:
    try:
      return loader.load(wd, "ann")
    except FileNotFoundError as e:
      errors.append(str(e))
  if ann_params == "ann":
    raise FileNotFoundError("ann_params='ann': no ANN phase checkpoint for the run in " + snn.workdir + ": "
                            + " ".join(errors))
  return None


def _block_index(name: str) -> tuple:
  head, _, tail = name.rpartition("_")
  return (head, int(tail)) if tail.isdigit() else (name, 0)


def sensitivity_table(errors: Mapping[str, Sequence[float]]) -> dict[str, dict]:
  """{block: {'e_1', 'e_T', 'sensitivity' (e_1 - e_T), 'T90', 'errors'}} from {block: e_b(T), T = 1..T_max};
  see the module docstring."""
  out = {}
  for block, e in errors.items():
    e = np.asarray(e, np.float64).reshape(-1)
    drop = e[0] - e[-1]
    if drop > 0:
      t90 = int(np.argmax(e[0] - e >= 0.9 * drop - 1e-12)) + 1
    else:
      t90 = 1
    out[block] = {"e_1": float(e[0]), "e_T": float(e[-1]), "sensitivity": float(drop), "T90": t90,
                  "errors": [float(x) for x in e]}
  return out


# ------------------------------------------------------------------------------------------------------------
# Early exit, runs.


def early_exit_rows(snn: loader.Loaded, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                    criterion: str = "confidence", max_batches: int = 0,
                    batch_size: int | None = None) -> list[dict]:
  """`inference.early_exit_over_batches` on the test split (all of it when max_batches = 0):
  [{'threshold', 'accuracy', 'avg_steps', 'avg_module_steps'}]."""
  from dtvit import inference  # pylint: disable=g-import-not-at-top
  if not snn.is_snn:
    raise ValueError("Early exit needs an SNN phase.")
  batches = snn.batches(batch_size=batch_size)
  if max_batches:
    batches = (b for i, b in zip(range(max_batches), batches))
  return inference.early_exit_over_batches(snn.variant(masks="hard").model, snn.variables, batches, thresholds,
                                           criterion)


def _snn_phase(summary: Mapping[str, Any]) -> str | None:
  for p in ("finetune", "snn"):
    if p in summary and "test_accuracy" in summary[p]:
      return p
  return None


def run_rows(workdirs: Sequence[str]) -> list[dict]:
  """One row per workdir from its summary.json and config.json (None where a value is missing):
  name, workdir, phase, masks ('learned' | 'fixed T'), semantics, T_max, T_avg, T_avg_op, T_sim, T_sim_op,
  accuracy, accuracy_all_steps, ann_accuracy, snn_energy_uj, ann_energy_uj, energy_ratio, note.
  T_sim (the mean of the masked modules' simulated steps) is T_max for a fixed-T run; for a learned run whose
  summary predates it, None."""
  names = _run_names(workdirs)
  rows = []
  for name, wd in zip(names, workdirs):
    row = {"name": name, "workdir": os.path.abspath(wd), "phase": None, "masks": None, "semantics": None,
           "T_max": None, "T_avg": None, "T_avg_op": None, "T_sim": None, "T_sim_op": None, "accuracy": None,
           "accuracy_all_steps": None, "ann_accuracy": None,
           "snn_energy_uj": None, "ann_energy_uj": None, "energy_ratio": None, "note": ""}
    try:
      config = loader.read_config(wd)
    except FileNotFoundError as e:
      row["note"] = str(e)
      rows.append(row)
      continue
    row["masks"] = "learned" if config.model.mask.enabled else "fixed T"
    if config.model.mask.enabled:
      row["semantics"] = config.model.mask.get("semantics", "filter")  # configs before the option: 'filter'

    row["T_max"] = int(config.model.num_steps)
    summary = loader.read_summary(wd)
    if summary is None:
      row["note"] = "no summary.json (run unfinished?)"
      rows.append(row)
      continue
    if "ann" in summary and "test_accuracy" in summary["ann"]:
      row["ann_accuracy"] = summary["ann"]["test_accuracy"]
    else:
      source = _init_from_workdir(config)
      ann_summary = (loader.read_summary(source) or {}).get("ann", {}) if source else {}
      if "test_accuracy" in ann_summary:
        row["ann_accuracy"] = ann_summary["test_accuracy"]
        row["note"] = f"ANN: the run it started from ({source})"
    phase = _snn_phase(summary)
    if phase is None:
      row["note"] = "no SNN phase in summary.json"
      rows.append(row)
      continue
    s = summary[phase]
    row.update(phase=phase, T_max=s.get("T_max", row["T_max"]), T_avg=s.get("average_time_steps"),
               T_avg_op=s.get("op_weighted_time_steps"), T_sim=s.get("average_simulated_steps"),
               T_sim_op=s.get("op_weighted_simulated_steps"), accuracy=s.get("test_accuracy"),
               accuracy_all_steps=s.get("test_accuracy_fixed_T"))
    if not config.model.mask.enabled:  # every step of every module is simulated
      row["T_sim"] = row["T_sim"] if row["T_sim"] is not None else float(row["T_max"])
      row["T_sim_op"] = row["T_sim_op"] if row["T_sim_op"] is not None else float(row["T_max"])
    elif row["T_sim"] is None and s.get("masks") and config.model.mask.get("granularity", "module") == "module":
      # A summary from before simulated steps were reported ('filter' runs): from its masks, each module
      # simulates every step up to its last active one.
      sim = [float(np.max(np.flatnonzero(np.asarray(m)) + 1, initial=0)) for m in s["masks"].values()]
      row["T_sim"] = float(np.mean(sim))
      row["note"] = (row["note"] + "; " if row["note"] else "") + "T_sim from its masks ('filter')"
    totals = (s.get("energy") or {}).get("totals") or {}
    if totals:
      row.update(snn_energy_uj=totals["snn_energy_j"] * 1e6, ann_energy_uj=totals["ann_energy_j"] * 1e6,
                 energy_ratio=totals.get("energy_ratio"))
    rows.append(row)
  return rows


def _init_from_workdir(config) -> str | None:
  """The workdir whose ANN phase the SNN phase started from (`snn.init_from` = <workdir>/ann/checkpoints)."""
  init_from = config.get("snn", {}).get("init_from") or ""
  path = os.path.abspath(init_from.rstrip(os.sep)) if init_from else ""
  if path and os.path.basename(path) == "checkpoints" and os.path.basename(os.path.dirname(path)) == "ann":
    return os.path.dirname(os.path.dirname(path))
  return None


def _run_names(workdirs: Sequence[str]) -> list[str]:
  paths = [os.path.abspath(w).rstrip(os.sep) for w in workdirs]
  if len(paths) == 1:
    return [os.path.basename(paths[0])]
  root = os.path.commonpath(paths)
  names = [os.path.relpath(p, root) if p != root else os.path.basename(p) for p in paths]
  return names if len(set(names)) == len(names) else paths


# ------------------------------------------------------------------------------------------------------------
# Plots: each returns a matplotlib Figure.


def plot_accuracy_vs_steps(rows: Sequence[Mapping[str, Any]]):
  """Test accuracy vs average time steps for each run (see the module docstring)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 5.2))
  shown = [dict(r, T_x=r["T_sim"] if r.get("T_sim") is not None else r["T_avg"]) for r in rows
           if r["accuracy"] is not None and (r.get("T_sim") is not None or r["T_avg"] is not None)]
  labelled = set()

  def point(x, y, label, **kw):
    ax.plot([x], [y], linestyle="none", label=None if label in labelled else label, **kw)
    labelled.add(label)

  for r in shown:
    acc = 100 * r["accuracy"]
    if r["masks"] == "fixed T":
      point(r["T_x"], acc, "fixed T (masks disabled in training)", marker="s", color=_COLORS["ann"], ms=8)
    else:
      if r["accuracy_all_steps"] is not None:
        acc_all = 100 * r["accuracy_all_steps"]
        ax.plot([r["T_x"], r["T_max"]], [acc, acc_all], ":", color="0.6", lw=1)
        # A ring larger than the dot, so that both stay visible when the masks keep every step.
        point(r["T_max"], acc_all, "same weights, every step on (masks off)", marker="o", mfc="none",
              color=_COLORS["snn"], ms=12, mew=1.5)
      if r["T_avg"] is not None and r["T_avg"] != r["T_x"]:  # active steps short of simulated ones ('filter')
        ax.plot([r["T_avg"], r["T_x"]], [acc, acc], "-", color=_COLORS["snn"], lw=1, alpha=0.5)
        point(r["T_avg"], acc, "its active steps (T_avg), where they differ", marker="|", color=_COLORS["snn"],
              ms=10, mew=1.5)
      point(r["T_x"], acc, "learned time steps (hard masks)", marker="o", color=_COLORS["snn"], ms=7, zorder=3)
    ax.annotate(r["name"], (r["T_x"], acc), textcoords="offset points", xytext=(6, 6), fontsize=8)
  anns = [r for r in rows if r["ann_accuracy"] is not None]
  if anns:
    ax.axhline(100 * anns[0]["ann_accuracy"], color="0.3", ls="--", lw=1,
               label=f"ANN of {anns[0]['name']} (no time steps)")
  t_max = max([r["T_max"] for r in rows if r["T_max"]] or [1])
  ax.set_xlim(0, t_max + 0.5)
  ax.set_xticks(range(0, t_max + 1))
  ax.set_xlabel("average simulated time steps (mean per masked module of the steps its work is needed at)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Accuracy vs average simulated time steps" + (f" ({len(shown)} runs)" if len(shown) > 1 else ""))
  ax.grid(alpha=0.3)
  ys = [100 * r[k] for r in rows for k in ("accuracy", "accuracy_all_steps", "ann_accuracy") if r[k] is not None]
  if ys:
    pad = max(1.0, 0.08 * (max(ys) - min(ys)))
    ax.set_ylim(max(0.0, min(ys) - pad), min(100.0, max(ys) + pad))
  if not shown:
    ax.text(0.5, 0.5, "no run has SNN results in summary.json", ha="center", transform=ax.transAxes)
  handles, labels = ax.get_legend_handles_labels()
  order = sorted(range(len(labels)), key=lambda i: ("learned" not in labels[i], "masks off" not in labels[i],
                                                    "fixed" not in labels[i]))
  ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
            bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
  fig.tight_layout()
  return fig


def plot_time_steps(steps_per_module: Mapping[str, float], masks: Mapping[str, Any], num_steps: int,
                    simulated: Mapping[str, float] | None = None):
  """Bar chart of each masked module's learned active steps (and, as a light bar behind it, its simulated
  steps), its mask pattern written above the bar."""
  plt = _plt()
  names = list(steps_per_module)
  fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(names) + 2), 5.0))
  kinds = [n.rpartition("/")[2] if n.rpartition("/")[2] in ("attn", "mlp") else "other" for n in names]
  x = np.arange(len(names))
  if simulated:
    ax.bar(x, [simulated[n] for n in names], color="0.85", edgecolor="0.5", width=0.75,
           label="simulated steps (work needed)")
  ax.bar(x, [steps_per_module[n] for n in names], color=[_COLORS[k] for k in kinds], width=0.6)
  for i, n in enumerate(names):
    pattern = "".join(str(int(v)) for v in np.asarray(masks[n]).reshape(-1))
    top = max(steps_per_module[n], simulated[n] if simulated else 0.0)
    ax.text(i, top + 0.08, pattern, ha="center", va="bottom", fontsize=8, family="monospace")
  t_avg = float(np.mean(list(steps_per_module.values()))) if names else 0.0
  ax.axhline(num_steps, color="0.3", ls="--", lw=1, label=f"T_max = {num_steps}")
  ax.axhline(t_avg, color="0.3", ls=":", lw=1, label=f"T_avg = {t_avg:.2f} (mean active steps over modules)")
  if simulated:
    t_sim = float(np.mean([simulated[n] for n in names])) if names else 0.0
    ax.axhline(t_sim, color="0.5", ls="-.", lw=1, label=f"mean simulated steps = {t_sim:.2f}")
  for kind in ("attn", "mlp", "other"):
    if kind in kinds:
      ax.bar([0], [0], color=_COLORS[kind], label={"attn": "self-attention", "mlp": "MLP", "other": "other"}[kind])
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30, ha="right")
  ax.set_ylim(0, num_steps + 0.6)
  ax.set_ylabel(f"active time steps (of T_max = {num_steps})")
  ax.set_title(f"Learned time steps per module\n(digits above a bar: its mask over steps 1..{num_steps}, "
               "1 = active)", fontsize=10)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=8, ncol=2, frameon=False)
  fig.tight_layout()
  return fig


def _gating_mask(neuron: str, masks: Mapping[str, Any]):
  owners = [m for m in masks if neuron == m or neuron.startswith(m + "/")]
  return np.asarray(masks[max(owners, key=len)]).reshape(-1) if owners else None


_NEURON_ORDER = ("conv0_lif", "conv1_lif", "conv2_lif", "conv3_lif", "rpe_lif", "patch_lif", "q_lif", "k_lif",
                 "v_lif", "attn_lif", "proj_lif", "fc1_lif", "fc2_lif")


def _layer_order(name: str) -> tuple:
  """Network order: the stem, then blocks in order; attention before MLP; neurons in the order they run."""
  parts = name.split("/")
  block = -1 if parts[0] == "embedding" else _block_index(parts[0])[1]
  module = {"attn": 0, "mlp": 1}.get(parts[1] if len(parts) > 2 else "", 0)
  leaf = parts[-1]
  return (block, module, _NEURON_ORDER.index(leaf) if leaf in _NEURON_ORDER else len(_NEURON_ORDER), name)


def plot_spike_rates(spike_rates: Mapping[str, Sequence[float]], masks: Mapping[str, Any], *, source: str = ""):
  """Heatmap: spiking layer x time step, colour = mean spike rate (fraction of the layer's neurons that fire),
  masked steps hatched."""
  plt = _plt()
  names = sorted(spike_rates, key=_layer_order)
  R = np.asarray([np.asarray(spike_rates[n], np.float64).reshape(-1) for n in names])
  T = R.shape[1]
  fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * T + 3.5), 0.32 * len(names) + 1.6))
  im = ax.imshow(R, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(R.max()), 1e-6))
  for i, n in enumerate(names):
    m = _gating_mask(n, masks)
    for t in range(T):
      if m is not None and m[t] == 0:
        ax.add_patch(plt.Rectangle((t - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.85", lw=0))
        ax.text(t, i, "off", ha="center", va="center", fontsize=7, color="white")
      elif T <= 16 and len(names) <= 60:
        ax.text(t, i, f"{R[i, t]:.2f}", ha="center", va="center", fontsize=7,
                color="white" if R[i, t] < 0.6 * R.max() else "black")
  ax.set_xticks(range(T))
  ax.set_xticklabels([str(t + 1) for t in range(T)])
  ax.set_yticks(range(len(names)))
  ax.set_yticklabels(names, fontsize=8)
  ax.set_xlabel("time step")
  ax.set_ylabel("spiking layer (stem, then blocks in order)")
  ax.set_title("Spike rate per spiking layer and time step" + (f"\n({source})" if source else ""), fontsize=10)
  cb = fig.colorbar(im, ax=ax)
  cb.set_label("spike rate (spikes per neuron per step)")
  fig.tight_layout()
  return fig


def _bins(values: Iterable[np.ndarray], num_steps: int, max_bins: int = 120) -> np.ndarray:
  """Edges centred on multiples of 1/T_max (the values a rate over T_max steps of one spike source takes)."""
  lo = min((float(v.min()) for v in values if v.size), default=0.0)
  hi = max((float(v.max()) for v in values if v.size), default=1.0)
  width = 1.0 / num_steps
  while (hi - lo) / width > max_bins:
    width *= 2
  start = math.floor(lo / width) * width - width / 2
  n = int(math.ceil((hi - start) / width)) + 1
  return start + width * np.arange(n + 1)


def plot_activation_histograms(analysis: ActivationAnalysis, sensitivity: Mapping[str, Mapping[str, float]]):
  """Per block: histograms of the ANN twin's output and of the SNN's output averaged over time."""
  plt = _plt()
  blocks = analysis.blocks
  cols = min(len(blocks), 4)
  rows = -(-len(blocks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(max(4.4 * cols, 9.0), 3.4 * rows + 1.3), squeeze=False,
                           layout="constrained")
  T = analysis.num_steps
  labels = {"ann": "ANN (clipped ReLU)", "snn": f"SNN, every step on: mean over T={T} steps",
            "snn_masked": "SNN, learned masks: mean over T_max steps"}
  for ax, b in zip(axes.flat, blocks):
    vals = analysis.values[b]
    keys = ["ann", "snn"] + (["snn_masked"] if analysis.masks_enabled else [])
    edges = _bins([vals[k] for k in keys], T)
    for k in keys:
      v = vals[k]
      if not v.size:
        continue
      kw = dict(histtype="stepfilled", alpha=0.35) if k == "ann" else dict(histtype="step", lw=1.6)
      ax.hist(v, bins=edges, weights=np.full(v.shape, 1.0 / v.size), color=_COLORS[k], label=labels[k],
              ls="--" if k == "snn_masked" else "-", **kw)
    ax.set_yscale("log")
    s = sensitivity[b]
    ax.set_title(f"{b}: e(1)={s['e_1']:.2f}, e({T})={s['e_T']:.2f}, S={s['sensitivity']:.2f}", fontsize=10)
    ax.set_xlabel("block output value (residual stream)")
    ax.set_ylabel("fraction of values (log scale)")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(blocks):]:
    ax.axis("off")
  handles, labs = axes.flat[0].get_legend_handles_labels()
  fig.suptitle(f"ANN vs SNN block outputs (ANN: {analysis.ann_source}); histograms of {analysis.hist_examples} "
               f"test images, errors over {analysis.num_examples}\n"
               f"e(T) = ||r(T) - a|| / ||a||, r(T) = SNN output averaged over the first T steps;  "
               f"S = e(1) - e({T}) (time-step sensitivity)", fontsize=10)
  fig.legend(handles, labs, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
  return fig


def plot_sensitivity(sensitivity: Mapping[str, Mapping[str, Any]], steps_per_module: Mapping[str, float]):
  """Left: e_b(T) vs T per block. Right: sensitivity S_b per block, learned steps of its modules written on top."""
  plt = _plt()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  blocks = list(sensitivity)
  T = len(next(iter(sensitivity.values()))["errors"]) if blocks else 1
  for i, b in enumerate(blocks):  # markers and dashes keep overlapping curves apart
    ax1.plot(range(1, T + 1), sensitivity[b]["errors"], marker="osD^v<>p"[i % 8], ls=("-", "--", ":", "-.")[i % 4],
             label=b, alpha=0.85)
  ax1.set_xticks(range(1, T + 1))
  ax1.set_xlabel("time steps T simulated (masks off)")
  ax1.set_ylabel("e(T) = ||r(T) - a|| / ||a||")
  ax1.set_title("SNN vs ANN block output: normalised L2 error")
  ax1.set_ylim(bottom=0)
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=8)
  x = np.arange(len(blocks))
  vals = [sensitivity[b]["sensitivity"] for b in blocks]
  ax2.bar(x, vals, color=_COLORS["snn"], width=0.6)
  top = max(vals + [1e-6])
  for i, b in enumerate(blocks):
    learned = [f"{m.rpartition('/')[2]} {steps_per_module[m]:g}" for m in steps_per_module
               if m.startswith(b + "/")]
    text = f"T90={sensitivity[b]['T90']}" + (("\nlearned: " + ", ".join(learned)) if learned else "")
    ax2.text(i, max(vals[i], 0) + 0.02 * top, text, ha="center", va="bottom", fontsize=8)
  ax2.set_xticks(x)
  ax2.set_xticklabels(blocks)
  ax2.set_ylim(min(0, min(vals + [0])) * 1.2, top * 1.45)
  ax2.set_ylabel(f"S = e(1) - e({T})")
  ax2.set_title("Time-step sensitivity per block (higher: needs more steps)")
  ax2.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return fig


def plot_early_exit(rows: Sequence[Mapping[str, Any]], num_steps: int, *, criterion: str = "confidence"):
  """Accuracy vs steps run per image (left) and vs T_avg counted to each image's exit (right)."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True, layout="constrained")
  acc = [100 * r["accuracy"] for r in rows]
  panels = [("avg_steps", "steps run per image (mean)", "Early exit: accuracy vs latency"),
            ("avg_simulated_steps" if all("avg_simulated_steps" in r for r in rows) else "avg_module_steps",
             "simulated steps up to the exit step (mean per masked module)"
             if all("avg_simulated_steps" in r for r in rows) else
             "T_avg up to the exit step (mean active steps per module)",
             "Early exit: accuracy vs module time steps")]
  full = [r for r in rows if r["threshold"] == (1.0 if criterion == "confidence" else 0.0)]
  thr = [r["threshold"] for r in rows]
  sc = None
  for ax, (key, xlabel, title) in zip(axes, panels):
    if not all(key in r for r in rows):
      ax.axis("off")
      continue
    xs = [r[key] for r in rows]
    ax.plot(xs, acc, color="0.6", lw=1, zorder=1)
    sc = ax.scatter(xs, acc, c=thr, cmap="viridis", vmin=0.0, vmax=1.0, s=36, zorder=2, edgecolors="0.2",
                    linewidths=0.5)
    if full:
      ax.axhline(100 * full[0]["accuracy"], color="0.3", ls="--", lw=1, label="no early exit (all T_max steps)")
      ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(-0.15, num_steps + 0.3)
    ax.margins(y=0.1)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (%)")
  what = "max softmax probability" if criterion == "confidence" else "normalised entropy"
  fig.suptitle(f"Per-image early exit on top of the learned masks: an image stops once the {what} of its "
               f"accumulated output passes the threshold", fontsize=10)
  if sc is not None:
    cb = fig.colorbar(sc, ax=list(axes), fraction=0.025, pad=0.01)
    cb.set_label(f"{criterion} threshold")
  return fig


# ------------------------------------------------------------------------------------------------------------
# The report.


def _fmt(v, spec: str = ".2f", scale: float = 1.0) -> str:
  return "-" if v is None else format(v * scale, spec)


def _runs_table(rows) -> list[str]:
  lines = ["| run | masks | masked steps | T_max | T_avg (active) | simulated steps | T_avg (op-weighted) "
           "| SNN acc. (%) | every step on (%) | ANN acc. (%) "
           "| SNN energy (uJ/img) | ANN energy (uJ/img) | SNN / ANN energy | notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['masks'] or '-'} | {r.get('semantics') or '-'} | {r['T_max'] or '-'} "
                 f"| {_fmt(r['T_avg'])} | {_fmt(r.get('T_sim'))} | {_fmt(r['T_avg_op'])} "
                 f"| {_fmt(r['accuracy'], '.2f', 100)} "
                 f"| {_fmt(r['accuracy_all_steps'], '.2f', 100)} | {_fmt(r['ann_accuracy'], '.2f', 100)} "
                 f"| {_fmt(r['snn_energy_uj'], '.4g')} | {_fmt(r['ann_energy_uj'], '.4g')} "
                 f"| {_fmt(r['energy_ratio'], '.3f')} | {r['note']} |")
  return lines


def _save(fig, out: str, name: str) -> str:
  plt = _plt()
  path = os.path.join(out, f"{name}.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return f"{name}.png"


def write_report(workdirs: Sequence[str], out: str | None = None, *, num_batches: int = 2,
                 batch_size: int | None = None, early_exit_batches: int = 0, ann_params: str = "auto",
                 criterion: str = "confidence", thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 command: str = "") -> dict:
  """Writes `report.md`, the PNGs and `report.json` into `out`; returns the report.json dict.

  Args:
    workdirs: training runs; the first is the primary run (see the module docstring).
    out: output directory; default `<workdir>/report` for one run, `<common parent>/report` for several.
    num_batches: test batches for the activation analysis.
    batch_size: test batch size (default: the primary run's eval_batch_size).
    early_exit_batches: test batches for early exit (0: the whole test split).
    ann_params: the ANN of the activation analysis: 'auto' | 'ann' | 'snn', see `ann_reference`.
  """
  if not workdirs:
    raise ValueError("write_report needs at least one workdir.")
  if ann_params not in ("auto", "ann", "snn"):
    raise ValueError(f"ann_params must be 'auto', 'ann' or 'snn', got {ann_params!r}.")
  for wd in workdirs:
    loader.read_config(wd)  # a clear error for a wrong path before any work
  if out is None:
    paths = [os.path.abspath(w) for w in workdirs]
    out = os.path.join(paths[0] if len(paths) == 1 else os.path.commonpath(paths), "report")
  os.makedirs(out, exist_ok=True)
  primary = workdirs[0]
  rows = run_rows(workdirs)
  result: dict[str, Any] = {"workdirs": [os.path.abspath(w) for w in workdirs],
                            "report": os.path.join(os.path.abspath(out), "report.md"), "runs": rows, "plots": {}}
  md = [f"# dtvit report: {rows[0]['name']}", "",
        f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"
        + (f" by `{command}`" if command else "") + ".", "",
        "Workdirs: " + ", ".join(f"`{w}`" for w in result["workdirs"]) + ".", "",
        "## Runs", "",
        "From each run's `summary.json` (test split). Simulated steps: mean over masked modules of the steps whose "
        "work any output depends on (the x axis of the plot). T_avg: mean over masked modules of their active steps "
        "(the paper's average time steps); op-weighted: weighted by each module's per-step operations. "
        "\"every step on\": the same weights evaluated with masks off (all T_max steps). Energy per image "
        "(`dtvit.energy`, E_MAC = 4.6 pJ, E_AC = 0.9 pJ).", ""]
  md += _runs_table(rows) + [""]
  result["plots"]["accuracy_vs_steps"] = _save(plot_accuracy_vs_steps(rows), out, "accuracy_vs_steps")
  md += ["## Accuracy vs average time steps", "",
         "Filled circles: SNN with learned masks at its T_avg. Open circles: the same weights with every step on. "
         "Squares: runs trained with masks disabled (fixed T = T_max). Dashed: the ANN phase of the first run that "
         "has one (or that it started from).", "",
         "![accuracy vs steps](accuracy_vs_steps.png)", ""]

  snn = None
  try:
    snn = loader.load(primary)
  except FileNotFoundError as e:
    md += [f"No checkpoint to analyse in {primary}: {e}", ""]
  if snn is not None and not snn.is_snn:
    md += [f"The primary run's latest phase is '{snn.phase}': no SNN to analyse.", ""]
    snn = None

  if snn is not None:
    T = snn.num_steps
    sim = snn.simulated_steps_per_module
    result["primary"] = {"phase": snn.phase, "T_max": T, "steps_per_module": snn.steps_per_module,
                         "simulated_steps_per_module": sim, "mask_semantics": snn.model.mask.semantics,
                         "masks": {k: v.astype(int).tolist() for k, v in snn.masks.items()},
                         "average_time_steps": snn.average_time_steps,
                         "average_simulated_steps": snn.average_simulated_steps}
    result["plots"]["time_steps"] = _save(plot_time_steps(snn.steps_per_module, snn.masks, T, sim), out,
                                          "time_steps")
    md += [f"## {rows[0]['name']}: learned time steps ({snn.phase} phase)", "",
           f"T_max = {T}; masked steps '{snn.model.mask.semantics}'; T_avg = {snn.average_time_steps:.2f} active "
           f"steps, {snn.average_simulated_steps:.2f} simulated (the steps whose work any output depends on). "
           f"The digits above each bar are the "
           f"module's hard mask over steps 1..{T} (1 = the module emits spikes at that step)."
           + ("" if snn.config.model.mask.enabled else " Masks are disabled in this run: every step is on."), "",
           "![time steps](time_steps.png)", ""]

    ann = ann_reference(snn, ann_params)
    analysis = analyse_activations(snn, ann, num_batches=num_batches, batch_size=batch_size)
    sens = sensitivity_table(analysis.errors)

    summary_rates = (snn.summary or {}).get("spike_rates")
    if summary_rates:
      rates, source = summary_rates, "whole test split, learned hard masks; from summary.json"
    else:
      rates = {k: v.tolist() for k, v in analysis.spike_rates.items()}
      source = f"{analysis.num_examples} test images, learned hard masks"
    result["plots"]["spike_rates"] = _save(plot_spike_rates(rates, snn.masks, source=source), out, "spike_rates")
    md += ["## Spike rates per layer and step", "",
           f"Mean spike rate of every spiking layer at every step ({source}). Hatched 'off' cells: steps the "
           "layer's module mask switches off (its spikes are dropped there).", "",
           "![spike rates](spike_rates.png)", ""]

    result["sensitivity"] = sens
    result["masked_errors"] = analysis.masked_errors
    result["activation_examples"] = analysis.num_examples
    result["plots"]["activation_histograms"] = _save(plot_activation_histograms(analysis, sens), out,
                                                     "activation_histograms")
    result["plots"]["sensitivity"] = _save(plot_sensitivity(sens, snn.steps_per_module), out, "sensitivity")
    md += ["## ANN vs SNN activations per block (time-step sensitivity)", "",
           f"The ANN ({analysis.ann_source}) and the SNN run on {analysis.num_examples} test images (histograms: "
           f"the first {analysis.hist_examples}). For each block b, a_b is the ANN's block output (residual "
           "stream) and r_b(T) the SNN's block output averaged over its first T steps, simulated with masks off "
           "so that every block sees every step. The ANN's neurons output clip(x / threshold, 0, 1), the rate an "
           "IF neuron approximates, so r_b is on the ANN's scale.", "",
           "- e_b(T) = ||r_b(T) - a_b||_2 / ||a_b||_2 over all images, tokens and channels (normalised L2 "
           f"error), T = 1..{T};",
           f"- sensitivity S_b = e_b(1) - e_b({T}): how much error the extra steps remove. High S_b: the block's "
           "activations need many steps to approach the ANN's; S_b near 0: one step is as good as all;",
           "- T90_b: the fewest steps that remove 90% of S_b (how fast the error falls);",
           f"- e_b with learned masks: the error of the SNN with its hard masks (rate over T_max = {T} steps).", "",
           "Errors compound over depth: block b sees the SNN outputs of the blocks before it.", "",
           "![activation histograms](activation_histograms.png)", "", "![sensitivity](sensitivity.png)", "",
           f"| block | e(1) | e({T}) | S = e(1) - e({T}) | T90 | e with learned masks | learned steps |",
           "|---|---|---|---|---|---|---|"]
    for b, s in sens.items():
      learned = ", ".join(f"{m.rpartition('/')[2]} {v:g}" for m, v in snn.steps_per_module.items()
                          if m.startswith(b + "/")) or "-"
      masked = f"{analysis.masked_errors[b]:.3f}" if analysis.masks_enabled else "- (masks disabled)"
      md.append(f"| {b} | {s['e_1']:.3f} | {s['e_T']:.3f} | {s['sensitivity']:.3f} | {s['T90']} "
                f"| {masked} | {learned if analysis.masks_enabled else f'fixed T = {T}'} |")
    md.append("")

    ee = early_exit_rows(snn, thresholds, criterion=criterion, max_batches=early_exit_batches,
                         batch_size=batch_size)
    result["early_exit"] = {"criterion": criterion, "rows": ee}
    result["plots"]["early_exit"] = _save(plot_early_exit(ee, T, criterion=criterion), out, "early_exit")
    md += ["## Early exit", "",
           f"Per-image early exit on top of the learned masks ({criterion} criterion, "
           f"{'whole test split' if not early_exit_batches else f'{early_exit_batches} test batches'}): steps "
           "run in order and an image stops once its accumulated output is confident. 'steps run' is the mean "
           "number of steps per image (latency); 'T_avg to exit' counts each masked module's active steps up "
           f"to the exit step, averaged over modules (the paper's T_avg; {snn.average_time_steps:.2f} without "
           "exit); 'simulated to exit' counts the steps whose work is needed up to the exit step "
           f"({snn.average_simulated_steps:.2f} without exit).", "", "![early exit](early_exit.png)", "",
           "| threshold | accuracy (%) | steps run | T_avg to exit | simulated to exit |", "|---|---|---|---|---|"]
    for r in ee:
      md.append(f"| {r['threshold']:g} | {100 * r['accuracy']:.2f} | {r['avg_steps']:.2f} "
                f"| {_fmt(r.get('avg_module_steps'))} | {_fmt(r.get('avg_simulated_steps'))} |")
    md.append("")

  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md))
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(result, f, indent=2, default=_json_default)
  return result


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


# ------------------------------------------------------------------------------------------------------------
# Command line.


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  result = write_report(FLAGS.workdir, FLAGS.out, num_batches=FLAGS.num_batches, batch_size=FLAGS.batch_size,
                        early_exit_batches=FLAGS.early_exit_batches, ann_params=FLAGS.ann_params,
                        criterion=FLAGS.criterion, thresholds=[float(t) for t in FLAGS.thresholds],
                        command="python -m dtvit.report " + " ".join(sys.argv[1:]))
  print(f"report: {result['report']} ({len(result['plots'])} plots)")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_multi_string("workdir", None, "Training run directory; repeat for a sweep (the first is the "
                            "primary run).")
  flags.DEFINE_string("out", None, "Output directory (default <workdir>/report, or <common parent>/report).")
  flags.DEFINE_integer("num_batches", 2, "Test batches for the ANN vs SNN activation analysis.")
  flags.DEFINE_integer("batch_size", None, "Test batch size (default: the run's eval_batch_size).")
  flags.DEFINE_integer("early_exit_batches", 0, "Test batches for early exit (0: the whole test split).")
  flags.DEFINE_enum("ann_params", "auto", ["auto", "ann", "snn"], "The ANN of the activation analysis: 'ann' = "
                    "the ANN phase the SNN started from (this workdir's, or the one snn.init_from points into), "
                    "'snn' = the ANN twin of the SNN's own weights, 'auto' = 'ann' when there is one, else 'snn'.")
  flags.DEFINE_enum("criterion", "confidence", ["confidence", "entropy"], "Early-exit criterion.")
  flags.DEFINE_list("thresholds", [str(t) for t in DEFAULT_THRESHOLDS], "Early-exit thresholds in [0, 1].")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
