"""Pool and Dense matmul with fast gradients: exact replacements for the reference ops where XLA's own
gradients are slow.

Each op computes the same values and the same gradients as its reference (JAX's autodiff of the plain lax op),
up to float summation order; `tests/ops_test.py` checks both. They exist because XLA:CPU lowers some backward
passes badly (measured in experiments/benchmarks/README.md):
- `max_pool`: `reduce_window` max backward (select-and-scatter) carries int32 index tensors and ran ~10x its
  forward. Here the forward is a max over k*k strided slices and the backward routes each output's gradient to
  the FIRST maximum of its window in row-major order, as XLA's select-and-scatter and torch do: ties are the
  rule, not the exception, on binary spikes, and splitting the gradient among tied inputs would change it.
- `dot_general` of a Dense layer on [..., D] inputs: with more than one leading axis, XLA:CPU contracts the
  weight gradient over them through a transposed copy of the output gradient (e.g. [F, T*B, N] for [T*B, N, F]).
  Here the leading axes are folded first, so the weight gradient is one [D, M] x [M, F] matmul read in place.
(The neuron recurrence's fused backward lives in `dtvit.lif_fused`.) Convolutions are lax's
own on both paths: a kernel gradient as k*k tap matmuls was faster than lax's only while XLA:CPU ran
convolutions on one core; with `dtvit.compilation`'s CPU options lax's is faster
(experiments/benchmarks/README.md).

Which path a model takes is its static `kernels` attribute ('fused' | 'reference', see
`dtvit.models.SpikingViT`): a model built with 'reference' uses `flax.linen.max_pool` and Flax's Dense matmul.
Being a model attribute, the choice is part of what `jax.jit` traces and caches.

No Flax here: plain functions of arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# ----------------------------------------------------------------------------------------------------------
# Dense.


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """Drop-in for `lax.dot_general` as `flax.linen.Dense` calls it ([..., D] x [D, F], contracting the last
  axis): `dense` for that form, lax's own for any other."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  if (lhs_b or rhs_b or rhs.ndim != 2 or tuple(rhs_c) != (0,) or tuple(lhs_c) != (lhs.ndim - 1,)
      or preferred_element_type is not None):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  return dense(lhs, rhs, precision=precision)


def dense(x_XD, w_DF, precision=None):
  """x @ w over the last axis of x, [..., D] x [D, F] -> [..., F], as one 2-D matmul [M, D] x [D, F] with the
  leading axes folded into M (so that autodiff's weight gradient is a 2-D contraction over M, no transpose)."""
  d, f = w_DF.shape
  y_MF = lax.dot_general(x_XD.reshape(-1, d), w_DF, (((1,), (0,)), ((), ())), precision=precision)
  return y_MF.reshape(x_XD.shape[:-1] + (f,))


# ----------------------------------------------------------------------------------------------------------
# Max pooling.


def _explicit_padding(padding, in_hw, k_hw, strides):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_hw, k_hw, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


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
