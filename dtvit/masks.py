"""Learned time-step masks in pure JAX: scores -> binary per-step masks, the time-step cost, step counts.

Each masked module l owns scores s_l in R^{T_max} (ordinary parameters). Its mask m_l[t] in {0, 1} switches step
t of its LIF layers on or off (how, `semantics` below says), so the module learns how many steps it needs.

Modes (see ../shared/PAPER.md, "The time-step mask"):
- 'ste' (default): forward m = 1[s > 0] exactly; backward dm/ds = sigmoid'(s / temperature) / temperature.
- 'sigmoid': m = sigmoid(s / temperature), soft; anneal the temperature towards 0 for a hard step. At
  evaluation and for inference use `hard_mask`.
`monotone=True` turns any of them into m[t] = prod_{k<=t} b[k]: a module that stops stays stopped.

What a masked step means (`semantics`, config `model.mask.semantics`):
- 'skip': the step does not exist for the module. Its neurons take no input there (membrane held: no leak, no
  charge) and emit nothing; its synaptic layers and batch norms do no work there. A module costs exactly its
  active steps, wherever they sit, and inference runs only those.
- 'filter' (the paper's wording: the mask filters the spikes a LIF layer emits): the neurons integrate at
  every step and emit only at active steps. The work at masked steps before the last active step is real
  (later spikes depend on it) and is counted; the steps after the last active step cost nothing and are not run
  at inference.

Accounting (`work_masks`, `step_counts`), the one place the step counts come from: a unit (a masked module, or
one neuron with granularity 'layer') is *active* at the steps its mask is 1, and *works* at the steps whose
work some output depends on. Its spikes at step t matter if the unit is active at t and a consumer of its
spikes works at t (a module's output neurons feed the residual stream, which the head reads at every step).
Then under 'skip' the unit works at its active steps at or before its last mattering emission, and under
'filter' at every step at or before it. Synaptic layers feeding a unit, and its batch norm statistics, do
work exactly at the unit's working steps; the SOPs count nothing else (see `dtvit.energy`). A consumer may
receive the product of several units' spikes (attention: Q K^T V), which is 0 where any of them is inactive.

The time-step cost (`time_step_cost`) counts what each semantics costs: expected active steps under 'skip',
expected simulated steps (up to the last active one) under 'filter'.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

MASK_MODES = ("ste", "sigmoid")
COSTS = ("expected", "op_weighted", "hinge", "hinge_hard")
SEMANTICS = ("skip", "filter")
OUTPUT = "<output>"  # a consumer in `work_masks`' graph: the module's output, read at every step


def check_semantics(semantics: str) -> None:
  if semantics not in SEMANTICS:
    raise ValueError(f"Unknown mask semantics {semantics!r}; choose one of {', '.join(map(repr, SEMANTICS))} "
                     "(model.mask.semantics).")


def _check_mode(mode: str) -> None:
  if mode not in MASK_MODES:
    raise ValueError(f"Unknown mask mode {mode!r}; choose one of {', '.join(map(repr, MASK_MODES))}.")


def time_step_mask(scores_T: jax.Array, *, mode: str = "ste", temperature: jax.Array | float = 1.0,
                   monotone: bool = False) -> jax.Array:
  """The per-step mask of one module, [T] float, from its scores [T]."""
  _check_mode(mode)
  soft_T = jax.nn.sigmoid(scores_T / temperature)
  if mode == "ste":
    hard_T = (scores_T > 0).astype(scores_T.dtype)
    # soft - stop_gradient(soft) is exactly 0 forward, so the forward value is exactly 0/1.
    mask_T = hard_T + (soft_T - jax.lax.stop_gradient(soft_T))
  else:
    mask_T = soft_T
  if monotone:
    mask_T = jnp.cumprod(mask_T)
  return mask_T


def hard_mask(scores_T: jax.Array, *, monotone: bool = False) -> jax.Array:
  """The binary mask used at evaluation and inference, [T] in {0, 1} (no gradient)."""
  mask_T = (scores_T > 0).astype(jnp.float32)
  return jnp.cumprod(mask_T) if monotone else mask_T


def expected_steps(scores_T: jax.Array, *, temperature: jax.Array | float = 1.0,
                   monotone: bool = False, semantics: str = "skip") -> jax.Array:
  """Differentiable expected number of steps one module costs, with each step on with p[t] = sigmoid(s[t] / T):
  'skip': its active steps, sum_t p[t]; 'filter': its simulated steps (every step up to the last active one),
  sum_t (1 - prod_{k >= t} (1 - p[k])), the probability that some step at or after t is active."""
  check_semantics(semantics)
  p_T = jax.nn.sigmoid(scores_T / temperature)
  if monotone:
    p_T = jnp.cumprod(p_T)
  if semantics == "filter":
    none_after_T = jnp.flip(jnp.cumprod(jnp.flip(1.0 - p_T)))
    return jnp.sum(1.0 - none_after_T)
  return jnp.sum(p_T)


def counted_steps(scores_T: jax.Array, *, temperature: jax.Array | float = 1.0, monotone: bool = False,
                  semantics: str = "skip") -> jax.Array:
  """The steps one module costs under its hard mask, as `step_counts` counts them ('skip': its active steps,
  'filter': its simulated steps), with the gradient of `expected_steps` (straight through): the value is the
  accounting's exactly, and the gradient still says which way each score moves it."""
  hard_T = hard_mask(scores_T, monotone=monotone)
  count = jnp.sum(work_masks({"m": hard_T}, {"m": (OUTPUT,)}, semantics)["m"])
  soft = expected_steps(scores_T, temperature=temperature, monotone=monotone, semantics=semantics)
  return count + (soft - jax.lax.stop_gradient(soft))


def time_step_cost(scores: Mapping[str, jax.Array], *, kind: str = "expected",
                   op_weights: Mapping[str, float] | None = None, target: float | None = None,
                   temperature: jax.Array | float = 1.0, monotone: bool = False,
                   semantics: str = "skip") -> jax.Array:
  """The time-step cost added to the loss (before its weight lambda_T).

  The steps it counts are the steps a module costs under `semantics` (`expected_steps`): its active steps under
  'skip', its simulated steps (up to the last active one) under 'filter', so that training lowers the work the
  accounting reports. (With granularity 'layer' each neuron's own mask is counted; the steps its consumers
  make free are not.)

  Args:
    scores: module name -> scores [T].
    kind: 'expected' -> mean over modules of expected steps; 'op_weighted' -> the same weighted by each
      module's dense op count (energy-aware); 'hinge' -> max(0, mean expected steps - target); 'hinge_hard' ->
      max(0, T_avg - target) with T_avg the mean of the hard counts (`counted_steps`: the average the
      evaluation reports), straight-through: it pushes every score down while the reported T_avg is above the
      target and is exactly 0 once it is not (the soft 'hinge' stops while every hard mask may still be on).
    op_weights: module name -> op count, for 'op_weighted'.
    target: the target average steps, for 'hinge'.
  """
  if kind not in COSTS:
    raise ValueError(f"Unknown time-step cost {kind!r}; choose one of {', '.join(map(repr, COSTS))}.")
  if not scores:
    return jnp.zeros(())
  names = sorted(scores)
  count = counted_steps if kind == "hinge_hard" else expected_steps
  steps = jnp.stack([count(scores[n], temperature=temperature, monotone=monotone, semantics=semantics)
                     for n in names])
  if kind == "expected":
    return jnp.mean(steps)
  if kind == "op_weighted":
    if op_weights is None or any(n not in op_weights for n in names):
      missing = [n for n in names if op_weights is None or n not in op_weights]
      raise ValueError(f"The 'op_weighted' cost needs an op count for every masked module; missing: {missing}.")
    w = jnp.asarray([float(op_weights[n]) for n in names])
    return jnp.sum(w * steps) / jnp.sum(w)
  if target is None:
    raise ValueError(f"The {kind!r} cost needs a target average number of time steps (<phase>.target_steps).")
  return jnp.maximum(0.0, jnp.mean(steps) - target)


def binary(mask_T: jax.Array) -> jax.Array:
  """1 where a mask is on (> 0), 0 elsewhere, float32 without gradient: [T] -> [T]."""
  return (jax.lax.stop_gradient(jnp.asarray(mask_T)) > 0).astype(jnp.float32)


def at_or_before_last(x_T: jax.Array) -> jax.Array:
  """[T] in {0, 1} -> [T]: 1 at every step at or before the last 1 of x (a reverse cumulative max)."""
  return jnp.flip(jax.lax.cummax(jnp.flip(x_T, 0), axis=0), 0)


def work_masks(masks: Mapping[str, jax.Array], consumers: Mapping[str, tuple[str, ...]],
               semantics: str) -> dict[str, jax.Array]:
  """The steps at which each unit's work matters: {unit: [T] in {0, 1}} (float32, no gradient).

  Args:
    masks: {unit: mask [T]} (binary, or soft: any value > 0 counts as on).
    consumers: {unit: the units its spikes feed}, `OUTPUT` for the module output (read at every step). A
      consumer given as a tuple (consumer, *partners) receives the product of this unit's spikes with the
      partners' (attention: Q K^T V), which is 0 at any step a partner is inactive. Every unit of `masks` must
      be listed; the graph must be acyclic.
    semantics: 'skip' or 'filter' (see the module docstring).
  """
  check_semantics(semantics)
  missing = sorted(set(masks) - set(consumers))
  if missing:
    raise ValueError(f"work_masks: no consumers given for units {missing}.")
  work: dict[str, jax.Array] = {}

  def resolve(unit, seen=()):
    if unit in work:
      return work[unit]
    if unit in seen:
      raise ValueError(f"work_masks: the unit graph has a cycle through {unit!r}.")
    active_T = binary(masks[unit])
    used_T = jnp.zeros_like(active_T)
    for spec in consumers[unit]:
      c, partners = (spec[0], spec[1:]) if isinstance(spec, tuple) else (spec, ())
      if c == OUTPUT:
        used_T = jnp.ones_like(active_T)
        continue
      for other in (c,) + tuple(partners):
        if other not in masks:
          raise ValueError(f"work_masks: unit {unit!r} feeds {c!r} (with {list(partners)}), but {other!r} has "
                           "no mask.")
      use_T = resolve(c, seen + (unit,))
      for p in partners:
        use_T = use_T * binary(masks[p])
      used_T = jnp.maximum(used_T, use_T)
    until_T = at_or_before_last(active_T * used_T)
    work[unit] = active_T * until_T if semantics == "skip" else until_T
    return work[unit]

  for unit in masks:
    resolve(unit)
  return {u: work[u] for u in masks}


def step_counts(masks: Mapping[str, jax.Array], consumers: Mapping[str, tuple[str, ...]],
                semantics: str) -> dict[str, dict]:
  """{unit: {'active_steps', 'simulated_steps', 'mask', 'work'}} (python floats and lists) from hard masks.

  'active_steps' = sum_t m[t] (the steps the unit emits at); 'simulated_steps' = sum_t work[t] (the steps whose
  work any output depends on, `work_masks`)."""
  work = work_masks(masks, consumers, semantics)
  out = {}
  for u in sorted(masks):
    m = np.asarray(binary(masks[u]))
    w = np.asarray(work[u])
    out[u] = {"active_steps": float(m.sum()), "simulated_steps": float(w.sum()),
              "mask": [int(v) for v in m], "work": [int(v) for v in w]}
  return out


def average_steps(counts: Mapping[str, Mapping[str, float]], key: str = "active_steps",
                  weights: Mapping[str, float] | None = None) -> float | None:
  """The mean over units of `counts[unit][key]` (`step_counts`' 'active_steps' or 'simulated_steps'); with
  `weights` {unit: w} (e.g. the per-step MACs each mask gates) the weighted mean, None if they sum to 0. None
  without units."""
  if not counts:
    return None
  if weights is None:
    return float(np.mean([c[key] for c in counts.values()]))
  total = sum(weights[u] for u in counts)
  return float(sum(weights[u] * c[key] for u, c in counts.items()) / total) if total > 0 else None


def active_steps_by_exit(masks: Mapping[str, jax.Array]) -> np.ndarray:
  """[T]: the mean over units of their active steps among the first t steps, t = 1..T (a sample that exits
  after step t)."""
  m = np.stack([np.asarray(binary(jnp.asarray(v)), np.float64).reshape(-1) for v in masks.values()])
  return np.cumsum(m, axis=1).mean(axis=0)


def simulated_steps_by_exit(masks: Mapping[str, jax.Array], consumers: Mapping[str, tuple[str, ...]],
                            semantics: str) -> np.ndarray:
  """[T]: the mean over units of their simulated steps when a sample exits after step t, t = 1..T: `step_counts`
  on the masks cut to their first t steps (under 'filter' a unit cut before its last active step simulates
  only up to the cut)."""
  T = len(next(iter(masks.values())))
  out = []
  for t in range(1, T + 1):
    cut = {u: jnp.asarray(m)[:t] for u, m in masks.items()}
    out.append(average_steps(step_counts(cut, consumers, semantics), "simulated_steps"))
  return np.asarray(out, np.float64)
