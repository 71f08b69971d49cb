"""The plots of a run (and of a sweep's runs), each a function that returns a matplotlib Figure, on what
`dtvit.analysis` computes or a run's files hold. `dtvit.report` writes them into its report; a notebook or
`dtvit.evaluate --early_exit` draws them one at a time.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dtvit import analysis as analysis_lib
from dtvit import masks as masks_lib
from dtvit import events
from dtvit.models import paths

_COLORS = {"ann": "#4c72b0", "snn": "#dd8452", "snn_masked": "#55a868", paths.ATTN: "#4c72b0",
           paths.MLP: "#dd8452", "other": "#8c8c8c"}


def pyplot():
  import matplotlib.pyplot as plt
  return plt




def plot_accuracy_vs_steps(rows: Sequence[Mapping[str, Any]]):
  """Test accuracy vs average time steps for each run (see the module docstring)."""
  plt = pyplot()
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


CURVE_PANELS = (("loss", ("loss",)), ("accuracy", ("accuracy", "val_accuracy", "test_accuracy")),
                ("time steps", ("average_time_steps", "average_simulated_steps")))


def training_curves(workdir: str, phases: Sequence[str]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """{phase: {tag: (steps [N], values [N])}} of the CURVE_PANELS tags in `<workdir>/<phase>/`'s event files
  (phases without event files are left out)."""
  tags = tuple(t for _, panel in CURVE_PANELS for t in panel)
  out = {}
  for phase in phases:
    curves = events.read_curves(os.path.join(workdir, phase), tags)
    if curves:
      out[phase] = curves
  return out


def plot_training_curves(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]):
  """One panel per CURVE_PANELS entry; phases side by side on one step axis (each phase's steps offset by the
  last step of the phases before it, a dotted line at each boundary). `curves`: `training_curves`."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.2 * len(CURVE_PANELS), 3.4), squeeze=False)
  offset = 0
  for phase, tags in curves.items():
    for ax, (_, panel) in zip(axes[0], CURVE_PANELS):
      for tag in panel:
        if tag in tags:
          steps_N, values_N = tags[tag]
          ax.plot(steps_N + offset, values_N, marker="o" if len(steps_N) < 3 else None, ms=3,
                  label=f"{phase} {tag}", linestyle=":" if tag.startswith("val") else "-")
      if offset:
        ax.axvline(offset, color=_COLORS["other"], linestyle=":", linewidth=0.8)
    offset += max(int(s[-1]) for s, _ in tags.values())
  for ax, (title, _) in zip(axes[0], CURVE_PANELS):
    ax.set_title(title)
    ax.set_xlabel("step (phases in order)")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_time_steps(step_counts: Mapping[str, Mapping[str, Any]], max_time_steps: int):
  """Bar chart of each masked module's learned active steps (and, as a light bar behind it, its simulated
  steps), its mask pattern written above the bar.

  Args:
    step_counts: {module: {'active_steps', 'simulated_steps', 'mask'}}, as `dtvit.load(...).step_counts`
      (`models.step_counts`).
    max_time_steps: T_max.
  """
  plt = pyplot()
  names = list(step_counts)
  steps_per_module = {n: step_counts[n]["active_steps"] for n in names}
  simulated = {n: step_counts[n]["simulated_steps"] for n in names}
  fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(names) + 2), 5.0))
  kinds = [_kind(n) for n in names]
  x = np.arange(len(names))
  if names:
    ax.bar(x, [simulated[n] for n in names], color="0.85", edgecolor="0.5", width=0.75,
           label="simulated steps (work needed)")
  ax.bar(x, [steps_per_module[n] for n in names], color=[_COLORS[k] for k in kinds], width=0.6)
  for i, n in enumerate(names):
    pattern = "".join(str(int(v)) for v in np.asarray(step_counts[n]["mask"]).reshape(-1))
    top = max(steps_per_module[n], simulated[n])
    ax.text(i, top + 0.08, pattern, ha="center", va="bottom", fontsize=8, family="monospace")
  t_avg = masks_lib.average_steps(step_counts, "active_steps") or 0.0
  ax.axhline(max_time_steps, color="0.3", ls="--", lw=1, label=f"T_max = {max_time_steps}")
  ax.axhline(t_avg, color="0.3", ls=":", lw=1, label=f"T_avg = {t_avg:.2f} (mean active steps over modules)")
  if names:
    t_sim = masks_lib.average_steps(step_counts, "simulated_steps")
    ax.axhline(t_sim, color="0.5", ls="-.", lw=1, label=f"mean simulated steps = {t_sim:.2f}")
  for kind in (paths.ATTN, paths.MLP, "other"):
    if kind in kinds:
      ax.bar([0], [0], color=_COLORS[kind], label={paths.ATTN: "self-attention", paths.MLP: "MLP",
                                                   "other": "other"}[kind])
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30, ha="right")
  ax.set_ylim(0, max_time_steps + 0.6)
  ax.set_ylabel(f"active time steps (of T_max = {max_time_steps})")
  ax.set_title(f"Learned time steps per module\n(digits above a bar: its mask over steps 1..{max_time_steps}, "
               "1 = active)", fontsize=10)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=8, ncol=2, frameon=False)
  fig.tight_layout()
  return fig


def _kind(module: str) -> str:
  """The colour group of a masked unit: 'attn', 'mlp', or 'other' (the stem; single neurons with granularity
  'layer')."""
  kind = paths.short_name(module)
  return kind if kind in (paths.ATTN, paths.MLP) else "other"


def plot_spike_rates(spike_rates: Mapping[str, Sequence[float]], masks: Mapping[str, Any], *, source: str = ""):
  """Heatmap: spiking layer x time step, colour = mean spike rate (fraction of the layer's neurons that fire),
  masked steps hatched."""
  plt = pyplot()
  names = sorted(spike_rates, key=paths.order_key)
  R = np.asarray([np.asarray(spike_rates[n], np.float64).reshape(-1) for n in names])
  T = R.shape[1]
  fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * T + 3.5), 0.32 * len(names) + 1.6))
  im = ax.imshow(R, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(R.max()), 1e-6))
  for i, n in enumerate(names):
    unit = paths.owner(n, masks)
    m = None if unit is None else np.asarray(masks[unit]).reshape(-1)
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


def _bins(values: Iterable[np.ndarray], max_time_steps: int, max_bins: int = 120) -> np.ndarray:
  """Edges centred on multiples of 1/T_max (the values a rate over T_max steps of one spike source takes)."""
  lo = min((float(v.min()) for v in values if v.size), default=0.0)
  hi = max((float(v.max()) for v in values if v.size), default=1.0)
  width = 1.0 / max_time_steps
  while (hi - lo) / width > max_bins:
    width *= 2
  start = math.floor(lo / width) * width - width / 2
  n = int(math.ceil((hi - start) / width)) + 1
  return start + width * np.arange(n + 1)


def plot_activation_histograms(analysis: analysis_lib.ActivationAnalysis,
                               sensitivity: Mapping[str, Mapping[str, float]]):
  """Per block: histograms of the ANN twin's output and of the SNN's output averaged over time."""
  plt = pyplot()
  blocks = analysis.blocks
  cols = min(len(blocks), 4)
  rows = -(-len(blocks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(max(4.4 * cols, 9.0), 3.4 * rows + 1.3), squeeze=False,
                           layout="constrained")
  T = analysis.max_time_steps
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
  plt = pyplot()
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
    learned = [f"{k} {v:g}" for k, v in analysis_lib.steps_in_block(steps_per_module, b).items()]
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


def plot_early_exit(rows: Sequence[Mapping[str, Any]], max_time_steps: int, *, criterion: str = "confidence"):
  """Accuracy vs steps run per image (left), vs T_avg counted to each image's exit (middle) and, when the rows
  have it, vs the mean energy per image (right)."""
  plt = pyplot()
  with_energy = all(r.get("avg_energy_j") is not None for r in rows)
  fig, axes = plt.subplots(1, 3 if with_energy else 2, figsize=(17 if with_energy else 12, 4.4), sharey=True,
                           layout="constrained")
  acc = [100 * r["accuracy"] for r in rows]
  panels = [("avg_steps", "steps run per image (mean)", "Early exit: accuracy vs latency"),
            ("avg_simulated_steps" if all("avg_simulated_steps" in r for r in rows) else "avg_module_steps",
             "simulated steps up to the exit step (mean per masked module)"
             if all("avg_simulated_steps" in r for r in rows) else
             "T_avg up to the exit step (mean active steps per module)",
             "Early exit: accuracy vs module time steps")]
  if with_energy:
    panels.append(("avg_energy_uj", "SNN energy per image (uJ, mean; counted to each image's exit)",
                   "Early exit: accuracy vs energy"))
    rows = [dict(r, avg_energy_uj=1e6 * r["avg_energy_j"]) for r in rows]
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
    if key != "avg_energy_uj":
      ax.set_xlim(-0.15, max_time_steps + 0.3)
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



def plot_exit_tradeoff(result: Mapping[str, Any]):
  """Accuracy vs mean energy per image (left) and vs steps run per image (right), one curve per criterion, from
  `dtvit.evaluate.early_exit_workdir`'s result."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True, layout="constrained")
  markers = {"confidence": "o", "entropy": "s"}
  for c in dict.fromkeys(r["criterion"] for r in result["rows"]):
    rows = [r for r in result["rows"] if r["criterion"] == c]
    acc = [100 * r["accuracy"] for r in rows]
    for ax, key, scale in ((axes[0], "avg_energy_j", 1e6), (axes[1], "avg_steps", 1.0)):
      if all(r.get(key) is not None for r in rows):
        ax.plot([scale * r[key] for r in rows], acc, marker=markers.get(c, "^"), lw=1, ms=5, label=c)
  if result.get("no_exit"):
    for ax in axes:
      ax.axhline(100 * result["no_exit"]["accuracy"], color="0.3", ls="--", lw=1, label="no exit")
  axes[0].set_xlabel("SNN energy per image (uJ, mean; counted to each image's exit)")
  axes[1].set_xlabel("steps run per image (mean)")
  axes[0].set_ylabel(f"accuracy (%), {result['data']}")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  fig.suptitle(f"Per-image early exit ({result['phase']}, T_max = {result['T_max']}, masks "
               f"{'learned, ' + result['mask_semantics'] if result['masks_enabled'] else 'off'})", fontsize=10)
  return fig
