"""Fast custom-gradient ops: exact replacements for the reference ops where XLA's own gradients are slow.

Each op computes the same values and the same gradients as its reference (JAX's autodiff of the plain lax op),
up to float summation order; `tests/ops_test.py` checks both. They exist because XLA:CPU lowers some backward
passes badly (measured in experiments/benchmarks/README.md):
- `conv_general_dilated`: the kernel gradient of a 3x3 conv, emitted as a convolution whose window is the whole
  image, ran 2-5x slower than the forward conv. Here it is k*k tap matmuls [C, N*H*W] x [N*H*W, D].
- `max_pool`: `reduce_window` max backward (select-and-scatter) carries int32 index tensors and ran ~10x its
  forward. Here the forward is a max over k*k strided slices and the backward routes each output's gradient to
  the FIRST maximum of its window in row-major order, as XLA's select-and-scatter and torch do: ties are the
  rule, not the exception, on binary spikes, and splitting the gradient among tied inputs would change it.
- `lif_multistep`: the neuron recurrence with a hand-written backward over a Python-unrolled time loop, saving
  only the membrane before reset [T, ...] (and, optionally, nothing but the spikes as int8 plus the input
  current), instead of `lax.scan`'s stacked per-step intermediates and dynamic-update-slices.

The switch: `fast_ops()` (default True) is read at trace time by `dtvit.models.layers.Conv`, `max_pool` and
`dtvit.neurons.multistep`; `use_fast_ops(False)` is a context manager that selects the reference paths (used by
the tests and the benchmark's before/after rows). Because it is read when a function is traced, set it before
`jax.jit` traces the function; a compiled function keeps the path it was traced with.

No Flax here: plain functions of arrays.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_FAST = [True]


def fast_ops() -> bool:
  """Whether layers use the fast custom-gradient ops (read at trace time)."""
  return _FAST[-1]


@contextlib.contextmanager
def use_fast_ops(enabled: bool):
  """Selects the fast (True) or reference (False) ops for everything traced inside the context."""
  _FAST.append(bool(enabled))
  try:
    yield
  finally:
    _FAST.pop()


# ----------------------------------------------------------------------------------------------------------
# Convolution.

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if ndim != 4:
    return False
  if dimension_numbers is None:
    return False
  dn = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers)
  return tuple(dn) == tuple(lax.conv_dimension_numbers((1,) * 4, (1,) * 4, _NHWC))


def _explicit_padding(padding, in_hw, k_hw, strides):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_hw, k_hw, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """Drop-in for `lax.conv_general_dilated` (the signature `flax.linen.Conv` calls) with a fast kernel
  gradient for 2-D NHWC/HWIO convolutions without dilation or groups, when `fast_ops()`; otherwise lax's own."""
  simple = (fast_ops() and _is_nhwc(dimension_numbers, lhs.ndim) and feature_group_count == 1 and batch_group_count == 1
            and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and preferred_element_type is None)
  if not simple:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count,
                                    batch_group_count=batch_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  return conv2d(lhs, rhs, strides=strides, padding=pads, precision=precision)


def _conv_ref(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d(x_NHWC, w_HWIO, strides, padding, precision):
  return _conv_ref(x_NHWC, w_HWIO, strides, padding, precision)


def _conv2d_fwd(x, w, strides, padding, precision):
  return _conv_ref(x, w, strides, padding, precision), (x, w)


def _conv2d_bwd(strides, padding, precision, res, g_NHWD):
  x, w = res
  # The input gradient is a transposed conv, which XLA handles well: take lax's own (the forward is DCE'd).
  _, vjp_x = jax.vjp(lambda x_: _conv_ref(x_, w, strides, padding, precision), x)
  (dx,) = vjp_x(g_NHWD)
  return dx, conv2d_kernel_grad(x, g_NHWD, w.shape, strides, padding, precision).astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d_kernel_grad(x_NHWC, g_NHWD, kernel_shape, strides, padding, precision=None):
  """dL/dw of y = conv(x, w) as k_h*k_w tap matmuls: dw[i, j] = x_tap(i, j)^T g, contracted over N*H*W."""
  kh, kw, c, d = kernel_shape
  (plo, phi), (qlo, qhi) = padding
  sh, sw = strides
  xp = jnp.pad(x_NHWC, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)))
  n, ho, wo, _ = g_NHWD.shape
  g_MD = g_NHWD.reshape(-1, d)
  dot = lambda x_tap: lax.dot_general(x_tap.reshape(-1, c), g_MD, (((0,), (0,)), ((), ())), precision=precision,
                                      preferred_element_type=jnp.float32)
  if (sh, sw) == (1, 1) and kh * kw > 1:
    # A loop, so that one shifted copy of x is alive at a time (unrolled, XLA kept all k*k of them).
    def body(t, dw):
      x_tap = lax.dynamic_slice(xp, (0, t // kw, t % kw, 0), (n, ho, wo, c))
      return lax.dynamic_update_index_in_dim(dw, dot(x_tap), t, 0)
    dw = lax.fori_loop(0, kh * kw, body, jnp.zeros((kh * kw, c, d), jnp.float32))
    return dw.reshape(kh, kw, c, d)
  taps = []
  for i in range(kh):
    for j in range(kw):
      x_tap = lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
      taps.append(lax.dot_general(x_tap.reshape(-1, c), g_MD, (((0,), (0,)), ((), ())), precision=precision,
                                  preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, c, d)


def conv2d(x_NHWC, w_HWIO, *, strides: Sequence[int] = (1, 1), padding="SAME", precision=None):
  """2-D convolution, NHWC x HWIO -> NHWC, with the fast kernel gradient.

  Args:
    x_NHWC: input [N, H, W, C].
    w_HWIO: kernel [kh, kw, C, D].
    strides: (sh, sw).
    padding: 'SAME' | 'VALID' | ((lo, hi), (lo, hi)).
  Returns:
    [N, Ho, Wo, D], equal to `lax.conv_general_dilated` (the same lax op computes it).
  """
  strides = tuple(int(s) for s in strides)
  pads = _explicit_padding(padding, x_NHWC.shape[1:3], w_HWIO.shape[:2], strides)
  return _conv2d(x_NHWC, w_HWIO, strides, pads, precision)


# ----------------------------------------------------------------------------------------------------------
# Max pooling.


def _pool_taps(xp, window, strides, out_hw):
  n, _, _, c = xp.shape
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
  for i in range(kh):
    for j in range(kw):
      yield i, j, lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))


def _pool_geometry(shape, window, strides, padding):
  _, h, w, _ = shape
  (plo, phi), (qlo, qhi) = padding
  ho = (h + plo + phi - window[0]) // strides[0] + 1
  wo = (w + qlo + qhi - window[1]) // strides[1] + 1
  return ho, wo


def _pad_low(x, padding):
  (plo, phi), (qlo, qhi) = padding
  fill = jnp.array(-jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min, x.dtype)
  return lax.pad(x, fill, ((0, 0, 0), (plo, phi, 0), (qlo, qhi, 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x_NHWC, window, strides, padding, x_shape):
  return _max_pool_fwd(x_NHWC, window, strides, padding, x_shape)[0]


def _max_pool_fwd(x, window, strides, padding, x_shape):
  del x_shape
  out_hw = _pool_geometry(x.shape, window, strides, padding)
  y = arg = None
  for i, j, tap in _pool_taps(_pad_low(x, padding), window, strides, out_hw):
    t = i * window[1] + j
    if y is None:
      y, arg = tap, jnp.zeros(tap.shape, jnp.int8)
    else:
      # Strictly greater: on ties the earlier (row-major first) tap keeps the gradient.
      better = tap > y
      y, arg = jnp.where(better, tap, y), jnp.where(better, jnp.int8(t), arg)
  # The residual is the window position of each output's maximum (int8), not the input: 1/16 of its bytes
  # for a 3x3/2 pool of float32.
  return y, arg


def _max_pool_bwd(window, strides, padding, x_shape, arg, g):
  """Gathers, for every padded input position, the gradients of the outputs whose window picked it.

  Padded row hp = s * a + r (phase r) is tap i = hp - s * ho of output row ho = a - (i - r) / s, for each
  i = r, r + s, ... < k. So each phase is a sum of a few shifted masked copies of g, and the phases interleave
  into the padded gradient with one reshape: a single elementwise pass, no per-tap padded buffers.
  """
  (kh, kw), (sh, sw) = window, strides
  (plo, phi), (qlo, qhi) = padding
  n, ho, wo, c = g.shape
  a_h, a_w = -(-(x_shape[1] + plo + phi) // sh), -(-(x_shape[2] + qlo + qhi) // sw)
  zero = jnp.zeros((), g.dtype)

  def shifted(t, mh, mw):  # c_t[a - mh, b - mw] on the [a_h, a_w] phase grid, zero outside
    sel = jnp.where(arg == t, g, zero)
    return lax.pad(sel, zero, ((0, 0, 0), (mh, a_h - ho - mh, 0), (mw, a_w - wo - mw, 0), (0, 0, 0)))

  rows = []
  for r in range(sh):
    cols = []
    for q in range(sw):
      parts = [shifted(i * kw + j, (i - r) // sh, (j - q) // sw)
               for i in range(r, kh, sh) for j in range(q, kw, sw)]
      cols.append(sum(parts[1:], parts[0]) if parts else jnp.zeros((n, a_h, a_w, c), g.dtype))
    rows.append(jnp.stack(cols, axis=3))              # [n, a_h, a_w, sw, c]
  dxp = jnp.stack(rows, axis=2).reshape(n, a_h * sh, a_w * sw, c)  # [n, a_h, sh, a_w, sw, c] interleaved
  return (lax.slice(dxp, (0, plo, qlo, 0), (n, plo + x_shape[1], qlo + x_shape[2], c)),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x_NHWC, window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))):
  """Max pooling over H, W of [N, H, W, C]; equal to `flax.linen.max_pool` in values and gradients
  (the gradient of each output goes to the first maximum of its window, row-major)."""
  window = tuple(int(k) for k in window)
  strides = tuple(int(s) for s in strides)
  if isinstance(padding, str):
    padding = _explicit_padding(padding, x_NHWC.shape[1:3], window, strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if window[0] * window[1] > 127:
    raise ValueError(f"max_pool: window {window} too large for the int8 argmax residual.")
  return _max_pool(x_NHWC, window, strides, padding, tuple(x_NHWC.shape))


# ----------------------------------------------------------------------------------------------------------
# Multi-step LIF / IF / Spikformer neuron with a hand-written backward.


def lif_multistep(current_TX, *, num_steps=None, neuron="lif", leak=1.0, threshold=1.0, tau=2.0,
                  surrogate="pwl", alpha=None, reset=None, detach_reset=None, membrane_dtype=jnp.float32,
                  init_membrane: float = 0.0, surrogate_input: str = "normalized", step_mask_T=None):
  """`dtvit.neurons.multistep` (spikes only) with a hand-written backward; the same values and gradients.

  The T steps are unrolled in Python (T is static and small) so XLA fuses each direction into a few
  elementwise loops; the only residual is the membrane before reset h [T, ...] in `membrane_dtype`, from which
  the backward recomputes spikes, surrogate slopes and the pre-step membranes.

  Args:
    current_TX: [T, ...] input currents, or with `num_steps` a static input [...] fed at every step.
    neuron, leak, threshold, tau, surrogate, alpha, reset, detach_reset, surrogate_input: as in
      `dtvit.neurons.make_step`.
    init_membrane: U[0] as a fraction of the threshold, as in `dtvit.neurons.multistep`.
    step_mask_T: None, or [T]: the 'skip' mask applied inside the recurrence (membrane held, no spike where
      0), differentiable, as in `dtvit.neurons.multistep`.
  Returns:
    spikes [T, ...] in {0, 1}, dtype of `current_TX`.
  """
  from dtvit import neurons as neurons_lib  # pylint: disable=g-import-not-at-top  # neurons imports ops
  # Validates the settings exactly as the reference path does.
  neurons_lib.make_step(neuron, leak=leak, threshold=threshold, tau=tau, surrogate=surrogate, alpha=alpha,
                        reset=reset, detach_reset=detach_reset, surrogate_input=surrogate_input)
  if num_steps is not None and num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if num_steps is None and current_TX.ndim < 1:
    raise ValueError("multistep needs a time axis: current_TX must be [T, ...] (or pass num_steps).")
  reset = reset or ("hard" if neuron == "spikformer" else "soft")
  if detach_reset is None:
    detach_reset = neuron == "spikformer"
  alpha = neurons_lib.default_alpha(surrogate) if alpha is None else float(alpha)
  lam = jnp.clip(leak, 0.0, 1.0) if neuron == "lif" else jnp.ones((), jnp.float32)
  static = num_steps is not None
  T = int(num_steps) if static else current_TX.shape[0]
  masked = step_mask_T is not None
  mask_T = (neurons_lib.check_step_mask(step_mask_T, T).astype(jnp.float32) if masked
            else jnp.zeros((0,), jnp.float32))
  cfg = (T, static, neuron, float(tau), surrogate, alpha, reset, bool(detach_reset), jnp.dtype(membrane_dtype),
         float(init_membrane), surrogate_input, masked)
  return _lif(current_TX, jnp.asarray(lam, jnp.float32), jnp.asarray(threshold, jnp.float32), mask_T, cfg)


def _distance(h, vth, surrogate_input):
  """The spike function's argument x (see `dtvit.neurons`): U/Vth - 1 or U - Vth."""
  return h / vth - 1.0 if surrogate_input == "normalized" else h - vth


def _after_reset(h, s, vth, reset):
  return h - vth * s if reset == "soft" else h * (1.0 - s)


def _lif_forward(current, lam, vth, mask_T, cfg):
  T, static, neuron, tau, _, _, reset, _, mdtype, init, sin, masked = cfg
  u = _initial_membrane(current.shape[int(not static):], init, vth, mdtype)
  spikes, hs = [], []
  for t in range(T):
    i = (current if static else current[t]).astype(mdtype)
    # The same expressions as `neurons.make_step`, so the forward is bitwise the reference's.
    h = u + (i - u) / tau if neuron == "spikformer" else lam * u + i
    s = (_distance(h, vth, sin) >= 0).astype(mdtype)
    u_next = _after_reset(h, s, vth, reset)
    if masked:
      m = mask_T[t].astype(mdtype)
      u_next = m * u_next + (1.0 - m) * u
      s = s * m
    u = u_next
    spikes.append(s.astype(current.dtype))
    hs.append(h)
  return jnp.stack(spikes), jnp.stack(hs)


def _initial_membrane(shape, init, vth, mdtype):
  return jnp.full(shape, init, mdtype) * vth  # as `neurons.multistep` computes it


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lif(current, lam, vth, mask_T, cfg):
  return _lif_forward(current, lam, vth, mask_T, cfg)[0]


def _lif_fwd(current, lam, vth, mask_T, cfg):
  spikes, h_TX = _lif_forward(current, lam, vth, mask_T, cfg)
  return spikes, (h_TX, lam, vth, mask_T)


def _lif_bwd(cfg, res, g_TX):
  from dtvit import neurons as neurons_lib  # pylint: disable=g-import-not-at-top
  T, static, neuron, tau, surrogate, alpha, reset, detach, mdtype, init, sin, masked = cfg
  h_TX, lam, vth, mask_T = res
  normalized = sin == "normalized"
  # The membrane after each step (held where masked), recomputed forward from the stored h: u_TX[t] enters
  # step t + 1. Without a mask it is the reset of h[t] and is recomputed inside the loop instead.
  u_after = None
  if masked:
    u = _initial_membrane(h_TX.shape[1:], init, vth, mdtype)
    u_after = []
    for t in range(T):
      h = h_TX[t]
      r = _after_reset(h, (_distance(h, vth, sin) >= 0).astype(mdtype), vth, reset)
      m = mask_T[t].astype(mdtype)
      u = m * r + (1.0 - m) * u
      u_after.append(u)
  g_u = jnp.zeros(h_TX.shape[1:], mdtype)   # dL/du[t] arriving from step t+1
  # The scalar gradients are accumulated elementwise and reduced once: one pass, not one reduction per step.
  g_lam = g_vth = None
  g_in, g_mask = [], []
  for t in reversed(range(T)):
    h = h_TX[t]
    x = _distance(h, vth, sin)
    s = (x >= 0).astype(mdtype)
    g_o = g_TX[t].astype(mdtype)
    if t > 0:  # the membrane entering step t
      if masked:
        u_prev = u_after[t - 1]
      else:  # recomputed from the stored h[t-1]
        h_prev = h_TX[t - 1]
        u_prev = _after_reset(h_prev, (_distance(h_prev, vth, sin) >= 0).astype(mdtype), vth, reset)
    else:
      u_prev = _initial_membrane(h.shape, init, vth, mdtype) if (init or masked) else None
    if masked:
      m = mask_T[t].astype(mdtype)
      r = _after_reset(h, s, vth, reset)
      g_mask.append(jnp.sum(g_o * s + g_u * (r - u_prev), dtype=jnp.float32))
      g_s, g_r = m * g_o, m * g_u
    else:
      g_s, g_r = g_o, g_u
    if not detach:  # the reset's dependence on the spike
      g_s = g_s - (vth * g_r if reset == "soft" else h * g_r)
    g_x = g_s * neurons_lib.surrogate_grad(x, surrogate, alpha).astype(mdtype)
    g_h = (g_x / vth if normalized else g_x) + (g_r if reset == "soft" else g_r * (1.0 - s))
    g_vth_t = -g_x * h / (vth * vth) if normalized else -g_x
    if reset == "soft":
      g_vth_t = g_vth_t - s * g_r
    g_vth = g_vth_t if g_vth is None else g_vth + g_vth_t
    if neuron == "spikformer":
      g_in.append(g_h / tau)
      g_u_next = g_h - g_h / tau
    else:
      g_in.append(g_h)
      if u_prev is not None and neuron == "lif":
        g_lam = g_h * u_prev if g_lam is None else g_lam + g_h * u_prev
      g_u_next = lam * g_h
    g_u = g_u_next + (1.0 - m) * g_u if masked else g_u_next
  if init:  # U[0] = init * Vth
    g_vth = g_vth + init * g_u
  g_vth = jnp.sum(g_vth, dtype=jnp.float32)
  g_lam = jnp.zeros((), jnp.float32) if g_lam is None else jnp.sum(g_lam, dtype=jnp.float32)
  g_in = g_in[::-1]
  g_current = sum(g_in[1:], g_in[0]) if static else jnp.stack(g_in)
  g_mask_T = jnp.stack(g_mask[::-1]).astype(mask_T.dtype) if masked else jnp.zeros_like(mask_T)
  return g_current.astype(g_TX.dtype), g_lam, g_vth, g_mask_T


_lif.defvjp(_lif_fwd, _lif_bwd)


# ----------------------------------------------------------------------------------------------------------
# Bounded BPTT memory: keep only the spikes (as int8) and recompute everything else in the backward pass.

SPIKES = "dtvit_spikes"


def tag_spikes(spikes):
  """Marks spikes as the residual `checkpoint_spikes` keeps (an identity, also for gradients).

  They stay in their float dtype: an int8 copy would be exact for {0, 1} but carries no gradient, and a bf16
  copy would round the cotangents passing back through it."""
  from jax.ad_checkpoint import checkpoint_name  # pylint: disable=g-import-not-at-top
  return checkpoint_name(spikes, SPIKES)


def checkpoint_spikes(fn, *, prevent_cse: bool = True):
  """`jax.checkpoint` of `fn` (e.g. the loss of a model built with NeuronConfig(remat='spikes')) that saves only
  the tagged spikes: the backward pass recomputes each layer's convs, matmuls, batch norms and membranes from
  the spikes entering it, one layer at a time, so BPTT memory is the spikes of all layers plus one layer's
  working set instead of every layer's intermediates (conv inputs, batch-norm statistics, membranes)."""
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(SPIKES), prevent_cse=prevent_cse)
