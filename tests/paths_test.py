"""dtvit.models.paths against real models: the names it knows are the names the layers create, in the order
they run, so renaming a layer in one place cannot silently break energy, inference or the report."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dtvit import energy
from dtvit import models
from dtvit.models import layers
from dtvit.models import paths

CASES = [("spikformer", "module", False), ("spikformer", "layer", True), ("vit", "module", True),
         ("vit", "layer", False)]


def _model(arch, granularity, mask_stem):
  mask = models.MaskConfig(granularity=granularity, mask_stem=mask_stem)
  if arch == "spikformer":
    return models.spikformer("tiny", 10, depth=2, max_time_steps=2, mask=mask)
  return models.vit("tiny", 10, patch_size=4, depth=2, max_time_steps=2, mask=mask)


def _trace(model):
  """(params tree, neurons in the order their __call__ runs, aux tree) from one abstract init."""
  order = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Neuron) and context.method_name == "__call__":
      order.append(paths.path_str(context.module.scope.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                               jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  return variables["params"], order, variables["aux"]


@pytest.mark.parametrize("arch,granularity,mask_stem", CASES)
def test_units_scores_and_neurons_are_the_models(arch, granularity, mask_stem):
  model = _model(arch, granularity, mask_stem)
  params, order, aux = _trace(model)
  units = paths.mask_units(model)
  # Every unit owns scores in the tree, and every score holder is a unit.
  assert set(paths.scores(params)) == set(units)
  # Every neuron of every masked module exists, and every neuron outside them is the unmasked stem's.
  graphs = {n for m, g in paths.masked_modules(model).items() for n in paths.unit_graph(m, g)}
  neurons = {paths.neuron_of_param(p) for p in jax.tree_util.tree_flatten_with_path(params)[0]
             for p in [tuple(str(k.key) for k in p[0])] if paths.is_threshold(p)}
  assert graphs <= neurons
  assert all(paths.is_stem(n) for n in neurons - graphs) and (mask_stem or neurons - graphs)
  # The order key sorts neurons as they run.
  assert sorted(order, key=paths.order_key) == order == sorted(neurons, key=paths.order_key)
  # The side outputs parse into the units' masks and work masks, every neuron's rate.
  collected = paths.collect_aux(aux)
  assert set(collected["masks"]) == set(units) == set(collected["work"])
  assert set(collected["spike_rates"]) == neurons
  assert set(collected["attention_rates"]) == {m for m in paths.masked_modules(model) if m.endswith(paths.ATTN)}


# The counted layers of the two depth-2 models: spikformer's stem (4 convs, rpe), 2 x (q, k, v, qk, qkv, proj,
# fc1, fc2), head; ViT's patch embedding, 2 x the same 8, head.
NUM_LAYERS = {"spikformer": 22, "vit": 18}
# The units that gate no counted layer: a masked stem's unit fed only by the analog input layer (its MACs are
# analog, never gated): spikformer's first stem neuron, ViT's whole stem.
UNGATED = {("spikformer", "layer", True): {"embedding/conv0_lif"}, ("vit", "module", True): {"embedding"}}


@pytest.mark.parametrize("arch,granularity,mask_stem", CASES)
def test_every_counted_layer_has_its_gating_unit(arch, granularity, mask_stem):
  """Each synaptic layer of a masked module (and each attention product) is gated by a unit of that module;
  the analog layer and the layers outside masked modules by none; every unit but `UNGATED` gates a layer."""
  model = _model(arch, granularity, mask_stem)
  units = paths.mask_units(model)
  counts = energy.op_counts(model, (16, 16, 3))
  assert len(counts) == NUM_LAYERS[arch] and len(units) >= 4
  gated = {c["module"] for c in counts.values() if c["module"] is not None}
  assert gated == set(units) - UNGATED.get((arch, granularity, mask_stem), set())
  assert sum(c["kind"] == "analog" for c in counts.values()) == 1
  for layer, c in counts.items():
    owner = paths.owner(layer, paths.masked_modules(model))
    if c["kind"] == "analog" or owner is None:
      assert c["module"] is None, layer
    else:
      assert c["module"] in units and paths.owner(c["module"], [owner]) == owner, (layer, c["module"])
      if granularity == "layer":
        expected = paths.attention_neuron(owner) if c["kind"] == "attention" else paths.neuron_of(layer)
        assert c["module"] == expected


def test_param_groups_and_names():
  assert paths.param_group(("blocks_0", "attn", paths.MODULE_MASK, paths.SCORES)) == "scores"
  assert paths.param_group(("blocks_0", "attn", "q_lif", paths.THRESHOLD)) == "neuron"
  assert paths.param_group(("blocks_0", "attn", "q", "kernel")) == "weights"
  assert paths.module_of_param(("blocks_0", "attn", "q", "kernel")) == "blocks_0/attn/q"
  assert paths.blocks_in(["blocks_10/mlp", "blocks_2/attn/q_lif", "embedding"]) == ["blocks_2", "blocks_10"]
  assert paths.scores({"blocks_0": {"attn": {"q_lif_mask": {"time_scores": 1}, "time_mask": {"time_scores": 2}}}}) == {
      "blocks_0/attn/q_lif": 1, "blocks_0/attn": 2}


def test_with_scores_replaces_only_the_named_units():
  model = _model("vit", "layer", False)
  params = models.init(model, jax.random.key(0), (16, 16, 3))["params"]
  new = paths.with_scores(params, {"blocks_1/mlp/fc2_lif": jnp.array([1.0, -1.0])})
  counts = models.step_counts(model, new)
  assert counts["blocks_1/mlp/fc2_lif"]["mask"] == [1, 0]
  assert all(c["mask"] == [1, 1] for u, c in counts.items() if u != "blocks_1/mlp/fc2_lif")
  with pytest.raises(ValueError, match="No scores for units"):
    paths.with_scores(params, {"blocks_7/mlp": jnp.ones(2)})
