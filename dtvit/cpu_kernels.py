"""The neuron recurrence as an XLA:CPU kernel (`csrc/lif_cpu.cc`), built on first use and called through the FFI.

XLA:CPU splits the unrolled recurrence of `dtvit.lif_fused` into several elementwise loops per step and recomputes
earlier steps inside later ones; the kernel runs each neuron's T steps in one pass, forward and backward, on
XLA's intra-op threads (experiments/benchmarks/README.md has the measurements). `dtvit.lif_fused.lif_multistep`
calls it on CPU for float32 currents, and keeps its pure-JAX recurrence on other platforms (`lax.platform_dependent`)
and wherever the kernel cannot be built.

Building: the first `available()` in a process compiles the source with the C++ compiler (`$CXX`, else `g++`)
against jaxlib's FFI headers into a cache folder (`$DTVIT_KERNEL_CACHE`, else `~/.cache/dtvit/kernels`), keyed
by the source, the flags, the compiler, jaxlib's version and the CPU's instruction sets (the build is for this
CPU, `-march=native`); later processes load the cached library. A failed build logs one warning and the
pure-JAX recurrence runs instead. `DTVIT_CPU_KERNELS=0` turns the kernel off for a process without building.

A library loaded into the process runs as its user, so it is built and loaded only from folders that user alone
can write: each folder is created with mode 0700, and the cache folder, the key folder and the library file
must be the user's own (not a symbolic link, no group or other write bit), checked again just before loading.
Where the cache folder fails that (or cannot be created: a read-only home), a per-user temp folder
`<tmp>/dtvit-kernels-<uid>` under the same rule; where that fails too (another user created it first), a fresh
private folder from `tempfile.mkdtemp`, with one warning saying why.

The kernel's forward is bitwise the pure-JAX forward (the same expressions, no FMA contraction); its gradients
sum the threshold, leak and mask terms in another order, so they agree to float rounding
(`tests/cpu_kernels_test.py`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
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
# What the kernel implements (the settings list at the top of csrc/lif_cpu.cc), by `neuron_spec.NeuronSpec` field;
# a neuron with any other value or field takes the pure-JAX recurrence.
NEURONS = ("lif", "if", "spikingjelly_lif")
RESETS = ("soft", "hard")
SURROGATE_INPUTS = ("normalized", "difference")
SPEC_FIELDS = frozenset({"neuron", "surrogate", "alpha", "tau", "reset", "detach_reset", "init_membrane",
                         "surrogate_input"})


class BuildError(RuntimeError):
  pass


def cache_dir() -> Path:
  return Path(os.environ.get("DTVIT_KERNEL_CACHE") or Path.home() / ".cache" / "dtvit" / "kernels")


def _unsafe(path: Path, *, directory: bool = True) -> str | None:
  """Why `path` may not hold code this process loads, or None: it must be a real directory (or, for
  `directory=False`, a regular file), not a symbolic link, owned by this user, with no group or other write bit."""
  try:
    st = os.lstat(path)
  except OSError as e:
    return f"{path}: {e.strerror or e}"
  kind = "directory" if directory else "file"
  if stat.S_ISLNK(st.st_mode):
    return f"{path} is a symbolic link, not a {kind}"
  if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
    return f"{path} is not a {kind}"
  if st.st_uid != os.getuid():
    return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
  if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f"{path} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):o})"
  return None


def _private_dir(path: Path) -> tuple[str | None, bool]:
  """Creates `path` with mode 0700 (its missing parents as usual) unless it exists. (None, False) when it is
  then safe (`_unsafe`) and writable; else (why not, whether it was refused as unsafe rather than unusable)."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700)
  except FileExistsError:
    pass
  except OSError as e:
    return f"{path} cannot be created: {e.strerror or e}", False
  why = _unsafe(path)
  if why is not None:
    return why, True
  if not os.access(path, os.W_OK):
    return f"{path} is not writable", False
  return None, False


def _cache_root(preferred: Path | None) -> Path:
  """`preferred` (or `cache_dir()`) when it is a safe folder (`_private_dir`), else the per-user temp folder
  under the same rule, else a fresh `mkdtemp`. A folder refused as unsafe (not merely unusable, as under a
  read-only home) logs one warning. Raises BuildError when no folder can be made."""
  candidates, reasons, refused = [], [], False
  try:
    candidates.append(cache_dir() if preferred is None else Path(preferred))
  except RuntimeError as e:  # no home directory
    reasons.append(str(e))
  candidates.append(Path(tempfile.gettempdir()) / f"dtvit-kernels-{os.getuid()}")
  chosen = None
  for candidate in candidates:
    why, unsafe = _private_dir(candidate)
    if why is None:
      chosen = candidate
      break
    reasons.append(why)
    refused |= unsafe
  if chosen is None:
    try:
      chosen = Path(tempfile.mkdtemp(prefix="dtvit-kernels-"))
    except OSError as e:
      raise BuildError(f"no safe folder to build in ({'; '.join(reasons)}; mkdtemp: {e})") from e
  if refused:
    logging.warning("dtvit: not using a CPU kernel folder that others could write (%s); building in %s.",
                    "; ".join(reasons), chosen)
  return chosen


def check_library(library: Path) -> None:
  """Raises BuildError unless `library`, its key folder and the cache folder above are this user's own
  (`_unsafe`): the check made just before the library is loaded."""
  library = Path(library)
  why = _unsafe(library.parent.parent) or _unsafe(library.parent) or _unsafe(library, directory=False)
  if why is not None:
    raise BuildError(f"refusing to load {library}: {why}")


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
  directory = _cache_root(None if directory is None else Path(directory))
  key = directory / _build_key(version.splitlines()[0] if version else "")
  why, _ = _private_dir(key)
  if why is not None:  # the cache folder is ours, so only this user (or root) made the key folder so
    logging.warning("dtvit: not using the CPU kernel folder %s (%s); building in a fresh folder.", key, why)
    key = Path(tempfile.mkdtemp(prefix="dtvit-kernels-")) / key.name
    key.mkdir(mode=0o700)
  library = key / "liblif_cpu.so"
  if os.path.lexists(library):
    check_library(library)
    return library
  import fcntl  # POSIX only: `dtvit.models` imports this module anywhere
  with open(key / ".lock", "w") as lock:  # one build when several processes start at once
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.lexists(library):
      check_library(library)
      return library
    with tempfile.NamedTemporaryFile(dir=key, suffix=".so", delete=False) as tmp:
      partial = Path(tmp.name)
    cmd = [compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(partial)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
      partial.unlink(missing_ok=True)
      raise BuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.chmod(partial, 0o700)
    os.replace(partial, library)  # atomic: a reader never sees a half-written library
  return library


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered in this process (builds it on the first call)."""
  if os.environ.get("DTVIT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  try:
    library = build()
    check_library(library)  # again, just before loading: nothing may have replaced it since
    lib = ctypes.cdll.LoadLibrary(str(library))
    jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(lib.DtvitLifForward), platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD, jax.ffi.pycapsule(lib.DtvitLifBackward), platform="cpu")
  except (BuildError, OSError, AttributeError) as e:
    logging.warning("dtvit: the CPU neuron kernel is unavailable, using the pure-JAX recurrence (%s).", e)
    return False
  return True


def supports(spec, current_dtype, membrane_dtype) -> bool:
  """Whether the kernel computes this neuron: float32 currents and membranes, and a `neuron_spec.NeuronSpec` whose
  every setting the kernel implements (NEURONS, SURROGATES, RESETS, SURROGATE_INPUTS; a positive tau)."""
  try:
    fields = {f.name for f in dataclasses.fields(spec)}
  except TypeError:  # not a dataclass
    return False
  return (jnp.dtype(current_dtype) == jnp.float32 and jnp.dtype(membrane_dtype) == jnp.float32
          and fields == SPEC_FIELDS and spec.neuron in NEURONS and spec.surrogate in SURROGATES
          and spec.reset in RESETS and spec.surrogate_input in SURROGATE_INPUTS
          and isinstance(spec.detach_reset, (bool, np.bool_)) and float(spec.tau) > 0)


def _attributes(spec, *, masked: bool, static: bool) -> dict:
  return dict(tau=np.float32(spec.tau), alpha=np.float32(spec.alpha), init=np.float32(spec.init_membrane),
              spikformer=np.int32(spec.neuron == "spikingjelly_lif"), soft=np.int32(spec.reset == "soft"),
              normalized=np.int32(spec.surrogate_input == "normalized"),
              surrogate=np.int32(SURROGATES.index(spec.surrogate)), detach=np.int32(spec.detach_reset),
              masked=np.int32(masked), is_static=np.int32(static), with_lam=np.int32(spec.neuron == "lif"))


def forward(current, lam, vth, mask_T, spec, *, num_steps: int, masked: bool, static: bool):
  """(spikes [T, ...], h [T, N]): the recurrence of `lif_fused._lif_forward` over [T, ...] or a static [...]."""
  x_shape = current.shape if static else current.shape[1:]
  flat = current.reshape(-1) if static else current.reshape(num_steps, -1)
  out = jax.ShapeDtypeStruct((num_steps, flat.shape[-1]), jnp.float32)
  spikes, h = jax.ffi.ffi_call(FORWARD, (out, out), vmap_method="sequential")(
      flat, lam.reshape(1), vth.reshape(1), mask_T, **_attributes(spec, masked=masked, static=static))
  return spikes.reshape((num_steps,) + x_shape), h


def backward(h, g_TX, lam, vth, mask_T, spec, *, masked: bool, static: bool):
  """(dL/dcurrent, dL/dlam, dL/dVth, dL/dmask) from h [T, N] and dL/dspikes [T, ...]: `lif_fused._lif_bwd`."""
  num_steps, n = h.shape
  scalar = jax.ShapeDtypeStruct((1,), jnp.float32)
  g_in = jax.ShapeDtypeStruct((n,) if static else (num_steps, n), jnp.float32)
  g_current, g_lam, g_vth, g_mask = jax.ffi.ffi_call(
      BACKWARD, (g_in, scalar, scalar, jax.ShapeDtypeStruct(mask_T.shape, jnp.float32)),
      vmap_method="sequential")(h, g_TX.reshape(num_steps, n), lam.reshape(1), vth.reshape(1), mask_T,
                                **_attributes(spec, masked=masked, static=static))
  x_shape = g_TX.shape[1:]
  return g_current.reshape(x_shape if static else (num_steps,) + x_shape), g_lam[0], g_vth[0], g_mask
