"""Spiking neurons in pure JAX: spike functions with surrogate gradients and multi-step LIF/IF dynamics.

No Flax here: the functions take arrays and return arrays. `dtvit.models.layers.Neuron` holds the trainable
leak and threshold and calls `multistep`.

Conventions (see ../shared/PAPER.md, "Neurons"):
- 'lif' (default, the authors' convention): U[t] = lam * U[t-1] + I[t]; S[t] = H(U[t]/Vth - 1);
  soft reset U[t] -= Vth * S[t]; lam = clip(leak, 0, 1) and Vth are trainable scalars.
- 'if': the same with lam = 1 (integrate-and-fire), the neuron used for ANN-to-SNN conversion.
- 'spikformer': H[t] = V[t-1] + (I[t] - V[t-1]) / tau; S[t] = H(H[t]/Vth - 1);
  hard reset V[t] = H[t] * (1 - S[t]) with the reset detached from the graph.

The spike function sees the distance to threshold x and fires when x >= 0; its gradient dS/dx is the
surrogate g(x). `surrogate_input` says what x is: 'normalized' (default) x = U/Vth - 1, so dS/dU = g(x)/Vth;
'difference' x = U - Vth (SpikingJelly's convention), so dS/dU = g(x). Spikes are binary {0, 1}: the ANN
twin's matching activation is clip(I/Vth, 0, 1), the rate an IF neuron with threshold Vth fires at under a
constant input I.

Masked steps ('skip' semantics, see `dtvit.masks`): with a per-step mask m [T] the step is
  U[t] = m[t] * U_step[t] + (1 - m[t]) * U[t-1],   S[t] = m[t] * S_step[t],
so at m[t] = 0 the neuron takes no input, does not leak and emits nothing (membrane held), and at m[t] = 1 it
is the plain step; both exactly (the products with 0 and 1 are exact). A soft m in (0, 1) interpolates, and
the mask's gradient is d/dm = (U_step - U[t-1]) and S_step (straight-through for 'ste' masks).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

NEURONS = ("lif", "if", "spikformer")
SURROGATES = ("pwl", "sigmoid", "atan")
RESETS = ("soft", "hard")
SURROGATE_INPUTS = ("normalized", "difference")


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {kind} {value!r}; choose one of {', '.join(repr(c) for c in choices)}.")


def surrogate_grad(x: jax.Array, surrogate: str = "pwl", alpha: float = 0.3) -> jax.Array:
  """The surrogate derivative dS/dx at x = U/Vth - 1.

  Args:
    x: normalised membrane distance to threshold, any shape.
    surrogate: 'pwl' -> alpha * max(0, 1 - |x|) (the authors' piecewise linear, alpha = gamma = 0.3);
      'sigmoid' -> alpha * sig(alpha x) * (1 - sig(alpha x)) (Spikformer, alpha = 4);
      'atan' -> alpha / 2 / (1 + (pi/2 * alpha * x)^2) (alpha = 2).
    alpha: the surrogate's sharpness or height.
  """
  _check_choice("surrogate", surrogate, SURROGATES)
  if surrogate == "pwl":
    return alpha * jnp.maximum(0.0, 1.0 - jnp.abs(x))
  if surrogate == "sigmoid":
    sg = jax.nn.sigmoid(alpha * x)
    return alpha * sg * (1.0 - sg)
  return alpha / 2.0 / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def spike(x: jax.Array, surrogate: str = "pwl", alpha: float = 0.3) -> jax.Array:
  """Heaviside step H(x) = 1[x >= 0] forward; `surrogate_grad(x)` as its derivative."""
  x = jnp.asarray(x)
  return (x >= 0).astype(x.dtype)


@spike.defjvp
def _spike_jvp(surrogate, alpha, primals, tangents):
  (x,), (dx,) = primals, tangents
  x = jnp.asarray(x)
  return spike(x, surrogate, alpha), surrogate_grad(x, surrogate, alpha).astype(x.dtype) * dx


def default_alpha(surrogate: str) -> float:
  """The customary sharpness of each surrogate (pwl: gamma = 0.3; sigmoid: 4; atan: 2)."""
  _check_choice("surrogate", surrogate, SURROGATES)
  return {"pwl": 0.3, "sigmoid": 4.0, "atan": 2.0}[surrogate]


def make_step(
    neuron: str = "lif",
    *,
    leak: jax.Array | float = 1.0,
    threshold: jax.Array | float = 1.0,
    tau: float = 2.0,
    surrogate: str = "pwl",
    alpha: float | None = None,
    reset: str | None = None,
    detach_reset: bool | None = None,
    surrogate_input: str = "normalized",
) -> Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array]]]:
  """One time step of a neuron: (membrane, input current[, mask]) -> (membrane, (spikes, membrane before reset)).

  `reset` defaults to 'soft' for 'lif'/'if' and 'hard' for 'spikformer'; `detach_reset` defaults to True for
  'spikformer' (its published form) and False otherwise. With a scalar `mask` the step is the 'skip' step of
  the module docstring (membrane held and no spike where mask = 0).
  """
  _check_choice("neuron", neuron, NEURONS)
  _check_choice("surrogate", surrogate, SURROGATES)
  _check_choice("surrogate input", surrogate_input, SURROGATE_INPUTS)
  reset = reset or ("hard" if neuron == "spikformer" else "soft")
  _check_choice("reset", reset, RESETS)
  if detach_reset is None:
    detach_reset = neuron == "spikformer"
  if tau <= 0:
    raise ValueError(f"tau must be > 0, got {tau}.")
  alpha = default_alpha(surrogate) if alpha is None else alpha
  if neuron == "lif":
    lam = jnp.clip(leak, 0.0, 1.0)  # the leak is trainable; a gain above 1 would make the neuron unstable
  elif neuron == "if":
    lam = 1.0

  def step(u, i, mask=None):
    if neuron == "spikformer":
      h = u + (i - u) / tau
    else:
      h = lam * u + i
    x = h / threshold - 1.0 if surrogate_input == "normalized" else h - threshold
    s = spike(x, surrogate, alpha)
    s_reset = jax.lax.stop_gradient(s) if detach_reset else s
    if reset == "soft":
      u_next = h - threshold * s_reset
    else:
      u_next = h * (1.0 - s_reset)
    if mask is not None:
      mask = mask.astype(u_next.dtype)
      u_next = mask * u_next + (1.0 - mask) * u
      s = s * mask.astype(s.dtype)
    return u_next, (s, h)

  return step


def multistep(
    current_TX: jax.Array,
    *,
    num_steps: int | None = None,
    neuron: str = "lif",
    leak: jax.Array | float = 1.0,
    threshold: jax.Array | float = 1.0,
    tau: float = 2.0,
    surrogate: str = "pwl",
    alpha: float | None = None,
    reset: str | None = None,
    detach_reset: bool | None = None,
    return_membrane: bool = False,
    remat: bool | str = False,
    unroll: int = 1,
    membrane_dtype=jnp.float32,
    init_membrane: float = 0.0,
    surrogate_input: str = "normalized",
    step_mask_T: jax.Array | None = None,
):
  """Runs a neuron over the leading time axis with `lax.scan` (only the recurrence is scanned).

  Args:
    current_TX: input current, [T, ...]; or, with `num_steps` given, a static input [...] fed at every step
      (direct encoding of a static image: the analog first layer is computed once).
    num_steps: T for a static input; None when `current_TX` already has the time axis.
    return_membrane: also return the membrane potential before reset, [T, ...].
    remat: wrap the step in `jax.checkpoint` (recompute the step in the backward pass; the fast path always
      does); 'spikes': tag the spikes for `ops.checkpoint_spikes` (saved; the rest recomputed).
    unroll: `lax.scan` unroll factor.
    membrane_dtype: dtype of the membrane state (float32 even when the currents are bf16).
    init_membrane: U[0] as a fraction of the threshold. 0.5 makes an IF neuron's rate round, not floor, its
      time-averaged input, which halves the conversion error at small T.
    surrogate_input: 'normalized' (x = U/Vth - 1) or 'difference' (x = U - Vth), see the module docstring.
    step_mask_T: None, or a per-step mask [T] applied inside the recurrence ('skip' semantics: where it is 0
      the membrane is held and nothing is emitted).

  Returns:
    spikes [T, ...] in {0, 1} with the input's dtype, and, if requested, membranes [T, ...].
  """
  from dtvit import ops  # pylint: disable=g-import-not-at-top  # ops imports this module
  if remat == "spikes":  # see `ops.checkpoint_spikes`: the spikes are what its remat policy keeps
    out = multistep(current_TX, num_steps=num_steps, neuron=neuron, leak=leak, threshold=threshold, tau=tau,
                    surrogate=surrogate, alpha=alpha, reset=reset, detach_reset=detach_reset, unroll=unroll,
                    membrane_dtype=membrane_dtype, init_membrane=init_membrane, return_membrane=return_membrane,
                    surrogate_input=surrogate_input, step_mask_T=step_mask_T)
    return (ops.tag_spikes(out[0]), out[1]) if return_membrane else ops.tag_spikes(out)
  if ops.fast_ops() and not return_membrane:
    # The same values and gradients with a hand-written backward (see dtvit/ops.py); checked in tests. It keeps
    # only the membrane per step and recomputes the rest in the backward, which is what `remat` asks for.
    return ops.lif_multistep(current_TX, num_steps=num_steps, neuron=neuron, leak=leak, threshold=threshold,
                             tau=tau, surrogate=surrogate, alpha=alpha, reset=reset, detach_reset=detach_reset,
                             membrane_dtype=membrane_dtype, init_membrane=init_membrane,
                             surrogate_input=surrogate_input, step_mask_T=step_mask_T)
  step = make_step(neuron, leak=leak, threshold=threshold, tau=tau, surrogate=surrogate, alpha=alpha,
                   reset=reset, detach_reset=detach_reset, surrogate_input=surrogate_input)
  out_dtype = current_TX.dtype

  def body(u, inputs):
    i, m = inputs
    u, (s, h) = step(u, i.astype(membrane_dtype) if i is not None else static, m)
    return u, (s.astype(out_dtype), h if return_membrane else None)

  if remat:
    body = jax.checkpoint(body)
  if num_steps is None:
    if current_TX.ndim < 1:
      raise ValueError("multistep needs a time axis: current_TX must be [T, ...] (or pass num_steps).")
    static = None
    xs = current_TX
    u0 = jnp.full(current_TX.shape[1:], init_membrane, membrane_dtype) * threshold
  else:
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    static = current_TX.astype(membrane_dtype)
    xs = None
    u0 = jnp.full(current_TX.shape, init_membrane, membrane_dtype) * threshold
  T = num_steps if num_steps is not None else current_TX.shape[0]
  step_mask_T = check_step_mask(step_mask_T, T)
  _, (spikes_TX, membrane_TX) = jax.lax.scan(body, u0, (xs, step_mask_T), length=T, unroll=unroll)
  if return_membrane:
    return spikes_TX, membrane_TX
  return spikes_TX


def check_step_mask(step_mask_T, num_steps: int):
  if step_mask_T is None:
    return None
  step_mask_T = jnp.asarray(step_mask_T)
  if step_mask_T.shape != (num_steps,):
    raise ValueError(f"step_mask_T must be one value per time step, shape ({num_steps},); got "
                     f"{step_mask_T.shape}.")
  return step_mask_T
