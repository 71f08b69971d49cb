"""dtvit.compilation: the CPU compiler options take effect (convolutions leave YNNPACK), change values only by
float rounding, and fall back to XLA's defaults where a jaxlib does not know them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import compilation


def _conv_grad(x, w):
  f = lambda w_: jnp.sum(jax.lax.conv_general_dilated(x, w_, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
  return jax.value_and_grad(f)(w)


def _args():
  kx, kw = jax.random.split(jax.random.key(0))
  return jax.random.normal(kx, (8, 16, 16, 32)), jax.random.normal(kw, (3, 3, 32, 64)) * 0.1


def _ynn_fusions_with_conv(hlo: str) -> int:
  """How many YNNPACK fusions hold a convolution, in optimised HLO text."""
  called = re.findall(r"%ynn_fusion[\w.]* = .* fusion\(.*calls=(%[\w.\-]+)", hlo)
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n(%[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, flags=re.S)}
  return sum("convolution(" in bodies.get(c, "") for c in called)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_cpu_options_move_convolutions_out_of_ynnpack():
  opts = compilation.options()
  assert opts == compilation.CPU_OPTIONS
  default = jax.jit(_conv_grad).lower(*_args()).compile().as_text()
  tuned = jax.jit(_conv_grad, compiler_options=opts).lower(*_args()).compile().as_text()
  assert tuned.count("convolution(") >= 2  # forward and kernel gradient: still XLA convolutions
  assert _ynn_fusions_with_conv(tuned) == 0
  if _ynn_fusions_with_conv(default) == 0:
    pytest.skip("this jaxlib keeps convolutions out of YNNPACK by default; nothing to compare")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_cpu_options_change_values_only_by_rounding():
  (v0, g0), (v1, g1) = jax.jit(_conv_grad)(*_args()), compilation.jit(_conv_grad)(*_args())
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g0))))


def test_no_options_off_cpu_or_when_the_jaxlib_refuses_them(monkeypatch, caplog):
  assert compilation.options("gpu") is None and compilation.options("tpu") is None
  monkeypatch.setattr(compilation, "CPU_OPTIONS", {"xla_cpu_no_such_option_in_any_jaxlib": "1"})
  compilation._accepted.cache_clear()
  try:
    assert compilation.options("cpu") is None
    assert "does not accept the CPU compiler options" in caplog.text
    assert float(compilation.jit(lambda x: x * 2)(np.float32(3))) == 6.0  # compiles without them
  finally:
    compilation._accepted.cache_clear()
