"""The spiking ViT family: one tree for both phases, masks gate spikes, conversion, no recompiles, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import models
from dtvit.models import layers

IMG = (16, 16, 3)


def tiny(arch, **kw):
  if arch == "spikformer":
    return models.spikformer("tiny", 5, **kw)
  return models.vit("tiny", 5, patch_size=4, **kw)


def images(n=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, *IMG))


def shapes(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["spikformer", "vit"])
@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_ann_and_snn_share_one_parameter_tree(arch, granularity):
  mask = models.MaskConfig(granularity=granularity)
  ann = models.init(tiny(arch, phase="ann", max_time_steps=3, mask=mask), jax.random.key(0), IMG)
  snn = models.init(tiny(arch, phase="snn", max_time_steps=3, mask=mask), jax.random.key(0), IMG)
  assert shapes(ann) == shapes(snn)
  # The ANN checkpoint's params run the SNN directly.
  snn_model = tiny(arch, phase="snn", max_time_steps=3, mask=mask)
  logits = jax.jit(lambda v, x: models.apply_model(snn_model, v, x, with_aux=False))(ann, images())
  assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
  scores = models.time_step_scores(snn["params"])
  if granularity == "module":
    assert sorted(scores) == ["blocks_0/attn", "blocks_0/mlp"]
  else:
    assert "blocks_0/attn/q_lif" in scores and "blocks_0/mlp/fc2_lif" in scores
  assert all(s.shape == (3,) for s in scores.values())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["spikformer", "vit"])
def test_aux_reports_masks_rates_and_step_logits(arch):
  model = tiny(arch, max_time_steps=4)
  variables = models.init(model, jax.random.key(0), IMG)
  logits, aux = jax.jit(lambda v, x: models.apply_model(model, v, x))(variables, images())
  assert sorted(aux["masks"]) == ["blocks_0/attn", "blocks_0/mlp"]
  np.testing.assert_array_equal(aux["masks"]["blocks_0/attn"], np.ones(4))
  np.testing.assert_allclose(aux["step_logits"].mean(0), logits, rtol=1e-5, atol=1e-6)
  for name, rate in aux["spike_rates"].items():
    assert rate.shape == (4,) and np.all((rate >= 0) & (rate <= 1)), name
  assert "blocks_0/attn/q" in aux["input_rates"] and "head" in aux["input_rates"]


@pytest.mark.slow
def test_stem_pool_first_moves_the_neuron_after_the_pool():
  """stem_pool_first: a pooled SPS stage runs its neuron on the pooled BN output (4x fewer neurons). The ANN
  computes the same values either way (max pooling commutes with the clipped ReLU); the SNN does not."""
  out = {}
  for pool_first in (False, True):
    for phase in ("ann", "snn"):
      model = models.spikformer("tiny", 5, phase=phase, max_time_steps=2, stem_pool_first=pool_first)
      variables = models.init(model, jax.random.key(0), IMG)
      logits, state = model.apply(variables, images(), train=False, capture_intermediates=True,
                                  mutable=["intermediates"])
      lif2 = state["intermediates"]["embedding"]["conv2_lif"]["__call__"][0]
      out[pool_first, phase] = logits, lif2
  # tiny pools after stages 2 and 3: stage 2's neuron sees 16x16 (pooled after) or 8x8 (pooled first).
  assert out[False, "snn"][1].shape[1:3] == (16, 16)
  assert out[True, "snn"][1].shape[1:3] == (8, 8)
  assert set(np.unique(np.asarray(out[True, "snn"][1]))) <= {0.0, 1.0}
  chex.assert_trees_all_equal(out[True, "ann"][0], out[False, "ann"][0])
  assert not np.array_equal(out[True, "snn"][0], out[False, "snn"][0])


@pytest.mark.parametrize("arch", ["spikformer", "vit"])
def test_masked_step_emits_no_spikes(arch):
  model = tiny(arch, max_time_steps=4)
  variables = models.init(model, jax.random.key(0), IMG)
  params = jax.tree.map(lambda a: a, variables["params"])
  params["blocks_0"]["attn"]["time_mask"]["time_scores"] = jnp.array([1.0, -1.0, 1.0, -1.0])
  params["blocks_0"]["mlp"]["time_mask"]["time_scores"] = jnp.array([-1.0, -1.0, 1.0, 1.0])
  _, aux = jax.jit(lambda v, x: models.apply_model(model, v, x))({**variables, "params": params}, images())
  attn_neurons = [k for k in aux["spike_rates"] if k.startswith("blocks_0/attn/")]
  assert len(attn_neurons) == 5
  for k in attn_neurons:
    np.testing.assert_array_equal(aux["spike_rates"][k][np.array([1, 3])], 0.0)
  for k in ("blocks_0/mlp/fc1_lif", "blocks_0/mlp/fc2_lif"):
    np.testing.assert_array_equal(aux["spike_rates"][k][:2], 0.0)
  assert np.all(aux["spike_rates"]["blocks_0/mlp/fc1_lif"][2:] > 0)
  assert {k: c["active_steps"] for k, c in models.step_counts(model, params).items()} == {
      "blocks_0/attn": 2.0, "blocks_0/mlp": 2.0}
  # Masked steps do no synaptic work in the energy accounting.
  np.testing.assert_array_equal(aux["input_rates"]["blocks_0/mlp/fc1"][:2], 0.0)


@pytest.mark.slow
def test_fully_masked_block_is_identity():
  model = tiny("vit", max_time_steps=3)
  variables = models.init(model, jax.random.key(0), IMG)
  params = jax.tree.map(lambda a: a, variables["params"])
  for m in ("attn", "mlp"):
    params["blocks_0"][m]["time_mask"]["time_scores"] = -jnp.ones(3)
  no_block = tiny("vit", max_time_steps=3, depth=0)
  p0 = {k: v for k, v in params.items() if k != "blocks_0"}
  bs0 = {k: v for k, v in variables["batch_stats"].items() if k != "blocks_0"}
  a = models.apply_model(model, {"params": params, "batch_stats": variables["batch_stats"]}, images(),
                         with_aux=False)
  b = models.apply_model(no_block, {"params": p0, "batch_stats": bs0}, images(), with_aux=False)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_gradients_reach_scores_weights_and_neuron_params():
  model = tiny("vit", max_time_steps=3)
  variables = models.init(model, jax.random.key(0), IMG)
  labels = jnp.array([1, 3])

  def loss(params):
    logits, _, _ = models.apply_model(model, {**variables, "params": params}, images(), train=True)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  flat = {"/".join(str(p.key) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert np.any(flat["blocks_0/attn/time_mask/time_scores"] != 0)
  assert np.any(flat["blocks_0/mlp/fc1/kernel"] != 0)
  assert flat["blocks_0/mlp/fc1_lif/threshold"] != 0
  assert flat["blocks_0/mlp/fc1_lif/leak"] != 0


def test_changing_scores_does_not_recompile():
  model = tiny("vit", max_time_steps=4)
  variables = models.init(model, jax.random.key(0), IMG)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(v, x):
    return models.apply_model(model, v, x, with_aux=False)

  x = images()
  outs = []
  for scores in ([1.0, 1, 1, 1], [1.0, -1, 1, -1], [-1.0, -1, -1, -1]):
    params = jax.tree.map(lambda a: a, variables["params"])
    params["blocks_0"]["attn"]["time_mask"]["time_scores"] = jnp.array(scores)
    outs.append(forward({**variables, "params": params}, x))
  assert not np.allclose(outs[0], outs[2])  # the masks did change the output


class _Layer(nn.Module):
  """Dense -> neuron, the smallest converted layer."""
  phase: str
  num_steps: int

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(16)(x)
    cfg = models.NeuronConfig(neuron="if", reset="soft")
    return layers.Neuron(self.phase, self.num_steps, cfg, 0.7, name="lif")(y, static=True)


def test_converted_if_rates_approach_ann_activations():
  x = jax.random.normal(jax.random.key(0), (32, 8))
  variables = _Layer("ann", 1).init(jax.random.key(1), x)
  params = models.ann_to_snn(variables["params"])
  ann = _Layer("ann", 1).apply({"params": variables["params"]}, x)
  errors = []
  for T in (4, 16, 64, 256):
    spikes = _Layer("snn", T).apply({"params": params}, x).reshape(T, 32, 16)
    errors.append(float(jnp.mean(jnp.abs(spikes.mean(0) - ann))))
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.01


def test_ann_to_snn_scales_thresholds():
  model = tiny("spikformer", phase="ann")
  params = models.init(model, jax.random.key(0), IMG)["params"]
  new = models.ann_to_snn(params, scale={"blocks_0/attn/q_lif": 0.5})
  q_threshold = float(params["blocks_0"]["attn"]["q_lif"]["threshold"])
  assert float(new["blocks_0"]["attn"]["q_lif"]["threshold"]) == 0.5 * q_threshold
  assert float(new["blocks_0"]["attn"]["k_lif"]["threshold"]) == float(params["blocks_0"]["attn"]["k_lif"]["threshold"])
  assert float(models.ann_to_snn(params, scale=2.0)["head"]["kernel"][0, 0]) == float(params["head"]["kernel"][0, 0])
  with pytest.raises(ValueError, match="no neuron at \\['blocks_9/attn'\\]"):
    models.ann_to_snn(params, scale={"blocks_9/attn": 2.0})


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_time_steps=0), "T_max \\(max_time_steps\\) must be an integer >= 1"),
    (dict(phase="hybrid"), "Unknown phase 'hybrid'"),
    (dict(neuron=models.NeuronConfig(neuron="adex")), "Unknown neuron 'adex'"),
    (dict(neuron=models.NeuronConfig(surrogate="erf")), "Unknown surrogate 'erf'"),
    (dict(mask=models.MaskConfig(mode="gumbel")), "Unknown mask mode 'gumbel'"),
    (dict(mask=models.MaskConfig(granularity="head")), "Unknown mask granularity 'head'"),
])
def test_bad_model_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.init(tiny("vit", **kwargs), jax.random.key(0), IMG)


def test_wrong_input_shape():
  model = tiny("vit")
  variables = models.init(model, jax.random.key(0), IMG)
  with pytest.raises(ValueError, match="Expected images \\[batch, height, width, channels\\]"):
    models.apply_model(model, variables, jnp.zeros((16, 16, 3)))
  with pytest.raises(ValueError, match="not divisible by the stem's downsampling factor 4"):
    models.apply_model(model, variables, jnp.zeros((2, 18, 18, 3)))
  with pytest.raises(ValueError, match="Unknown Spikformer variant"):
    models.spikformer("4-999", 10)
