"""Learned time-step masks in pure JAX: scores -> binary per-step masks, the time-step cost, step averages.

Each masked module l owns scores s_l in R^{T_max} (ordinary parameters). Its mask m_l[t] in {0, 1} multiplies
the spikes its LIF layers emit at step t, so the module learns how many steps it needs.

Modes (see ../shared/PAPER.md, "The time-step mask"):
- 'ste' (default): forward m = 1[s > 0] exactly; backward dm/ds = sigmoid'(s / temperature) / temperature.
- 'sigmoid': m = sigmoid(s / temperature), soft; anneal the temperature towards 0 for a hard step. At
  evaluation and for inference use `hard_mask`.
`monotone=True` turns any of them into m[t] = prod_{k<=t} b[k]: a module that stops stays stopped, which is
what lets inference skip its trailing steps.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

MASK_MODES = ("ste", "sigmoid")
COSTS = ("expected", "op_weighted", "hinge")


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
                   monotone: bool = False) -> jax.Array:
  """Differentiable expected number of active steps of one module: sum_t sigmoid(s[t] / temperature)."""
  p_T = jax.nn.sigmoid(scores_T / temperature)
  if monotone:
    p_T = jnp.cumprod(p_T)
  return jnp.sum(p_T)


def time_step_cost(scores: Mapping[str, jax.Array], *, kind: str = "expected",
                   op_weights: Mapping[str, float] | None = None, target: float | None = None,
                   temperature: jax.Array | float = 1.0, monotone: bool = False) -> jax.Array:
  """The time-step cost added to the loss (before its weight lambda_T).

  Args:
    scores: module name -> scores [T].
    kind: 'expected' -> mean over modules of expected steps; 'op_weighted' -> the same weighted by each
      module's dense op count (energy-aware); 'hinge' -> max(0, mean expected steps - target).
    op_weights: module name -> op count, for 'op_weighted'.
    target: the target average steps, for 'hinge'.
  """
  if kind not in COSTS:
    raise ValueError(f"Unknown time-step cost {kind!r}; choose one of {', '.join(map(repr, COSTS))}.")
  if not scores:
    return jnp.zeros(())
  names = sorted(scores)
  steps = jnp.stack([expected_steps(scores[n], temperature=temperature, monotone=monotone) for n in names])
  if kind == "expected":
    return jnp.mean(steps)
  if kind == "op_weighted":
    if op_weights is None or any(n not in op_weights for n in names):
      missing = [n for n in names if op_weights is None or n not in op_weights]
      raise ValueError(f"The 'op_weighted' cost needs an op count for every masked module; missing: {missing}.")
    w = jnp.asarray([float(op_weights[n]) for n in names])
    return jnp.sum(w * steps) / jnp.sum(w)
  if target is None:
    raise ValueError("The 'hinge' cost needs a target average number of time steps (mask.target_steps).")
  return jnp.maximum(0.0, jnp.mean(steps) - target)


def steps_per_module(masks: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Active steps of each module: sum_t m[t]."""
  return {n: jnp.sum(m) for n, m in masks.items()}


def average_steps(masks: Mapping[str, jax.Array]) -> jax.Array:
  """T_avg: the mean over masked modules of their active steps (the paper's 'average time steps')."""
  if not masks:
    raise ValueError("average_steps needs at least one masked module.")
  return jnp.mean(jnp.stack([jnp.sum(m) for m in masks.values()]))


def op_weighted_average_steps(masks: Mapping[str, jax.Array], op_weights: Mapping[str, float]) -> jax.Array:
  """The op-weighted mean over modules of their active steps: sum_l w_l T_l / sum_l w_l."""
  names = sorted(masks)
  missing = [n for n in names if n not in op_weights]
  if missing:
    raise ValueError(f"No op count for masked modules {missing}.")
  w = jnp.asarray([float(op_weights[n]) for n in names])
  t = jnp.stack([jnp.sum(masks[n]) for n in names])
  return jnp.sum(w * t) / jnp.sum(w)
