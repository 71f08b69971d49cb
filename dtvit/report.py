"""The run report: `report.md`, PNG plots and `report.json` for one training run or a sweep of runs.

  python -m dtvit.report --workdir=workdirs/quickstart                      # -> workdirs/quickstart/report/
  python -m dtvit.report --workdir=runs/cost0.01 --workdir=runs/cost0.05 --workdir=runs/fixedT --out=runs/report

The first workdir is the primary run: every plot below is made for it; with several workdirs the accuracy vs
time steps plot and the table of runs cover all of them (each read from its summary.json and config.json).
This module draws and writes; the numbers come from `dtvit.analysis`, which defines them.

What it shows (the file of each plot in brackets):
- The runs (table, `runs_table.run_rows`): accuracy, average time steps and energy per image from each
  summary.json.
- Training curves [training_curves.png]: the primary run's train loss, train and validation accuracy and
  average time steps over training, phase after phase, read from its TensorBoard event files.
- Accuracy vs average time steps [accuracy_vs_steps.png]: each run's SNN test accuracy with its learned masks at
  its T_avg; runs with masks disabled (model.mask.enabled=False) at T_max; for runs evaluated with every step on
  as well (eval_fixed_steps), the same weights with masks off at T_max.
- Learned time steps [time_steps.png]: each masked module's active steps and mask pattern.
- Spike rates [spike_rates.png]: mean spike rate of every spiking layer at every step, with the learned masks
  (summary.json's test-set rates; masked steps hatched).
- ANN vs SNN activations [activation_histograms.png, sensitivity.png]: each block's output of an ANN and of the
  SNN averaged over its first T steps, their normalised error e_b(T), the sensitivity S_b = e_b(1) - e_b(T_max)
  and T90_b (`analysis.analyse_activations`, `analysis.sensitivity_table`).
- Early exit [early_exit.png]: per-sample exit on top of the learned masks for a range of confidence
  thresholds (`analysis.early_exit_rows`): accuracy vs steps run per image, vs the paper's T_avg counted up
  to each image's exit step, and vs the mean energy per image (`energy.energy_by_exit`).
- Early-exit evaluation [exit_tradeoff.png, only when the primary run has one]: the table and curves of
  `python -m dtvit.evaluate --workdir=W --early_exit=confidence,entropy` (<workdir>/early_exit/), accuracy vs
  energy and vs steps per criterion.

Library use (e.g. in a notebook): the `dtvit.plots` functions (each returns a matplotlib Figure) on what
`dtvit.analysis` computes; `write_report` does everything.
"""

from __future__ import annotations

import datetime
import sys
from typing import Any, Sequence

from dtvit import analysis as analysis_lib
from dtvit import runs_table
from dtvit import loader
from dtvit import plots
from dtvit import storage
from dtvit import workdir as workdir_lib

PLOTS = ("training_curves", "accuracy_vs_steps", "time_steps", "spike_rates", "activation_histograms", "sensitivity",
         "early_exit")


# ------------------------------------------------------------------------------------------------------------
# The report: report.md, the PNGs and report.json. Each section below adds its Markdown lines, plots and
# report.json entries.


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


def _save(fig, out: str, name: str, result: dict) -> None:
  """Writes `fig` to <out>/<name>.png and records it in result['plots']."""
  plt = plots.pyplot()
  with storage.local_copy(storage.join(out, f"{name}.png"), ".png") as png:
    fig.savefig(png, dpi=110)
  plt.close(fig)
  result["plots"][name] = f"{name}.png"


def _runs_section(rows, result: dict, out: str, command: str) -> list[str]:
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
  _save(plots.plot_accuracy_vs_steps(rows), out, "accuracy_vs_steps", result)
  return md + [
      "## Accuracy vs average time steps", "",
      "Filled circles: SNN with learned masks at its T_avg. Open circles: the same weights with every step on. "
      "Squares: runs trained with masks disabled (fixed T = T_max). Dashed: the ANN phase of the first run that "
      "has one (or that it started from).", "",
      "![accuracy vs steps](accuracy_vs_steps.png)", ""]


def _curves_section(workdir: str, result: dict, out: str) -> list[str]:
  phases = [p.strip() for p in str(loader.read_config(workdir).get("phases", "ann,snn")).split(",")]
  curves = plots.training_curves(workdir, phases)
  if not curves:
    return ["## Training curves", "", f"No TensorBoard event files under {workdir}.", ""]
  result["curves"] = {p: {t: {"steps": s.tolist(), "values": v.tolist()} for t, (s, v) in c.items()}
                      for p, c in curves.items()}
  _save(plots.plot_training_curves(curves), out, "training_curves", result)
  return ["## Training curves", "",
          "From the primary run's TensorBoard event files, phase after phase: the train loss and accuracy "
          "averaged over each log interval, the accuracy on the held-out validation split (`eval_every`, "
          "dotted) and the test accuracy at each phase's end, and the SNN's average active and simulated time "
          "steps (hard masks) at each log point.", "", "![training curves](training_curves.png)", ""]


def _primary_snn(workdir: str, allow_unfinished: bool) -> tuple[loader.Loaded | None, list[str]]:
  """The primary run's SNN phase to analyse, or None and the reason in Markdown. An unfinished run raises
  `loader.UnfinishedRunError` unless `allow_unfinished`."""
  try:
    snn = loader.load(workdir, allow_unfinished=allow_unfinished)
    print(f"dtvit.report: {snn.source}", file=sys.stderr)
  except FileNotFoundError as e:
    return None, [f"No checkpoint to analyse in {workdir}: {e}", ""]
  if not snn.is_snn:
    return None, [f"The primary run's latest phase is '{snn.phase}': no SNN to analyse.", ""]
  return snn, []


def _time_steps_section(snn: loader.Loaded, name: str, result: dict, out: str) -> list[str]:
  T = snn.max_time_steps
  result["primary"] = analysis_lib.primary_summary(snn)
  _save(plots.plot_time_steps(snn.step_counts, T), out, "time_steps", result)
  return [f"## {name}: learned time steps ({snn.phase} phase)", "",
          f"T_max = {T}; masked steps '{snn.model.mask.semantics}'; T_avg = {snn.average_time_steps:.2f} active "
          f"steps, {snn.average_simulated_steps:.2f} simulated (the steps whose work any output depends on). "
          f"The digits above each bar are the "
          f"module's hard mask over steps 1..{T} (1 = the module emits spikes at that step)."
          + ("" if snn.config.model.mask.enabled else " Masks are disabled in this run: every step is on."), "",
          "![time steps](time_steps.png)", ""]


def _spike_rates_section(snn: loader.Loaded, analysis, result: dict, out: str) -> list[str]:
  rates, source = analysis_lib.spike_rates(snn, analysis)
  _save(plots.plot_spike_rates(rates, snn.masks, source=source), out, "spike_rates", result)
  return ["## Spike rates per layer and step", "",
          f"Mean spike rate of every spiking layer at every step ({source}). Hatched 'off' cells: steps the "
          "layer's module mask switches off (its spikes are dropped there).", "",
          "![spike rates](spike_rates.png)", ""]


def _activations_section(snn: loader.Loaded, analysis, sens: dict, result: dict, out: str) -> list[str]:
  T = snn.max_time_steps
  result["sensitivity"] = sens
  result["masked_errors"] = analysis.masked_errors
  result["activation_examples"] = analysis.num_examples
  _save(plots.plot_activation_histograms(analysis, sens), out, "activation_histograms", result)
  _save(plots.plot_sensitivity(sens, snn.steps_per_module), out, "sensitivity", result)
  md = ["## ANN vs SNN activations per block (time-step sensitivity)", "",
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
    learned = ", ".join(f"{k} {v:g}" for k, v in analysis_lib.steps_in_block(snn.steps_per_module, b).items())
    masked = f"{analysis.masked_errors[b]:.3f}" if analysis.masks_enabled else "- (masks disabled)"
    md.append(f"| {b} | {s['e_1']:.3f} | {s['e_T']:.3f} | {s['sensitivity']:.3f} | {s['T90']} "
              f"| {masked} | {(learned or '-') if analysis.masks_enabled else f'fixed T = {T}'} |")
  return md + [""]


def _early_exit_section(snn: loader.Loaded, rows: list[dict], criterion: str, early_exit_batches: int,
                        result: dict, out: str) -> list[str]:
  result["early_exit"] = {"criterion": criterion, "rows": rows}
  _save(plots.plot_early_exit(rows, snn.max_time_steps, criterion=criterion), out, "early_exit", result)
  md = ["## Early exit", "",
        f"Per-image early exit on top of the learned masks ({criterion} criterion, "
        f"{'whole test split' if not early_exit_batches else f'{early_exit_batches} test batches'}): steps "
        "run in order and an image stops once its accumulated output is confident. 'steps run' is the mean "
        "number of steps per image (latency); 'T_avg to exit' counts each masked module's active steps up "
        f"to the exit step, averaged over modules (the paper's T_avg; {snn.average_time_steps:.2f} without "
        "exit); 'simulated to exit' counts the steps whose work is needed up to the exit step "
        f"({snn.average_simulated_steps:.2f} without exit).", "", "![early exit](early_exit.png)", "",
        "| threshold | accuracy (%) | steps run | T_avg to exit | simulated to exit | energy (uJ) |",
        "|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['threshold']:g} | {100 * r['accuracy']:.2f} | {r['avg_steps']:.2f} "
              f"| {_fmt(r.get('avg_module_steps'))} | {_fmt(r.get('avg_simulated_steps'))} "
              f"| {_fmt(r.get('avg_energy_j'), '.4f', 1e6)} |")
  return md + [""]



EXIT_PLOT = "exit_tradeoff"  # drawn when the primary run has `python -m dtvit.evaluate --early_exit` results


def _exit_eval_section(workdir: str, result: dict, out: str) -> list[str]:
  """The primary run's early-exit evaluation (`dtvit.evaluate.early_exit_workdir`), when it has one."""
  from dtvit import evaluate as evaluate_lib
  path = storage.join(workdir, evaluate_lib.EXIT_DIR, "early_exit.json")
  if not storage.exists(path):
    return []
  ee = workdir_lib.read_json(path, expect=dict)
  result["early_exit_evaluation"] = ee
  _save(plots.plot_exit_tradeoff(ee), out, EXIT_PLOT, result)
  return (["## Early exit: accuracy vs energy (python -m dtvit.evaluate --early_exit)", "",
           f"![accuracy vs energy and steps]({EXIT_PLOT}.png)", ""] + evaluate_lib.exit_table_md(ee) + [""])


def _output_dir(workdirs: Sequence[str], out: str | None, ann_params: str) -> str:
  """Checks the arguments (a clear error for a wrong path before any work) and makes the output directory:
  `out`, or by default <workdir>/report for one run, <common parent>/report for several."""
  if not workdirs:
    raise ValueError("write_report needs at least one workdir.")
  analysis_lib.check_ann_params(ann_params)
  for wd in workdirs:
    loader.read_config(wd)
  if out is None:
    abs_paths = [storage.abspath(w) for w in workdirs]
    out = storage.join(abs_paths[0] if len(abs_paths) == 1 else runs_table.common_path(abs_paths), "report")
  storage.check(out, "--out")
  storage.makedirs(out)
  return out


def write_report(workdirs: Sequence[str], out: str | None = None, *, num_batches: int = 2,
                 batch_size: int | None = None, early_exit_batches: int = 0, ann_params: str = "auto",
                 criterion: str = "confidence", thresholds: Sequence[float] = analysis_lib.DEFAULT_THRESHOLDS,
                 command: str = "", allow_unfinished: bool = False) -> dict:
  """Writes `report.md`, the PNGs and `report.json` into `out`; returns the report.json dict.

  Args:
    workdirs: training runs; the first is the primary run (see the module docstring).
    out: output directory; default `<workdir>/report` for one run, `<common parent>/report` for several.
    num_batches: test batches for the activation analysis.
    batch_size: test batch size (default: the primary run's eval_batch_size).
    early_exit_batches: test batches for early exit (0: the whole test split).
    ann_params: the ANN of the activation analysis: 'auto' | 'ann' | 'snn', see `analysis.ann_reference`.
    allow_unfinished: analyse a primary run that has not finished (its latest checkpoint; `dtvit.load`); else
      such a run raises `loader.UnfinishedRunError`.
  """
  out = _output_dir(workdirs, out, ann_params)
  rows = runs_table.run_rows(workdirs)
  result: dict[str, Any] = {"workdirs": [storage.abspath(w) for w in workdirs],
                            "report": storage.join(storage.abspath(out), "report.md"), "runs": rows, "plots": {}}
  md = _runs_section(rows, result, out, command)
  md += _curves_section(workdirs[0], result, out)
  snn, md_none = _primary_snn(workdirs[0], allow_unfinished)
  md += md_none
  if snn is not None:
    md += _time_steps_section(snn, rows[0]["name"], result, out)
    ann = analysis_lib.ann_reference(snn, ann_params)
    analysis = analysis_lib.analyse_activations(snn, ann, num_batches=num_batches, batch_size=batch_size)
    sens = analysis_lib.sensitivity_table(analysis.errors)
    md += _spike_rates_section(snn, analysis, result, out)
    md += _activations_section(snn, analysis, sens, result, out)
    ee = analysis_lib.early_exit_rows(snn, thresholds, criterion=criterion, max_batches=early_exit_batches,
                                      batch_size=batch_size)
    md += _early_exit_section(snn, ee, criterion, early_exit_batches, result, out)
  md += _exit_eval_section(workdirs[0], result, out)
  storage.write_text(storage.join(out, "report.md"), "\n".join(md))
  workdir_lib.write_json(storage.join(out, "report.json"), result)
  return result


# ------------------------------------------------------------------------------------------------------------
# The command line.


def main(argv):
  from absl import flags
  from absl import app
  import matplotlib
  matplotlib.use("Agg")  # files only
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with loader.user_errors("dtvit.report"):
    result = write_report(runs_table.expand_sweeps(FLAGS.workdir), FLAGS.out, num_batches=FLAGS.num_batches,
                          batch_size=FLAGS.batch_size, early_exit_batches=FLAGS.early_exit_batches,
                          ann_params=FLAGS.ann_params, criterion=FLAGS.criterion,
                          thresholds=[float(t) for t in FLAGS.thresholds],
                          command="python -m dtvit.report " + " ".join(sys.argv[1:]),
                          allow_unfinished=FLAGS.allow_unfinished)
  print(f"report: {result['report']} ({len(result['plots'])} plots)")


def _define_flags():
  from absl import flags
  flags.DEFINE_multi_string("workdir", None, "Training run directory, or a dtvit.sweep root (its points); "
                            "repeat for several (the first run is the primary run).")
  flags.DEFINE_string("out", None, "Output directory (default <workdir>/report, or <common parent>/report).")
  flags.DEFINE_integer("num_batches", 2, "Test batches for the ANN vs SNN activation analysis.")
  flags.DEFINE_integer("batch_size", None, "Test batch size (default: the run's eval_batch_size).")
  flags.DEFINE_integer("early_exit_batches", 0, "Test batches for early exit (0: the whole test split).")
  flags.DEFINE_enum("ann_params", "auto", ["auto", "ann", "snn"], "The ANN of the activation analysis: 'ann' = "
                    "the ANN phase the SNN started from (this workdir's, or the one snn.init_from points into), "
                    "'snn' = the ANN twin of the SNN's own weights, 'auto' = 'ann' when there is one, else 'snn'.")
  flags.DEFINE_enum("criterion", "confidence", ["confidence", "entropy"], "Early-exit criterion.")
  flags.DEFINE_list("thresholds", [str(t) for t in analysis_lib.DEFAULT_THRESHOLDS], "Early-exit thresholds in [0, 1].")
  flags.DEFINE_bool("allow_unfinished", False, "Analyse a primary run that has not finished (its latest "
                    "checkpoint); without it such a run is refused.")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
