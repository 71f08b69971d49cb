"""The CPU neuron kernel (`dtvit.cpu_kernels`): for every neuron setting the same spikes, bitwise, as the
pure-JAX fused recurrence and the scan, and the same gradients (input, leak, threshold, step mask) to float
rounding; lowered on CPU only; a failed build falls back to the pure-JAX recurrence with a clear message."""

import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import compilation, cpu_kernels, lif_fused, neuron_spec, neurons


def _close(a, b, rtol):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(float(np.max(np.abs(b))), 1e-6))


@pytest.fixture(scope="module")
def kernel():
  if shutil.which(os.environ.get("CXX") or "g++") is None:
    pytest.skip("no C++ compiler here: the kernel cannot be built (the fallback is tested below)")
  # With a compiler and jaxlib's headers the build must succeed: a broken kernel fails here, not silently.
  assert cpu_kernels.available(), "the CPU neuron kernel did not build (see the warning logged above)"


# (neuron, surrogate, reset, detach, surrogate input, init membrane): every setting appears with each of
# the others at least once.
CASES = [
    ("lif", "pwl", "soft", False, "normalized", 0.0),
    ("lif", "sigmoid", "hard", True, "difference", 0.5),
    ("lif", "atan", "soft", True, "normalized", 0.5),
    ("if", "pwl", "hard", False, "difference", 0.5),
    ("if", "atan", "soft", False, "normalized", 0.0),
    ("if", "sigmoid", "soft", True, "normalized", 0.0),
    ("spikingjelly_lif", "sigmoid", "hard", True, "difference", 0.0),
    ("spikingjelly_lif", "pwl", "soft", False, "normalized", 0.5),
    ("spikingjelly_lif", "atan", "hard", False, "difference", 0.0),
]
MASKS = {"none": None, "binary": [1.0, 0.0, 1.0, 1.0, 0.0], "soft": [1.0, 0.3, 0.0, 0.8, 1.0]}


def _grads(spec, inp, w, mask, static, *, path):
  """Loss, spikes and gradients (input, leak, threshold[, mask]) on one path: 'kernel', 'xla' or 'scan'."""

  def run(inp, leak, threshold, m):
    kw = dict(leak=leak, threshold=threshold, num_steps=w.shape[0] if static else None, step_mask_T=m)
    s = neurons.multistep(inp, spec, fused=path != "scan", cpu_kernel=path == "kernel", **kw)
    return jnp.sum(s * w), s

  argnums = (0, 1, 2) + (() if mask is None else (3,))
  fn = compilation.jit(jax.value_and_grad(run, argnums=argnums, has_aux=True))
  (_, spikes), grads = fn(inp, 0.8, 0.9, mask)
  return spikes, grads, fn.lower(inp, 0.8, 0.9, mask).compile().as_text()


@pytest.mark.parametrize("neuron,surrogate,reset,detach,surrogate_input,init", CASES)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("static", [False, True])
def test_kernel_matches_the_fused_recurrence_and_the_scan(kernel, neuron, surrogate, reset, detach,
                                                          surrogate_input, init, mask, static):
  spec = neuron_spec.NeuronSpec.resolve(neuron, surrogate=surrogate, reset=reset, detach_reset=detach,
                                    surrogate_input=surrogate_input, init_membrane=init)
  x = 1.5 * jax.random.normal(jax.random.key(1), (5, 3, 37)) + 0.3  # 111 neurons: not a whole block
  inp = x[0] if static else x
  w = jax.random.normal(jax.random.key(2), (5, 3, 37))
  m = None if MASKS[mask] is None else jnp.asarray(MASKS[mask], jnp.float32)
  s_k, g_k, hlo = _grads(spec, inp, w, m, static, path="kernel")
  assert cpu_kernels.FORWARD in hlo and cpu_kernels.BACKWARD in hlo  # the kernel did run
  infer = compilation.jit(lambda i, m: neurons.multistep(i, spec, leak=0.8, threshold=0.9, step_mask_T=m,
                                                         num_steps=5 if static else None))
  chex.assert_trees_all_equal(infer(inp, m), s_k)  # inference (T = 5: the kernel's forward alone)
  for path in ("xla", "scan"):
    s_r, g_r, hlo_r = _grads(spec, inp, w, m, static, path=path)
    assert cpu_kernels.FORWARD not in hlo_r
    chex.assert_trees_all_equal(s_k, s_r)
    _close(g_k[0], g_r[0], 2e-5)
    for a, b in zip(g_k[1:], g_r[1:]):  # sums over every neuron and step, in another order
      _close(a, b, 1e-4)
  assert 0 < float(jnp.mean(s_k)) < 1
  if m is not None:
    assert float(jnp.max(jnp.abs(g_k[3]))) > 0


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 4, 8, 16])
def test_kernel_over_many_neurons_and_steps(kernel, T):
  """Large layers (several threads' chunks, a partial last block) and T beyond the unrolling limit: the
  kernel equals the pure-JAX recurrence (unrolled up to 8 steps, a chunk loop beyond)."""
  spec = neuron_spec.NeuronSpec.resolve("spikingjelly_lif", surrogate="sigmoid", alpha=4.0,
                                        surrogate_input="difference")
  x = 1.5 * jax.random.normal(jax.random.key(3), (T, 4, 50001)) + 0.5
  w = jax.random.normal(jax.random.key(4), x.shape)
  m = jnp.asarray(([1.0, 0.0] * T)[:T], jnp.float32)
  s_k, g_k, _ = _grads(spec, x, w, m, False, path="kernel")
  s_r, g_r, _ = _grads(spec, x, w, m, False, path="xla")
  chex.assert_trees_all_equal(s_k, s_r)
  _close(g_k[0], g_r[0], 2e-5)
  for a, b in zip(g_k[1:], g_r[1:]):
    _close(a, b, 1e-4)


def test_inference_and_other_platforms(kernel):
  """Without a gradient the forward is XLA's own up to 4 steps (faster there) and the kernel's beyond
  (experiments/benchmarks/README.md); lowered for GPU or TPU the program has no trace of the CPU kernel
  (`lax.platform_dependent`)."""
  for T in (4, 5, 8):
    x, m = jnp.ones((T, 8, 16)), jnp.ones((T,))
    spikes = jax.jit(lambda x, m: lif_fused.lif_multistep(x, step_mask_T=m))
    assert (cpu_kernels.FORWARD in spikes.lower(x, m).compile().as_text()) == (
        T >= lif_fused.KERNEL_INFERENCE_MIN_STEPS)
  grad = jax.jit(jax.grad(lambda x, m: jnp.sum(lif_fused.lif_multistep(x, step_mask_T=m)), argnums=(0, 1)))
  assert cpu_kernels.BACKWARD in grad.lower(x, m).as_text()
  for platforms in (("cuda",), ("tpu",)):
    assert "dtvit_lif" not in grad.trace(x, m).lower(lowering_platforms=platforms).as_text()
    assert "dtvit_lif" not in spikes.trace(x, m).lower(lowering_platforms=platforms).as_text()


def test_bfloat16_currents_take_the_jax_recurrence(kernel):
  x = jnp.ones((4, 8, 16), jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(lif_fused.lif_multistep(x).astype(jnp.float32))))
  assert "dtvit_lif" not in grad.lower(x).as_text()


def test_a_failed_build_names_the_compiler_and_falls_back(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
  with pytest.raises(cpu_kernels.BuildError, match="no-such-g\\+\\+"):
    cpu_kernels.build(tmp_path / "cache")
  cpu_kernels.available.cache_clear()
  monkeypatch.setenv("DTVIT_KERNEL_CACHE", str(tmp_path / "cache"))
  try:
    assert not cpu_kernels.available()
    assert "unavailable, using the pure-JAX recurrence" in caplog.text and "no-such-g++" in caplog.text
    grad = jax.jit(jax.grad(lambda x: jnp.sum(lif_fused.lif_multistep(x))))
    assert "dtvit_lif" not in grad.lower(jnp.ones((4, 3))).as_text()
  finally:
    cpu_kernels.available.cache_clear()


def test_the_switch_turns_it_off_without_building(monkeypatch, tmp_path):
  monkeypatch.setenv("DTVIT_CPU_KERNELS", "0")
  monkeypatch.setenv("DTVIT_KERNEL_CACHE", str(tmp_path))
  cpu_kernels.available.cache_clear()
  try:
    assert not cpu_kernels.available()
    assert not any(tmp_path.iterdir())
  finally:
    cpu_kernels.available.cache_clear()


@pytest.mark.slow
def test_build_is_cached_per_source_and_machine(kernel, tmp_path):
  first = cpu_kernels.build(tmp_path)
  stamp = first.stat().st_mtime_ns
  assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # loaded, not rebuilt
  assert [p.name for p in first.parent.iterdir() if p.suffix == ".so"] == ["liblif_cpu.so"]  # no partial file


@pytest.mark.slow
def test_an_unusable_cache_folder_builds_in_a_temp_folder(kernel, tmp_path, monkeypatch):
  """A cache path that cannot be a folder (here under a file: no user may create it) falls back to a per-user
  temp folder, and the build works there."""
  (tmp_path / "a-file").write_text("")
  monkeypatch.setenv("DTVIT_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))
  monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  library = cpu_kernels.build()
  assert library.exists() and library.is_relative_to(tmp_path / "tmp")


# ------------------------------------------------------------------------------------------------------------
# Only this user's folders: a library another user could plant is never loaded.

OTHER_UID = 12345  # a user that is not this one (the tests run as root here, so chown can give folders away)


def _give_away(path):
  if os.getuid() != 0:
    pytest.skip("making a folder another user's needs root")
  os.chown(path, OTHER_UID, OTHER_UID)


def _unsafe_folder(tmp_path, how):
  """A folder that holds a planted key folder, made unsafe `how`: another user's, group-writable, a symlink."""
  real = tmp_path / "real"
  real.mkdir(mode=0o700)
  if how == "symlink":
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    return tmp_path / "link"
  if how == "group-writable":
    real.chmod(0o770)
  elif how == "other-owner":
    real.chmod(0o777)
    _give_away(real)
  return real


@pytest.mark.parametrize("how", ["other-owner", "group-writable", "symlink"])
def test_a_folder_others_could_write_is_refused(tmp_path, monkeypatch, caplog, how):
  cache = _unsafe_folder(tmp_path, how)
  assert cpu_kernels._unsafe(cache) is not None
  monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  chosen = cpu_kernels._cache_root(cache)
  assert chosen == tmp_path / "tmp" / f"dtvit-kernels-{os.getuid()}"  # the per-user temp folder instead
  st = os.lstat(chosen)
  assert st.st_uid == os.getuid() and (st.st_mode & 0o777) == 0o700
  assert cpu_kernels._unsafe(chosen) is None
  assert caplog.text.count("not using a CPU kernel folder that others could write") == 1
  assert str(cache) in caplog.text


def test_a_temp_folder_another_user_made_first_gives_a_fresh_private_folder(tmp_path, monkeypatch, caplog):
  (tmp_path / "a-file").write_text("")  # the cache folder cannot be created (as under a read-only home)
  monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  planted = tmp_path / "tmp" / f"dtvit-kernels-{os.getuid()}"
  planted.mkdir(parents=True, mode=0o777)
  planted.chmod(0o777)
  _give_away(planted)
  chosen = cpu_kernels._cache_root(tmp_path / "a-file" / "kernels")
  assert chosen.parent == tmp_path / "tmp" and chosen != planted and chosen.name.startswith("dtvit-kernels-")
  assert cpu_kernels._unsafe(chosen) is None and (os.lstat(chosen).st_mode & 0o777) == 0o700
  assert caplog.text.count("not using a CPU kernel folder") == 1


@pytest.mark.parametrize("how", ["other-owner", "group-writable", "symlink", "library"])
def test_a_library_outside_this_users_folders_is_never_loaded(tmp_path, how):
  """The check just before loading: the cache folder another user's, the key folder group-writable or swapped
  for a symlink, or the library itself another user's."""
  cache, key = tmp_path / "cache", tmp_path / "cache" / "0123456789abcdef"
  key.mkdir(parents=True, mode=0o700)
  cache.chmod(0o700)
  library = key / "liblif_cpu.so"
  library.write_bytes(b"\x7fELF")
  library.chmod(0o700)
  cpu_kernels.check_library(library)  # all this user's own: accepted
  if how == "other-owner":
    cache.chmod(0o777)
    _give_away(cache)
  elif how == "group-writable":
    key.chmod(0o770)
  elif how == "symlink":
    key.rename(tmp_path / "elsewhere")
    key.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
  else:
    library.chmod(0o777)
    _give_away(library)
  with pytest.raises(cpu_kernels.BuildError, match="refusing to load"):
    cpu_kernels.check_library(library)


PLANTED_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
  FILE* f = fopen(getenv("MARKER"), "w");
  if (f) { fprintf(f, "constructor ran: uid=%d\n", (int)getuid()); fclose(f); }
}
"""


@pytest.mark.slow
def test_a_planted_library_in_a_shared_cache_folder_never_runs(kernel, tmp_path):
  """The attack this guards against: another user pre-creates the cache folder (mode 0777) with a library at the key
  this user would compute; a training process must neither load it nor run its constructor. The process loads
  the kernel from its own per-user temp folder instead (seeded here with the real build, to skip a compile)."""
  if shutil.which("gcc") is None:
    pytest.skip("no C compiler to build the planted library")
  real = cpu_kernels.build()
  shared = tmp_path / "shared"
  (shared / real.parent.name).mkdir(parents=True)
  planted = shared / real.parent.name / "liblif_cpu.so"
  source = tmp_path / "planted.c"
  source.write_text(PLANTED_SOURCE)
  subprocess.run(["gcc", "-shared", "-fPIC", str(source), "-o", str(planted)], check=True)
  for p in (shared, shared / real.parent.name, planted):
    p.chmod(0o777)
    _give_away(p)
  own = tmp_path / "tmp" / f"dtvit-kernels-{os.getuid()}" / real.parent.name
  own.mkdir(parents=True, mode=0o700)
  own.parent.chmod(0o700)
  shutil.copy2(real, own / "liblif_cpu.so")
  marker = tmp_path / "marker"
  script = ("import jax, jax.numpy as jnp\nfrom dtvit import cpu_kernels, lif_fused\n"
            "assert cpu_kernels.available()\nprint('library:', cpu_kernels.build())\n"
            "g = jax.jit(jax.grad(lambda x: jnp.sum(lif_fused.lif_multistep(x))))\n"
            "assert 'dtvit_lif' in g.lower(jnp.ones((4, 3))).as_text()\n")
  env = dict(os.environ, DTVIT_KERNEL_CACHE=str(shared), TMPDIR=str(tmp_path / "tmp"), MARKER=str(marker))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert not marker.exists(), marker.read_text()  # the planted constructor never ran
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"library: {own / 'liblif_cpu.so'}" in proc.stdout
  assert "not using a CPU kernel folder that others could write" in proc.stderr


def test_an_unknown_neuron_takes_the_jax_recurrence(kernel):
  """A setting the kernel does not implement (a new neuron kind, reset or surrogate input; a spec with a field
  the kernel does not know) must not run there with the wrong dynamics."""
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class WithRefractory(neuron_spec.NeuronSpec):
    refractory: int = 2

  known = neuron_spec.NeuronSpec.resolve("lif")
  assert cpu_kernels.supports(known, jnp.float32, jnp.float32)
  for spec in (dataclasses.replace(known, neuron="adex"), dataclasses.replace(known, reset="zero"),
               dataclasses.replace(known, surrogate_input="scaled"), WithRefractory()):
    assert not cpu_kernels.supports(spec, jnp.float32, jnp.float32), spec
  grad = jax.jit(jax.grad(lambda x: jnp.sum(lif_fused.lif_multistep(x, dataclasses.replace(known, neuron="adex")))))
  assert "dtvit_lif" not in grad.lower(jnp.ones((4, 3))).as_text()


@pytest.mark.slow
def test_the_models_import_where_fcntl_does_not_exist():
  script = "import sys\nsys.modules['fcntl'] = None\nimport dtvit.models, dtvit.cpu_kernels\nprint('imported')\n"
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-2000:]
