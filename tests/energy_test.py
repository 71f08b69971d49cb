"""Energy accounting: op counts from the shapes, energy from the aux rates by hand, masked steps cost nothing,
MACs agree with XLA's cost analysis, bad aux is refused clearly."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import energy
from dtvit import masks as masks_lib
from dtvit import models

IMG = (16, 16, 3)
T = 3
K = 5  # classes


def tiny_vit(**kw):
  return models.vit("tiny", K, patch_size=4, max_time_steps=T, **kw)


def tiny_spikformer(**kw):
  return models.spikformer("tiny", K, max_time_steps=T, **kw)


def vit_hand_macs(heads=2, H=16, W=16, C=3, p=4, D=32, M=64):
  """Per sample per step, tiny ViT (depth 1, dim D, MLP width M = 2 D) on H x W x C images."""
  N = (H // p) * (W // p)        # tokens
  dh = D // heads                # head dim
  # The model multiplies in the cheaper order: (Q K^T) V when N <= dh, Q (K^T V) otherwise.
  first, att = ("kv", heads * N * dh * dh) if N > dh else ("qk", heads * N * N * dh)
  return {
      "embedding/patch": N * (p * p * C) * D,   # each token: a p x p x C patch -> D
      "blocks_0/attn/q": N * D * D,
      "blocks_0/attn/k": N * D * D,
      "blocks_0/attn/v": N * D * D,
      f"blocks_0/attn/{first}": att,           # per head: [N, dh] x [dh, N] or [dh, N] x [N, dh]
      "blocks_0/attn/qkv": att,                # per head: [N, N] x [N, dh] or [N, dh] x [dh, dh]
      "blocks_0/attn/proj": N * D * D,
      "blocks_0/mlp/fc1": N * D * M,
      "blocks_0/mlp/fc2": N * M * D,
      "head": D * K,                           # on the token mean
  }


def spikformer_hand_macs(H=16, W=16, C=3, D=32, heads=2, M=64):
  """Tiny Spikformer: SPS convs 3x3 SAME (C -> D/8 -> D/4 -> D/2 -> D), pools after conv2 and conv3."""
  c0, c1, c2, c3 = D // 8, D // 4, D // 2, D
  h3, w3 = H // 2, W // 2                 # conv3 runs after the first pool
  hr, wr = H // 4, W // 4                 # rpe after the second
  N, dh = hr * wr, D // heads
  assert N <= dh
  return {
      "embedding/conv0": H * W * c0 * 9 * C,       # outputs x (3 x 3 x Cin) taps
      "embedding/conv1": H * W * c1 * 9 * c0,
      "embedding/conv2": H * W * c2 * 9 * c1,
      "embedding/conv3": h3 * w3 * c3 * 9 * c2,
      "embedding/rpe": hr * wr * D * 9 * c3,
      "blocks_0/attn/q": N * D * D,
      "blocks_0/attn/k": N * D * D,
      "blocks_0/attn/v": N * D * D,
      "blocks_0/attn/qk": heads * N * N * dh,
      "blocks_0/attn/qkv": heads * N * N * dh,
      "blocks_0/attn/proj": N * D * D,
      "blocks_0/mlp/fc1": N * D * M,
      "blocks_0/mlp/fc2": N * M * D,
      "head": D * K,
  }


ANALOG = {"embedding/patch", "embedding/conv0"}


def kind_of(path):
  if path in ANALOG:
    return "analog"
  return "attention" if path.rsplit("/", 1)[-1] in ("qk", "kv", "qkv") else "synaptic"


def module_of(path, granularity, mask_stem=False):
  """The masked module gating each layer, written out from the model's structure."""
  if path in ANALOG or path == "head" or (path.startswith("embedding") and not mask_stem):
    return None
  if granularity == "module":
    return path.rsplit("/", 1)[0]
  if kind_of(path) == "attention":
    return "blocks_0/attn/attn_lif"
  return path + "_lif"


@pytest.mark.parametrize("heads", [2, 4])  # 16 tokens vs head dim 16 ((QK^T)V) and 8 (Q(K^TV))
@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_vit_op_counts_match_the_shapes(heads, granularity):
  model = tiny_vit(num_heads=heads, mask=models.MaskConfig(granularity=granularity))
  hand = vit_hand_macs(heads)
  counts = energy.op_counts(model, IMG)
  assert counts == {p: {"kind": kind_of(p), "macs": m, "module": module_of(p, granularity)}
                    for p, m in hand.items()}
  assert energy.ann_macs(model, IMG) == sum(hand.values())
  # The ANN twin records the same counts.
  assert energy.op_counts(model.clone(phase="ann"), IMG) == counts


@pytest.mark.parametrize("granularity,mask_stem", [("module", False), ("module", True), ("layer", True)])
def test_spikformer_op_counts_match_the_shapes(granularity, mask_stem):
  model = tiny_spikformer(mask=models.MaskConfig(granularity=granularity, mask_stem=mask_stem))
  hand = spikformer_hand_macs()
  expected = {p: {"kind": kind_of(p), "macs": m, "module": module_of(p, granularity, mask_stem)}
              for p, m in hand.items()}
  if granularity == "module" and mask_stem:
    for p in ("embedding/conv1", "embedding/conv2", "embedding/conv3", "embedding/rpe"):
      expected[p]["module"] = "embedding"
  assert energy.op_counts(model, IMG) == expected


def test_module_op_weights_sum_the_gated_layers():
  h = vit_hand_macs()
  attn = h["blocks_0/attn/q"] * 4 + h["blocks_0/attn/qk"] * 2
  assert energy.module_op_weights(tiny_vit(), IMG) == {"blocks_0/attn": attn,
                                                        "blocks_0/mlp": h["blocks_0/mlp/fc1"] * 2}
  # Granularity 'layer': each layer counts for the neuron it feeds; the attention products for attn_lif.
  # The stem's conv0 is analog (run once per image), so its neuron's mask saves no per-step MACs.
  model = tiny_spikformer(mask=models.MaskConfig(granularity="layer", mask_stem=True))
  s = spikformer_hand_macs()
  weights = energy.module_op_weights(model, IMG)
  assert weights == {
      "embedding/conv0_lif": 0, "embedding/conv1_lif": s["embedding/conv1"],
      "embedding/conv2_lif": s["embedding/conv2"], "embedding/conv3_lif": s["embedding/conv3"],
      "embedding/rpe_lif": s["embedding/rpe"],
      "blocks_0/attn/q_lif": s["blocks_0/attn/q"], "blocks_0/attn/k_lif": s["blocks_0/attn/k"],
      "blocks_0/attn/v_lif": s["blocks_0/attn/v"], "blocks_0/attn/proj_lif": s["blocks_0/attn/proj"],
      "blocks_0/attn/attn_lif": s["blocks_0/attn/qk"] + s["blocks_0/attn/qkv"],
      "blocks_0/mlp/fc1_lif": s["blocks_0/mlp/fc1"], "blocks_0/mlp/fc2_lif": s["blocks_0/mlp/fc2"]}
  # The keys are the score names, so the weights drive the op-weighted time-step cost directly.
  params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *IMG)), train=False), jax.random.key(0))["params"]
  scores = {k: jnp.ones(v.shape) for k, v in models.time_step_scores(params).items()}
  assert sorted(scores) == sorted(weights)
  assert np.isfinite(masks_lib.time_step_cost(scores, kind="op_weighted", op_weights=weights))


# ----------------------------------------------------------------------------------------------------------
# Energy from real aux rates.

_EVAL = {}


def run(model, params_fn=None):
  """The aux of an SNN evaluation of `model` on 2 random images, its params optionally edited by params_fn.

  One compiled evaluation per model: edited params are new values, not new shapes.
  """
  if model not in _EVAL:
    _EVAL[model] = (models.init(model, jax.random.key(0), IMG),
                    jax.jit(lambda v, x: models.apply_model(model, v, x)))
  variables, evaluate = _EVAL[model]
  if params_fn is not None:
    variables = {**variables, "params": params_fn(copy.deepcopy(variables["params"]))}
  images = 2.0 * jax.random.uniform(jax.random.key(1), (2, *IMG))
  return jax.tree.map(np.asarray, evaluate(variables, images)[1])


def hand_snn_energy(hand, aux, e_mac, e_ac):
  """E_SNN = e_mac * analog MACs + e_ac * sum_l MACs_l * sum_t rate_l[t], written out from aux."""
  att = aux["attention_rates"]["blocks_0/attn"]
  first = "blocks_0/attn/kv" if "blocks_0/attn/kv" in hand else "blocks_0/attn/qk"
  sops = 0.0
  for layer, macs in hand.items():
    if layer in ANALOG:
      continue
    if layer == first:
      rate_T = att[0]                       # first product: its first operand (K or Q)
    elif layer == "blocks_0/attn/qkv":
      rate_T = att[1]                       # second product
    else:
      rate_T = aux["input_rates"][layer]
    sops += macs * float(np.sum(np.asarray(rate_T, np.float64)))
  analog = sum(m for layer, m in hand.items() if layer in ANALOG)
  return e_mac * analog + e_ac * sops, sops


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit", "spikformer"])
def test_energy_matches_a_hand_computation(arch):
  model, hand = (tiny_vit(), vit_hand_macs()) if arch == "vit" else (tiny_spikformer(), spikformer_hand_macs())
  aux = run(model)
  rep = energy.energy_report(model, IMG, aux)
  e_snn, sops = hand_snn_energy(hand, aux, 4.6e-12, 0.9e-12)
  tot = rep["totals"]
  assert tot["ann_macs"] == sum(hand.values())
  np.testing.assert_allclose(tot["ann_energy_j"], 4.6e-12 * sum(hand.values()), rtol=1e-12)
  np.testing.assert_allclose(tot["sops"], sops, rtol=1e-9)
  np.testing.assert_allclose(tot["snn_energy_j"], e_snn, rtol=1e-9)
  np.testing.assert_allclose(tot["energy_ratio"], e_snn / (4.6e-12 * sum(hand.values())), rtol=1e-9)
  assert sops > 0 and 0 < tot["energy_ratio"] < 1
  # The analog layer costs its MACs once, whatever the steps.
  analog = next(p for p in hand if p in ANALOG)
  assert rep["layers"][analog]["energy_j"] == pytest.approx(4.6e-12 * hand[analog], rel=1e-12)
  # One row: ACs per step = MACs x that step's (masked) input rate.
  np.testing.assert_allclose(rep["layers"]["blocks_0/mlp/fc1"]["acs_per_step"],
                             hand["blocks_0/mlp/fc1"] * aux["input_rates"]["blocks_0/mlp/fc1"], rtol=1e-6)
  # Other constants pass straight through.
  e2, _ = hand_snn_energy(hand, aux, 2.0, 0.5)
  assert energy.energy_report(model, IMG, aux, e_mac=2.0, e_ac=0.5)["totals"]["snn_energy_j"] == pytest.approx(
      e2, rel=1e-9)
  # The per-module table partitions the SNN energy; all steps are open at init.
  assert sum(m["energy_j"] for m in rep["modules"].values()) == pytest.approx(tot["snn_energy_j"], rel=1e-9)
  assert rep["average_steps"] == rep["op_weighted_average_steps"] == T and rep["masks_binary"]
  assert json.loads(json.dumps(rep)) == rep


def _mask_steps(params):
  params["blocks_0"]["attn"]["time_mask"]["time_scores"] = jnp.array([1.0, -1.0, 1.0])
  params["blocks_0"]["mlp"]["time_mask"]["time_scores"] = jnp.array([-1.0, -1.0, 1.0])
  return params


def test_masked_steps_cost_nothing():
  model = tiny_vit()
  aux = run(model, _mask_steps)
  rep = energy.energy_report(model, IMG, aux)
  gated = {"blocks_0/attn": [1], "blocks_0/mlp": [0, 1]}
  for layer, row in rep["layers"].items():
    off = gated.get(row["module"], [])
    for t in off:
      assert row["acs_per_step"][t] == 0.0, (layer, t)
  # ... while the open steps still do work, and the analog stem is unaffected.
  assert rep["layers"]["blocks_0/attn/q"]["acs_per_step"][0] > 0
  assert rep["layers"]["blocks_0/mlp/fc1"]["acs_per_step"][2] > 0
  assert rep["modules"]["blocks_0/mlp"]["acs"] == pytest.approx(
      sum(rep["layers"][p]["acs_per_step"][2] for p in ("blocks_0/mlp/fc1", "blocks_0/mlp/fc2")))
  e_snn, _ = hand_snn_energy(vit_hand_macs(), aux, 4.6e-12, 0.9e-12)
  assert rep["totals"]["snn_energy_j"] == pytest.approx(e_snn, rel=1e-9)
  # Steps: attn 2, mlp 1; op-weighted by the MACs each mask gates.
  h = vit_hand_macs()
  w_attn, w_mlp = 4 * h["blocks_0/attn/q"] + 2 * h["blocks_0/attn/qk"], 2 * h["blocks_0/mlp/fc1"]
  assert rep["steps_per_module"] == {"blocks_0/attn": 2.0, "blocks_0/mlp": 1.0}
  assert rep["average_steps"] == pytest.approx(1.5)
  assert rep["op_weighted_average_steps"] == pytest.approx((2 * w_attn + 1 * w_mlp) / (w_attn + w_mlp))


@pytest.mark.slow
def test_layer_granularity_gates_only_the_fed_neurons_layer():
  model = tiny_vit(mask=models.MaskConfig(granularity="layer"))

  def close_attn_lif_step1(params):
    params["blocks_0"]["attn"]["attn_lif_mask"]["time_scores"] = jnp.array([1.0, -1.0, 1.0])
    return params

  rep = energy.energy_report(model, IMG, run(model, close_attn_lif_step1))
  for layer in ("blocks_0/attn/qk", "blocks_0/attn/qkv"):
    assert rep["layers"][layer]["module"] == "blocks_0/attn/attn_lif"
    assert rep["layers"][layer]["acs_per_step"][1] == 0.0
    assert rep["layers"][layer]["acs_per_step"][2] > 0.0
  # Q, K, V are gated by their own neurons' masks, still open.
  assert rep["layers"]["blocks_0/attn/q"]["acs_per_step"][1] > 0.0
  assert rep["steps_per_module"]["blocks_0/attn/attn_lif"] == 2.0


# ----------------------------------------------------------------------------------------------------------
# MACs vs XLA. XLA counts 2 flops per multiply-accumulate of a dot or convolution, plus the elementwise work
# (BN, clipped ReLU, residual adds, token mean), ~10 flops per activation. With wide layers (D = 128-256)
# a matmul output costs 2 x fan-in >= 256 flops, so the elementwise part is a few percent at most.


def xla_flops(model, shape, batch=2):
  variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False), jax.random.key(0))
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, jax.ShapeDtypeStruct((batch, *shape), jnp.float32)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / batch


def test_ann_macs_agree_with_xla_vit():
  # Patch conv is VALID (no padding), 16 tokens of width 256: almost all flops are matmuls.
  model = models.vit("tiny", 10, patch_size=4, dim=256, num_heads=2, phase="ann")
  flops = xla_flops(model, (16, 16, 3))
  assert flops == pytest.approx(2 * energy.ann_macs(model, (16, 16, 3)), rel=0.05)


def test_ann_macs_agree_with_xla_spikformer():
  # SAME 3x3 convs: our dense count includes the taps that fall on the zero padding, XLA's does not. Count
  # them by hand (per channel pair, an H x W map has 9 H W taps, (3 H - 2)(3 W - 2) of them inside) and
  # compare the rest. No pools, so every conv runs at 32 x 32 and the border is a small share.
  model = models.spikformer("tiny", 10, dim=128, num_heads=2, stem_pools=(False,) * 4, phase="ann")
  chans = [3, 16, 32, 64, 128, 128]  # conv0..conv3, rpe: Cin -> Cout pairs
  padded = (9 * 32 * 32 - 94 * 94) * sum(a * b for a, b in zip(chans[:-1], chans[1:]))
  macs = energy.ann_macs(model, (32, 32, 3))
  assert xla_flops(model, (32, 32, 3)) == pytest.approx(2 * (macs - padded), rel=0.05)
  assert padded / macs < 0.05  # the convention's padding overcount stays small here too


# ----------------------------------------------------------------------------------------------------------
# Bad input.


def fake_aux():
  """A well-formed aux for tiny_vit(), built by hand (no model run)."""
  r = np.array([0.1, 0.2, 0.3])
  layers = ["blocks_0/attn/q", "blocks_0/attn/k", "blocks_0/attn/v", "blocks_0/attn/proj", "blocks_0/mlp/fc1",
            "blocks_0/mlp/fc2", "head"]
  return {"input_rates": {p: r for p in layers}, "attention_rates": {"blocks_0/attn": (r, 0.5 * r)},
          "masks": {"blocks_0/attn": np.ones(3), "blocks_0/mlp": np.ones(3)}}


def test_fake_aux_report_is_hand_computable():
  h = vit_hand_macs()
  rep = energy.energy_report(tiny_vit(), IMG, fake_aux())
  synaptic = sum(m for p, m in h.items() if kind_of(p) == "synaptic")
  sops = 0.6 * synaptic + 0.6 * h["blocks_0/attn/qk"] + 0.3 * h["blocks_0/attn/qkv"]
  assert rep["totals"]["sops"] == pytest.approx(sops)
  assert rep["totals"]["snn_energy_j"] == pytest.approx(4.6e-12 * h["embedding/patch"] + 0.9e-12 * sops)


@pytest.mark.parametrize("edit,match", [
    (lambda a: a["input_rates"].update({"blocks_0/attn/nope": np.zeros(3)}), r"Unknown input rates.*nope"),
    (lambda a: a["input_rates"].pop("blocks_0/mlp/fc1"), r"Missing input rates.*blocks_0/mlp/fc1"),
    (lambda a: a["input_rates"].clear(), r"Missing input rates.*SNN evaluation"),  # e.g. an ANN-phase aux
    (lambda a: a["attention_rates"].clear(), r"Missing attention rates.*blocks_0/attn"),
    (lambda a: a["attention_rates"].update({"blocks_9/attn": (np.zeros(3),) * 2}), r"Unknown attention rates"),
    (lambda a: a["attention_rates"].update({"blocks_0/attn": (np.zeros(3),)}), r"must hold 2 rates"),
    (lambda a: a["input_rates"].update({"head": np.zeros(4)}), r"head.*shape \(4,\).*expected \(3,\)"),
    (lambda a: a["input_rates"].update({"head": -np.ones(3)}), r"head.*>= 0"),
    (lambda a: a["masks"].pop("blocks_0/mlp"), r"Missing masks.*blocks_0/mlp"),
    (lambda a: a.pop("input_rates"), r"no 'input_rates'"),
])
def test_bad_aux_is_a_clear_error(edit, match):
  aux = fake_aux()
  edit(aux)
  with pytest.raises(ValueError, match=match):
    energy.energy_report(tiny_vit(), IMG, aux)


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="image_shape"):
    energy.op_counts(tiny_vit(), (16, 16))
  with pytest.raises(ValueError, match="e_ac"):
    energy.energy_report(tiny_vit(), IMG, fake_aux(), e_ac=-1.0)
  with pytest.raises(ValueError, match="not divisible"):
    energy.op_counts(tiny_vit(), (18, 18, 3))


# ----------------------------------------------------------------------------------------------------------
# Energy of a per-sample early exit.


def _counted_exit_energy(hand, aux, masks, exits, semantics, mask_stem, e_mac=4.6e-12, e_ac=0.9e-12):
  """An independent counter, sample by sample, layer by layer, step by step: the analog layer once; a layer of a
  masked module at the steps before the sample's exit where the module works when the run stops there ('skip':
  the module is active at the step; 'filter': it is active at that step or a later one before the exit); a layer
  of no mask (unmasked stem, head) at every step before the exit. Its rate at a step is aux's."""
  att = aux["attention_rates"]["blocks_0/attn"]
  first = "blocks_0/attn/kv" if "blocks_0/attn/kv" in hand else "blocks_0/attn/qk"
  total = 0.0
  for e in exits:
    joules = 0.0
    for layer, macs in hand.items():
      if layer in ANALOG:
        joules += e_mac * macs
        continue
      rate = att[0] if layer == first else att[1] if layer == "blocks_0/attn/qkv" else aux["input_rates"][layer]
      module = module_of(layer, "module", mask_stem)
      for t in range(e):
        if module is None:
          works = True
        elif semantics == "skip":
          works = masks[module][t] == 1
        else:
          works = any(masks[module][s] == 1 for s in range(t, e))
        if works:
          joules += e_ac * macs * float(rate[t])
    total += joules
  return total / len(exits)


@pytest.mark.parametrize("semantics,mask_stem", [("skip", False), ("filter", True)])
def test_per_exit_energy_against_an_independent_counter(semantics, mask_stem):
  steps = 4
  model = models.vit("tiny", K, patch_size=4, max_time_steps=steps, neuron=models.NeuronConfig(init_threshold=0.5),
                     mask=models.MaskConfig(semantics=semantics, mask_stem=mask_stem, hard=True))
  masks = {"blocks_0/attn": [1, 0, 1, 0], "blocks_0/mlp": [0, 1, 0, 1], "embedding": [1, 1, 0, 1]}

  def set_scores(params):
    for name, m in masks.items():
      if name != "embedding" or mask_stem:
        node = params
        for part in name.split("/"):
          node = node[part]
        node["time_mask"]["time_scores"] = jnp.asarray([1.0 if v else -1.0 for v in m])
    return params

  aux = run(model, set_scores)
  hand = vit_hand_macs()
  rep = energy.energy_report(model, IMG, aux)
  by_exit = energy.energy_by_exit(model, IMG, aux)
  # No exit: exactly the energy report.
  assert by_exit["snn_energy_j"][-1] == rep["totals"]["snn_energy_j"]
  assert by_exit["sops"][-1] == rep["totals"]["sops"]
  assert energy.mean_exit_energy(by_exit["snn_energy_j"], [steps] * 5) == rep["totals"]["snn_energy_j"]
  # A batch with known exit steps, against the counter.
  exits = [1, 4, 2, 2, 3, 4, 1]
  got = energy.mean_exit_energy(by_exit["snn_energy_j"], exits)
  assert got == pytest.approx(_counted_exit_energy(hand, aux, masks, exits, semantics, mask_stem), rel=1e-9)
  for e in range(1, steps + 1):
    assert by_exit["snn_energy_j"][e - 1] == pytest.approx(
        _counted_exit_energy(hand, aux, masks, [e], semantics, mask_stem), rel=1e-9)
  # Under 'filter' the mlp's step 0 (masked) integrates for its step 1, so an exit after step 1 does not pay it.
  assert np.all(np.diff(by_exit["snn_energy_j"]) > 0)
  assert by_exit["snn_energy_j"][0] > 4.6e-12 * hand["embedding/patch"]
  # Padding does not count; the early-exit rows carry the same energy.
  assert energy.mean_exit_energy(by_exit["snn_energy_j"], exits + [1], weights_B=[1] * 7 + [0]) == pytest.approx(got)
  from dtvit import inference
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(steps, 40, K)) * 2
  thresholds = [0.3, 0.6, 0.9, 1.0]
  steps_RB, _ = inference.exit_steps(logits, thresholds, "confidence")
  rows = inference.early_exit_eval(logits, rng.integers(0, K, 40), thresholds, energy_T=by_exit["snn_energy_j"])
  for row, s in zip(rows, steps_RB):
    assert len(set(s.tolist())) > 1 or row["threshold"] == 1.0
    assert row["avg_energy_j"] == pytest.approx(
        _counted_exit_energy(hand, aux, masks, s.tolist(), semantics, mask_stem), rel=1e-9)
  assert rows[-1]["avg_energy_j"] == pytest.approx(rep["totals"]["snn_energy_j"], rel=1e-12)
