"""Neuron dynamics: scan equals a plain loop, the fused recurrence equals the scan (values and gradients),
surrogate gradients, conversion behaviour, errors. The fused recurrence here is the pure-JAX one
(`cpu_kernel=False`); tests/cpu_kernels_test.py checks the CPU kernel against it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import chex
import pytest

from dtvit import lif_fused, neuron_spec, neurons


def _multistep(current, *, leak=1.0, threshold=1.0, num_steps=None, step_mask_T=None, fused=True,
               return_membrane=False, **spec):
  """`neurons.multistep` with the spec's settings as keywords."""
  return neurons.multistep(current, neuron_spec.NeuronSpec.resolve(**spec), leak=leak, threshold=threshold,
                           num_steps=num_steps, step_mask_T=step_mask_T, fused=fused,
                           return_membrane=return_membrane, cpu_kernel=False)


def _close(a, b, rtol=2e-5, floor=1e-6):
  """Equal up to float32 summation order: within rtol of the tensor's scale (at least `floor`)."""
  a, b = np.asarray(a), np.asarray(b)
  scale = max(float(np.max(np.abs(a))), floor)
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)

NEURON_CASES = [
    dict(neuron="lif", leak=0.8, threshold=1.0),
    dict(neuron="lif", leak=1.3, threshold=0.7),  # leak clamps to 1
    dict(neuron="if", threshold=0.5),
    dict(neuron="spikingjelly_lif", threshold=1.0, tau=2.0),
    dict(neuron="spikingjelly_lif", threshold=0.5, tau=2.0, reset="soft"),
]


def loop_reference(current_TX, neuron, leak=1.0, threshold=1.0, tau=2.0, reset=None):
  """Plain NumPy loop over steps, written independently of dtvit.neurons."""
  reset = reset or ("hard" if neuron == "spikingjelly_lif" else "soft")
  lam = min(max(leak, 0.0), 1.0) if neuron == "lif" else 1.0
  u = np.zeros(current_TX.shape[1:], np.float64)
  spikes, membranes = [], []
  for i in np.asarray(current_TX, np.float64):
    h = u + (i - u) / tau if neuron == "spikingjelly_lif" else lam * u + i
    s = (h >= threshold).astype(np.float64)
    u = h - threshold * s if reset == "soft" else h * (1 - s)
    spikes.append(s)
    membranes.append(h)
  return np.stack(spikes), np.stack(membranes)


@pytest.mark.parametrize("case", NEURON_CASES, ids=lambda c: f"{c['neuron']}-{c.get('reset', 'default')}")
def test_scan_equals_python_loop(case):
  current = jax.random.uniform(jax.random.key(0), (12, 5, 7), minval=-0.5, maxval=1.5)
  spikes, membranes = _multistep(current, return_membrane=True, **case)
  ref_s, ref_h = loop_reference(np.asarray(current), **case)
  np.testing.assert_array_equal(np.asarray(spikes), ref_s)
  np.testing.assert_allclose(np.asarray(membranes), ref_h, rtol=1e-5, atol=1e-5)
  assert 0 < ref_s.mean() < 1  # the case exercises both firing and silence


@pytest.mark.parametrize("case", NEURON_CASES[:3], ids=lambda c: c["neuron"])
def test_static_input_equals_repeated_input(case):
  current = jax.random.uniform(jax.random.key(1), (4, 6), minval=0.0, maxval=1.2)
  static = _multistep(current, num_steps=9, **case)
  repeated = _multistep(jnp.broadcast_to(current, (9, 4, 6)), **case)
  np.testing.assert_array_equal(np.asarray(static), np.asarray(repeated))


def _primitive(x, surrogate, alpha):
  """A smooth function whose derivative is the surrogate (used for finite differences)."""
  if surrogate == "sigmoid":
    return jax.nn.sigmoid(alpha * x)
  if surrogate == "atan":
    return jnp.arctan(math.pi / 2 * alpha * x) / math.pi
  # pwl: alpha * integral of max(0, 1 - |x|)
  c = jnp.clip(x, -1.0, 1.0)
  return alpha * (c - jnp.sign(c) * c ** 2 / 2)


@pytest.mark.parametrize("surrogate,alpha", [("pwl", 0.3), ("sigmoid", 4.0), ("atan", 2.0), ("pwl", 1.0)])
def test_spike_gradient_is_the_surrogate(surrogate, alpha):
  x = jnp.linspace(-1.7, 1.7, 41, dtype=jnp.float32) + 0.013
  grad = jax.vmap(jax.grad(lambda v: neuron_spec.spike(v, surrogate, alpha)))(x)
  eps = 1e-3
  x64 = np.asarray(x, np.float64)
  fd = (np.asarray(_primitive(jnp.asarray(x64 + eps), surrogate, alpha), np.float64)
        - np.asarray(_primitive(jnp.asarray(x64 - eps), surrogate, alpha), np.float64)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(grad), fd, rtol=2e-2, atol=2e-3)
  # Forward is the exact Heaviside step.
  np.testing.assert_array_equal(np.asarray(neuron_spec.spike(x, surrogate, alpha)), (np.asarray(x) >= 0) * 1.0)
  # Known values at threshold.
  g0 = float(jax.grad(lambda v: neuron_spec.spike(v, surrogate, alpha))(0.0))
  assert g0 == pytest.approx({"pwl": alpha, "sigmoid": alpha / 4, "atan": alpha / 2}[surrogate], rel=1e-5)


def test_gradients_reach_leak_and_threshold():
  current = jax.random.uniform(jax.random.key(2), (6, 32), minval=0.0, maxval=1.5)

  def loss(leak, threshold):
    return jnp.sum(_multistep(current, neuron="lif", leak=leak, threshold=threshold))

  g_leak, g_th = jax.grad(loss, argnums=(0, 1))(0.9, 1.0)
  assert np.isfinite(g_leak) and np.isfinite(g_th)
  assert g_leak > 0  # less leak -> more spikes
  assert g_th < 0  # higher threshold -> fewer spikes


def test_detached_hard_reset_blocks_reset_gradient():
  current = jnp.array([[1.2], [0.7], [0.9]])
  grad = lambda detach: jax.grad(lambda c: jnp.sum(_multistep(
      c, neuron="spikingjelly_lif", surrogate="sigmoid", detach_reset=detach)))(current)
  assert not np.allclose(grad(True), grad(False))


def test_if_rate_approaches_clipped_relu():
  current = jnp.linspace(-0.5, 1.5, 21)
  errors = []
  for T in (4, 16, 64, 256):
    rate = jnp.mean(_multistep(current, num_steps=T, neuron="if", threshold=0.8), axis=0)
    errors.append(float(jnp.max(jnp.abs(rate - jnp.clip(current / 0.8, 0, 1)))))
  assert errors == sorted(errors, reverse=True) and errors[-1] < 1.0 / 256 + 1e-6


@pytest.mark.parametrize("kwargs,match", [
    (dict(neuron="izhikevich"), "Unknown neuron 'izhikevich'"),
    (dict(surrogate="tanh"), "Unknown surrogate 'tanh'"),
    (dict(reset="partial"), "Unknown reset 'partial'"),
    (dict(num_steps=0), "num_steps must be >= 1"),
    (dict(tau=0.0), "tau must be > 0"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _multistep(jnp.ones((3, 2)), **kwargs)


@pytest.mark.parametrize("neuron", ["lif", "if", "spikingjelly_lif"])
def test_a_skip_masked_step_does_not_exist_for_the_neuron(neuron):
  """With mask [1, 0, 0, 1, 1] the neuron's spikes at the active steps equal those of a run over the active
  steps' inputs alone (membrane held: no leak, no charge at masked steps), and it emits nothing at masked steps;
  the inputs at masked steps change nothing."""
  x = 1.2 * jax.random.normal(jax.random.key(2), (5, 3, 16)) + 0.4
  m = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0])
  kw = dict(neuron=neuron, leak=0.7, threshold=0.8, init_membrane=0.5)
  masked = _multistep(x, step_mask_T=m, **kw)
  alone = _multistep(x[jnp.array([0, 3, 4])], **kw)
  np.testing.assert_array_equal(masked[jnp.array([0, 3, 4])], alone)
  np.testing.assert_array_equal(masked[1:3], 0.0)
  noisy = x.at[1:3].add(5.0 * jax.random.normal(jax.random.key(3), (2, 3, 16)))
  np.testing.assert_array_equal(_multistep(noisy, step_mask_T=m, **kw), masked)
  assert float(jnp.sum(alone)) > 0
  with pytest.raises(ValueError, match="one value per time step"):
    _multistep(x, step_mask_T=jnp.ones(4), **kw)


# Each neuron, surrogate, reset and detach setting at least once (the full product passes too; it is slow).
_NEURON_CASES = [
    ("lif", "pwl", "soft", False, False, 0.0), ("lif", "sigmoid", "hard", True, True, 0.5),
    ("lif", "atan", "soft", True, False, 0.5), ("if", "pwl", "hard", False, True, 0.0),
    ("if", "atan", "soft", False, False, 0.5), ("spikingjelly_lif", "sigmoid", "hard", True, False, 0.0),
    ("spikingjelly_lif", "sigmoid", "hard", True, True, 0.5), ("spikingjelly_lif", "pwl", "soft", False, False, 0.5),
    ("spikingjelly_lif", "atan", "hard", False, False, 0.0),
]


@pytest.mark.slow
@pytest.mark.parametrize("neuron,surrogate,reset,detach,static,init", _NEURON_CASES)
def test_lif_multistep_matches_scan(neuron, surrogate, reset, detach, static, init):
  x = 1.5 * jax.random.normal(jax.random.key(4), (5, 3, 40)) + 0.3
  inp = x[0] if static else x
  w = jax.random.normal(jax.random.key(5), (5, 3, 40))

  def run(inp, leak, threshold, fast):
    s = _multistep(inp, num_steps=5 if static else None, neuron=neuron, surrogate=surrogate, reset=reset,
                   detach_reset=detach, leak=leak, threshold=threshold, init_membrane=init, fused=fast)
    return jnp.sum(s * w), s

  grad = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (_, s_ref), g_ref = grad(inp, 0.8, 0.9, False)
  (_, s_fast), g_fast = grad(inp, 0.8, 0.9, True)
  chex.assert_trees_all_equal(s_fast, s_ref)
  _close(g_fast[0], g_ref[0])
  # The leak and threshold gradients are sums over all neurons and steps: float32 sums in another order.
  _close(g_fast[1], g_ref[1], rtol=1e-4)
  _close(g_fast[2], g_ref[2], rtol=1e-4)


def test_lif_multistep_validates_like_reference():
  with pytest.raises(ValueError, match="num_steps"):
    lif_fused.lif_multistep(jnp.zeros((3,)), num_steps=0)
  with pytest.raises(ValueError, match="one value per time step"):
    lif_fused.lif_multistep(jnp.zeros((3, 2)), step_mask_T=jnp.ones(2))


def test_fused_is_the_default_and_switchable():
  x = jnp.zeros((4, 2, 3))
  assert "custom_vjp" in str(jax.make_jaxpr(lambda x: neurons.multistep(x))(x))
  assert "custom_vjp" not in str(jax.make_jaxpr(lambda x: neurons.multistep(x, fused=False))(x))
  # return_membrane keeps the scan (the fused op returns spikes only).
  assert "custom_vjp" not in str(jax.make_jaxpr(lambda x: neurons.multistep(x, return_membrane=True))(x))


@pytest.mark.slow
@pytest.mark.parametrize("neuron,surrogate,reset,detach,static,init", _NEURON_CASES[::2])
@pytest.mark.parametrize("surrogate_input", ["normalized", "difference"])
@pytest.mark.parametrize("mask", [[0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.3, 0.8, 1.0]])
def test_lif_multistep_with_a_skip_mask_matches_scan(neuron, surrogate, reset, detach, static, init,
                                                      surrogate_input, mask):
  """The 'skip' mask inside the recurrence (binary and soft), and the 'difference' surrogate input: the same
  spikes and the same gradients (the mask's included) on the fast path as on the scan."""
  x = 1.5 * jax.random.normal(jax.random.key(4), (5, 3, 40)) + 0.3
  inp = x[0] if static else x
  w = jax.random.normal(jax.random.key(5), (5, 3, 40))

  def run(inp, leak, threshold, m, fast):
    s = _multistep(inp, num_steps=5 if static else None, neuron=neuron, surrogate=surrogate, reset=reset,
                   detach_reset=detach, leak=leak, threshold=threshold, init_membrane=init,
                   surrogate_input=surrogate_input, step_mask_T=m, fused=fast)
    return jnp.sum(s * w), s

  grad = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
  m = jnp.asarray(mask, jnp.float32)
  (_, s_ref), g_ref = grad(inp, 0.8, 0.9, m, False)
  (_, s_fast), g_fast = grad(inp, 0.8, 0.9, m, True)
  chex.assert_trees_all_equal(s_fast, s_ref)
  _close(g_fast[0], g_ref[0])
  for a, b in zip(g_fast[1:], g_ref[1:]):
    _close(a, b, rtol=1e-4)
  assert float(jnp.max(jnp.abs(g_ref[3]))) > 0  # the mask does get a gradient


@pytest.mark.parametrize("chunk", [0, 1, 2, 3])
@pytest.mark.parametrize("neuron,surrogate,reset,detach,static,init", _NEURON_CASES[1:6])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_chunk_loop_matches_scan(chunk, neuron, surrogate, reset, detach, static, init, masked):
  """The fused recurrence unrolled (chunk 0) or as a loop over chunks of 1, 2 or 3 unrolled steps (T = 6):
  the same spikes as the scan, and the same gradients (input, leak, threshold and a soft 'skip' mask's)."""
  spec = neuron_spec.NeuronSpec.resolve(neuron, surrogate=surrogate, reset=reset, detach_reset=detach,
                                    init_membrane=init)
  x = 1.5 * jax.random.normal(jax.random.key(6), (6, 3, 20)) + 0.3
  inp = x[0] if static else x
  w = jax.random.normal(jax.random.key(7), (6, 3, 20))
  m = jnp.asarray([1.0, 0.0, 0.3, 1.0, 0.8, 1.0]) if masked else None

  def run(inp, leak, threshold, m, fast):
    kw = dict(leak=leak, threshold=threshold, num_steps=6 if static else None, step_mask_T=m)
    s = (lif_fused.lif_multistep(inp, spec, chunk=chunk, cpu_kernel=False, **kw) if fast
         else neurons.multistep(inp, spec, fused=False, **kw))
    return jnp.sum(s * w), s

  grad = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2) + ((3,) if masked else ()), has_aux=True),
                 static_argnums=4)
  (_, s_ref), g_ref = grad(inp, 0.8, 0.9, m, False)
  (_, s_fast), g_fast = grad(inp, 0.8, 0.9, m, True)
  chex.assert_trees_all_equal(s_fast, s_ref)
  assert 0 < float(jnp.mean(s_ref)) < 1
  _close(g_fast[0], g_ref[0])
  for a, b in zip(g_fast[1:], g_ref[1:]):
    _close(a, b, rtol=1e-4)
  loops = "scan" in str(jax.make_jaxpr(lambda i: run(i, 0.8, 0.9, m, True)[0])(inp))
  assert loops == (chunk > 0)


def test_chunk_policy():
  for masked, limit in ((True, lif_fused.UNROLL_MAX), (False, lif_fused.UNROLL_MAX_UNMASKED)):
    assert [lif_fused.chunk_steps(t, masked=masked) for t in (1, limit)] == [0, 0]  # unrolled up to the limit
    for t in (limit + 1, 2 * limit, 16):
      k = lif_fused.chunk_steps(t, masked=masked)
      assert 1 <= k <= lif_fused.LOOP_CHUNK and t % k == 0
  assert lif_fused.chunk_steps(8, masked=True) == 0 and lif_fused.chunk_steps(8, masked=False) == 2
  with pytest.raises(ValueError, match="divisor"):
    lif_fused.lif_multistep(jnp.zeros((6, 2)), chunk=4)


@pytest.mark.parametrize("surrogate_input", ["normalized", "difference"])
def test_fires_is_the_distance_sign_for_positive_thresholds(surrogate_input):
  """The fused path's division-free spike decision h >= Vth equals distance(h, Vth) >= 0 bitwise, including
  the floats adjacent to Vth, for thresholds across many binades."""
  spec = neuron_spec.NeuronSpec.resolve("lif", surrogate_input=surrogate_input)
  vth = np.exp(np.random.default_rng(0).uniform(np.log(1e-3), np.log(1e3), 4000)).astype(np.float32)
  vth = np.concatenate([vth, np.float32([1e-3, 0.5, 1.0, 2.0, 3.0])])
  hs = [vth, np.nextafter(vth, np.float32(np.inf)), np.nextafter(vth, np.float32(-np.inf)),
        np.nextafter(np.nextafter(vth, np.float32(-np.inf)), np.float32(-np.inf)), vth * np.float32(0.999999),
        -vth, np.zeros_like(vth)]
  for h in hs:
    fires = np.asarray(spec.fires(jnp.asarray(h), jnp.asarray(vth)))
    np.testing.assert_array_equal(fires, np.asarray(spec.distance(jnp.asarray(h), jnp.asarray(vth)) >= 0))
  assert np.asarray(spec.fires(jnp.asarray(hs[0]), jnp.asarray(vth))).all()
  assert not np.asarray(spec.fires(jnp.asarray(hs[2]), jnp.asarray(vth))).any()
