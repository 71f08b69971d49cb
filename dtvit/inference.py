"""Inference with trained time-step masks: skipped-step execution and per-sample early exit.

Skipped steps. Training simulates all T_max steps with traced masks, so shapes never depend on learned values.
At inference the hard masks are fixed, and `make_inference_fn` compiles a static schedule {module: steps}: the
step indices at which some unit of the module works (`dtvit.masks.work_masks`, the same accounting the summary
and the energy report use). Under 'skip' these are the module's active steps, wherever they sit; under 'filter'
every step up to its last active one. The same model code runs with `SpikingViT.schedule` set: each scheduled
module gathers those steps' rows of the residual stream [T_max*B, ...], runs its Dense/BN/attention layers and
neuron scans over them only, and scatters its output back to T_max*B rows with zeros elsewhere; a module with
no working step is not run at all. This is exact because
- every stateless layer (Dense, Conv, BN with running statistics, attention products, pooling) acts on each
  (step, sample) row independently, so leaving rows out does not change the rows kept;
- under 'skip' a neuron does nothing at a masked step (membrane held, no spike), so running its active steps
  back to back is the same recurrence; under 'filter' the recurrence is causal, so its first steps do not
  depend on later inputs;
- the module's output at the steps left out is exactly 0, which the scatter reproduces.

Granularity 'layer' (one mask per neuron): a module runs the union of its neurons' working steps, so a neuron
whose own work ends earlier (or, under 'skip', pauses) may compute a few rows nothing depends on; the
accounting does not count those.

The stem. With `mask_stem=False` (default) the stem is unmasked: its tokens enter the residual stream at
every step and reach the head directly, so every one of the T_max steps is needed and the stem runs them all
(its analog first layer runs once per image anyway). With `mask_stem=True` the stem's output at a masked step
is exactly 0, so nothing downstream needs it computed and the stem is scheduled like any other module. The
head runs on all T_max steps (a zero residual stream still gives its bias), so the time-averaged logits are
unchanged.

Early exit (SEENN / DT-SNN, on top of the learned masks). Steps run in order; sample b stops after step t
once its accumulated output, the mean of its first t step logits, is confident. The prediction is the
argmax of that accumulated output; a sample that never becomes confident runs all T_max steps and gets the
full evaluation's prediction. `early_exit_eval` computes accuracy and average steps from the model's step
logits [T, B, K] (aux['step_logits']) for a list of thresholds; `early_exit_over_batches` accumulates them
over a dataset.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dtvit import compilation
from dtvit import masks as masks_lib
from dtvit import models
from dtvit.models import paths
from dtvit.models import SpikingViT

CRITERIA = ("confidence", "entropy")
_RATE_KEYS = ("input_rates", "attention_rates", "masks")  # what `energy.energy_by_exit` reads from aux

# ----------------------------------------------------------------------------------------------------------
# Skipped-step inference.


def run_steps(mask_T) -> int:
  """T_run of one mask [T]: the index of its last active step + 1 (0 when no step is active)."""
  active = np.flatnonzero(np.asarray(mask_T) > 0)
  return int(active[-1]) + 1 if active.size else 0


def schedule_from_masks(model: SpikingViT, masks: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """{masked module path: the sorted step indices it runs} from hard masks {unit: [T]} as returned by
  `models.hard_masks` (modules for granularity 'module', neurons for 'layer'): the steps at which any of the
  module's units works (`masks.work_masks` under the model's semantics)."""
  units = paths.mask_units(model)
  unknown = sorted(set(masks) - set(units))
  if unknown:
    raise ValueError(f"No mask unit {unknown} in this model; its units are {sorted(units)}.")
  work = masks_lib.work_masks({u: jnp.asarray(m) for u, m in masks.items()}, {u: units[u] for u in masks},
                              model.mask.semantics)
  by_module: dict[str, np.ndarray] = {}
  modules = paths.masked_modules(model)
  for unit, w in work.items():
    module = paths.owner(unit, modules)
    w = np.asarray(w) > 0
    by_module[module] = w if module not in by_module else (by_module[module] | w)
  return {m: tuple(int(t) for t in np.flatnonzero(w)) for m, w in sorted(by_module.items())}


def make_schedule(model: SpikingViT, params) -> dict[str, tuple[int, ...]]:
  """{masked module path: the step indices it runs} from a trained model's hard masks."""
  return schedule_from_masks(model, models.hard_masks(model, params))


def scheduled_model(model: SpikingViT, schedule: Mapping[str, Any]) -> SpikingViT:
  """The same model with hard masks and the static schedule {module: step indices} (an int k means the first
  k steps; entries that run all T_max steps are dropped)."""
  if model.phase != "snn":
    raise ValueError("Skipped-step inference needs the SNN (phase='snn'); the ANN twin has no time steps.")
  steps = {}
  for name, run in schedule.items():
    if isinstance(run, (int, np.integer)):
      if not 0 <= run <= model.max_time_steps:
        raise ValueError(f"T_run of {name!r} must be an integer in [0, {model.max_time_steps}], got {run!r}.")
      run = range(run)
    steps[name] = tuple(int(t) for t in run)
  entries = tuple(sorted((name, run) for name, run in steps.items() if len(run) < model.max_time_steps))
  m = models.with_mask(model, hard=True).clone(schedule=entries)
  m.validate()
  return m


def make_inference_fn(model: SpikingViT, variables) -> tuple[Callable[[jax.Array], jax.Array], dict[str, int]]:
  """A jit-compiled `fn(images [B, H, W, C]) -> logits [B, K]` that skips masked steps, and its schedule.

  The schedule {masked module: step indices} is read once from the hard masks in `variables['params']` and compiled
  into the function: the function is only valid for these masks (new scores need a new function). Its logits
  equal `dense_masked_eval(model, variables, images)`.
  """
  schedule = make_schedule(model, variables["params"])
  fast = scheduled_model(model, schedule)

  @compilation.jit
  def fn(images):
    return models.apply_model(fast, variables, images, with_aux=False)

  return fn, schedule


def dense_masked_eval(model: SpikingViT, variables, images) -> jax.Array:
  """The training path's evaluation with hard masks: all T_max steps simulated. Returns logits [B, K]."""
  return models.apply_model(models.with_mask(model, hard=True), variables, images, with_aux=False)


def matmul_flops(fn: Callable, *args) -> int:
  """FLOPs (2 per multiply-add) of the dot products and convolutions `fn(*args)` traces to.

  Counted from the jaxpr, recursing into scans (times their length), jits, checkpoints and custom-derivative
  calls: the work the program asks for, independent of timing noise. Elementwise work (neurons, BN) is not
  counted.
  """
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) dims
      k = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in _sub_jaxprs(eqn.params):
      total += times * _jaxpr_flops(sub)
  return total


def _sub_jaxprs(params):
  for v in params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


# ----------------------------------------------------------------------------------------------------------
# Per-sample early exit.


def _check_early_exit_args(criterion: str, thresholds: Sequence[float]) -> np.ndarray:
  if criterion not in CRITERIA:
    raise ValueError(f"Unknown early-exit criterion {criterion!r}; choose one of {CRITERIA}.")
  thr = np.asarray(thresholds, np.float64).reshape(-1)
  if thr.size == 0:
    raise ValueError("early exit needs at least one threshold.")
  bad = thr[~((thr >= 0.0) & (thr <= 1.0))]
  if bad.size:
    raise ValueError(f"Early-exit thresholds must lie in [0, 1] (max softmax probability or normalised "
                     f"entropy), got {bad.tolist()}.")
  return thr


def exit_steps(step_logits_TBK, thresholds, criterion: str = "confidence"):
  """Where each sample stops and what it predicts, for each threshold.

  Sample b stops after the first step t (1-based) at which its accumulated output mean(step_logits[:t, b])
  is confident: criterion 'confidence' -> max softmax probability > threshold; 'entropy' -> entropy of the
  softmax / log K < threshold. It stops at T at the latest. The comparisons are strict so that threshold 1.0
  ('confidence') or 0.0 ('entropy') never exits early and reproduces the full evaluation (a float32 softmax
  can round to exactly 1).

  Args:
    step_logits_TBK: per-step logits [T, B, K] (aux['step_logits']).
    thresholds: R values in [0, 1].
  Returns:
    steps_RB int32 in [1, T], predictions_RB int32 (numpy).
  """
  thr_R = _check_early_exit_args(criterion, thresholds)
  x = np.asarray(step_logits_TBK, np.float32)
  if x.ndim != 3:
    raise ValueError(f"step logits must be [T, B, K], got shape {x.shape}.")
  T, _, K = x.shape
  if criterion == "entropy" and K < 2:
    raise ValueError("The entropy criterion needs at least 2 classes.")
  # Post-processing of a few [T, B, K] arrays: numpy, no compilation. The accumulated output's argmax is
  # taken in float32 like the model's own time average (x.mean(0) at the last step); the criteria in float64.
  acc_TBK = np.cumsum(x, axis=0, dtype=np.float32) / np.arange(1, T + 1, dtype=np.float32)[:, None, None]
  acc_TBK[-1] = x.mean(axis=0)
  z = acc_TBK.astype(np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  p_TBK = np.exp(z)
  p_TBK /= p_TBK.sum(axis=-1, keepdims=True)
  if criterion == "confidence":
    ok_RTB = p_TBK.max(axis=-1)[None] > thr_R[:, None, None]
  else:
    with np.errstate(divide="ignore", invalid="ignore"):
      plogp = np.where(p_TBK > 0, p_TBK * np.log(p_TBK), 0.0)
    ok_RTB = (-plogp.sum(axis=-1) / math.log(K))[None] < thr_R[:, None, None]
  ok_RTB[:, -1] = True
  t_RB = np.argmax(ok_RTB, axis=1)  # the first confident step
  pred_TB = np.argmax(acc_TBK, axis=-1)
  pred_RB = np.take_along_axis(pred_TB, t_RB, axis=0)
  return (t_RB + 1).astype(np.int32), pred_RB.astype(np.int32)


def simulated_steps_by_exit(model: SpikingViT, masks: Mapping[str, Any]) -> np.ndarray:
  """[T]: the mean over mask units of their simulated steps when a sample stops after step t, t = 1..T
  (`masks.simulated_steps_by_exit` over the model's unit graph)."""
  units = paths.mask_units(model)
  return masks_lib.simulated_steps_by_exit(masks, {u: units[u] for u in masks}, model.mask.semantics)


def early_exit_stats(step_logits_TBK, labels_B, thresholds, criterion: str = "confidence", *,
                     weights_B=None, masks: Mapping[str, Any] | None = None,
                     simulated_T=None) -> dict[str, np.ndarray]:
  """Sums to accumulate over batches: {'correct', 'steps', 'module_steps' (with masks), 'simulated_steps'
  (with simulated_T, from `simulated_steps_by_exit`), 'count'} per threshold ([R] each; 'count' a scalar), and
  'exit_counts' [R, T]: how many samples stop after each step (for the energy, `_summarise`).
  weights_B: 1 for real examples, 0 for padding (default all 1)."""
  steps_RB, pred_RB = exit_steps(step_logits_TBK, thresholds, criterion)
  labels_B = np.asarray(labels_B).reshape(-1)
  if labels_B.shape[0] != steps_RB.shape[1]:
    raise ValueError(f"{labels_B.shape[0]} labels for {steps_RB.shape[1]} samples.")
  w_B = np.ones(labels_B.shape, np.float64) if weights_B is None else np.asarray(weights_B, np.float64)
  T = np.asarray(step_logits_TBK).shape[0]
  out = {"correct": ((pred_RB == labels_B[None]) * w_B).sum(axis=1), "steps": (steps_RB * w_B).sum(axis=1),
         "count": w_B.sum(),
         "exit_counts": np.stack([((steps_RB == t) * w_B).sum(axis=1) for t in range(1, T + 1)], axis=1)}
  if masks:
    per_t = masks_lib.active_steps_by_exit(masks)
    out["module_steps"] = (per_t[steps_RB - 1] * w_B).sum(axis=1)
  if simulated_T is not None:
    out["simulated_steps"] = (np.asarray(simulated_T)[steps_RB - 1] * w_B).sum(axis=1)
  return out


def _summarise(thresholds, stats, energy_T=None) -> list[dict]:
  n = max(float(stats["count"]), 1e-12)
  if energy_T is not None:  # the mean per-sample energy: each exit step's energy times its share of samples
    energy_R = stats["exit_counts"] @ np.asarray(energy_T, np.float64) / n
  rows = []
  for i, thr in enumerate(np.asarray(thresholds, np.float64).reshape(-1)):
    row = {"threshold": float(thr), "accuracy": float(stats["correct"][i]) / n,
           "avg_steps": float(stats["steps"][i]) / n}
    if "module_steps" in stats:
      row["avg_module_steps"] = float(stats["module_steps"][i]) / n
    if "simulated_steps" in stats:
      row["avg_simulated_steps"] = float(stats["simulated_steps"][i]) / n
    if energy_T is not None:
      row["avg_energy_j"] = float(energy_R[i])
    rows.append(row)
  return rows


def early_exit_eval(step_logits_TBK, labels_B, thresholds, criterion: str = "confidence", *,
                    weights_B=None, masks: Mapping[str, Any] | None = None, energy_T=None) -> list[dict]:
  """Accuracy and cost of per-sample early exit, one row per threshold.

  Returns [{'threshold', 'accuracy', 'avg_steps'}]: 'avg_steps' is the mean number of steps run per sample
  (T_max without exits). With `masks` ({module: hard mask [T]}) each row also has 'avg_module_steps': the
  paper's T_avg (mean over masked modules of active steps) counted up to each sample's exit step. With
  `energy_T` (`energy.energy_by_exit(...)['snn_energy_j']`: joules per sample that stops after step t) each row
  also has 'avg_energy_j', the mean per-sample energy (the stem, every module and the head at the steps each
  sample ran, under the masks' semantics).
  """
  stats = early_exit_stats(step_logits_TBK, labels_B, thresholds, criterion, weights_B=weights_B, masks=masks)
  return _summarise(thresholds, stats, energy_T)


def early_exit_over_batches(model: SpikingViT, variables, batches: Iterable[Mapping[str, Any]], thresholds,
                            criterion: str = "confidence", *, skip_steps: bool = False,
                            energy: bool = True) -> list[dict]:
  """`early_exit_eval` over a dataset: batches are {'image', 'label'[, 'mask']} (as from
  `data.eval_batches`; 'mask' marks real examples). The model runs with hard masks, with its masked
  steps skipped when `skip_steps` (same step logits either way). Rows also have 'avg_simulated_steps' (the
  mean over mask units of their simulated steps up to each sample's exit, `simulated_steps_by_exit`) and, with
  `energy`, 'avg_energy_j' (`energy.energy_by_exit` from the per-step rates of the dense evaluation, averaged
  over the full batches as `evaluate.evaluate` does for the energy report; with `skip_steps` a second, dense
  pass gives them)."""
  return early_exit_criteria_over_batches(model, variables, batches, {criterion: thresholds},
                                          skip_steps=skip_steps, energy=energy)[criterion]


def early_exit_criteria_over_batches(model: SpikingViT, variables, batches: Iterable[Mapping[str, Any]],
                                     thresholds: Mapping[str, Sequence[float]], *, skip_steps: bool = False,
                                     energy: bool = True, e_mac: float | None = None,
                                     e_ac: float | None = None) -> dict[str, list[dict]]:
  """`early_exit_over_batches` for several criteria in one pass over the data: {criterion: thresholds} ->
  {criterion: rows}."""
  from dtvit import energy as energy_lib
  for criterion, thr in thresholds.items():
    _check_early_exit_args(criterion, thr)
  masks = models.hard_masks(model, variables["params"])
  simulated_T = simulated_steps_by_exit(model, masks) if masks else None
  dense = models.with_mask(model, hard=True)
  run_model = scheduled_model(model, make_schedule(model, variables["params"])) if skip_steps else dense

  @compilation.jit
  def forward(images):
    aux = models.apply_model(run_model, variables, images)[1]
    out = {"step_logits": aux["step_logits"]}
    if energy:
      if run_model is not dense:  # a scheduled model's rates cover its run steps only: the dense pass has [T]
        aux = models.apply_model(dense, variables, images)[1]
      out.update({k: aux[k] for k in _RATE_KEYS})
    return out

  totals: dict[str, dict] = {}
  rate_sums, full, partial, image_shape = None, 0, [], None
  for batch in batches:
    image_shape = tuple(np.asarray(batch["image"]).shape[1:])
    out = jax.device_get(forward(jnp.asarray(batch["image"])))
    for criterion, thr in thresholds.items():
      stats = early_exit_stats(out["step_logits"], batch["label"], thr, criterion, weights_B=batch.get("mask"),
                               masks=masks or None, simulated_T=simulated_T)
      prev = totals.get(criterion)
      totals[criterion] = stats if prev is None else {k: prev[k] + v for k, v in stats.items()}
    if energy:
      rates = {k: out[k] for k in _RATE_KEYS}
      weights = batch.get("mask")
      if weights is None or float(np.min(weights)) > 0:
        rate_sums = rates if rate_sums is None else jax.tree.map(np.add, rate_sums, rates)
        full += 1
      else:
        partial.append(rates)
  if not totals:
    raise ValueError("early_exit_over_batches got no batches.")
  energy_T = None
  if energy:
    if not full:  # only partly padded batches: their rates, as the energy report would have none
      rate_sums, full = jax.tree.map(lambda *x: np.sum(x, axis=0), *partial), len(partial)
    aux = jax.tree.map(lambda x: np.asarray(x) / full, rate_sums)  # as `evaluate.evaluate` averages them
    kw = {k: v for k, v in (("e_mac", e_mac), ("e_ac", e_ac)) if v is not None}
    energy_T = energy_lib.energy_by_exit(dense, image_shape, aux, **kw)["snn_energy_j"]
  return {c: _summarise(thresholds[c], totals[c], energy_T) for c in thresholds}
