"""The spiking ViT family, its ANN twin, and the functions that work on their parameter trees.

Quick use:

  from dtvit import models
  model = models.spikformer('tiny', num_classes=10, max_time_steps=4)
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  logits, aux = models.apply_model(model, variables, images)
  print(models.step_counts(model, variables['params']))   # {'blocks_0/attn': {'active_steps': 4.0, ...}, ...}

Layout: `settings` (neuron and mask settings), `paths` (every name in a model), `layers` (neurons, masks,
synaptic layers), `blocks` (attention, MLP, blocks, stems), `spiking_vit` (the model and its variant tables),
`schedule` (skipped-step rows), `remat` (recompute in the backward pass).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax
import jax
import jax.numpy as jnp

from dtvit import masks as masks_lib
from dtvit.models import paths
from dtvit.models.settings import KERNELS, LayerConfig, MaskConfig, NeuronConfig  # noqa: F401
from dtvit.models.spiking_vit import SpikingViT, spikformer, vit  # noqa: F401

ARCHS = ("spikformer", "vit")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Neuron settings older configs carry that no longer exist, with the value that made them a no-op.
_RETIRED_NEURON_KEYS = {"unroll": 1}


def build_model(model_cfg, num_classes: int, *, phase: str | None = None) -> SpikingViT:
  """A `SpikingViT` from a config's `model` section (see dtvit/recipes.py for its fields)."""
  get = model_cfg.get
  arch = get("arch", "spikformer")
  if arch not in ARCHS:
    raise ValueError(f"Unknown model.arch {arch!r}; choose one of {ARCHS}.")
  dtype = get("dtype", "float32")
  if dtype not in _DTYPES:
    raise ValueError(f"Unknown model.dtype {dtype!r}; choose one of {sorted(_DTYPES)}.")
  neuron_cfg = NeuronConfig(**_neuron_settings(dict(get("neuron", {}))))
  mask_cfg = MaskConfig(**dict(get("mask", {})))
  layer_cfg = LayerConfig(**{k: get(k) for k in ("dense_init", "conv_init", "head_init") if get(k)},
                          pre_bn_bias=tuple(get("pre_bn_bias", ()) or ()))
  kwargs = dict(phase=phase or get("phase", "snn"), max_time_steps=get("max_time_steps", 4), neuron=neuron_cfg,
                mask=mask_cfg, dtype=_DTYPES[dtype], attn_scale=get("attn_scale", 0.125),
                kernels=get("kernels", "fused"), layer_cfg=layer_cfg)
  for k in ("depth", "dim", "num_heads", "mlp_ratio"):
    if get(k):
      kwargs[k] = get(k)
  if arch == "spikformer":
    if get("stem_pools"):
      kwargs["stem_pools"] = tuple(bool(p) for p in get("stem_pools"))
    kwargs["stem_pool_first"] = bool(get("stem_pool_first", False))
    model = spikformer(get("variant", "4-384"), num_classes, **kwargs)
  else:
    model = vit(get("variant", "Ti"), num_classes, patch_size=get("patch_size", 16), **kwargs)
  model.validate()
  return model


def _neuron_settings(settings: dict) -> dict:
  for key, inert in _RETIRED_NEURON_KEYS.items():
    if key in settings and settings.pop(key) != inert:
      raise ValueError(f"model.neuron.{key} no longer exists (the fused neuron runs every step unrolled); "
                       f"remove it from the config.")
  if settings.get("remat") is True:
    raise ValueError("model.neuron.remat=True no longer exists (it did nothing on the fused neuron): use "
                     "'blocks' to recompute each block in the backward pass, or False.")
  return settings


def phase_model(model_cfg, num_classes: int, phase: str) -> SpikingViT:
  """The model a training phase runs: 'ann' the ANN twin, 'snn' the SNN with learned masks, 'finetune' the SNN
  with its masks frozen hard."""
  model = build_model(model_cfg, num_classes, phase="ann" if phase == "ann" else "snn")
  return with_mask(model, hard=True) if phase == "finetune" else model


def init(model: SpikingViT, rng, image_shape) -> dict:
  """Initial variables {'params', 'batch_stats'} for images of shape (H, W, C)."""
  model.validate()
  fn = jax.jit(lambda r: model.init(r, jnp.zeros((2, *image_shape), jnp.float32), train=False))
  lowered = fn.lower(rng)
  try:
    # Init runs once: skip XLA's backend optimisations, which cost seconds of compile time on CPU.
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
  except Exception:  # a backend without that option
    compiled = lowered.compile()
  variables = compiled(rng)
  return {k: v for k, v in variables.items() if k != "aux"}


def apply_model(model: SpikingViT, variables, images, *, train: bool = False, mask_temperature=1.0,
                with_aux: bool = True, step_logits: bool = False):
  """Runs the model and collects its side outputs.

  Returns:
    logits [B, K] (with `step_logits`: the per-step logits [T, B, K] instead, T = 1 for the ANN);
    aux (if `with_aux`) with
      'masks': {module: [T]}, 'work': {module: [T]} (the steps whose work some output depends on, see
      `dtvit.masks.work_masks`), 'spike_rates': {neuron: [T]}, 'input_rates': {layer: [T]},
      'attention_rates': {attn module: [T]} (the two spike operands of the attention products),
      'step_logits': [T, B, K], 'block_outputs': {block: [T*B, N, D]};
    and, if `train`, the updated 'batch_stats'. The return is (logits, aux[, batch_stats]).
  """
  mutable = (["aux"] if with_aux else []) + (["batch_stats"] if train else [])
  out = model.apply(variables, images, train=train, mask_temperature=mask_temperature, step_logits=step_logits,
                    mutable=mutable or False)
  logits, state = (out, {}) if not mutable else out
  result = (logits,)
  if with_aux:
    result += (collect_aux(state.get("aux", {})),)
  if train:
    result += (state["batch_stats"],)
  return result if len(result) > 1 else result[0]


def collect_aux(aux_tree) -> dict:
  """Flattens the 'aux' collection (see `paths.collect_aux`)."""
  return paths.collect_aux(aux_tree)


def time_step_scores(params) -> dict[str, jax.Array]:
  """Every mask unit's scores: {unit: [T]}."""
  return paths.scores(params)


def active_scores(model: SpikingViT, params) -> dict[str, jax.Array]:
  """The scores of the masks that are in use (e.g. the stem's only with mask_stem)."""
  scores = time_step_scores(params)
  if not model.mask.enabled:
    return {}
  return {k: scores[k] for k in paths.used_units(model, scores)}


def hard_masks(model: SpikingViT, params) -> dict[str, jax.Array]:
  """The binary masks the model uses at evaluation: {module: [T] in {0, 1}}. All ones when masks are off."""
  if not model.mask.enabled:
    return {k: jnp.ones((model.max_time_steps,), jnp.float32)
            for k in paths.used_units(model, time_step_scores(params))}
  return {k: masks_lib.hard_mask(v, monotone=model.mask.monotone) for k, v in active_scores(model, params).items()}


def step_counts(model: SpikingViT, params) -> dict[str, dict]:
  """Every mask unit's {'active_steps', 'simulated_steps', 'mask', 'work'} under the model's mask semantics
  (`dtvit.masks.step_counts` over `paths.mask_units`): the numbers the summary, energy report and inference
  schedule all use. Units are keyed like `hard_masks`."""
  masks = hard_masks(model, params)
  units = paths.mask_units(model)
  return masks_lib.step_counts(masks, {u: units[u] for u in masks}, model.mask.semantics)


def ann_to_snn(params, *, scale: float | Mapping[str, float] = 1.0):
  """Sets each neuron's threshold from the ANN twin's clip value: threshold = scale * clip.

  The two phases share one tree and the clip value is stored as the neuron's `threshold`, so the weights carry
  over unchanged. `scale` is one factor for all neurons or {neuron path ('blocks_0/attn/q_lif'): factor}
  (e.g. calibrated on pre-activations); neurons missing from the dict keep scale 1.

  Returns a new params tree (the input is not modified).
  """
  flat = flax.traverse_util.flatten_dict(params)
  if isinstance(scale, Mapping):
    known = {paths.neuron_of_param(p) for p in flat if paths.is_threshold(p)}
    unknown = sorted(set(scale) - known)
    if unknown:
      raise ValueError(f"ann_to_snn: no neuron at {unknown}; neuron paths look like {sorted(known)[:3]}.")
  new = {}
  for path, value in flat.items():
    if paths.is_threshold(path):
      s = scale.get(paths.neuron_of_param(path), 1.0) if isinstance(scale, Mapping) else scale
      if s <= 0:
        raise ValueError(f"ann_to_snn: threshold scale must be > 0, got {s} for {paths.neuron_of_param(path)}.")
      value = value * s
    new[path] = value
  return flax.traverse_util.unflatten_dict(new)


def with_mask(model: SpikingViT, **changes) -> SpikingViT:
  """The same model with mask settings changed, e.g. `with_mask(model, hard=True)` or `enabled=False`."""
  return model.clone(mask=dataclasses.replace(model.mask, **changes))
