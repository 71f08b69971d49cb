"""Spiking neurons in pure JAX: spike functions with surrogate gradients and multi-step LIF/IF dynamics.

No Flax here: the functions take arrays and return arrays. A neuron's settings are one frozen `NeuronSpec`,
resolved once (`NeuronSpec.resolve` fills every default); `dtvit.models.layers.Neuron` holds the trainable leak
and threshold and calls `multistep` with its spec.

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
reference), and a fused one with a hand-written backward (`lif_multistep`, the default in training): the T
steps are unrolled in Python (T is static and small) so XLA fuses each direction into a few elementwise loops,
and the only residual is the membrane before reset h [T, ...], from which the backward recomputes spikes,
surrogate slopes and the pre-step membranes, instead of `lax.scan`'s stacked per-step intermediates. XLA:CPU
computes each output step of such a fused loop from the inputs of every earlier step, so its cost grows as T^2;
beyond `UNROLL_MAX` steps (`UNROLL_MAX_UNMASKED` without a step mask) the fused recurrence therefore loops
over chunks of a few unrolled steps (`chunk`),
one pass over the neurons per chunk, with the same residual and the same hand-written step gradients.
`tests/neurons_test.py` checks that both give the same values and gradients. On CPU the fused recurrence's
training path runs as an FFI kernel instead (`dtvit.cpu_kernels`: each neuron's T steps in one pass, the same
expressions and residual; `tests/cpu_kernels_test.py`); inference too beyond 4 steps (XLA's fused forward up
to 4, where it is faster).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from dtvit import cpu_kernels

NEURONS = ("lif", "if", "spikingjelly_lif")
SURROGATES = ("pwl", "sigmoid", "atan")
RESETS = ("soft", "hard")
SURROGATE_INPUTS = ("normalized", "difference")
DEFAULT_ALPHA = {"pwl": 0.3, "sigmoid": 4.0, "atan": 2.0}  # each surrogate's customary sharpness


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {kind} {value!r}; choose one of {', '.join(repr(c) for c in choices)}.")


@dataclasses.dataclass(frozen=True)
class NeuronSpec:
  """A neuron's dynamics with every setting resolved (build it with `NeuronSpec.resolve`).

  neuron: 'lif' | 'if' | 'spikingjelly_lif'; surrogate: 'pwl' | 'sigmoid' | 'atan' with sharpness `alpha`; tau: the
  'spikingjelly_lif' time constant; reset: 'soft' | 'hard'; detach_reset: no gradient through the reset;
  init_membrane: U[0] as a fraction of the threshold (0.5 makes an IF neuron's rate round, not floor, its
  time-averaged input); surrogate_input: 'normalized' | 'difference' (the module docstring).
  """
  neuron: str = "lif"
  surrogate: str = "pwl"
  alpha: float = 0.3
  tau: float = 2.0
  reset: str = "soft"
  detach_reset: bool = False
  init_membrane: float = 0.0
  surrogate_input: str = "normalized"

  @classmethod
  def resolve(cls, neuron: str = "lif", *, surrogate: str = "pwl", alpha: float | None = None, tau: float = 2.0,
              reset: str | None = None, detach_reset: bool | None = None, init_membrane: float = 0.0,
              surrogate_input: str = "normalized") -> "NeuronSpec":
    """Checks the settings and fills the defaults: `reset` 'hard' for 'spikingjelly_lif' and 'soft' otherwise,
    `detach_reset` True for 'spikingjelly_lif' (its published form), `alpha` the surrogate's customary value."""
    _check_choice("neuron", neuron, NEURONS)
    _check_choice("surrogate", surrogate, SURROGATES)
    _check_choice("surrogate input", surrogate_input, SURROGATE_INPUTS)
    reset = reset or ("hard" if neuron == "spikingjelly_lif" else "soft")
    _check_choice("reset", reset, RESETS)
    if tau <= 0:
      raise ValueError(f"tau must be > 0, got {tau}.")
    return cls(neuron=neuron, surrogate=surrogate, alpha=float(DEFAULT_ALPHA[surrogate] if alpha is None else alpha),
               tau=float(tau), reset=reset,
               detach_reset=bool(neuron == "spikingjelly_lif" if detach_reset is None else detach_reset),
               init_membrane=float(init_membrane), surrogate_input=surrogate_input)

  def leak_factor(self, leak) -> jax.Array:
    """lam of U[t] = lam U[t-1] + I[t]: the trainable leak clipped to [0, 1] for 'lif' (a gain above 1 would
    make the neuron unstable), 1 for 'if'; unused by 'spikingjelly_lif'."""
    if self.neuron == "lif":
      return jnp.clip(jnp.asarray(leak, jnp.float32), 0.0, 1.0)
    return jnp.ones((), jnp.float32)

  def charge(self, u, i, lam):
    """The membrane before reset, H[t], from U[t-1] and I[t]."""
    return u + (i - u) / self.tau if self.neuron == "spikingjelly_lif" else lam * u + i

  def distance(self, h, vth):
    """The spike function's argument x: U/Vth - 1 or U - Vth."""
    return h / vth - 1.0 if self.surrogate_input == "normalized" else h - vth

  def fires(self, h, vth):
    """The spike decision H[t] >= Vth, for Vth > 0 exactly `distance(h, vth) >= 0` in both conventions (a float
    h < Vth has h/Vth <= 1 - 2^-24, which rounds below 1), without the division: XLA:CPU keeps a division as a
    fusion boundary, whose output then stayed alive from the forward to the backward pass (where CSE merged
    the backward's recomputation into it). `dtvit.models.layers.Neuron` keeps Vth >= 1e-3."""
    return h >= vth

  def after_reset(self, h, s, vth):
    return h - vth * s if self.reset == "soft" else h * (1.0 - s)


def surrogate_grad(x: jax.Array, surrogate: str = "pwl", alpha: float = 0.3) -> jax.Array:
  """The surrogate derivative dS/dx at the distance to threshold x.

  'pwl' -> alpha * max(0, 1 - |x|) (the authors' piecewise linear, alpha = gamma = 0.3); 'sigmoid' ->
  alpha * sig(alpha x) * (1 - sig(alpha x)) (Spikformer, alpha = 4); 'atan' -> alpha / 2 / (1 + (pi/2 alpha
  x)^2) (alpha = 2).
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
    fused: the fused recurrence with a hand-written backward (`lif_multistep`); False: `lax.scan` over
      `make_step`. The same values and gradients.
    cpu_kernel: with `fused`, run it as the CPU kernel on CPU (`lif_multistep`); False: the pure-JAX recurrence.
    return_membrane: also return the membrane before reset [T, ...] (the scan path).
    membrane_dtype: dtype of the membrane state (float32 even when the currents are bf16).

  Returns:
    spikes [T, ...] in {0, 1} with the input's dtype, and, if requested, membranes [T, ...].
  """
  T = _num_steps(current_TX, num_steps)
  step_mask_T = check_step_mask(step_mask_T, T)
  if fused and not return_membrane:
    return lif_multistep(current_TX, spec, leak=leak, threshold=threshold, num_steps=num_steps,
                         step_mask_T=step_mask_T, membrane_dtype=membrane_dtype, cpu_kernel=cpu_kernel)
  step = make_step(spec, leak=leak, threshold=threshold)
  out_dtype = current_TX.dtype
  static = None if num_steps is None else current_TX.astype(membrane_dtype)

  def body(u, inputs):
    i, m = inputs
    u, (s, h) = step(u, i.astype(membrane_dtype) if i is not None else static, m)
    return u, (s.astype(out_dtype), h if return_membrane else None)

  u0 = _initial_membrane(current_TX.shape[int(num_steps is None):], spec, threshold, membrane_dtype)
  xs = current_TX if num_steps is None else None
  _, (spikes_TX, membrane_TX) = jax.lax.scan(body, u0, (xs, step_mask_T), length=T)
  return (spikes_TX, membrane_TX) if return_membrane else spikes_TX


def _num_steps(current_TX, num_steps: int | None) -> int:
  if num_steps is None:
    if current_TX.ndim < 1:
      raise ValueError("multistep needs a time axis: current_TX must be [T, ...] (or pass num_steps).")
    return current_TX.shape[0]
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  return int(num_steps)


def check_step_mask(step_mask_T, num_steps: int):
  if step_mask_T is None:
    return None
  step_mask_T = jnp.asarray(step_mask_T)
  if step_mask_T.shape != (num_steps,):
    raise ValueError(f"step_mask_T must be one value per time step, shape ({num_steps},); got "
                     f"{step_mask_T.shape}.")
  return step_mask_T


def _initial_membrane(shape, spec: NeuronSpec, vth, mdtype):
  return jnp.full(shape, spec.init_membrane, mdtype) * vth


# ----------------------------------------------------------------------------------------------------------
# The fused recurrence.


@dataclasses.dataclass(frozen=True)
class _Fused:
  """The static part of a fused call (hashable: a custom_vjp non-differentiable argument)."""
  spec: NeuronSpec
  num_steps: int
  static: bool        # a static input fed at every step
  masked: bool        # a 'skip' mask inside the recurrence
  membrane_dtype: jnp.dtype
  chunk: int = 0      # 0: the T steps unrolled; k > 0: a loop over T/k chunks of k unrolled steps


def lif_multistep(current_TX, spec: NeuronSpec = NeuronSpec(), *, leak=1.0, threshold=1.0, num_steps=None,
                  step_mask_T=None, membrane_dtype=jnp.float32, chunk: int | None = None, cpu_kernel: bool = True):
  """`multistep` (spikes only) with a hand-written backward: the same values and gradients (module docstring).

  chunk: None picks by T and the mask (`chunk_steps`); 0 unrolls all T steps; k > 0 (dividing T) loops over
  T/k chunks of k unrolled steps. The same values and gradients either way; only the program differs.
  cpu_kernel: on CPU, run the recurrence as `dtvit.cpu_kernels`' FFI kernel (each neuron's T steps in one pass)
  where it is built and supports the dtypes (float32); other platforms keep the unrolled recurrence. The same
  spikes bitwise, gradients to float rounding."""
  T = _num_steps(current_TX, num_steps)
  masked = step_mask_T is not None
  mask_T = (check_step_mask(step_mask_T, T).astype(jnp.float32) if masked else jnp.zeros((0,), jnp.float32))
  chunk = chunk_steps(T, masked=masked) if chunk is None else int(chunk)
  if chunk < 0 or (chunk and T % chunk):
    raise ValueError(f"chunk must be 0 or a divisor of T = {T}, got {chunk}.")
  fused = _Fused(spec, T, num_steps is not None, masked, jnp.dtype(membrane_dtype), chunk)
  lif = _lif_looped if fused.chunk else _lif
  # The kernel where programs run on CPU (the default backend; an accelerator host does not build it). The
  # program still lowers for other platforms without it (`_lif_cpu_kernel`, e.g. an export for GPU).
  if (cpu_kernel and jax.default_backend() == "cpu" and cpu_kernels.supports(spec, current_TX.dtype, membrane_dtype)
      and cpu_kernels.available()):
    lif = _lif_cpu_kernel
  return lif(current_TX, spec.leak_factor(leak), jnp.asarray(threshold, jnp.float32), mask_T, fused)


def chunk_steps(num_steps: int, *, masked: bool = True) -> int:
  """The fused recurrence's loop chunk for T steps: 0 (all T unrolled) up to UNROLL_MAX steps
  (UNROLL_MAX_UNMASKED without a step mask), else the largest divisor of T up to LOOP_CHUNK."""
  if num_steps <= (UNROLL_MAX if masked else UNROLL_MAX_UNMASKED):
    return 0
  return max(k for k in range(1, LOOP_CHUNK + 1) if num_steps % k == 0)


# Measured in the benchmark model's train step, side by side (experiments/benchmarks/README.md). With step
# masks, at T = 8 the unrolled form is 3% faster than the loop of 2-step chunks; without them the loop is 11%
# faster at T = 8 and the unrolled form 12% faster at T = 4. At T = 16 the loop of 2-step chunks is as fast in
# CPU time, 17-26% faster in wall time and holds 11% less.
UNROLL_MAX = 8
UNROLL_MAX_UNMASKED = 4
LOOP_CHUNK = 2


# XLA:CPU fuses the producer of the unrolled recurrence's input (a batch norm's normalisation, mask products)
# into the recurrence's loops, which recompute earlier steps for every output step (module docstring), and the
# consumers of its input gradient (the batch norm's backward reductions) likewise. An optimization barrier on
# the current, on the incoming gradient and on the gradients out keeps each materialised once: 1.6-6.3% less CPU
# time in four side-by-side runs of the benchmark model's train step (T = 4 and 8, masked and not; wall time
# 0.94-1.00), 1-2% less XLA temp memory
# (experiments/benchmarks/README.md). Values are unchanged: a barrier is the identity.
_barrier = jax.lax.optimization_barrier


def _lif_forward(current, lam, vth, mask_T, f: _Fused):
  spec, mdtype = f.spec, f.membrane_dtype
  current = _barrier(current)
  u = _initial_membrane(current.shape[int(not f.static):], spec, vth, mdtype)
  spikes, hs = [], []
  for t in range(f.num_steps):
    i = (current if f.static else current[t]).astype(mdtype)
    # The same expressions as `make_step`, so the forward is bitwise the reference's.
    h = spec.charge(u, i, lam)
    s = spec.fires(h, vth).astype(mdtype)
    u_next = spec.after_reset(h, s, vth)
    if f.masked:
      m = mask_T[t].astype(mdtype)
      u_next = m * u_next + (1.0 - m) * u
      s = s * m
    u = u_next
    spikes.append(s.astype(current.dtype))
    hs.append(h)
  return jnp.stack(spikes), jnp.stack(hs)


def _custom_lif(forward, backward, primal=None):
  """(current, lam, vth, mask_T, f) -> spikes with a hand-written VJP: `forward` returns (spikes, h_TX) and
  only h_TX (with the parameters) is kept for `backward`. `primal` (default: `forward`'s spikes) computes the
  spikes where no gradient is taken."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
  def lif(current, lam, vth, mask_T, f):
    if primal is not None:
      return primal(current, lam, vth, mask_T, f)
    return forward(current, lam, vth, mask_T, f)[0]

  def lif_fwd(current, lam, vth, mask_T, f):
    spikes, h_TX = forward(current, lam, vth, mask_T, f)
    return spikes, (h_TX, lam, vth, mask_T)

  lif.defvjp(lif_fwd, backward)
  return lif


def _held_membranes(h_TX, vth, mask_T, f: _Fused) -> list:
  """The membrane after each step (held where masked), recomputed forward from the stored h."""
  spec, mdtype = f.spec, f.membrane_dtype
  u = _initial_membrane(h_TX.shape[1:], spec, vth, mdtype)
  out = []
  for t in range(f.num_steps):
    h = h_TX[t]
    r = spec.after_reset(h, spec.fires(h, vth).astype(mdtype), vth)
    m = mask_T[t].astype(mdtype)
    u = m * r + (1.0 - m) * u
    out.append(u)
  return out


def _membrane_before(t, h_TX, vth, u_after, f: _Fused):
  """The membrane entering step t, or None where it is a constant 0."""
  spec, mdtype = f.spec, f.membrane_dtype
  if t == 0:
    return _initial_membrane(h_TX.shape[1:], spec, vth, mdtype) if (spec.init_membrane or f.masked) else None
  if f.masked:
    return u_after[t - 1]
  h_prev = h_TX[t - 1]  # recomputed from the stored h[t-1]
  return spec.after_reset(h_prev, spec.fires(h_prev, vth).astype(mdtype), vth)


def _step_grads(h, g_o, g_u, u_prev, m, lam, vth, f: _Fused):
  """The backward of one step: (dL/dI[t], dL/dU[t-1], dL/dlam, dL/dVth, dL/dm) terms, elementwise."""
  spec, mdtype = f.spec, f.membrane_dtype
  soft = spec.reset == "soft"
  normalized = spec.surrogate_input == "normalized"
  # One division per call, not per element: multiplies fuse across the steps' loops where XLA:CPU keeps
  # elementwise divisions as boundaries (2-3% of the train step; the surrogate's x moves by an ulp at most).
  inv = 1.0 / vth if normalized else None
  x = h - vth if inv is None else h * inv - 1.0
  s = spec.fires(h, vth).astype(mdtype)
  g_mask = None
  if m is not None:
    g_mask = jnp.sum(g_o * s + g_u * (spec.after_reset(h, s, vth) - u_prev), dtype=jnp.float32)
    g_s, g_r = m * g_o, m * g_u
  else:
    g_s, g_r = g_o, g_u
  if not spec.detach_reset:  # the reset's dependence on the spike
    g_s = g_s - (vth * g_r if soft else h * g_r)
  g_x = g_s * surrogate_grad(x, spec.surrogate, spec.alpha).astype(mdtype)
  g_h = (g_x * inv if normalized else g_x) + (g_r if soft else g_r * (1.0 - s))
  g_vth = (-g_x * h * (inv * inv) if normalized else -g_x) - (s * g_r if soft else 0.0)
  if spec.neuron == "spikingjelly_lif":
    g_in, g_u_prev, g_lam = g_h / spec.tau, g_h - g_h / spec.tau, None
  else:
    g_in, g_u_prev = g_h, lam * g_h
    g_lam = g_h * u_prev if (u_prev is not None and spec.neuron == "lif") else None
  if m is not None:
    g_u_prev = g_u_prev + (1.0 - m) * g_u
  return g_in, g_u_prev, g_lam, g_vth, g_mask


def _lif_bwd(f: _Fused, res, g_TX):
  h_TX, lam, vth, mask_T = res
  mdtype = f.membrane_dtype
  g_TX = _barrier(g_TX)
  u_after = _held_membranes(h_TX, vth, mask_T, f) if f.masked else None
  g_u = jnp.zeros(h_TX.shape[1:], mdtype)   # dL/du[t] arriving from step t+1
  # The scalar gradients are accumulated elementwise and reduced once: one pass, not one reduction per step.
  g_lam = g_vth = None
  g_in, g_mask = [], []
  for t in reversed(range(f.num_steps)):
    m = mask_T[t].astype(mdtype) if f.masked else None
    u_prev = _membrane_before(t, h_TX, vth, u_after, f)
    g_i, g_u, g_l, g_v, g_m = _step_grads(h_TX[t], g_TX[t].astype(mdtype), g_u, u_prev, m, lam, vth, f)
    g_in.append(g_i)
    g_mask.append(g_m)
    g_vth = g_v if g_vth is None else g_vth + g_v
    if g_l is not None:
      g_lam = g_l if g_lam is None else g_lam + g_l
  if f.spec.init_membrane:  # U[0] = init * Vth
    g_vth = g_vth + f.spec.init_membrane * g_u
  g_vth = jnp.sum(g_vth, dtype=jnp.float32)
  g_lam = jnp.zeros((), jnp.float32) if g_lam is None else jnp.sum(g_lam, dtype=jnp.float32)
  g_in = g_in[::-1]
  g_current = sum(g_in[1:], g_in[0]) if f.static else jnp.stack(g_in)
  g_mask_T = jnp.stack(g_mask[::-1]).astype(mask_T.dtype) if f.masked else jnp.zeros_like(mask_T)
  return _barrier((g_current.astype(g_TX.dtype), g_lam, g_vth, g_mask_T))


_lif = _custom_lif(_lif_forward, _lif_bwd)

# ----------------------------------------------------------------------------------------------------------
# The same recurrence as a loop over chunks of `chunk` steps, unrolled inside a chunk (a lax.scan forward, a
# lax.fori_loop backward). Fully unrolled, XLA:CPU fuses each direction into loops that recompute the earlier
# steps for every output step, so its cost grows as T^2 (experiments/benchmarks/README.md); a loop over
# chunks is one pass over the neurons per chunk, linear in T, with the quadratic part bounded by the chunk.


def _chunk_forward(u, i_KX, m_K, lam, vth, f: _Fused, out_dtype):
  """k steps from the membrane u: the same expressions as `_lif_forward`. Returns (u, spikes [k], h [k])."""
  spec, mdtype = f.spec, f.membrane_dtype
  spikes, hs = [], []
  for j in range(f.chunk):
    h = spec.charge(u, i_KX if f.static else i_KX[j].astype(mdtype), lam)
    s = spec.fires(h, vth).astype(mdtype)
    u_next = spec.after_reset(h, s, vth)
    if f.masked:
      u_next = m_K[j] * u_next + (1.0 - m_K[j]) * u
      s = s * m_K[j]
    u = u_next
    spikes.append(s.astype(out_dtype))
    hs.append(h)
  return u, jnp.stack(spikes), jnp.stack(hs)


def _lif_forward_looped(current, lam, vth, mask_T, f: _Fused):
  mdtype, k, n = f.membrane_dtype, f.chunk, f.num_steps // f.chunk
  x_shape = current.shape[int(not f.static):]
  static = current.astype(mdtype) if f.static else None

  def body(u, inputs):
    i_KX, m_K = inputs
    u, s_KX, h_KX = _chunk_forward(u, static if f.static else i_KX, m_K, lam, vth, f, current.dtype)
    return u, (s_KX, h_KX)

  u0 = _initial_membrane(x_shape, f.spec, vth, mdtype)
  xs = (None if f.static else current.reshape((n, k) + x_shape),
        mask_T.astype(mdtype).reshape(n, k) if f.masked else None)
  _, (spikes, h_TX) = jax.lax.scan(body, u0, xs, length=n)
  return spikes.reshape((f.num_steps,) + x_shape), h_TX.reshape((f.num_steps,) + x_shape)


def _held_membranes_looped(h_TX, vth, mask_T, f: _Fused):
  """[T, ...]: the membrane after each step (held where masked), recomputed from h in one loop."""
  spec, mdtype = f.spec, f.membrane_dtype

  def body(u, inputs):
    h, m = inputs
    r = spec.after_reset(h, spec.fires(h, vth).astype(mdtype), vth)
    u = m * r + (1.0 - m) * u
    return u, u

  u0 = _initial_membrane(h_TX.shape[1:], spec, vth, mdtype)
  return jax.lax.scan(body, u0, (h_TX, mask_T.astype(mdtype)))[1]


def _lif_bwd_looped(f: _Fused, res, g_TX):
  h_TX, lam, vth, mask_T = res
  spec, mdtype, k, n = f.spec, f.membrane_dtype, f.chunk, f.num_steps // f.chunk
  x_shape = h_TX.shape[1:]
  u_after = _held_membranes_looped(h_TX, vth, mask_T, f) if f.masked else None
  u_init = _initial_membrane(x_shape, spec, vth, mdtype)
  reset = lambda h: spec.after_reset(h, spec.fires(h, vth).astype(mdtype), vth)
  take = lambda a, t: jax.lax.dynamic_index_in_dim(a, t, keepdims=False)

  def u_prev_at(t):  # the membrane entering step t (a traced index)
    prev = take(u_after, jnp.maximum(t - 1, 0)) if f.masked else reset(take(h_TX, jnp.maximum(t - 1, 0)))
    return jnp.where(t > 0, prev, u_init)

  def body(c, carry):
    c = n - 1 - c
    g_u, g_lam, g_vth, g_in, g_mask = carry
    g_chunk = []
    for j in reversed(range(k)):
      t = c * k + j
      m = mask_T[t].astype(mdtype) if f.masked else None
      u_prev = u_prev_at(t) if (j == 0 or f.masked) else reset(take(h_TX, t - 1))
      g_i, g_u, g_l, g_v, g_m = _step_grads(take(h_TX, t), take(g_TX, t).astype(mdtype), g_u, u_prev, m, lam,
                                            vth, f)
      g_chunk.append(g_i)
      g_vth = g_vth + g_v
      if g_l is not None:
        g_lam = g_lam + g_l
      if f.masked:
        g_mask = g_mask.at[t].set(g_m)
    g_chunk = g_chunk[::-1]
    if f.static:
      g_in = g_in + sum(g_chunk[1:], g_chunk[0])
    else:
      g_in = jax.lax.dynamic_update_slice_in_dim(g_in, jnp.stack(g_chunk).astype(g_in.dtype), c * k, 0)
    return g_u, g_lam, g_vth, g_in, g_mask

  zeros = jnp.zeros(x_shape, mdtype)
  g_in0 = zeros if f.static else jnp.zeros(g_TX.shape, g_TX.dtype)
  carry = (zeros, zeros, zeros, g_in0, jnp.zeros(mask_T.shape, jnp.float32))
  g_u, g_lam, g_vth, g_current, g_mask_T = jax.lax.fori_loop(0, n, body, carry)
  if spec.init_membrane:
    g_vth = g_vth + spec.init_membrane * g_u
  return (g_current.astype(g_TX.dtype), jnp.sum(g_lam, dtype=jnp.float32), jnp.sum(g_vth, dtype=jnp.float32),
          g_mask_T.astype(mask_T.dtype))


_lif_looped = _custom_lif(_lif_forward_looped, _lif_bwd_looped)


# ----------------------------------------------------------------------------------------------------------
# The recurrence as `dtvit.cpu_kernels`' FFI kernel on CPU (each neuron's T steps in one pass, forward and
# backward), the pure-JAX one above elsewhere: `lax.platform_dependent` lowers only the branch of the platform
# it compiles for. Both keep the same residual h [T, ...].


def _forward_kernel_or_jax(current, lam, vth, mask_T, f: _Fused):
  def on_cpu(current, lam, vth, mask_T):
    spikes, h = cpu_kernels.forward(current, lam, vth, mask_T, f.spec, num_steps=f.num_steps, masked=f.masked,
                                    static=f.static)
    return spikes.astype(current.dtype), h.reshape(spikes.shape)

  elsewhere = functools.partial(_lif_forward_looped if f.chunk else _lif_forward, f=f)
  return jax.lax.platform_dependent(current, lam, vth, mask_T, cpu=on_cpu, default=elsewhere)


# From this many steps on, inference runs the kernel's forward too (measured: `_spikes_kernel_or_jax`).
KERNEL_INFERENCE_MIN_STEPS = 5


def _spikes_kernel_or_jax(current, lam, vth, mask_T, f: _Fused):
  """The spikes where no gradient is taken (inference): up to `KERNEL_INFERENCE_MIN_STEPS - 1` steps XLA's
  unrolled forward, which fuses into its neighbours (3% faster than the kernel at T = 4, benchmark model);
  beyond, the kernel (7-10% faster at T = 8, benchmark and paper-size models; experiments/benchmarks/README.md)."""
  if f.num_steps >= KERNEL_INFERENCE_MIN_STEPS:
    return _forward_kernel_or_jax(current, lam, vth, mask_T, f)[0]
  return (_lif_forward_looped if f.chunk else _lif_forward)(current, lam, vth, mask_T, f)[0]


def _bwd_kernel_or_jax(f: _Fused, res, g_TX):
  h_TX, lam, vth, mask_T = res

  def on_cpu(h_TX, lam, vth, mask_T, g_TX):
    g_current, g_lam, g_vth, g_mask = cpu_kernels.backward(
        h_TX.reshape(f.num_steps, -1), g_TX.astype(jnp.float32), lam, vth, mask_T, f.spec, masked=f.masked,
        static=f.static)
    return g_current.astype(g_TX.dtype), g_lam, g_vth, g_mask.astype(mask_T.dtype)

  def elsewhere(h_TX, lam, vth, mask_T, g_TX):
    return (_lif_bwd_looped if f.chunk else _lif_bwd)(f, (h_TX, lam, vth, mask_T), g_TX)

  return jax.lax.platform_dependent(h_TX, lam, vth, mask_T, g_TX, cpu=on_cpu, default=elsewhere)


_lif_cpu_kernel = _custom_lif(_forward_kernel_or_jax, _bwd_kernel_or_jax, _spikes_kernel_or_jax)
