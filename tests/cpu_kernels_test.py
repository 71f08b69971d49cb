"""The CPU neuron kernel (`dtvit.cpu_kernels`): for every neuron setting the same spikes, bitwise, as the
pure-JAX fused recurrence and the scan, and the same gradients (input, leak, threshold, step mask) to float
rounding; lowered on CPU only; a failed build falls back to the pure-JAX recurrence with a clear message."""

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import compilation, cpu_kernels, neurons


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
    ("spikformer", "sigmoid", "hard", True, "difference", 0.0),
    ("spikformer", "pwl", "soft", False, "normalized", 0.5),
    ("spikformer", "atan", "hard", False, "difference", 0.0),
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
  spec = neurons.NeuronSpec.resolve(neuron, surrogate=surrogate, reset=reset, detach_reset=detach,
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
  spec = neurons.NeuronSpec.resolve("spikformer", surrogate="sigmoid", alpha=4.0, surrogate_input="difference")
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
    spikes = jax.jit(lambda x, m: neurons.lif_multistep(x, step_mask_T=m))
    assert (cpu_kernels.FORWARD in spikes.lower(x, m).compile().as_text()) == (
        T >= neurons.KERNEL_INFERENCE_MIN_STEPS)
  grad = jax.jit(jax.grad(lambda x, m: jnp.sum(neurons.lif_multistep(x, step_mask_T=m)), argnums=(0, 1)))
  assert cpu_kernels.BACKWARD in grad.lower(x, m).as_text()
  for platforms in (("cuda",), ("tpu",)):
    assert "dtvit_lif" not in grad.trace(x, m).lower(lowering_platforms=platforms).as_text()
    assert "dtvit_lif" not in spikes.trace(x, m).lower(lowering_platforms=platforms).as_text()


def test_bfloat16_currents_take_the_jax_recurrence(kernel):
  x = jnp.ones((4, 8, 16), jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(neurons.lif_multistep(x).astype(jnp.float32))))
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
    grad = jax.jit(jax.grad(lambda x: jnp.sum(neurons.lif_multistep(x))))
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
