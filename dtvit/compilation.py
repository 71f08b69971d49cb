"""XLA compiler options for dtvit's jitted programs, and the `jit` that applies them.

On CPU, XLA (jaxlib 0.10 and 0.11) hands convolutions to its YNNPACK library by default, which ran the Spikformer
stem's convolutions on one core of a 2-core machine; XLA's Eigen convolutions use every core. `CPU_OPTIONS` keeps
YNNPACK for reductions only and gives convolutions and matmuls to Eigen: the benchmark model's train step took
0.82-0.86 of the time (convolutions), the paper-size model's 0.92 of that again (Eigen's matmuls are faster at
dim 384; the same at dim 128) (experiments/benchmarks/README.md, "Second round"). The option only chooses which
library computes an op, so values agree to float rounding (summation order).

Every jit in dtvit goes through `jit` below; a notebook that jits its own function over a dtvit model gets the
same programs with `jax.jit(fn, compiler_options=compilation.options())`. A jaxlib that does not know the
option compiles without it (`options()` returns None there, and on GPU and TPU).
"""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.lru_cache(maxsize=None)
def _accepted() -> bool:
  """Whether this jaxlib's CPU backend (the default backend when asked) compiles with `CPU_OPTIONS` (an option
  it does not know is an INVALID_ARGUMENT)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.float32(0)).compile()
  except Exception as e:  # jaxlib raises its own runtime error type
    logging.warning("dtvit: this jaxlib does not accept the CPU compiler options %s (%s); compiling without "
                    "them (convolutions may run on one core).", CPU_OPTIONS, str(e).splitlines()[0])
    return False
  return True


def options(platform: str | None = None) -> dict | None:
  """The compiler options dtvit uses on `platform` (default: JAX's default backend); None where it uses none."""
  platform = platform or jax.default_backend()
  if platform != "cpu" or not _accepted():
    return None
  return dict(CPU_OPTIONS)


def jit(fn, **kwargs):
  """`jax.jit(fn, **kwargs)` with `options()` as its compiler options."""
  return jax.jit(fn, compiler_options=options(), **kwargs)
