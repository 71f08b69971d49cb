"""Evaluation of a trained phase: test accuracy, and for the SNN its time steps, spike rates and energy.

Every time-step figure comes from `models.step_counts` and its means from `masks.average_steps` (the accounting
of `dtvit.masks`), through `step_averages` for the log lines during training and for summary.json alike.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np

from dtvit import compilation
from dtvit import energy as energy_lib
from dtvit import masks as masks_lib
from dtvit import data
from dtvit import models
from dtvit import sharding
from dtvit import steps
from dtvit import storage
from dtvit.models import paths

_RATE_KEYS = ("input_rates", "attention_rates", "spike_rates", "masks")


@functools.lru_cache(maxsize=16)
def _eval_fn(model, mesh):
  """The jitted eval step, one per (model, mesh): evaluating again during training compiles nothing new."""
  return compilation.jit(steps.make_eval_step(model), out_shardings=sharding.replicated(mesh))


def evaluate(model, variables, config, mesh, *, split: str = "test", batches: Iterable[dict] | None = None) -> dict:
  """{'accuracy', 'count'} over the split, and for the SNN 'aux': the per-step rates and masks averaged over
  full batches (a last, partly padded batch counts for accuracy only). `batches` (numpy {'image', 'label',
  'mask'} of eval_batch_size each) replace the config's split. `config.eval_examples` subsets the test split
  only."""
  gb = config.eval_batch_size
  sharding.check_batch_size(gb, mesh, "eval_batch_size")
  eval_fn = _eval_fn(model, mesh)
  correct = count = 0.0
  rate_sums, n_full = None, 0
  if batches is None:
    batches = data.eval_batches(config.data, split=split, global_batch_size=gb,
                                max_examples=config.get("eval_examples", 0) if split == "test" else 0)
  for local in batches:
    batch = sharding.global_batch(mesh, {k: local[k] for k in ("image", "label", "mask")})
    out = jax.device_get(eval_fn(variables, batch))
    correct += float(out["correct"])
    count += float(out["count"])
    if model.phase == "snn" and float(out["count"]) == gb:
      rates = {k: out[k] for k in _RATE_KEYS}
      rate_sums = rates if rate_sums is None else jax.tree.map(np.add, rate_sums, rates)
      n_full += 1
  result = {"accuracy": correct / max(count, 1.0), "count": int(count)}
  if rate_sums is not None:
    result["aux"] = jax.tree.map(lambda x: np.asarray(x) / n_full, rate_sums)
  return result


def step_averages(counts: Mapping[str, dict], op_weights: Mapping[str, float] | None = None) -> dict:
  """The summary's names for `masks.average_steps` of the units' active steps ('average_time_steps', the paper's
  T_avg) and simulated steps ('average_simulated_steps'); with `op_weights` ({unit: per-step MACs}) also both
  weighted by the units' op counts ('op_weighted_time_steps', 'op_weighted_simulated_steps').

  counts: `models.step_counts(model, params)`."""
  out = {}
  for name, key in (("time_steps", "active_steps"), ("simulated_steps", "simulated_steps")):
    out[f"average_{name}"] = masks_lib.average_steps(counts, key)
    if op_weights is not None:
      out[f"op_weighted_{name}"] = masks_lib.average_steps(counts, key, weights=op_weights)
  return out


def step_scalars(model, params) -> dict:
  """The SNN's time-step figures for the training log: the averages and every unit's steps."""
  if model.phase != "snn" or not model.mask.enabled:
    return {}
  counts = models.step_counts(model, jax.device_get(params))
  out = step_averages(counts)
  out.update({f"time_steps/{k}": c["active_steps"] for k, c in counts.items()})
  out.update({f"simulated_steps/{k}": c["simulated_steps"] for k, c in counts.items()})
  return out


def step_summary(model, params, op_weights: Mapping[str, float]) -> dict:
  """The SNN's time-step figures for summary.json, all from `models.step_counts` (see `dtvit.masks`).

  'average_time_steps': the mean over masked units (modules, or neurons with granularity 'layer') of their
  active (emitting) steps, the paper's T_avg; 'average_simulated_steps': the mean of their simulated steps (the
  steps whose work any output depends on); both also op-weighted (`op_weights`: `energy.module_op_weights`).
  'step_counts' lists every unit, and the unmasked stem (masked: false) with its own steps."""
  counts = models.step_counts(model, params)
  averages = step_averages(counts, op_weights)
  listed = {k: dict(c, masked=True) for k, c in counts.items()}
  stem = paths.unmasked_stem(model)
  if stem is not None:
    T = float(model.max_time_steps)
    listed[stem] = {"active_steps": T, "simulated_steps": T, "masked": False}
  return {
      "mask_semantics": model.mask.semantics,
      "time_steps_convention": ("average_time_steps = mean over masked units of their active (emitting) steps; "
                                "average_simulated_steps = mean over masked units of the steps whose work any "
                                "output depends on; the unmasked stem is listed in step_counts, not averaged"),
      **{k: averages[k] for k in ("average_time_steps", "average_simulated_steps", "op_weighted_time_steps",
                                  "op_weighted_simulated_steps")},
      "per_module_time_steps": {k: c["active_steps"] for k, c in sorted(counts.items())},
      "per_module_simulated_steps": {k: c["simulated_steps"] for k, c in sorted(counts.items())},
      "masks": {k: c["mask"] for k, c in sorted(counts.items())},
      "step_counts": dict(sorted(listed.items())),
  }


def evaluate_phase(model, variables, config, mesh, info, phase, *, op_counts: Mapping[str, dict] | None,
                   split: str = "test", batches: Sequence[dict] | None = None) -> dict:
  """The phase's test results: accuracy; for SNN phases also time steps, spike rates and energy.

  op_counts: the model's `energy.op_counts` (SNN phases), traced once per phase by the caller. `split` or
  `batches` (re-iterable: read twice with eval_fixed_steps) as in `evaluate`; the keys say 'test' either way."""
  kw = dict(split=split, batches=batches)
  if phase == "ann":
    return {"test_accuracy": evaluate(model, variables, config, mesh, **kw)["accuracy"]}
  hard = models.with_mask(model, hard=True)
  ev = evaluate(hard, variables, config, mesh, **kw)
  out = {"test_accuracy": ev["accuracy"]}
  op_weights = energy_lib.module_op_weights(model, counts=op_counts)
  out.update(step_summary(model, jax.device_get(variables["params"]), op_weights))
  out["T_max"] = model.max_time_steps
  if "aux" in ev:
    aux = ev["aux"]
    out["spike_rates"] = {k: np.round(v, 5).tolist() for k, v in sorted(aux["spike_rates"].items())}
    out["energy"] = energy_lib.energy_report(hard, info.image_shape, aux, counts=op_counts)
  if config.eval_fixed_steps and model.mask.enabled:
    fixed = models.with_mask(model, enabled=False)
    out["test_accuracy_fixed_T"] = evaluate(fixed, variables, config, mesh, **kw)["accuracy"]
  return out


# ------------------------------------------------------------------------------------------------------------
# Command line: a trained run on a split of its data or on a folder of images.
#   python -m dtvit.evaluate --workdir=workdirs/quickstart [--phase=ann] [--split=train] [--images=DIR]

_HEADLINE = ("accuracy", "accuracy_fixed_T", "mask_semantics", "average_time_steps", "average_simulated_steps",
             "op_weighted_time_steps", "op_weighted_simulated_steps", "per_module_time_steps", "T_max")


class FolderBatches:
  """Eval batches ({'image', 'label', 'mask'}, `batch_size` each, the last padded) of the images in
  `<root>/<class name>/`, preprocessed as the run's data (`Loaded.preprocess`); iterable more than once."""

  def __init__(self, run, root: str, batch_size: int):
    self.run, self.batch_size = run, batch_size
    self.files, self.labels = data.spec.class_folder_files(root, run.class_names)

  def __len__(self) -> int:
    return len(self.files)

  def __iter__(self):
    channels = self.run.info.image_shape[-1]
    for i in range(0, len(self.files), self.batch_size):
      files = self.files[i:i + self.batch_size]
      n, pad = len(files), self.batch_size - len(files)
      image = self.run.preprocess([data.spec.read_image(f, channels) for f in files])
      yield {"image": np.concatenate([image, np.zeros((pad, *image.shape[1:]), np.float32)]),
             "label": np.asarray(self.labels[i:i + n] + [0] * pad, np.int32),
             "mask": np.asarray([1.0] * n + [0.0] * pad, np.float32)}


def check_writable(path: str) -> None:
  """Raises PermissionError / FileNotFoundError now when the file `path` could not be written later (object
  storage: only that its package is installed; its permissions show at the write)."""
  if storage.is_url(path):
    storage.check(path, "--out")
    return
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist.")
  if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise PermissionError(f"cannot write {path}: the folder {folder} is not writable; choose another path.")


def evaluate_workdir(workdir: str, *, phase: str | None = None, split: str = "test", images: str | None = None,
                     examples: int = 0, allow_unfinished: bool = False) -> dict:
  """`evaluate_phase` for a trained run (`dtvit.load(workdir, phase, allow_unfinished=...)`) on its data's
  `split` (`examples` > 0: an evenly strided subset) or on the images in `images`/<class name>/. Keys as in
  summary.json, with 'accuracy' for 'test_accuracy'; also 'phase', 'step', 'finished', 'data' and 'count'."""
  from dtvit import loader
  run = loader.load(workdir, phase, allow_unfinished=allow_unfinished)
  print(f"dtvit.evaluate: {run.source}", file=sys.stderr)
  config = run.config.copy_and_resolve_references()
  config.eval_examples = examples
  n = jax.device_count()
  mesh = sharding.make_mesh(n if config.eval_batch_size % n == 0 else 1)
  batches = None if images is None else FolderBatches(run, images, config.eval_batch_size)
  if batches is None:
    total = run.info.num_train if split == "train" else run.info.num_test
    count = min(examples, total) if examples else total
  else:
    count = len(batches)
  op_counts = None if run.phase == "ann" else energy_lib.op_counts(run.model, run.info.image_shape)
  variables = jax.device_put(run.variables, sharding.replicated(mesh))
  out = evaluate_phase(run.model, variables, config, mesh, run.info, run.phase, op_counts=op_counts,
                       split=split, batches=batches)
  out = {k.replace("test_accuracy", "accuracy"): v for k, v in out.items()}
  return {"phase": run.phase, "step": run.step, "finished": run.finished, "data": images or f"{split} split",
          "count": count, **out}


# ------------------------------------------------------------------------------------------------------------
# Per-sample early exit of a trained run (SEENN's confidence, DT-SNN's entropy):
#   python -m dtvit.evaluate --workdir=W --early_exit=confidence,entropy [--thresholds=...]

# Default threshold grids, each ending at the threshold that never exits early (the full evaluation).
# They span the whole range: confidence 0 and normalised entropy 1 stop every image after its first step.
EXIT_THRESHOLDS = {"confidence": (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0),
                   "entropy": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01, 0.0)}
EXIT_DIR = "early_exit"  # <workdir>/early_exit/: early_exit.json, early_exit.md, early_exit.png


def early_exit_workdir(workdir: str, *, criteria: Sequence[str] = ("confidence", "entropy"),
                       thresholds: Sequence[float] | None = None, phase: str | None = None, split: str = "test",
                       examples: int = 0, write: bool = True, allow_unfinished: bool = False) -> dict:
  """A trained SNN run under per-sample early exit: for each criterion and threshold the accuracy, the steps run
  per image, the module steps up to the exit and the mean per-image energy (`inference.early_exit_over_batches`,
  `energy.energy_by_exit`), over the run's `split` (`examples` > 0: an evenly strided subset).

  `thresholds` apply to every criterion (default: `EXIT_THRESHOLDS` per criterion). With `write`, the table goes
  to <workdir>/early_exit/early_exit.json and .md, the curves (accuracy vs energy and vs steps) to
  early_exit.png; `dtvit.report` shows them. Returns the json's dict."""
  from dtvit import inference
  from dtvit import loader
  bad = [c for c in criteria if c not in inference.CRITERIA]
  if bad or not criteria:
    raise ValueError(f"--early_exit: unknown criteria {bad}; choose from {inference.CRITERIA}.")
  run = loader.load(workdir, phase, allow_unfinished=allow_unfinished)
  if run.phase == "ann":
    raise ValueError(f"{workdir}: early exit needs an SNN phase ('snn' or 'finetune'), not the ANN twin.")
  config = run.config
  grids = {c: tuple(thresholds) if thresholds else EXIT_THRESHOLDS[c] for c in criteria}
  batches = data.eval_batches(config.data, split=split, global_batch_size=config.eval_batch_size,
                              max_examples=examples)
  rows = inference.early_exit_criteria_over_batches(run.model, run.variables, batches, grids)
  T = run.model.max_time_steps
  table = []
  for c in criteria:
    for r in rows[c]:
      table.append({"criterion": c, **r})
  full = [r for r in table if r["avg_steps"] == T and r["threshold"] == (1.0 if r["criterion"] == "confidence"
                                                                          else 0.0)]
  result = {"workdir": storage.basename(storage.abspath(workdir)), "phase": run.phase, "data": f"{split} split",
            "count": int(examples) if examples else (run.info.num_train if split == "train" else run.info.num_test),
            "T_max": T, "mask_semantics": run.model.mask.semantics, "masks_enabled": bool(run.model.mask.enabled),
            "no_exit": {k: full[0][k] for k in ("accuracy", "avg_energy_j")} if full else None,
            "energy_convention": ("avg_energy_j: mean over images of the SNN energy up to each image's exit "
                                  "(dtvit.energy.energy_by_exit: the stem, every module at its working steps up to "
                                  "the exit under the mask semantics, the head at the steps run), from the per-step "
                                  "rates of the dense evaluation averaged over full batches"),
            "rows": table}
  if write:
    out = storage.join(workdir, EXIT_DIR)
    storage.makedirs(out)
    from dtvit import workdir as workdir_lib
    workdir_lib.write_json(storage.join(out, "early_exit.json"), result)
    storage.write_text(storage.join(out, "early_exit.md"), "\n".join(exit_table_md(result)) + "\n")
    from dtvit import plots
    import matplotlib
    matplotlib.use("Agg")
    fig = plots.plot_exit_tradeoff(result)
    with storage.local_copy(storage.join(out, "early_exit.png"), ".png") as png:
      fig.savefig(png, dpi=110)
    plots.pyplot().close(fig)
  return result


def exit_table_md(result: Mapping) -> list[str]:
  """The early-exit table (`early_exit_workdir`) as Markdown lines."""
  md = [f"Per-image early exit of {result['workdir']} ({result['phase']}, {result['data']}, {result['count']} "
        f"images, T_max = {result['T_max']}, mask semantics {result['mask_semantics']!r}, masks "
        f"{'learned' if result['masks_enabled'] else 'off (fixed T)'}). Energy per image in uJ.", "",
        "| criterion | threshold | accuracy (%) | steps run | T_avg to exit | simulated to exit | energy (uJ) |",
        "|---|---|---|---|---|---|---|"]
  fmt = lambda v, spec=".2f", scale=1.0: "-" if v is None else format(v * scale, spec)
  for r in result["rows"]:
    md.append(f"| {r['criterion']} | {r['threshold']:g} | {100 * r['accuracy']:.2f} | {r['avg_steps']:.2f} "
              f"| {fmt(r.get('avg_module_steps'))} | {fmt(r.get('avg_simulated_steps'))} "
              f"| {fmt(r.get('avg_energy_j'), '.4f', 1e6)} |")
  return md


def _define_flags(values) -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "a training run's --workdir", flag_values=values)
  flags.DEFINE_enum("phase", None, ["ann", "snn", "finetune"], "default: the run's latest phase", flag_values=values)
  flags.DEFINE_enum("split", "test", ["test", "train"], "the run's data split", flag_values=values)
  flags.DEFINE_string("images", None, "instead of a split: a folder with one subfolder of images per class",
                      flag_values=values)
  flags.DEFINE_integer("examples", 0, "> 0: an evenly strided subset of the split", flag_values=values)
  flags.DEFINE_string("out", None, "also write every figure (spike rates, masks, energy per layer) to this JSON",
                      flag_values=values)
  flags.DEFINE_bool("allow_unfinished", False, "evaluate a run that has not finished (its latest checkpoint); "
                    "without it such a run is refused", flag_values=values)
  flags.DEFINE_string("early_exit", None, "instead: per-image early exit under these criteria (comma-separated: "
                      "confidence, entropy); writes <workdir>/early_exit/early_exit.{json,md,png}", flag_values=values)
  flags.DEFINE_string("thresholds", None, "early-exit thresholds in [0, 1], comma-separated, for every criterion "
                      "(default: a grid per criterion, dtvit.evaluate.EXIT_THRESHOLDS)", flag_values=values)
  flags.mark_flag_as_required("workdir", flag_values=values)


def main(argv=None) -> None:
  """`python -m dtvit.evaluate` with `argv` (without the program; None: sys.argv[1:]); a user's mistake prints one
  line and exits with status 1 (`loader.user_errors`), one in the command line with status 2 (`cli.parse`)."""
  import json
  from dtvit import cli
  from dtvit import loader
  from dtvit import workdir as workdir_lib
  args, _ = cli.parse("dtvit.evaluate", _define_flags, argv, doc="Accuracy (SNN phases: also time steps and "
                      "energy) of a trained run on a split of its data or a folder of images.")
  with loader.user_errors("dtvit.evaluate"):
    if args.early_exit:
      criteria = [c.strip() for c in args.early_exit.split(",") if c.strip()]
      try:
        thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else None
      except ValueError as e:
        raise ValueError(f"--thresholds={args.thresholds!r}: give numbers in [0, 1], comma-separated.") from e
      result = early_exit_workdir(args.workdir, criteria=criteria, thresholds=thresholds, phase=args.phase,
                                  split=args.split, examples=args.examples, allow_unfinished=args.allow_unfinished)
      print("\n".join(exit_table_md(result)))
      print(f"written: {os.path.join(args.workdir, EXIT_DIR)}/early_exit.{{json,md,png}}")
      return
    if args.out:
      check_writable(args.out)  # before the work, not after it
    result = evaluate_workdir(args.workdir, phase=args.phase, split=args.split, images=args.images,
                              examples=args.examples, allow_unfinished=args.allow_unfinished)
    if args.out:
      workdir_lib.write_json(args.out, result)
  headline = {k: result[k] for k in ("phase", "step", "finished", "data", "count", *_HEADLINE) if k in result}
  if "energy" in result:
    headline["energy"] = result["energy"]["totals"]
  print(json.dumps(headline, indent=2))


if __name__ == "__main__":
  main()
