"""The fused neuron recurrence: `lif_multistep`, `dtvit.neurons.multistep`'s default in training.

The recurrence of `dtvit.neurons` (its docstring has the conventions), fused, with a hand-written backward.
`dtvit.neurons.multistep`'s reference is a `lax.scan` over `make_step`; here the T steps are unrolled in Python
(T is static and small) so XLA fuses each direction into a few elementwise loops, and the only residual is the
membrane before reset h [T, ...], from which the backward recomputes spikes, surrogate slopes and the pre-step
membranes, instead of `lax.scan`'s stacked per-step intermediates. XLA:CPU computes each output step of such a
fused loop from the inputs of every earlier step, so its cost grows as T^2; beyond `UNROLL_MAX` steps
(`UNROLL_MAX_UNMASKED` without a step mask) the fused recurrence therefore loops over chunks of a few unrolled
steps (`chunk`), one pass over the neurons per chunk, with the same residual and the same hand-written step
gradients. `tests/neurons_test.py` checks that both give the same values and gradients. On CPU the fused
recurrence's training path runs as an FFI kernel instead (`dtvit.cpu_kernels`: each neuron's T steps in one
pass, the same expressions and residual; `tests/cpu_kernels_test.py`); inference too beyond 4 steps (XLA's
fused forward up to 4, where it is faster).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dtvit import cpu_kernels
from dtvit.neuron_spec import NeuronSpec, check_step_mask, initial_membrane, num_steps_of, surrogate_grad


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
  """`dtvit.neurons.multistep` (spikes only) with a hand-written backward: the same values and gradients
  (this module's docstring).

  chunk: None picks by T and the mask (`chunk_steps`); 0 unrolls all T steps; k > 0 (dividing T) loops over
  T/k chunks of k unrolled steps. The same values and gradients either way; only the program differs.
  cpu_kernel: on CPU, run the recurrence as `dtvit.cpu_kernels`' FFI kernel (each neuron's T steps in one pass)
  where it is built and supports the dtypes (float32); other platforms keep the unrolled recurrence. The same
  spikes bitwise, gradients to float rounding."""
  T = num_steps_of(current_TX, num_steps)
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
  u = initial_membrane(current.shape[int(not f.static):], spec, vth, mdtype)
  spikes, hs = [], []
  for t in range(f.num_steps):
    i = (current if f.static else current[t]).astype(mdtype)
    # The same expressions as `neurons.make_step`, so the forward is bitwise the reference's.
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
  u = initial_membrane(h_TX.shape[1:], spec, vth, mdtype)
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
    return initial_membrane(h_TX.shape[1:], spec, vth, mdtype) if (spec.init_membrane or f.masked) else None
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

  u0 = initial_membrane(x_shape, f.spec, vth, mdtype)
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

  u0 = initial_membrane(h_TX.shape[1:], spec, vth, mdtype)
  return jax.lax.scan(body, u0, (h_TX, mask_T.astype(mdtype)))[1]


def _lif_bwd_looped(f: _Fused, res, g_TX):
  h_TX, lam, vth, mask_T = res
  spec, mdtype, k, n = f.spec, f.membrane_dtype, f.chunk, f.num_steps // f.chunk
  x_shape = h_TX.shape[1:]
  u_after = _held_membranes_looped(h_TX, vth, mask_T, f) if f.masked else None
  u_init = initial_membrane(x_shape, spec, vth, mdtype)
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
