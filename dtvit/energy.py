"""Energy accounting for the spiking ViTs: dense op counts, synaptic operations (SOPs), ANN vs SNN energy.

Everything here is plain numpy / jnp on numbers the model reports; the only model hooks are the static op
counts of its counted layers (their `op_counts`, collected by a Flax method interceptor while the model is
traced with `jax.eval_shape`, so nothing is computed) and the 'aux' side outputs of an SNN evaluation
(`models.apply_model`).

Op counts (`op_counts`). For each layer that does synaptic work, 'macs' is the dense multiply-accumulate count
for ONE sample at ONE time step, as the layer records it:
  Dense  [N, Din] -> [N, Dout]:          N * Din * Dout                  (the head: Din * K, no token axis)
  Conv   kxk, Cin -> Cout, output HxW:   H * W * Cout * k * k * Cin      (padded taps counted: the dense count)
  attention product, H heads, N tokens, head dim dh (the model picks the cheaper association order):
    N > dh:  K^T V ('.../kv') and Q (K^T V) ('.../qkv'):  H * N * dh * dh each
    N <= dh: Q K^T ('.../qk') and (Q K^T) V ('.../qkv'):  H * N * N * dh each
BatchNorm (foldable into the weights at inference), neuron updates, pooling and residual additions are not
counted: the convention counts synaptic operations only.
'kind' is 'analog' for the layer that sees the pixels (direct encoding), 'synaptic' for layers fed by spikes
(or by sums of spikes: the residual stream), 'attention' for products of two spike tensors.
'module' is the masked module whose time-step mask gates the layer's work at each step:
  granularity 'module': the block's 'blocks_i/attn' or 'blocks_i/mlp' (the stem's 'embedding' with mask_stem);
  granularity 'layer':  the neuron the layer feeds, layer 'x' -> 'x_lif'; attention products -> '.../attn_lif';
  None for layers no mask gates: the head, the unmasked stem, and always the analog layer (it runs once per
  image, so no per-step mask can save its work).

Energy (`energy_report`), per sample, with e_mac = 4.6 pJ and e_ac = 0.9 pJ by default (45 nm, 32-bit float,
Horowitz ISSCC 2014):
  ANN twin:  E_ANN = e_mac * sum_l macs_l                      (one pass; `ann_macs`)
  SNN:       E_SNN = e_mac * sum_{l analog} macs_l               (computed once, not per step)
                   + e_ac  * SOPs
             SOPs  = sum_{l not analog} macs_l * sum_t rate_l[t]
where rate_l[t] is the mean input event count per input element of layer l at step t, averaged over the
evaluated batch, ALREADY multiplied by the work mask of the unit the layer feeds (`dtvit.masks.work_masks`: 1 at
the steps whose work some output depends on, under the model's `mask.semantics`; a step whose work nothing
depends on contributes zero, every other step its real input):
  synaptic layer l:  aux['input_rates'][l]
  attention product: macs x the rate of its spike operand. aux['attention_rates'][m] = (rate_1, rate_2) are the
    two operand rates the model reports for attention module m, in the order of its two products: the first
    product ('kv' or 'qk') uses rate_1 (its first operand: K for K^T V, Q for Q K^T), the second ('qkv') uses
    rate_2 (Q for Q (K^T V); for (Q K^T) V, whose left operand is an integer count matrix, the model reports
    K's rate and that is what is used). The products' rates are gated by the attention neuron's work mask
    times the masks of Q, K and V: a product with a masked operand is 0, so nothing depends on computing it.
Rates above 1 happen (the residual stream carries sums of spikes): an input of value n counts n events. The
head's input is the token mean of the residual stream (fractional), counted the same way.
A 'conv' event feeds k*k*Cout outputs in this count (exact away from the padded border).
`tests/energy_test.py` checks these SOPs against an independent counter that reads every layer's actual input
at every step whose removal would change the logits.

Time steps (`dtvit.masks.step_counts`, the same function the summary and the inference schedule use): per mask
unit, 'active_steps' = sum_t mask[t] (the steps it emits at) and 'simulated_steps' = sum_t work[t] (the steps
whose work any output depends on: under 'skip' its active steps; under 'filter' every step up to its last
active one). T_avg ('average_steps') is the mean of active steps over the masked units, the paper's convention;
'average_simulated_steps' the mean of simulated steps. The op-weighted forms weight unit l by
w_l = `module_op_weights` (the per-step dense MACs its mask gates); the same weights serve the 'op_weighted'
time-step cost. An unmasked stem is not in these averages; it is listed in 'stem' with its own steps (T_max).

The report is a dict of python floats / ints / lists / str / None: `json.dump` it as it is. Energy is linear in
the rates, so over a data set average the aux rates (weighted by batch size) and report once.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dtvit import masks as masks_lib
from dtvit.models import paths

E_MAC = 4.6e-12  # J per 32-bit float multiply-accumulate, 45 nm (Horowitz, ISSCC 2014)
E_AC = 0.9e-12   # J per 32-bit float accumulate
KINDS = ("analog", "synaptic", "attention")
UNMASKED = "<unmasked>"  # the per-module table's row for layers no mask gates (analog layer, head, ...)


def op_counts(model, image_shape) -> dict[str, dict[str, Any]]:
  """Dense op counts of every synaptic layer, per sample per step, from one abstract trace of the model.

  Args:
    model: a `SpikingViT` (either phase: the counts are the same).
    image_shape: (H, W, C) of one image.
  Returns:
    {layer path: {'kind': 'analog' | 'synaptic' | 'attention', 'macs': int, 'module': str | None}}, in the
    order the layers run. See the module docstring for the formulas and the 'module' convention. Trace once
    and pass the result as `counts=` to `module_op_weights` and `energy_report`.
  """
  image_shape = tuple(int(d) for d in image_shape)
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (height, width, channels), got {image_shape}.")
  model.validate()
  rec: dict = {}

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and hasattr(context.module, "op_counts"):
      rec.update(context.module.op_counts(args, out))
    return out

  with nn.intercept_methods(count):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  if not rec:
    raise ValueError("Tracing the model recorded no op counts: is it a dtvit SpikingViT?")
  bad = {k: v["kind"] for k, v in rec.items() if v["kind"] not in KINDS}
  if bad:
    raise ValueError(f"Unknown op kinds {bad}; expected one of {KINDS}.")
  units = sorted(paths.mask_units(model))
  return {path: dict(r, module=paths.gating_unit(path, r["kind"], units, model.mask.granularity))
          for path, r in rec.items()}


def module_op_weights(model, image_shape=None, *, counts=None) -> dict[str, int]:
  """{masked unit: sum of the per-step dense MACs of the layers its mask gates}, from `counts` (`op_counts`)
  or a new trace for `image_shape`.

  Every masked unit of the model is listed, including those that gate no per-step work (weight 0, e.g. the
  ViT patch stem's neuron with mask_stem: its only layer is the analog one). The keys are those of
  `models.time_step_scores`, so the dict goes straight to `masks.time_step_cost(kind='op_weighted')`.
  """
  counts = op_counts(model, image_shape) if counts is None else counts
  return _module_weights(counts, sorted(paths.mask_units(model)))


def _module_weights(counts, masked) -> dict[str, int]:
  weights = {m: 0 for m in masked}
  for c in counts.values():
    if c["module"] is not None:
      weights[c["module"]] += c["macs"]
  return weights


def ann_macs(model, image_shape) -> int:
  """Total dense MACs of one ANN-twin forward pass of one sample."""
  return sum(c["macs"] for c in op_counts(model, image_shape).values())


def _rate(value, name: str, num_steps: int) -> np.ndarray:
  if value is None:
    raise ValueError(f"Missing rate for {name}.")
  r = np.asarray(value, dtype=np.float64)
  if r.shape != (num_steps,):
    raise ValueError(f"Rate of {name} has shape {r.shape}; expected ({num_steps},) (one per time step, T_max = "
                     f"{num_steps}). Pass the aux of an SNN evaluation of this model.")
  if not np.all(np.isfinite(r)) or np.any(r < 0):
    raise ValueError(f"Rate of {name} must be finite and >= 0, got {r.tolist()}.")
  return r


def _check_keys(what: str, given, expected, hint: str) -> None:
  unknown = sorted(set(given) - set(expected))
  if unknown:
    raise ValueError(f"Unknown {what} in aux: {unknown}; this model has {sorted(expected)}. "
                     "Was aux produced by another model or image size?")
  missing = sorted(set(expected) - set(given))
  if missing:
    raise ValueError(f"Missing {what} in aux for {missing}. {hint}")


def _traced(model, image_shape, aux, e_mac, e_ac, counts):
  """What both energy accountings start from: (T_max, op counts, the masked modules (sorted), `_layer_rates`,
  `_unit_steps`), after checking the inputs."""
  _check_inputs(aux, e_mac, e_ac)
  T = int(model.max_time_steps)
  counts = op_counts(model, image_shape) if counts is None else counts
  masked = sorted(paths.mask_units(model))
  return T, counts, masked, _layer_rates(counts, aux, T), _unit_steps(model, masked, aux)


def energy_report(model, image_shape, aux: Mapping[str, Any], *, counts=None, e_mac: float = E_MAC,
                  e_ac: float = E_AC) -> dict[str, Any]:
  """ANN-twin vs SNN energy per sample, SOPs, per-layer and per-module tables, average time steps.

  Args:
    model: the `SpikingViT` that produced `aux` (its T_max, mask granularity and stem masking matter).
    image_shape: (H, W, C) of one image.
    aux: the aux of an SNN evaluation, `models.apply_model(model, variables, images)[1]` (or any mapping with
      'input_rates' {layer: [T]}, 'attention_rates' {attn module: ([T], [T])} and 'masks' {module: [T]}).
      Evaluate with hard masks (`models.with_mask(model, hard=True)`) for binary masks.
    counts: the model's `op_counts` when already traced (else traced here).
    e_mac, e_ac: joules per MAC and per AC.
  Returns:
    A JSON-able dict (joules per sample; see the module docstring for every formula):
      'constants': {'e_mac_j', 'e_ac_j'}; 'num_steps'; 'image_shape';
      'totals': {'ann_macs', 'snn_analog_macs', 'sops', 'ann_energy_j', 'snn_energy_j', 'energy_ratio'};
      'layers': {layer: {'kind', 'module', 'macs', 'rate_source', 'input_rate_per_step', 'mean_input_rate',
                         'acs_per_step', 'acs', 'energy_j'}};
      'modules': {module or '<unmasked>': {'macs' (per-step dense MACs of its non-analog layers, for a masked
                  module = its `module_op_weights` entry), 'analog_macs', 'steps', 'mask', 'acs', 'energy_j',
                  'layers'}};
      'mask_semantics'; 'steps_per_module' (active), 'simulated_steps_per_module', 'average_steps' (T_avg,
      active), 'average_simulated_steps', 'op_weighted_average_steps', 'op_weighted_average_simulated_steps',
      'stem' (an unmasked stem's own steps, or None), 'masks_binary'.
  """
  T, counts, masked, (rates, sources), (mask_T, per_unit) = _traced(model, image_shape, aux, e_mac, e_ac, counts)
  table = _layer_table(counts, rates, sources, e_mac, e_ac)
  weights = _module_weights(counts, masked)
  t_avg, t_op = _averages(per_unit, "active_steps", weights, T)
  t_sim, t_sim_op = _averages(per_unit, "simulated_steps", weights, T)
  ann_total = sum(row["macs"] for row in table.values())
  snn_analog = sum(row["macs"] for row in table.values() if row["kind"] == "analog")
  sops = sum(row["acs"] for row in table.values())
  ann_energy = float(e_mac * ann_total)
  snn_energy = float(e_mac * snn_analog + e_ac * sops)
  return {
      "constants": {"e_mac_j": float(e_mac), "e_ac_j": float(e_ac)},
      "num_steps": T,
      "image_shape": [int(d) for d in image_shape],
      "totals": {"ann_macs": int(ann_total), "snn_analog_macs": int(snn_analog), "sops": float(sops),
                 "ann_energy_j": ann_energy, "snn_energy_j": snn_energy,
                 "energy_ratio": snn_energy / ann_energy if ann_energy > 0 else None},
      "layers": table,
      "modules": _module_table(table, masked, mask_T, per_unit),
      "mask_semantics": model.mask.semantics,
      "steps_per_module": {m: per_unit[m]["active_steps"] for m in masked},
      "simulated_steps_per_module": {m: per_unit[m]["simulated_steps"] for m in masked},
      "average_steps": t_avg,
      "average_simulated_steps": t_sim,
      "op_weighted_average_steps": t_op,
      "op_weighted_average_simulated_steps": t_sim_op,
      "stem": None if model.mask.mask_stem else {"active_steps": float(T), "simulated_steps": float(T)},
      "masks_binary": bool(all(np.all((v == 0) | (v == 1)) for v in mask_T.values())),
  }


_HINT = ("The SNN records them at every synaptic layer: pass the aux of an SNN evaluation (phase='snn') of this "
         "model, with_aux=True.")


def _check_inputs(aux, e_mac, e_ac) -> None:
  for name, e in (("e_mac", e_mac), ("e_ac", e_ac)):
    if not (isinstance(e, (int, float)) and math.isfinite(e) and e >= 0):
      raise ValueError(f"{name} must be a finite number >= 0 (joules), got {e!r}.")
  if not isinstance(aux, Mapping):
    raise ValueError(f"aux must be the dict returned by models.apply_model, got {type(aux).__name__}.")
  for key in ("input_rates", "attention_rates"):
    if not isinstance(aux.get(key), Mapping):
      raise ValueError(f"aux has no {key!r} dict; pass the aux of an SNN evaluation (models.apply_model).")


def _layer_rates(counts, aux, T: int) -> tuple[dict, dict]:
  """({layer: input rate [T]}, {layer: where in aux it came from}) for every non-analog layer."""
  rate_layers = [p for p, c in counts.items() if c["kind"] == "synaptic"]
  attn_layers: dict[str, list[str]] = {}
  for p, c in counts.items():
    if c["kind"] == "attention":
      attn_layers.setdefault(paths.attention_module(p), []).append(p)
  _check_keys("input rates (layers)", aux["input_rates"], rate_layers, _HINT)
  _check_keys("attention rates (attention modules)", aux["attention_rates"], attn_layers, _HINT)
  rates, sources = {}, {}
  for p in rate_layers:
    rates[p], sources[p] = _rate(aux["input_rates"][p], f"layer {p!r}", T), f"input_rates[{p!r}]"
  for m, products in attn_layers.items():
    pair = aux["attention_rates"][m]
    if not isinstance(pair, (tuple, list)) or len(pair) != len(products):
      raise ValueError(f"attention_rates[{m!r}] must hold {len(products)} rates (one per attention product "
                       f"{products}), got {pair!r}.")
    for i, p in enumerate(products):
      rates[p] = _rate(pair[i], f"attention product {p!r} (attention_rates[{m!r}][{i}])", T)
      sources[p] = f"attention_rates[{m!r}][{i}]"
  return rates, sources


def _unit_steps(model, masked, aux) -> tuple[dict, dict]:
  """({unit: mask [T]}, `masks.step_counts` of the units), checking aux's work masks against the accounting."""
  T = int(model.max_time_steps)
  given_masks = aux.get("masks") or {}
  if model.mask.enabled:
    _check_keys("masks (masked modules)", given_masks, masked, _HINT)
    mask_T = {m: _rate(given_masks[m], f"mask of {m!r}", T) for m in masked}
  else:  # with masks disabled the model sows none and every step is active
    if given_masks:
      raise ValueError(f"aux has masks {sorted(given_masks)} but the model's masks are disabled.")
    mask_T = {m: np.ones(T) for m in masked}
  units = paths.mask_units(model)
  per_unit = masks_lib.step_counts({m: jnp.asarray(v) for m, v in mask_T.items()}, {m: units[m] for m in masked},
                                   model.mask.semantics)
  given_work = aux.get("work") or {}
  if model.mask.enabled and given_work:
    # The model gated its rates by the work masks it computed; they must be the accounting's.
    _check_keys("work masks (masked modules)", given_work, masked, _HINT)
    for m in masked:
      if [int(v) for v in np.asarray(given_work[m]) > 0] != per_unit[m]["work"]:
        raise ValueError(f"aux's work mask of {m!r} {np.asarray(given_work[m]).tolist()} is not the accounting's "
                         f"{per_unit[m]['work']} for mask {per_unit[m]['mask']} under "
                         f"{model.mask.semantics!r}: was aux produced with other mask semantics?")
  return mask_T, per_unit


def _layer_table(counts, rates, sources, e_mac, e_ac) -> dict:
  table = {}
  for p, c in counts.items():
    macs = c["macs"]
    row = {"kind": c["kind"], "module": c["module"], "macs": macs}
    if c["kind"] == "analog":
      row.update(rate_source=None, input_rate_per_step=None, mean_input_rate=None, acs_per_step=None,
                 acs=0.0, energy_j=float(e_mac * macs))
    else:
      acs_T = macs * rates[p]
      acs = float(np.sum(acs_T))
      row.update(rate_source=sources[p], input_rate_per_step=[float(r) for r in rates[p]],
                 mean_input_rate=float(np.mean(rates[p])), acs_per_step=[float(a) for a in acs_T], acs=acs,
                 energy_j=float(e_ac * acs))
    table[p] = row
  return table


def _module_table(table, masked, mask_T, per_unit) -> dict:
  modules = {m: {"macs": 0, "analog_macs": 0, "steps": per_unit[m]["active_steps"],
                 "simulated_steps": per_unit[m]["simulated_steps"],
                 "mask": [float(v) for v in mask_T[m]], "work": per_unit[m]["work"], "acs": 0.0,
                 "energy_j": 0.0, "layers": []} for m in masked}
  modules[UNMASKED] = {"macs": 0, "analog_macs": 0, "steps": None, "simulated_steps": None, "mask": None,
                       "work": None, "acs": 0.0, "energy_j": 0.0, "layers": []}
  for p, row in table.items():
    group = modules[UNMASKED if row["module"] is None else row["module"]]
    group["analog_macs" if row["kind"] == "analog" else "macs"] += row["macs"]
    group["acs"] += row["acs"]
    group["energy_j"] += row["energy_j"]
    group["layers"].append(p)
  return modules


def _averages(per_unit, key: str, weights: Mapping[str, int], T: int) -> tuple[float, float | None]:
  """(mean over units, op-weighted mean) of per-unit step counts (`masks.average_steps`); (T, T) without
  masked units."""
  if not per_unit:
    return float(T), float(T)
  return masks_lib.average_steps(per_unit, key), masks_lib.average_steps(per_unit, key, weights)


def energy_by_exit(model, image_shape, aux: Mapping[str, Any], *, counts=None, e_mac: float = E_MAC,
                   e_ac: float = E_AC) -> dict[str, Any]:
  """SNN energy per sample when the sample stops after step e, for e = 1..T_max (per-sample early exit).

  Counted from the same per-step rates as `energy_report` (aux of a dense evaluation with hard masks), layer by
  layer, over the steps before the exit only:
    analog layer:   e_mac * macs, once per image (it runs before the first step);
    a layer a mask gates: its rate at the steps t < e where its unit works when the run is cut after step e
      (`masks.work_masks` on the masks cut to their first e steps, under the model's `mask.semantics`): under
      'skip' its active steps up to the exit; under 'filter' every step up to min(exit, its last active step);
    a layer no mask gates (an unmasked stem, the head): its rate at every step t < e.
  The rates already carry the uncut work masks (a cut one is 1 only where the uncut one is), so the cut
  accounting is rate[t] * cut_work[t]. At e = T_max every cut is the full run and the result equals
  `energy_report`'s 'snn_energy_j' and 'sops' exactly (the same products, summed in the same order).
  The rates are means over the evaluated images: a sample's energy is counted at the mean rates of the steps
  it ran, not at its own spike counts.

  Returns {'exit_step': [1..T], 'snn_energy_j': [T], 'sops': [T], 'ann_energy_j', 'snn_analog_macs'} (python
  floats / ints; index e - 1 for an exit after step e).
  """
  T, counts, masked, (rates, _), (mask_T, _) = _traced(model, image_shape, aux, e_mac, e_ac, counts)
  units = paths.mask_units(model)
  analog = sum(c["macs"] for c in counts.values() if c["kind"] == "analog")
  energies, sops_e = [], []
  for e in range(1, T + 1):
    cut = masks_lib.work_masks({m: jnp.asarray(mask_T[m][:e]) for m in masked}, {m: units[m] for m in masked},
                               model.mask.semantics) if masked else {}
    acs = []
    for p, c in counts.items():
      if c["kind"] == "analog":
        acs.append(0.0)
        continue
      gate_T = np.zeros(T)
      gate_T[:e] = 1.0 if c["module"] is None else np.asarray(cut[c["module"]], np.float64)
      acs.append(float(np.sum(c["macs"] * (rates[p] * gate_T))))
    sops = sum(acs)
    sops_e.append(float(sops))
    energies.append(float(e_mac * analog + e_ac * sops))
  return {"exit_step": list(range(1, T + 1)), "snn_energy_j": energies, "sops": sops_e,
          "ann_energy_j": float(e_mac * sum(c["macs"] for c in counts.values())), "snn_analog_macs": int(analog)}


def mean_exit_energy(energy_by_exit_T, exit_steps_B, weights_B=None) -> float:
  """The mean per-sample energy of samples that stop after `exit_steps_B` (1-based), from `energy_by_exit`'s
  'snn_energy_j' [T]; `weights_B` 1 for real samples, 0 for padding."""
  e_T = np.asarray(energy_by_exit_T, np.float64)
  steps_B = np.asarray(exit_steps_B).reshape(-1)
  w_B = np.ones(steps_B.shape) if weights_B is None else np.asarray(weights_B, np.float64).reshape(-1)
  return float(np.sum(e_T[steps_B - 1] * w_B) / np.sum(w_B))
