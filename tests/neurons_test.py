"""Neuron dynamics: scan equals a plain loop, surrogate gradients, conversion behaviour, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import neurons

NEURON_CASES = [
    dict(neuron="lif", leak=0.8, threshold=1.0),
    dict(neuron="lif", leak=1.3, threshold=0.7),  # leak clamps to 1
    dict(neuron="if", threshold=0.5),
    dict(neuron="spikformer", threshold=1.0, tau=2.0),
    dict(neuron="spikformer", threshold=0.5, tau=2.0, reset="soft"),
]


def loop_reference(current_TX, neuron, leak=1.0, threshold=1.0, tau=2.0, reset=None):
  """Plain NumPy loop over steps, written independently of dtvit.neurons."""
  reset = reset or ("hard" if neuron == "spikformer" else "soft")
  lam = min(max(leak, 0.0), 1.0) if neuron == "lif" else 1.0
  u = np.zeros(current_TX.shape[1:], np.float64)
  spikes, membranes = [], []
  for i in np.asarray(current_TX, np.float64):
    h = u + (i - u) / tau if neuron == "spikformer" else lam * u + i
    s = (h >= threshold).astype(np.float64)
    u = h - threshold * s if reset == "soft" else h * (1 - s)
    spikes.append(s)
    membranes.append(h)
  return np.stack(spikes), np.stack(membranes)


@pytest.mark.parametrize("case", NEURON_CASES, ids=lambda c: f"{c['neuron']}-{c.get('reset', 'default')}")
def test_scan_equals_python_loop(case):
  current = jax.random.uniform(jax.random.key(0), (12, 5, 7), minval=-0.5, maxval=1.5)
  spikes, membranes = neurons.multistep(current, return_membrane=True, **case)
  ref_s, ref_h = loop_reference(np.asarray(current), **case)
  np.testing.assert_array_equal(np.asarray(spikes), ref_s)
  np.testing.assert_allclose(np.asarray(membranes), ref_h, rtol=1e-5, atol=1e-5)
  assert 0 < ref_s.mean() < 1  # the case exercises both firing and silence


@pytest.mark.parametrize("case", NEURON_CASES[:3], ids=lambda c: c["neuron"])
def test_static_input_equals_repeated_input(case):
  current = jax.random.uniform(jax.random.key(1), (4, 6), minval=0.0, maxval=1.2)
  static = neurons.multistep(current, num_steps=9, **case)
  repeated = neurons.multistep(jnp.broadcast_to(current, (9, 4, 6)), **case)
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
  grad = jax.vmap(jax.grad(lambda v: neurons.spike(v, surrogate, alpha)))(x)
  eps = 1e-3
  x64 = np.asarray(x, np.float64)
  fd = (np.asarray(_primitive(jnp.asarray(x64 + eps), surrogate, alpha), np.float64)
        - np.asarray(_primitive(jnp.asarray(x64 - eps), surrogate, alpha), np.float64)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(grad), fd, rtol=2e-2, atol=2e-3)
  # Forward is the exact Heaviside step.
  np.testing.assert_array_equal(np.asarray(neurons.spike(x, surrogate, alpha)), (np.asarray(x) >= 0) * 1.0)
  # Known values at threshold.
  g0 = float(jax.grad(lambda v: neurons.spike(v, surrogate, alpha))(0.0))
  assert g0 == pytest.approx({"pwl": alpha, "sigmoid": alpha / 4, "atan": alpha / 2}[surrogate], rel=1e-5)


def test_gradients_reach_leak_and_threshold():
  current = jax.random.uniform(jax.random.key(2), (6, 32), minval=0.0, maxval=1.5)

  def loss(leak, threshold):
    return jnp.sum(neurons.multistep(current, neuron="lif", leak=leak, threshold=threshold))

  g_leak, g_th = jax.grad(loss, argnums=(0, 1))(0.9, 1.0)
  assert np.isfinite(g_leak) and np.isfinite(g_th)
  assert g_leak > 0  # less leak -> more spikes
  assert g_th < 0  # higher threshold -> fewer spikes


def test_remat_changes_nothing():
  current = jax.random.normal(jax.random.key(3), (5, 16))
  f = lambda c, remat: jnp.sum(neurons.multistep(c, neuron="lif", leak=0.9, remat=remat) * jnp.arange(16.0))
  np.testing.assert_array_equal(f(current, False), f(current, True))
  np.testing.assert_allclose(jax.grad(f)(current, False), jax.grad(f)(current, True), rtol=1e-6)


def test_detached_hard_reset_blocks_reset_gradient():
  current = jnp.array([[1.2], [0.7], [0.9]])
  grad = lambda detach: jax.grad(lambda c: jnp.sum(neurons.multistep(
      c, neuron="spikformer", surrogate="sigmoid", detach_reset=detach)))(current)
  assert not np.allclose(grad(True), grad(False))


def test_if_rate_approaches_clipped_relu():
  current = jnp.linspace(-0.5, 1.5, 21)
  errors = []
  for T in (4, 16, 64, 256):
    rate = jnp.mean(neurons.multistep(current, num_steps=T, neuron="if", threshold=0.8), axis=0)
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
    neurons.multistep(jnp.ones((3, 2)), **kwargs)


@pytest.mark.parametrize("neuron", ["lif", "if", "spikformer"])
def test_a_skip_masked_step_does_not_exist_for_the_neuron(neuron):
  """With mask [1, 0, 0, 1, 1] the neuron's spikes at the active steps equal those of a run over the active
  steps' inputs alone (membrane held: no leak, no charge at masked steps), and it emits nothing at masked steps;
  the inputs at masked steps change nothing."""
  x = 1.2 * jax.random.normal(jax.random.key(2), (5, 3, 16)) + 0.4
  m = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0])
  kw = dict(neuron=neuron, leak=0.7, threshold=0.8, init_membrane=0.5)
  masked = neurons.multistep(x, step_mask_T=m, **kw)
  alone = neurons.multistep(x[jnp.array([0, 3, 4])], **kw)
  np.testing.assert_array_equal(masked[jnp.array([0, 3, 4])], alone)
  np.testing.assert_array_equal(masked[1:3], 0.0)
  noisy = x.at[1:3].add(5.0 * jax.random.normal(jax.random.key(3), (2, 3, 16)))
  np.testing.assert_array_equal(neurons.multistep(noisy, step_mask_T=m, **kw), masked)
  assert float(jnp.sum(alone)) > 0
  with pytest.raises(ValueError, match="one value per time step"):
    neurons.multistep(x, step_mask_T=jnp.ones(4), **kw)
