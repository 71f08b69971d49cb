"""The numbers of the run report (`dtvit.report` draws and writes them): ANN vs SNN activations per block, the
time-step sensitivity, early exit, and the rows of the table of runs.

ANN vs SNN activations (`analyse_activations`, `sensitivity_table`): the paper's motivating analysis. An ANN
and the SNN run on the same test images and each block's output (the residual stream, aux['block_outputs']) is
compared. The ANN (see `ann_reference`) is by default the ANN phase the SNN was converted from, else the ANN
twin of the SNN's own weights. Its neurons output clip(x / c, 0, 1), what an IF neuron's spike rate
approximates, so the SNN's output averaged over steps is on the ANN's scale: no rescaling.
With a_b the ANN output of block b and r_b(T) the SNN output of block b averaged over its first T steps, run with
masks off (every block sees every step; the dynamics are causal, so the first T steps of a T_max run are a
T-step run), both over all evaluated (image, token, channel) entries:
    e_b(T) = ||r_b(T) - a_b||_2 / ||a_b||_2        (normalised L2 error, T = 1..T_max)
    sensitivity S_b = e_b(1) - e_b(T_max)           (how much of the error more steps remove)
    T90_b = the fewest steps T with e_b(1) - e_b(T) >= 0.9 S_b   (how fast the error falls)
A block with a large S_b needs its steps: with one step its activations are far from the ANN's and they approach
them only as steps are added. S_b near 0: one step is as good as T_max. The errors compound over depth (block b
sees the SNN outputs of blocks < b), as in the network itself. e_b(T_max) is what T_max steps leave: the rate
error at finite T and, against the ANN phase, the weight changes of SNN training. Also measured: e_b with the
learned masks (rate over T_max).

Early exit (`early_exit_rows`): per-sample exit (`dtvit.inference.early_exit_over_batches`) on top of the learned
masks for a range of confidence thresholds.

Runs (`run_rows`): one row per workdir from its summary.json and config.json.

Step counts and their averages come from `dtvit.models.step_counts` (through `dtvit.load`) and
`dtvit.masks.average_steps`; block and module names from `dtvit.models.paths`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dtvit import compilation
from dtvit import inference
from dtvit import loader
from dtvit import models
from dtvit import runs_table
from dtvit.models import paths

DEFAULT_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
ANN_PARAMS = ("auto", "ann", "snn")
_SUMS = ("err", "ref", "masked_err")
_VALUES = ("ann", "snn", "snn_masked")


def check_ann_params(ann_params: str) -> None:
  if ann_params not in ANN_PARAMS:
    raise ValueError(f"ann_params must be 'auto', 'ann' or 'snn', got {ann_params!r}.")


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
  max_time_steps: int
  errors: dict
  masked_errors: dict
  values: dict
  spike_rates: dict
  num_examples: int
  masks_enabled: bool
  ann_source: str
  hist_examples: int = 0


def _comparison_fn(ann: loader.Loaded, snn: loader.Loaded, ann_source: str, hist_examples: int):
  """A jitted fn(ann_vars, snn_vars, images [B, H, W, C], w_B) -> ({block: sums and samples}, spike rates)."""
  off = snn.variant(masks="off")
  hard = snn.variant(masks="hard")
  T = snn.max_time_steps

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

  return compilation.jit(fn)


def _accumulate(out, sums: dict, values: dict, keep: int) -> None:
  """Adds one batch's per-block error sums to `sums` and its first `keep` images' outputs to `values`."""
  for name, o in out.items():
    s = sums.setdefault(name, {k: 0.0 for k in _SUMS})
    for k in s:
      s[k] = s[k] + np.asarray(o[k], np.float64)
    v = values.setdefault(name, {k: [] for k in _VALUES})
    if keep > 0:
      for k in v:
        v[k].append(np.asarray(o[k][:keep]).reshape(-1))


def _mean_spike_rates(batch_rates: list) -> dict:
  """{neuron: [T]} averaged over batches. The rates average over whole batches (padding included), so the full
  batches are used when there are any."""
  used = [r for r, full in batch_rates if full] or [r for r, _ in batch_rates]
  return {k: np.mean([np.asarray(r[k]) for r in used], axis=0) for k in sorted(used[0])}


def analyse_activations(snn: loader.Loaded, ann: loader.Loaded | None = None, *, num_batches: int = 2,
                        batch_size: int | None = None, hist_examples: int = 64) -> ActivationAnalysis:
  """Runs an ANN and the SNN on the first `num_batches` test batches; see the module docstring.

  Args:
    snn: a loaded SNN phase (`dtvit.load(workdir, 'snn')`).
    ann: where the ANN's variables come from: None = the SNN's own (its ANN twin: same weights), or a loaded
      ANN phase (`dtvit.load(workdir, 'ann')`, see `ann_reference`).
  """
  if not snn.is_snn:
    raise ValueError("analyse_activations needs an SNN phase (dtvit.load(workdir, phase='snn')).")
  if ann is None:
    ann, ann_source = snn.variant(phase="ann"), "the ANN twin of the SNN's own weights"
  else:
    ann, ann_source = ann.variant(phase="ann"), f"the ANN phase of {ann.workdir}"
  fn = _comparison_fn(ann, snn, ann_source, hist_examples)
  sums, values, batch_rates, count, taken = {}, {}, [], 0.0, 0
  for i, batch in enumerate(snn.batches(batch_size=batch_size)):
    if i >= num_batches:
      break
    w = np.asarray(batch["mask"], np.float32)
    out, rates = jax.device_get(fn(ann.variables, snn.variables, jnp.asarray(batch["image"]), jnp.asarray(w)))
    count += float(w.sum())
    batch_rates.append((rates, bool(w.all())))
    keep = int(min(hist_examples - taken, w[:hist_examples].sum()))
    _accumulate(out, sums, values, keep)
    taken += max(keep, 0)
  if not sums:
    raise ValueError("analyse_activations: the test split gave no batches.")
  blocks = paths.blocks_in(sums)
  errors = {b: np.sqrt(sums[b]["err"] / max(sums[b]["ref"], 1e-30)) for b in blocks}
  masked_errors = {b: float(np.sqrt(sums[b]["masked_err"] / max(sums[b]["ref"], 1e-30))) for b in blocks}
  flat = {b: {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in values[b].items()}
          for b in blocks}
  return ActivationAnalysis(blocks=blocks, max_time_steps=snn.max_time_steps, errors=errors,
                            masked_errors=masked_errors,
                            values=flat, spike_rates=_mean_spike_rates(batch_rates), num_examples=int(count),
                            masks_enabled=bool(snn.config.model.mask.enabled),
                            ann_source=ann_source, hist_examples=taken)


def ann_reference(snn: loader.Loaded, ann_params: str = "auto") -> loader.Loaded | None:
  """The ANN to compare the SNN with: 'snn' -> None (the ANN twin of the SNN's own weights); 'ann' -> the ANN
  phase the SNN started from: its own workdir's, or that of the workdir its `snn.init_from` points into;
  'auto' -> that ANN phase if there is one, else None."""
  check_ann_params(ann_params)
  if ann_params == "snn":
    return None
  candidates = [snn.workdir] + [w for w in [runs_table.init_from_workdir(snn.config)] if w]
  errors = []
  for wd in candidates:
    try:
      return loader.load(wd, "ann", allow_unfinished=True)  # the ANN the SNN (already accepted) started from
    except FileNotFoundError as e:
      errors.append(str(e))
  if ann_params == "ann":
    raise FileNotFoundError("ann_params='ann': no ANN phase checkpoint for the run in " + snn.workdir + ": "
                            + " ".join(errors))
  return None


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


def steps_in_block(steps_per_module: Mapping[str, float], block: str) -> dict[str, float]:
  """{short name ('attn', 'mlp', or a neuron's with granularity 'layer'): steps} of the masked units inside
  `block`, in the order of `steps_per_module`."""
  return {paths.short_name(m): v for m, v in steps_per_module.items() if paths.block_of(m) == block}


# ------------------------------------------------------------------------------------------------------------
# The primary run's steps and spike rates, early exit.


def primary_summary(snn: loader.Loaded) -> dict:
  """The primary run's step counts for report.json: phase, T_max, active and simulated steps per module,
  semantics, hard masks and their averages (all from `snn.step_counts`)."""
  return {"phase": snn.phase, "T_max": snn.max_time_steps, "steps_per_module": snn.steps_per_module,
          "simulated_steps_per_module": snn.simulated_steps_per_module,
          "mask_semantics": snn.model.mask.semantics,
          "masks": {k: v.astype(int).tolist() for k, v in snn.masks.items()},
          "average_time_steps": snn.average_time_steps,
          "average_simulated_steps": snn.average_simulated_steps}


def spike_rates(snn: loader.Loaded, analysis: ActivationAnalysis) -> tuple[dict, str]:
  """({neuron: [T]}, where they come from in words): the whole test split's rates from summary.json when the
  run wrote them, else those of the activation analysis' images."""
  summary_rates = (snn.summary or {}).get("spike_rates")
  if summary_rates:
    return summary_rates, "whole test split, learned hard masks; from summary.json"
  return ({k: v.tolist() for k, v in analysis.spike_rates.items()},
          f"{analysis.num_examples} test images, learned hard masks")


def early_exit_rows(snn: loader.Loaded, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                    criterion: str = "confidence", max_batches: int = 0,
                    batch_size: int | None = None) -> list[dict]:
  """`inference.early_exit_over_batches` on the test split (all of it when max_batches = 0):
  [{'threshold', 'accuracy', 'avg_steps', 'avg_module_steps', 'avg_simulated_steps', 'avg_energy_j'}]."""
  if not snn.is_snn:
    raise ValueError("Early exit needs an SNN phase.")
  batches = snn.batches(batch_size=batch_size)
  if max_batches:
    batches = (b for i, b in zip(range(max_batches), batches))
  return inference.early_exit_over_batches(snn.variant(masks="hard").model, snn.variables, batches, thresholds,
                                           criterion)
