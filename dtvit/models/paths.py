"""The one module that knows the names in a dtvit model: masked modules, score holders, neurons, side outputs.

Everything else (layers, optimizer groups, energy, inference schedules, training diagnostics, reports) asks
here instead of parsing names, so renaming a layer is one edit in this file.

A model's tree (`SpikingViT`):

  embedding/                      the stem: 'sps' conv0..conv3 (+ _bn, _lif), rpe; or 'patch' patch (+ _bn, _lif)
  blocks_<i>/attn/                q, k, v, proj (Dense) + <layer>_bn + <layer>_lif; attn_lif after Q K^T V
  blocks_<i>/mlp/                 fc1, fc2 (Dense) + _bn + _lif
  head                            the classifier (Dense)

Names used below:
- a *module* is a masked module path: 'blocks_0/attn', 'blocks_0/mlp', and 'embedding' when the stem is masked;
- a *neuron* is the neuron path 'blocks_0/attn/q_lif'; a synaptic *layer* 'blocks_0/attn/q' feeds the neuron
  `neuron_of(layer)`;
- a *unit* is what owns a mask: the module (granularity 'module'), or each of its neurons ('layer').
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import flax

from dtvit import masks as masks_lib

STEM = "embedding"
HEAD = "head"
ATTN = "attn"
MLP = "mlp"
BLOCK_PREFIX = "blocks_"
SCORES = "time_scores"          # a unit's scores [T_max]: the leaf of its mask holder
MODULE_MASK = "time_mask"       # the mask holder of a module (granularity 'module')
THRESHOLD, LEAK = "threshold", "leak"   # a neuron's trainable scalars
NEURON_PARAMS = (THRESHOLD, LEAK)
ATTENTION_PRODUCTS = ("qk", "kv", "qkv")  # op-count suffixes of the spike products (see `dtvit.energy`)
OUTPUT = masks_lib.OUTPUT

# Synaptic layers (each feeds the neuron `neuron_of(layer)` through the batch norm `batch_norm_of(layer)`).
QKV = ("q", "k", "v")            # attention: Q, K, V
PROJ = "proj"                    # attention: the output projection, after the attention neuron
FC = ("fc1", "fc2")              # MLP
SPS_CONVS = ("conv0", "conv1", "conv2", "conv3")  # the SPS stem's stages (conv0 sees the pixels)
RPE = "rpe"                      # the SPS stem's relative position embedding
PATCH = "patch"                  # the patch stem's embedding
PRODUCTS = "products"            # attention's spike products (no parameters)
ATTN_NEURON = "attn_lif"         # the neuron after the attention products


def neuron_of(layer: str) -> str:
  """The neuron a synaptic layer feeds: 'blocks_0/attn/q' -> 'blocks_0/attn/q_lif'."""
  return f"{layer}_lif"


def _chain(*neurons: str) -> dict:
  return {n: (c,) for n, c in zip(neurons, neurons[1:] + (OUTPUT,))}


# Each module's neuron graph: {neuron: the neurons its spikes feed}, OUTPUT for the module output (the residual
# stream, read at every step). Q, K and V meet in the products Q K^T V before the attention neuron, so each of
# them matters at a step only if the other two are active there too (a tuple: (consumer, *partners)).
_Q, _K, _V = (neuron_of(n) for n in QKV)
ATTN_UNITS = {_Q: ((ATTN_NEURON, _K, _V),), _K: ((ATTN_NEURON, _Q, _V),), _V: ((ATTN_NEURON, _Q, _K),),
              **_chain(ATTN_NEURON, neuron_of(PROJ))}
MLP_UNITS = _chain(*(neuron_of(n) for n in FC))
SPS_UNITS = {**_chain(*(neuron_of(n) for n in SPS_CONVS)), neuron_of(SPS_CONVS[-1]): (neuron_of(RPE), OUTPUT),
             neuron_of(RPE): (OUTPUT,)}
PATCH_UNITS = _chain(neuron_of(PATCH))
STEM_UNITS = {"sps": SPS_UNITS, "patch": PATCH_UNITS}

# Neurons in the order they run within their module (stems first, then attention, then MLP).
NEURON_ORDER = tuple(SPS_UNITS) + tuple(PATCH_UNITS) + tuple(ATTN_UNITS) + tuple(MLP_UNITS)

# Leaves of the 'aux' collection (sown by the layers) and the `collect_aux` entries they go to.
AUX_MASK = "mask"
AUX_WORK = "work"
AUX_SPIKE_RATE = "spike_rate"
AUX_INPUT_RATE = "input_rate"
AUX_ATTENTION_RATES = ("attention_rate_1", "attention_rate_2")
AUX_STEP_LOGITS = "step_logits"
AUX_BLOCK_OUTPUT = "output"


def block(i: int) -> str:
  """The name of block i: 'blocks_<i>'."""
  return f"{BLOCK_PREFIX}{i}"


def join(*parts: str) -> str:
  return "/".join(p for p in parts if p)


def path_str(keys: Iterable[Any]) -> str:
  """A tree path (tuple of names, or jax key entries) as 'a/b/c'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def batch_norm_of(layer: str) -> str:
  """The batch norm after a synaptic layer: 'q' -> 'q_bn'."""
  return f"{layer}_bn"


def neuron_mask(neuron: str) -> str:
  """The mask holder of a neuron (granularity 'layer'): 'q_lif' -> 'q_lif_mask'."""
  return f"{neuron}_mask"


def neuron_work(neuron: str) -> str:
  """The aux leaf of a neuron's work mask (granularity 'layer'): 'q_lif' -> 'q_lif_work'."""
  return f"{neuron}_{AUX_WORK}"


def attention_neuron(module: str) -> str:
  """The neuron the attention products of `module` feed."""
  return join(module, ATTN_NEURON)


def attention_product(module: str, product: str) -> str:
  """The op-count name of an attention product ('qk', 'kv', 'qkv') of `module`."""
  if product not in ATTENTION_PRODUCTS:
    raise ValueError(f"Unknown attention product {product!r}; choose one of {ATTENTION_PRODUCTS}.")
  return join(module, product)


def attention_module(product: str) -> str:
  """The attention module an attention product's op-count name belongs to: 'blocks_0/attn/kv' -> 'blocks_0/attn'."""
  return product.rpartition("/")[0]


# ----------------------------------------------------------------------------------------------------------
# The masked modules and units of a model (duck-typed: depth, stem, mask.mask_stem, mask.granularity).


def masked_modules(model) -> dict[str, dict]:
  """{masked module path: its neuron graph}: each block's attn and mlp, and the stem with mask_stem."""
  modules = {}
  for i in range(model.depth):
    modules[join(block(i), ATTN)] = ATTN_UNITS
    modules[join(block(i), MLP)] = MLP_UNITS
  if model.mask.mask_stem:
    modules[STEM] = STEM_UNITS[model.stem]
  return modules


def unit_graph(module: str, units: Mapping[str, tuple]) -> dict[str, tuple]:
  """A module's neuron graph with full neuron paths ('blocks_0/attn/q_lif': ...)."""
  full = lambda c: c if c == OUTPUT else join(module, c)
  return {join(module, n): tuple(tuple(full(x) for x in c) if isinstance(c, tuple) else full(c) for c in cons)
          for n, cons in units.items()}


def mask_units(model) -> dict[str, tuple]:
  """The mask units and what their spikes feed: {unit: consumer units or OUTPUT}. With `masks.work_masks` /
  `masks.step_counts` this gives every unit's working (simulated) steps."""
  modules = masked_modules(model)
  if model.mask.granularity == "module":
    return {m: (OUTPUT,) for m in modules}
  return {u: c for m, units in modules.items() for u, c in unit_graph(m, units).items()}


def _unit_of_holder(holder_path: str) -> str:
  """'blocks_0/attn/time_mask' -> 'blocks_0/attn'; 'blocks_0/attn/q_lif_mask' -> 'blocks_0/attn/q_lif'."""
  module, _, leaf = holder_path.rpartition("/")
  if leaf == MODULE_MASK:
    return module
  if leaf.endswith("_mask"):
    return join(module, leaf[: -len("_mask")])
  return holder_path


def scores(params) -> dict[str, Any]:
  """Every mask unit's scores in a params tree: {unit: [T_max]}, used or not (the stem's without mask_stem)."""
  return {_unit_of_holder(path_str(p[:-1])): v for p, v in _flat(params).items() if p[-1] == SCORES}


def with_scores(params, new_scores: Mapping[str, Any]):
  """A copy of a params tree with the scores of some units replaced: {unit: [T_max]}."""
  flat = _flat(params)
  holders = {_unit_of_holder(path_str(p[:-1])): p for p in flat if p[-1] == SCORES}
  unknown = sorted(set(new_scores) - set(holders))
  if unknown:
    raise ValueError(f"No scores for units {unknown}; the tree has {sorted(holders)}.")
  flat.update({holders[u]: v for u, v in new_scores.items()})
  return flax.traverse_util.unflatten_dict(flat)


def is_stem(name: str) -> bool:
  """Whether a module, unit, neuron or layer name belongs to the stem."""
  return name == STEM or name.startswith(STEM + "/")


def used_units(model, names: Iterable[str]) -> list[str]:
  """The units among `names` whose masks the model uses (when masks are enabled): all but the stem's unless
  mask_stem."""
  return [n for n in names if model.mask.mask_stem or not is_stem(n)]


def unmasked_stem(model) -> str | None:
  """The stem's name when it has no mask (its steps are T_max, listed apart in summaries)."""
  return None if model.mask.mask_stem else STEM


# ----------------------------------------------------------------------------------------------------------
# Parameters.


def param_group(path: tuple[str, ...]) -> str:
  """A parameter's optimizer group from its params path: 'scores', 'neuron' or 'weights'."""
  leaf = str(path[-1])
  if leaf == SCORES:
    return "scores"
  if leaf in NEURON_PARAMS:
    return "neuron"
  return "weights"


def is_scores_path(path: str) -> bool:
  """Whether a '/'-joined variable path ('params/blocks_0/attn/time_mask/time_scores') is a unit's scores."""
  return path.rpartition("/")[2] == SCORES


def is_threshold(path: tuple[str, ...]) -> bool:
  return str(path[-1]) == THRESHOLD


def decays(path: tuple[str, ...], value) -> bool:
  """Weight decay applies to matrices and conv kernels only (not BN scales, biases, position embeddings)."""
  return getattr(value, "ndim", 0) > 1 and str(path[-1]) == "kernel"


def module_of_param(path) -> str:
  """A parameter's module: ('blocks_0', 'attn', 'q', 'kernel') -> 'blocks_0/attn/q'; a root parameter is
  named by itself."""
  keys = path_str(path).split("/")
  return "/".join(keys[:-1]) or keys[-1]


def neuron_of_param(path) -> str:
  """The neuron a threshold / leak belongs to: ('blocks_0', 'attn', 'q_lif', 'threshold') -> '.../q_lif'."""
  return module_of_param(path)


# ----------------------------------------------------------------------------------------------------------
# Layers, neurons and the units that gate them.


def gating_unit(layer: str, kind: str, units: Iterable[str], granularity: str) -> str | None:
  """The mask unit whose work mask gates a synaptic layer's per-step work, or None (ungated).

  `kind` is the op kind ('analog' runs once per image: never gated; 'attention' products feed the attention
  neuron); `units` the masked units in use."""
  if kind == "analog":
    return None
  units = list(units)
  if granularity == "layer":
    module, _, name = layer.rpartition("/")
    unit = attention_neuron(module) if kind == "attention" else neuron_of(layer)
    return unit if unit in units else None
  return owner(layer, units)


def owner(name: str, units: Iterable[str]) -> str | None:
  """The innermost of `units` that `name` is or lies inside ('blocks_0/attn/q_lif' -> 'blocks_0/attn')."""
  owners = [u for u in units if name == u or name.startswith(u + "/")]
  return max(owners, key=len) if owners else None


def block_of(name: str) -> str | None:
  """The block a name lies in ('blocks_0/attn/q_lif' -> 'blocks_0'); None outside the blocks."""
  first = name.split("/")[0]
  return first if first.startswith(BLOCK_PREFIX) and first[len(BLOCK_PREFIX):].isdigit() else None


def block_number(name: str) -> int | None:
  """The index of the block a name lies in ('blocks_3/mlp' -> 3); None outside the blocks."""
  b = block_of(name)
  return None if b is None else int(b[len(BLOCK_PREFIX):])


def blocks_in(names: Iterable[str]) -> list[str]:
  """The blocks that names lie in, in network order."""
  return sorted({b for b in map(block_of, names) if b is not None}, key=block_number)


def short_name(name: str) -> str:
  """The last part of a name: 'blocks_0/attn' -> 'attn'."""
  return name.rpartition("/")[2]


def order_key(name: str) -> tuple:
  """Sort key for network order: the stem, then blocks in order; attention before MLP; neurons in the order
  they run."""
  number = block_number(name)
  index = -1 if number is None else number
  parts = name.split("/")
  module = {ATTN: 0, MLP: 1}.get(parts[1] if len(parts) > 1 else "", 0)
  leaf = parts[-1]
  rank = NEURON_ORDER.index(leaf) if leaf in NEURON_ORDER else len(NEURON_ORDER)
  return (index, module, rank, name)


# ----------------------------------------------------------------------------------------------------------
# Side outputs.


def collect_aux(aux_tree) -> dict:
  """Flattens the 'aux' collection into {'masks', 'work', 'spike_rates', 'input_rates', 'attention_rates',
  'block_outputs'} dicts keyed by unit, neuron, layer, module or block path, and 'step_logits'."""
  out = {"masks": {}, "work": {}, "spike_rates": {}, "input_rates": {}, "attention_rates": {},
         "block_outputs": {}}
  for path, value in _flat(aux_tree).items():
    leaf, where = str(path[-1]), path_str(path[:-1])
    if leaf == AUX_MASK:
      out["masks"][_unit_of_holder(where)] = value
    elif leaf == AUX_WORK:
      out["work"][where] = value
    elif leaf.endswith("_" + AUX_WORK):
      out["work"][join(where, leaf[: -len("_" + AUX_WORK)])] = value
    elif leaf == AUX_SPIKE_RATE:
      out["spike_rates"][where] = value
    elif leaf == AUX_INPUT_RATE:
      out["input_rates"][where] = value
    elif leaf in AUX_ATTENTION_RATES:
      out["attention_rates"].setdefault(where, [None, None])[AUX_ATTENTION_RATES.index(leaf)] = value
    elif leaf == AUX_STEP_LOGITS:
      out["step_logits"] = value
    elif leaf == AUX_BLOCK_OUTPUT:
      out["block_outputs"][where] = value
  out["attention_rates"] = {k: tuple(v) for k, v in out["attention_rates"].items()}
  return out


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree) if hasattr(tree, "unfreeze") else tree)
