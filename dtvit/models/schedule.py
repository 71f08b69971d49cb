"""Skipped-step inference inside a module: the rows of the steps a module runs, and back.

Activations are folded [T_max*B, ...] (step-major). A schedule gives a masked module the sorted tuple of step
indices it runs (`run`); these pure functions select those rows and put the module's output back at them, with
exact zeros at the other steps (the schedule leaves out only steps whose output is exactly 0)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np


def num_run(run: Optional[tuple], num_steps: int) -> int:
  """The number of steps a module simulates: all T_max when unscheduled."""
  return num_steps if run is None else len(run)


def take_steps(x, run: Optional[tuple], num_steps: int):
  """[T_max*B, ...] -> the scheduled steps' rows [len(run)*B, ...] (unchanged when unscheduled or all run)."""
  if run is None or len(run) == num_steps:
    return x
  b = x.shape[0] // num_steps
  if tuple(run) == tuple(range(len(run))):  # a prefix: one slice
    return x[: b * len(run)]
  x_TB = x.reshape((num_steps, b) + x.shape[1:])
  return x_TB[np.asarray(run)].reshape((-1,) + x.shape[1:])


def pad_steps(y, run: Optional[tuple], num_steps: int):
  """[len(run)*B, ...] -> [T_max*B, ...], zeros at the steps not in `run`."""
  if run is None or len(run) == num_steps:
    return y
  b = y.shape[0] // len(run)
  zeros = lambda steps: jnp.zeros((steps * b,) + y.shape[1:], y.dtype)
  # Contiguous pieces of y and zero blocks for the gaps, concatenated: a scatter (`.at[].set`) into a zero
  # [T_max*B, ...] buffer measured ~25% slower on XLA:CPU (experiments/inference_benchmark/).
  pieces, t, i = [], 0, 0
  while i < len(run):
    j = i
    while j + 1 < len(run) and run[j + 1] == run[j] + 1:
      j += 1
    if run[i] > t:
      pieces.append(zeros(run[i] - t))
    pieces.append(y[i * b:(j + 1) * b])
    t, i = run[j] + 1, j + 1
  if t < num_steps:
    pieces.append(zeros(num_steps - t))
  return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def window(mask_T, run: Optional[tuple]):
  """A [T_max] mask restricted to the scheduled steps [len(run)]."""
  return mask_T if mask_T is None or run is None else mask_T[np.asarray(run)]
