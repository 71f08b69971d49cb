"""Evaluation of a trained phase: test accuracy, and for the SNN its time steps, spike rates and energy.

Every time-step figure comes from `models.step_counts` and its means from `masks.average_steps` (the accounting
of `dtvit.masks`), through `step_averages` for the log lines during training and for summary.json alike.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import numpy as np

from dtvit import energy as energy_lib
from dtvit import masks as masks_lib
from dtvit import data
from dtvit import models
from dtvit import sharding
from dtvit import steps
from dtvit.models import paths

_RATE_KEYS = ("input_rates", "attention_rates", "spike_rates", "masks")


@functools.lru_cache(maxsize=16)
def _eval_fn(model, mesh):
  """The jitted eval step, one per (model, mesh): evaluating again during training compiles nothing new."""
  return jax.jit(steps.make_eval_step(model), out_shardings=sharding.replicated(mesh))


def evaluate(model, variables, config, mesh, *, split: str = "test") -> dict:
  """{'accuracy', 'count'} over the split, and for the SNN 'aux': the per-step rates and masks averaged over
  full batches (a last, partly padded batch counts for accuracy only). `config.eval_examples` subsets the
  test split only."""
  gb = config.eval_batch_size
  sharding.check_batch_size(gb, mesh, "eval_batch_size")
  eval_fn = _eval_fn(model, mesh)
  correct = count = 0.0
  rate_sums, n_full = None, 0
  max_examples = config.get("eval_examples", 0) if split == "test" else 0
  for local in data.eval_batches(config.data, split=split, global_batch_size=gb, max_examples=max_examples):
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
    T = float(model.num_steps)
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


def evaluate_phase(model, variables, config, mesh, info, phase, *, op_counts: Mapping[str, dict] | None) -> dict:
  """The phase's test results: accuracy; for SNN phases also time steps, spike rates and energy.

  op_counts: the model's `energy.op_counts` (SNN phases), traced once per phase by the caller."""
  if phase == "ann":
    return {"test_accuracy": evaluate(model, variables, config, mesh)["accuracy"]}
  hard = models.with_mask(model, hard=True)
  ev = evaluate(hard, variables, config, mesh)
  out = {"test_accuracy": ev["accuracy"]}
  op_weights = energy_lib.module_op_weights(model, counts=op_counts)
  out.update(step_summary(model, jax.device_get(variables["params"]), op_weights))
  out["T_max"] = model.num_steps
  if "aux" in ev:
    aux = ev["aux"]
    out["spike_rates"] = {k: np.round(v, 5).tolist() for k, v in sorted(aux["spike_rates"].items())}
    out["energy"] = energy_lib.energy_report(hard, info.image_shape, aux, counts=op_counts)
  if config.eval_fixed_steps and model.mask.enabled:
    fixed = models.with_mask(model, enabled=False)
    out["test_accuracy_fixed_T"] = evaluate(fixed, variables, config, mesh)["accuracy"]
  return out
