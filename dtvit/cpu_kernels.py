"""The neuron recurrence as an XLA:CPU kernel (`csrc/lif_cpu.cc`), built on first use and called through the FFI.

XLA:CPU splits the unrolled recurrence of `dtvit.neurons` into several elementwise loops per step and recomputes
earlier steps inside later ones; the kernel runs each neuron's T steps in one pass, forward and backward, on
XLA's intra-op threads (experiments/benchmarks/README.md has the measurements). `dtvit.neurons.lif_multistep`
calls it on CPU for float32 currents, and keeps its pure-JAX recurrence on other platforms (`lax.platform_dependent`)
and wherever the kernel cannot be built.

Building: the first `available()` in a process compiles the source with the C++ compiler (`$CXX`, else `g++`)
against jaxlib's FFI headers into a cache folder (`$DTVIT_KERNEL_CACHE`, else `~/.cache/dtvit/kernels`), keyed
by the source, the flags, the compiler, jaxlib's version and the CPU's instruction sets (the build is for this
CPU, `-march=native`; a per-user temp folder where the cache folder is not writable); later processes load the
cached library. A failed build logs one warning and the
pure-JAX recurrence runs instead. `DTVIT_CPU_KERNELS=0` turns the kernel off for a process without building.

The kernel's forward is bitwise the pure-JAX forward (the same expressions, no FMA contraction); its gradients
sum the threshold, leak and mask terms in another order, so they agree to float rounding
(`tests/cpu_kernels_test.py`).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).parent / "csrc" / "lif_cpu.cc"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
FORWARD, BACKWARD = "dtvit_lif_forward", "dtvit_lif_backward"
SURROGATES = ("pwl", "sigmoid", "atan")  # the kernel's surrogate codes, in order


class BuildError(RuntimeError):
  pass


def cache_dir() -> Path:
  return Path(os.environ.get("DTVIT_KERNEL_CACHE") or Path.home() / ".cache" / "dtvit" / "kernels")


def _writable_dir(preferred: Path | None) -> Path:
  """`preferred` (or `cache_dir()`), created; where it cannot be (a read-only home), a per-user temp folder."""
  if preferred is not None:
    preferred.mkdir(parents=True, exist_ok=True)
    return preferred
  try:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if os.access(directory, os.W_OK):
      return directory
  except (OSError, RuntimeError):  # RuntimeError: no home directory
    pass
  directory = Path(tempfile.gettempdir()) / f"dtvit-kernels-{os.getuid()}"
  directory.mkdir(parents=True, exist_ok=True)
  return directory


def _compiler() -> str:
  return os.environ.get("CXX") or "g++"


def _cpu_identity() -> str:
  """What -march=native depends on: the instruction-set flags of the first CPU (Linux), else the machine."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.machine() + platform.processor()


def _build_key(compiler_version: str) -> str:
  import jaxlib
  h = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler_version.encode(),
               jaxlib.__version__.encode(), _cpu_identity().encode()):
    h.update(part)
    h.update(b"\0")
  return h.hexdigest()[:16]


def build(directory: Path | None = None) -> Path:
  """The compiled library's path, compiling it first unless it is cached. Raises BuildError with the
  compiler's message when it cannot be built."""
  compiler = _compiler()
  if shutil.which(compiler) is None:
    raise BuildError(f"no C++ compiler {compiler!r} on PATH (install g++ or set $CXX)")
  try:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise BuildError(f"{compiler} --version failed: {e}") from e
  include = Path(jax.ffi.include_dir())
  if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
    raise BuildError(f"jaxlib's FFI headers are missing under {include}")
  directory = _writable_dir(None if directory is None else Path(directory))
  directory = directory / _build_key(version.splitlines()[0] if version else "")
  library = directory / "liblif_cpu.so"
  if library.exists():
    return library
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / ".lock", "w") as lock:  # one build when several processes start at once
    fcntl.flock(lock, fcntl.LOCK_EX)
    if library.exists():
      return library
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".so", delete=False) as tmp:
      partial = Path(tmp.name)
    cmd = [compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(partial)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
      partial.unlink(missing_ok=True)
      raise BuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(partial, library)  # atomic: a reader never sees a half-written library
  return library


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered in this process (builds it on the first call)."""
  if os.environ.get("DTVIT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(lib.DtvitLifForward), platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD, jax.ffi.pycapsule(lib.DtvitLifBackward), platform="cpu")
  except (BuildError, OSError, AttributeError) as e:
    logging.warning("dtvit: the CPU neuron kernel is unavailable, using the pure-JAX recurrence (%s).", e)
    return False
  return True


def supports(spec, current_dtype, membrane_dtype) -> bool:
  """Whether the kernel computes this neuron: float32 currents and membranes (any neuron setting)."""
  return (jnp.dtype(current_dtype) == jnp.float32 and jnp.dtype(membrane_dtype) == jnp.float32
          and spec.surrogate in SURROGATES)


def _attributes(spec, *, masked: bool, static: bool) -> dict:
  return dict(tau=np.float32(spec.tau), alpha=np.float32(spec.alpha), init=np.float32(spec.init_membrane),
              spikformer=np.int32(spec.neuron == "spikformer"), soft=np.int32(spec.reset == "soft"),
              normalized=np.int32(spec.surrogate_input == "normalized"),
              surrogate=np.int32(SURROGATES.index(spec.surrogate)), detach=np.int32(spec.detach_reset),
              masked=np.int32(masked), is_static=np.int32(static), with_lam=np.int32(spec.neuron == "lif"))


def forward(current, lam, vth, mask_T, spec, *, num_steps: int, masked: bool, static: bool):
  """(spikes [T, ...], h [T, N]): the recurrence of `neurons._lif_forward` over [T, ...] or a static [...]."""
  x_shape = current.shape if static else current.shape[1:]
  flat = current.reshape(-1) if static else current.reshape(num_steps, -1)
  out = jax.ShapeDtypeStruct((num_steps, flat.shape[-1]), jnp.float32)
  spikes, h = jax.ffi.ffi_call(FORWARD, (out, out), vmap_method="sequential")(
      flat, lam.reshape(1), vth.reshape(1), mask_T, **_attributes(spec, masked=masked, static=static))
  return spikes.reshape((num_steps,) + x_shape), h


def backward(h, g_TX, lam, vth, mask_T, spec, *, masked: bool, static: bool):
  """(dL/dcurrent, dL/dlam, dL/dVth, dL/dmask) from h [T, N] and dL/dspikes [T, ...]: `neurons._lif_bwd`."""
  num_steps, n = h.shape
  scalar = jax.ShapeDtypeStruct((1,), jnp.float32)
  g_in = jax.ShapeDtypeStruct((n,) if static else (num_steps, n), jnp.float32)
  g_current, g_lam, g_vth, g_mask = jax.ffi.ffi_call(
      BACKWARD, (g_in, scalar, scalar, jax.ShapeDtypeStruct(mask_T.shape, jnp.float32)),
      vmap_method="sequential")(h, g_TX.reshape(num_steps, n), lam.reshape(1), vth.reshape(1), mask_T,
                                **_attributes(spec, masked=masked, static=static))
  x_shape = g_TX.shape[1:]
  return g_current.reshape(x_shape if static else (num_steps,) + x_shape), g_lam[0], g_vth[0], g_mask
