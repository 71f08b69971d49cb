"""Every fast op equals its reference path: values and gradients (dtvit/ops.py); the model's kernels and remat
options (each changes the program, never the numbers)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import models, ops
from dtvit.models import NeuronConfig


def _spikes(key, shape, rate=0.3):
  return (jax.random.uniform(key, shape) < rate).astype(jnp.float32)


def _close(a, b, rtol=2e-5, floor=1e-6):
  """Equal up to float32 summation order: within rtol of the tensor's scale (at least `floor`)."""
  a, b = np.asarray(a), np.asarray(b)
  scale = max(float(np.max(np.abs(a))), floor)
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def _compile(fn, *args):
  """jit + compile without XLA's backend optimisations (seconds less per model on CPU; both paths alike)."""
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def _pool_ref(x, window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))):
  return nn.max_pool(x, window, strides=strides, padding=padding)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 8, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),   # Spikformer's pool
    ((2, 7, 9, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),   # odd sizes
    ((2, 8, 8, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((1, 6, 6, 2), (3, 3), (1, 1), "SAME"),
])
@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False])
def test_max_pool_matches_reference(shape, window, strides, padding, binary):
  kx, kg = jax.random.split(jax.random.key(3))
  x = _spikes(kx, shape) if binary else jax.random.normal(kx, shape)
  ref = lambda x: _pool_ref(x, window, strides, padding)
  fast = lambda x: ops.max_pool(x, window, strides, padding)
  y_ref, vjp_ref = jax.vjp(ref, x)
  y, vjp = jax.vjp(fast, x)
  chex.assert_trees_all_equal(y, y_ref)
  # Integer cotangents make the sums exact, so the routing of every gradient (ties included) must match.
  g = jnp.round(4 * jax.random.normal(kg, y.shape))
  chex.assert_trees_all_equal(vjp(g), vjp_ref(g))


def test_max_pool_routes_ties_to_first_maximum():
  """All-equal windows: each output's gradient lands on the first (row-major) element of its window."""
  x = jnp.ones((1, 4, 4, 1))
  g = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
  (dx,) = jax.vjp(ops.max_pool, x)[1](g)
  expected = np.zeros((4, 4))
  expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1, 2, 3, 4
  np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], expected)


@pytest.mark.slow
@pytest.mark.parametrize("pool_first", [False, True])
def test_model_fused_equals_reference(pool_first):
  """A whole tiny Spikformer (convs, pools, every neuron): kernels='fused' gives the same logits and the same
  parameter gradients as kernels='reference', and the two trace different programs."""
  model = models.spikformer("tiny", 10, max_time_steps=3, stem_pool_first=pool_first,
                            neuron=NeuronConfig(neuron="spikingjelly_lif", surrogate="sigmoid"))
  variables = models.init(model, jax.random.key(0), (8, 8, 3))
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  labels = jnp.arange(4) % 10

  def loss(params, fast):
    m = model.clone(kernels="fused" if fast else "reference")
    logits, _ = models.apply_model(m, {**variables, "params": params}, images, train=True, with_aux=False)
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels]), logits

  (_, logits_ref), g_ref = _compile(lambda p: jax.value_and_grad(loss, has_aux=True)(p, False),
                                    variables["params"])(variables["params"])
  (_, logits_fast), g_fast = _compile(lambda p: jax.value_and_grad(loss, has_aux=True)(p, True),
                                      variables["params"])(variables["params"])
  chex.assert_trees_all_equal(logits_fast, logits_ref)
  jaxprs = {fast: str(jax.make_jaxpr(lambda p: loss(p, fast))(variables["params"])) for fast in (True, False)}
  assert "custom_vjp" in jaxprs[True] and "custom_vjp" not in jaxprs[False]
  # Some gradients are analytically 0 (e.g. the Spikformer neuron's unused leak): compare at the tree's scale.
  floor = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
  jax.tree.map(lambda a, b: _close(a, b, rtol=1e-4, floor=1e-3 * floor), g_fast, g_ref)


def test_retired_remat_modes_are_errors():
  for remat in ("layers", "spikes", True):
    with pytest.raises(ValueError, match="remat"):
      NeuronConfig(remat=remat).validate()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["spikformer", "vit"])
def test_remat_blocks_is_exact_and_bounds_memory(arch):
  """NeuronConfig(remat='blocks') recomputes the stem and each block in the backward pass: the same loss,
  gradients and batch-norm statistics, bit for bit; and for a Spikformer with 4 blocks XLA's temp memory for the
  step falls by >= 30% (only one module's intermediates are alive at a time)."""
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  out, temp = {}, {}
  for remat in (False, "blocks"):
    kw = dict(max_time_steps=2, neuron=NeuronConfig(remat=remat), mask=models.MaskConfig(mode="sigmoid"))
    model = (models.spikformer("tiny", 10, dim=32, depth=4, **kw) if arch == "spikformer"
             else models.vit("tiny", 10, patch_size=4, depth=2, **kw))
    variables = models.init(model, jax.random.key(0), (16, 16, 3))

    def loss(params):
      logits, stats = models.apply_model(model, {**variables, "params": params}, images, train=True,
                                         with_aux=False, mask_temperature=0.7)
      return jnp.sum(logits * jnp.arange(10.0)), stats

    step = jax.value_and_grad(loss, has_aux=True)
    # The memory bound needs XLA's optimised buffer assignment; exactness alone compiles faster unoptimised.
    compiled = (jax.jit(step).lower(variables["params"]).compile() if arch == "spikformer"
                else _compile(step, variables["params"]))
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    out[remat] = compiled(variables["params"])
  chex.assert_trees_all_equal(out["blocks"], out[False])
  if arch == "spikformer":
    assert temp["blocks"] <= 0.7 * temp[False], temp


@pytest.mark.parametrize("shape", [(6, 5, 8), (4, 8), (2, 3, 4, 8)])
def test_dense_matches_lax(shape):
  """ops.dense (leading axes folded into one matmul) == lax.dot_general over the last axis: values and
  gradients; and the drop-in takes that path only for Dense's form."""
  kx, kw, kg = jax.random.split(jax.random.key(4), 3)
  x = _spikes(kx, shape)
  w = jax.random.normal(kw, (8, 5))
  dn = (((len(shape) - 1,), (0,)), ((), ()))
  y_ref, vjp_ref = jax.vjp(lambda x, w: jax.lax.dot_general(x, w, dn), x, w)
  y, vjp = jax.vjp(lambda x, w: ops.dot_general(x, w, dn), x, w)
  _close(y, y_ref)
  g = jax.random.normal(kg, y.shape)
  for a, b in zip(vjp(g), vjp_ref(g)):
    _close(a, b)
  other = jax.make_jaxpr(lambda a, b: ops.dot_general(a, b, (((1,), (1,)), ((), ()))))(x.reshape(-1, 8), w.T)
  assert "reshape" not in str(other)
