"""Skipped-step inference equals the dense masked evaluation and does less work; per-sample early exit."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import energy
from dtvit import inference
from dtvit import models

IMG = (16, 16, 3)
T = 4
# A lower threshold than the default so that every neuron of a random-init model fires: the equalities below
# then involve real spike trains, not all-zero outputs.
NEURON = models.NeuronConfig(init_threshold=0.5)


def tiny(arch="vit", **mask):
  kw = dict(max_time_steps=T, neuron=NEURON, mask=models.MaskConfig(**mask))
  if arch == "spikformer":
    return models.spikformer("tiny", 5, **kw)
  return models.vit("tiny", 5, patch_size=4, **kw)


def images(n=3, seed=1):
  return 2.0 * jax.random.normal(jax.random.key(seed), (n, *IMG))


@pytest.fixture(scope="module")
def vit_vars():
  return models.init(tiny(mask_stem=True), jax.random.key(0), IMG)


@pytest.fixture(scope="module")
def vit_layer_vars():
  return models.init(tiny(granularity="layer", mask_stem=True), jax.random.key(0), IMG)


def with_scores(variables, scores):
  """variables with the time scores of the named masks ({mask owner, as in models.hard_masks: [T]}) set."""
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  for name, s in scores.items():
    key = next(k for k in (f"{name}/time_mask/time_scores", f"{name}_mask/time_scores") if k in flat)
    flat[key] = jnp.asarray(s, jnp.float32)
  return {**variables, "params": flax.traverse_util.unflatten_dict(flat, sep="/")}


def random_scores(variables, seed):
  names = sorted(models.time_step_scores(variables["params"]))
  keys = jax.random.split(jax.random.key(seed), len(names))
  # Biased towards open steps so that monotone masks (cumulative products) are not mostly closed.
  return {n: jax.random.normal(k, (T,)) + 0.5 for n, k in zip(names, keys)}


def dense_fn(model):
  return jax.jit(lambda v, x: inference.dense_masked_eval(model, v, x))


def assert_skipped_equals_dense(model, variables, x, dense=None):
  dense = (dense or dense_fn(model))(variables, x)
  fn, schedule = inference.make_inference_fn(model, variables)
  skipped = fn(x)
  np.testing.assert_allclose(skipped, dense, rtol=1e-6, atol=1e-7)
  assert float(jnp.max(jnp.abs(dense))) > 1e-3  # not a vacuous all-zero comparison
  return schedule


# A fully-masked block module, a non-monotone pattern, a half-masked stem.
HAND = {"blocks_0/attn": [1.0, -1.0, 2.0, -1.0], "blocks_0/mlp": [-1.0, -2.0, -1.0, -1.0],
        "embedding": [1.0, 1.0, -1.0, -1.0]}


def expected_steps(mask, semantics):
  """The steps a module with this (module-granularity) mask runs: its active steps under 'skip', every step up
  to its last active one under 'filter'."""
  active = np.flatnonzero(np.asarray(mask))
  if semantics == "skip":
    return tuple(int(t) for t in active)
  return tuple(range(int(active[-1]) + 1)) if active.size else ()


@pytest.mark.parametrize("semantics", ["skip", "filter"])
@pytest.mark.parametrize("mode,monotone,seed", [("ste", False, 3), ("ste", True, 4), ("sigmoid", False, 5),
                                                ("sigmoid", True, 6)])
@pytest.mark.slow
def test_skipped_steps_give_the_dense_masked_logits(vit_vars, mode, monotone, seed, semantics):
  model = tiny(mode=mode, monotone=monotone, mask_stem=True, semantics=semantics)
  x = images()
  dense = dense_fn(model)
  for scores in (random_scores(vit_vars, seed), HAND):
    v = with_scores(vit_vars, scores)
    schedule = assert_skipped_equals_dense(model, v, x, dense)
    masks = models.hard_masks(model, v["params"])
    for name, m in masks.items():
      assert schedule[name] == expected_steps(m, semantics)
  # The hand pattern: the mlp is not run; the stem runs steps 0-1; the attn step 0 (monotone), or steps 0 and 2
  # ('skip': its masked step 1 is not run) or 0-2 ('filter': step 1 integrates for step 2).
  attn = (0,) if monotone else ((0, 2) if semantics == "skip" else (0, 1, 2))
  assert schedule == {"blocks_0/attn": attn, "blocks_0/mlp": (), "embedding": (0, 1)}
  if mode == "ste" and not monotone:
    # The equality is not vacuous: a schedule that cuts the attn's active step 2 shows in the logits.
    wrong = inference.scheduled_model(model, {**schedule, "blocks_0/attn": (0,)})
    cut = jax.jit(lambda v, x: models.apply_model(wrong, v, x, with_aux=False))(v, x)
    assert float(jnp.max(jnp.abs(cut - dense(v, x)))) > 1e-4
    if semantics == "filter":  # and under 'filter' the masked step 1 is needed: leaving it out shows too
      wrong = inference.scheduled_model(model, {**schedule, "blocks_0/attn": (0, 2)})
      cut = jax.jit(lambda v, x: models.apply_model(wrong, v, x, with_aux=False))(v, x)
      assert float(jnp.max(jnp.abs(cut - dense(v, x)))) > 1e-4


@pytest.mark.parametrize("semantics,expected", [
    # 'skip': fc1 is never active when fc2 works, so only fc2's step 1 runs.
    ("skip", {"blocks_0/attn": (0,), "blocks_0/mlp": (1,), "embedding": (0, 1, 2)}),
    # 'filter': fc2 integrates from step 0, where fc1's spike matters.
    ("filter", {"blocks_0/attn": (0,), "blocks_0/mlp": (0, 1), "embedding": (0, 1, 2)})])
def test_layer_granularity_schedules_modules_by_their_working_neurons(vit_layer_vars, semantics, expected):
  model = tiny(granularity="layer", mask_stem=True, semantics=semantics)
  x = images()
  scores = {f"blocks_0/attn/{n}": [1.0, 1.0, 1.0, 1.0] for n in ("q_lif", "k_lif", "v_lif", "attn_lif")}
  scores["blocks_0/attn/proj_lif"] = [1.0, -1.0, -1.0, -1.0]  # the attn's output: active at step 0 only
  scores["blocks_0/mlp/fc2_lif"] = [-1.0, 1.0, -1.0, -1.0]
  scores["blocks_0/mlp/fc1_lif"] = [1.0, -1.0, 1.0, 1.0]
  scores["embedding/patch_lif"] = [1.0, 1.0, 1.0, -1.0]
  v = with_scores(vit_layer_vars, scores)
  schedule = assert_skipped_equals_dense(model, v, x)
  assert schedule == expected


@pytest.mark.slow
@pytest.mark.parametrize("semantics", ["skip", "filter"])
def test_spikformer_sps_stem_and_blocks_skip_exactly(semantics):
  model = tiny("spikformer", mask_stem=True, semantics=semantics)
  variables = models.init(model, jax.random.key(0), IMG)
  v = with_scores(variables, {"embedding": [-1.0, 1.0, 1.0, -1.0], "blocks_0/attn": [1.0, -1.0, 1.0, -1.0],
                              "blocks_0/mlp": [1.0, 1.0, -1.0, -1.0]})
  attn, emb = ((0, 2), (1, 2)) if semantics == "skip" else ((0, 1, 2), (0, 1, 2))
  assert assert_skipped_equals_dense(model, v, images()) == {"embedding": emb, "blocks_0/attn": attn,
                                                             "blocks_0/mlp": (0, 1)}


def _dot_shapes(fn, *args):
  out = []

  def walk(jaxpr, times):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        out.append(eqn.invars[0].aval.shape)
      t = times * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
      for sub in inference._sub_jaxprs(eqn.params):
        walk(sub, t)

  walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
  return out


def test_skipped_module_steps_do_no_matmul_work(vit_vars):
  model = tiny(mask_stem=True)
  x = images(n=2)

  def traced(schedule):
    m = inference.scheduled_model(model, schedule)
    f = lambda v, x: models.apply_model(m, v, x, with_aux=False)
    return inference.matmul_flops(f, vit_vars, x), _dot_shapes(f, vit_vars, x)

  full = {"blocks_0/attn": T, "blocks_0/mlp": T, "embedding": T}
  f_dense, dots_dense = traced(full)
  dense_model = models.with_mask(model, hard=True)
  assert f_dense == inference.matmul_flops(lambda v, x: models.apply_model(dense_model, v, x, with_aux=False),
                                           vit_vars, x)
  # A fully-masked module is not run: its q, k, v, proj Dense layers and 2 attention products disappear.
  f_no_attn, dots_no_attn = traced({**full, "blocks_0/attn": 0})
  assert len(dots_dense) - len(dots_no_attn) == 6
  f_no_mlp, dots_no_mlp = traced({**full, "blocks_0/mlp": 0})
  assert len(dots_dense) - len(dots_no_mlp) == 2
  work = {"blocks_0/attn": f_dense - f_no_attn, "blocks_0/mlp": f_dense - f_no_mlp}
  assert min(work.values()) > 0
  # A module running T_run of T steps does T_run / T of its work: its matmuls see T_run * B rows.
  for sched in ({"blocks_0/attn": 1, "blocks_0/mlp": 3}, {"blocks_0/attn": 2, "blocks_0/mlp": 2},
                {"blocks_0/attn": 3, "blocks_0/mlp": 0}):
    f, dots = traced({**full, **sched})
    assert f == f_dense - sum(work[k] * (T - r) // T for k, r in sched.items())
    n_tokens = (IMG[0] // 4) * (IMG[1] // 4)
    # Dense layers on [rows, N, D], or [rows * N, D] where the fused kernels fold the leading axes.
    rows = ({s[0] for s in dots if len(s) == 3 and s[1] == n_tokens}
            | {s[0] // n_tokens for s in dots if len(s) == 2 and s[0] % n_tokens == 0})
    assert rows == {r * 2 for r in sched.values() if r}, (rows, sched)
  # Steps anywhere ('skip' schedules leading and interior gaps): the same work as that many leading steps.
  for sched in ({"blocks_0/attn": (1, 3), "blocks_0/mlp": (2,)}, {"blocks_0/attn": (0, 2, 3), "blocks_0/mlp": (3,)}):
    f, dots = traced({**full, **sched})
    assert f == f_dense - sum(work[k] * (T - len(r)) // T for k, r in sched.items())


def test_schedule_is_static_and_validated(vit_vars):
  model = tiny(mask_stem=True)
  with pytest.raises(ValueError, match="hard masks"):
    model.clone(schedule=(("blocks_0/attn", 2),)).validate()
  with pytest.raises(ValueError, match="unknown or unmasked"):
    inference.scheduled_model(model, {"blocks_7/attn": 2})
  with pytest.raises(ValueError, match="unknown or unmasked"):  # an unmasked stem runs every step
    inference.scheduled_model(tiny(), {"embedding": 2})
  with pytest.raises(ValueError, match=r"integer in \[0, 4\]"):
    inference.scheduled_model(model, {"blocks_0/attn": -1})
  with pytest.raises(ValueError, match=r"sorted tuple of distinct step indices in \[0, 4\)"):
    inference.scheduled_model(model, {"blocks_0/attn": (2, 1)})
  with pytest.raises(ValueError, match=r"sorted tuple of distinct step indices in \[0, 4\)"):
    inference.scheduled_model(model, {"blocks_0/attn": (0, 4)})
  with pytest.raises(ValueError, match="phase='snn'"):
    inference.scheduled_model(tiny().clone(phase="ann"), {"blocks_0/attn": 2})
  with pytest.raises(ValueError, match="disabled"):
    inference.scheduled_model(tiny(enabled=False), {"blocks_0/attn": 2})
  # Masks off: every module runs all T steps, nothing is skipped.
  off = tiny(enabled=False)
  assert inference.make_schedule(off, vit_vars["params"]) == {"blocks_0/attn": tuple(range(T)),
                                                              "blocks_0/mlp": tuple(range(T))}
  assert inference.scheduled_model(off, {"blocks_0/attn": T}).schedule == ()


# ----------------------------------------------------------------------------------------------------------
# Early exit.


def test_early_exit_semantics_on_hand_made_logits():
  # Sample 0: accumulated [0, 0] -> [2, 0] (p = 0.88) -> [-2, 0]; sample 1: always class 1, very confident.
  step_logits = jnp.array([[[0.0, 0.0], [0.0, 9.0]], [[4.0, 0.0], [0.0, 9.0]], [[-10.0, 0.0], [0.0, 9.0]]])
  labels = np.array([1, 1])
  rows = inference.early_exit_eval(step_logits, labels, [0.8, 0.9, 1.0])
  steps, preds = inference.exit_steps(step_logits, [0.8, 0.9, 1.0])
  np.testing.assert_array_equal(steps, [[2, 1], [3, 1], [3, 3]])
  np.testing.assert_array_equal(preds, [[0, 1], [1, 1], [1, 1]])  # exiting early can change the answer
  assert [r["accuracy"] for r in rows] == [0.5, 1.0, 1.0]
  assert [r["avg_steps"] for r in rows] == [1.5, 2.0, 3.0]
  # Entropy: sample 1's normalised entropy is ~1e-3 from step 1, sample 0's is 1 (uniform) at step 1.
  steps, _ = inference.exit_steps(step_logits, [0.0, 0.05, 1.0], "entropy")
  np.testing.assert_array_equal(steps, [[3, 3], [3, 1], [2, 1]])
  # With masks: the paper's T_avg counted up to each sample's exit.
  masks = {"a": np.array([1.0, 0.0, 0.0]), "b": np.array([1.0, 1.0, 1.0])}
  row = inference.early_exit_eval(step_logits, labels, [0.8], masks=masks)[0]
  assert row["avg_module_steps"] == pytest.approx(((1 + 2) / 2 + (1 + 1) / 2) / 2)


def test_early_exit_thresholds_trade_steps_for_accuracy():
  rng = np.random.default_rng(0)
  step_logits = jnp.asarray(rng.normal(size=(T, 256, 10)) * 3.0, jnp.float32)
  labels = rng.integers(0, 10, 256)
  full_pred = np.argmax(np.asarray(jnp.mean(step_logits, axis=0)), -1)
  for criterion, thresholds in (("confidence", [1.0, 0.9, 0.7, 0.5, 0.0]), ("entropy", [0.0, 0.3, 0.6, 0.9, 1.0])):
    rows = inference.early_exit_eval(step_logits, labels, thresholds, criterion)
    assert rows[0]["avg_steps"] == T
    assert rows[0]["accuracy"] == pytest.approx(np.mean(full_pred == labels))
    avg = [r["avg_steps"] for r in rows]
    assert all(a >= b for a, b in zip(avg, avg[1:])) and avg[-2] < T
    assert avg[-1] == 1.0  # everything exits at the first step
    _, preds = inference.exit_steps(step_logits, thresholds, criterion)
    np.testing.assert_array_equal(preds[0], full_pred)


@pytest.mark.slow
def test_early_exit_over_batches_matches_full_evaluation(vit_vars):
  model = tiny(mask_stem=True)
  v = with_scores(vit_vars, HAND)
  x = images(n=6, seed=7)
  logits, aux = jax.jit(lambda v, x: models.apply_model(models.with_mask(model, hard=True), v, x))(v, x)
  labels = np.array(jnp.argmax(logits, -1))
  labels[:2] = (labels[:2] + 1) % 5  # some wrong answers
  # Two batches, the second padded with 2 fake examples that must not count.
  pad = jnp.zeros((2, *IMG))
  batches = [{"image": x[:4], "label": labels[:4], "mask": np.ones(4)},
             {"image": jnp.concatenate([x[4:], pad]), "label": np.concatenate([labels[4:], [0, 0]]),
              "mask": np.array([1.0, 1.0, 0.0, 0.0])}]
  thresholds = [1.0, 0.5, 0.0]
  rows = inference.early_exit_over_batches(model, v, batches, thresholds)
  assert rows[0]["accuracy"] == pytest.approx(4 / 6) and rows[0]["avg_steps"] == T
  masks = models.hard_masks(model, v["params"])
  ref = inference.early_exit_eval(aux["step_logits"], labels, thresholds, masks=masks)
  for r, e in zip(rows, ref):
    chex.assert_trees_all_close({k: v for k, v in r.items() if k not in ("avg_simulated_steps", "avg_energy_j")},
                                e, rtol=1e-6)
  # Without exits the energy is the energy report's, from the rates of the full batch (as `evaluate` averages).
  hard = models.with_mask(model, hard=True)
  full_aux = jax.device_get(jax.jit(lambda v, x: models.apply_model(hard, v, x))(v, x[:4])[1])
  assert rows[0]["avg_energy_j"] == pytest.approx(
      energy.energy_report(hard, IMG, full_aux)["totals"]["snn_energy_j"], rel=1e-12)
  assert rows[2]["avg_steps"] == 1 and rows[2]["avg_energy_j"] < rows[1]["avg_energy_j"] <= rows[0]["avg_energy_j"]
  skipped = inference.early_exit_over_batches(model, v, batches, thresholds, skip_steps=True)
  chex.assert_trees_all_close(skipped, rows, rtol=1e-6)
  # At full evaluation avg_module_steps is the paper's T_avg of the hard masks, avg_simulated_steps the mean of
  # the simulated steps the accounting reports.
  assert rows[0]["avg_module_steps"] == pytest.approx(float(np.mean([np.sum(m) for m in masks.values()])))
  counts = models.step_counts(model, v["params"])
  assert rows[0]["avg_simulated_steps"] == pytest.approx(np.mean([c["simulated_steps"] for c in counts.values()]))


def test_early_exit_rejects_bad_input():
  x = jnp.zeros((T, 2, 3))
  with pytest.raises(ValueError, match="Unknown early-exit criterion"):
    inference.early_exit_eval(x, [0, 1], [0.5], "margin")
  for bad in ([1.5], [-0.1], [float("nan")], []):
    with pytest.raises(ValueError, match="threshold"):
      inference.early_exit_eval(x, [0, 1], bad)
  with pytest.raises(ValueError, match=r"\[T, B, K\]"):
    inference.early_exit_eval(jnp.zeros((2, 3)), [0, 1], [0.5])
  with pytest.raises(ValueError, match="labels"):
    inference.early_exit_eval(x, [0, 1, 2], [0.5])
  with pytest.raises(ValueError, match="2 classes"):
    inference.early_exit_eval(jnp.zeros((T, 2, 1)), [0, 0], [0.5], "entropy")


def test_simulated_steps_up_to_the_exit_follow_the_semantics():
  masks = {"blocks_0/attn": jnp.array([0.0, 1.0, 0.0, 1.0]), "blocks_0/mlp": jnp.array([1.0, 0.0, 0.0, 0.0])}
  # 'filter': a module cut after step t simulates up to its last active step within the first t.
  np.testing.assert_allclose(inference.simulated_steps_by_exit(tiny(semantics="filter"), masks),
                             [0.5, 1.5, 1.5, 2.5])
  # 'skip': its active steps within the first t.
  np.testing.assert_allclose(inference.simulated_steps_by_exit(tiny(semantics="skip"), masks), [0.5, 1.0, 1.0, 1.5])
  rows = inference.early_exit_eval(jnp.zeros((T, 2, 3)), np.array([0, 1]), [1.0], masks=masks)
  assert rows[0]["avg_module_steps"] == 1.5 and "avg_simulated_steps" not in rows[0]
  stats = inference.early_exit_stats(jnp.zeros((T, 2, 3)), np.array([0, 1]), [1.0], masks=masks,
                                     simulated_T=[0.5, 1.5, 1.5, 2.5])
  assert stats["simulated_steps"][0] == 2 * 2.5  # both samples run all T steps
