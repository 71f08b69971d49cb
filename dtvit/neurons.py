"""Spiking neurons in pure JAX: multi-step LIF/IF dynamics (`multistep`).

No Flax here: the functions take arrays and return arrays. A neuron's settings are one frozen `NeuronSpec`,
resolved once (`NeuronSpec.resolve` fills every default; `dtvit.neuron_spec`, with the spike function and its
surrogate gradients); `dtvit.models.layers.Neuron` holds the trainable leak and threshold and calls `multistep`
with its spec.

Conventions (see ../shared/PAPER.md, "Neurons"):
- 'lif' (default, the authors' convention): U[t] = lam * U[t-1] + I[t]; S[t] = H(U[t]/Vth - 1);
  soft reset U[t] -= Vth * S[t]; lam = clip(leak, 0, 1) and Vth are trainable scalars.
- 'if': the same with lam = 1 (integrate-and-fire), the neuron used for ANN-to-SNN conversion.
- 'spikingjelly_lif': H[t] = V[t-1] + (I[t] - V[t-1]) / tau; S[t] = H(H[t]/Vth - 1);
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

Two implementations of the same recurrence (`multistep(fused=...)`): a `lax.scan` over `make_step` (the
reference, here), and a fused one with a hand-written backward (`dtvit.lif_fused.lif_multistep`, the default in
training; on CPU an FFI kernel, `dtvit.cpu_kernels`). `tests/neurons_test.py` checks that both give the same
values and gradients.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dtvit import lif_fused
from dtvit.neuron_spec import NeuronSpec, check_step_mask, initial_membrane, num_steps_of, spike


def make_step(spec: NeuronSpec, *, leak=1.0, threshold=1.0) -> Callable:
  """One time step: (membrane, input current[, mask]) -> (membrane, (spikes, membrane before reset)).

  With a scalar `mask` the step is the 'skip' step of the module docstring (membrane held and no spike where
  mask = 0)."""
  lam = spec.leak_factor(leak)

  def step(u, i, mask=None):
    h = spec.charge(u, i, lam)
    s = spike(spec.distance(h, threshold), spec.surrogate, spec.alpha)
    u_next = spec.after_reset(h, jax.lax.stop_gradient(s) if spec.detach_reset else s, threshold)
    if mask is not None:
      mask = mask.astype(u_next.dtype)
      u_next = mask * u_next + (1.0 - mask) * u
      s = s * mask.astype(s.dtype)
    return u_next, (s, h)

  return step


def multistep(current_TX: jax.Array, spec: NeuronSpec = NeuronSpec(), *, leak=1.0, threshold=1.0,
              num_steps: int | None = None, step_mask_T: jax.Array | None = None, fused: bool = True,
              return_membrane: bool = False, membrane_dtype=jnp.float32, cpu_kernel: bool = True):
  """Runs a neuron over the leading time axis.

  Args:
    current_TX: input current, [T, ...]; or, with `num_steps` given, a static input [...] fed at every step
      (direct encoding of a static image: the analog first layer is computed once).
    spec: the neuron's dynamics (`NeuronSpec.resolve(...)`).
    leak, threshold: the trainable scalars (leak is used by 'lif').
    num_steps: T for a static input; None when `current_TX` already has the time axis.
    step_mask_T: None, or a per-step mask [T] applied inside the recurrence ('skip' semantics: where it is 0
      the membrane is held and nothing is emitted).
    fused: the fused recurrence with a hand-written backward (`lif_fused.lif_multistep`); False: `lax.scan` over
      `make_step`. The same values and gradients.
    cpu_kernel: with `fused`, run it as the CPU kernel on CPU (`lif_fused.lif_multistep`); False: the pure-JAX
      recurrence.
    return_membrane: also return the membrane before reset [T, ...] (the scan path).
    membrane_dtype: dtype of the membrane state (float32 even when the currents are bf16).

  Returns:
    spikes [T, ...] in {0, 1} with the input's dtype, and, if requested, membranes [T, ...].
  """
  T = num_steps_of(current_TX, num_steps)
  step_mask_T = check_step_mask(step_mask_T, T)
  if fused and not return_membrane:
    return lif_fused.lif_multistep(current_TX, spec, leak=leak, threshold=threshold, num_steps=num_steps,
                                   step_mask_T=step_mask_T, membrane_dtype=membrane_dtype, cpu_kernel=cpu_kernel)
  step = make_step(spec, leak=leak, threshold=threshold)
  out_dtype = current_TX.dtype
  static = None if num_steps is None else current_TX.astype(membrane_dtype)

  def body(u, inputs):
    i, m = inputs
    u, (s, h) = step(u, i.astype(membrane_dtype) if i is not None else static, m)
    return u, (s.astype(out_dtype), h if return_membrane else None)

  u0 = initial_membrane(current_TX.shape[int(num_steps is None):], spec, threshold, membrane_dtype)
  xs = current_TX if num_steps is None else None
  _, (spikes_TX, membrane_TX) = jax.lax.scan(body, u0, (xs, step_mask_T), length=T)
  return (spikes_TX, membrane_TX) if return_membrane else spikes_TX
