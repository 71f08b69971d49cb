"""The step counts and the energy equal the work the model does, under both mask semantics.

For every synaptic layer, attention product and masked neuron, and every step, the accounting
(`masks.work_masks`, through `models.step_counts`) says whether that step's work is needed. These tests check it
against the model itself, not against the accounting's own formulas:
- removal: every (layer, step) counted as free can have its input zeroed without changing the logits (or, in
  training mode, the batch-norm statistics) bitwise;
- dependence: every counted (layer, step) that sees input events moves the logits (non-zero gradient with respect
  to that input);
- SOPs: `energy.energy_report` equals an independent event counter that reads each layer's actual input at
  every step the logits depend on (found by gradient, not by the accounting) and multiplies by its fan-out;
- under 'skip', changing a module's input only at its masked steps changes nothing downstream;
- batch-norm statistics cover the working steps only.
Masks: leading, trailing, interior zeros, all zero, all one, random; granularity module and layer; train and eval.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import energy
from dtvit import models
from dtvit.models import blocks, layers

T = 4
K = 5
PATTERNS = {"leading": [0, 0, 1, 1], "trailing": [1, 1, 0, 0], "interior": [1, 0, 0, 1], "zero": [0, 0, 0, 0],
            "one": [1, 1, 1, 1], "sparse": [0, 1, 0, 1]}
# Low thresholds so that a random-init model fires everywhere; a surrogate that is never exactly 0, so that a
# zero gradient means "does not depend".
NEURON = models.NeuronConfig(init_threshold=0.3, attn_threshold=0.3, surrogate="sigmoid")


def build(arch, semantics, granularity):
  mask = models.MaskConfig(semantics=semantics, granularity=granularity, hard=True)
  if arch == "spikformer":
    return models.spikformer("tiny", K, max_time_steps=T, neuron=NEURON, mask=mask), (16, 16, 3)
  return models.vit("tiny", K, patch_size=4, max_time_steps=T, neuron=NEURON, mask=mask), (8, 8, 3)


@functools.lru_cache(maxsize=None)
def variables_of(arch, granularity):
  model, img = build(arch, "skip", granularity)
  v = models.init(model, jax.random.key(0), img)
  # Non-trivial running statistics and batch-norm scales, so that eval mode is not the identity.
  flat = flax.traverse_util.flatten_dict(v, sep="/")
  rng = np.random.default_rng(0)
  for k in list(flat):
    if k.endswith("/mean"):
      flat[k] = jnp.asarray(rng.normal(0, 0.2, flat[k].shape), jnp.float32)
    elif k.endswith("/var"):
      flat[k] = jnp.asarray(rng.uniform(0.5, 1.5, flat[k].shape), jnp.float32)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def with_masks(variables, masks):
  """Sets the scores so that the hard masks are `masks` ({unit: [T] 0/1})."""
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  for unit, m in masks.items():
    key = next(k for k in (f"{unit}/time_mask/time_scores", f"{unit}_mask/time_scores") if k in flat)
    flat[key] = jnp.asarray(np.where(np.asarray(m) > 0, 1.0, -1.0), jnp.float32)
  return {**variables, "params": flax.traverse_util.unflatten_dict(flat, sep="/")}


def mask_sets(model, variables, seed):
  """Mask assignments {unit: pattern} that together give every unit every pattern, plus random ones."""
  units = sorted(models.hard_masks(model, variables["params"]))
  names = list(PATTERNS)
  out = [{u: PATTERNS[names[(i + j) % len(names)]] for j, u in enumerate(units)} for i in range(len(names))]
  rng = np.random.default_rng(seed)
  out += [{u: list(rng.integers(0, 2, T)) for u in units} for _ in range(2)]
  return out


def images(img, n=2):
  return 1.5 * jax.random.normal(jax.random.key(7), (n, *img)) + 0.3


# ----------------------------------------------------------------------------------------------------------
# Probing layer inputs: zero one (site, step), or add a differentiable probe to every site.


def _site(context):
  """(site name, kind) of an intercepted call, or None. Sites: synaptic Dense/Conv layers (their input) and
  neurons of masked units (their input current: for the attention neuron, the attention products' result)."""
  mod = context.module
  if context.method_name != "__call__":
    return None
  path = "/".join(mod.scope.path)
  if isinstance(mod, (layers.Dense, layers.Conv)) and mod.kind != "analog":
    return path, "layer"
  if isinstance(mod, layers.Neuron) and not path.startswith("embedding"):
    return path, "neuron"
  return None


def _is_static(context, args, kwargs):
  return isinstance(context.module, layers.Neuron) and kwargs.get("static", False)


def apply(model, variables, x, *, train, edit=None):
  """logits (and batch stats in training) with `edit(site, x) -> x` applied to every site's input."""
  def interceptor(next_fun, args, kwargs, context):
    site = _site(context)
    if edit is not None and site is not None and not _is_static(context, args, kwargs):
      args = (edit(site[0], args[0]),) + tuple(args[1:])
    y = next_fun(*args, **kwargs)
    if edit is not None and site is not None and site[0].rpartition("/")[2] in ("q_lif", "k_lif", "v_lif"):
      y = edit(site[0] + ":out", y)  # the attention products' spike operands
    return y

  with nn.intercept_methods(interceptor):
    out = models.apply_model(model, variables, x, train=train, with_aux=False)
  return out if train else (out, None)


def site_shapes(model, variables, x):
  shapes = {}

  def record(site, v):
    shapes[site] = v.shape
    return v

  jax.eval_shape(lambda v: apply(model, v, x, train=False, edit=record), variables)
  return shapes


def zeroed_at(x_rows, step):
  b = x_rows.shape[0] // T
  keep = (jnp.arange(x_rows.shape[0]) // b != step).reshape((-1,) + (1,) * (x_rows.ndim - 1))
  return jnp.where(keep, x_rows, jnp.zeros((), x_rows.dtype))


def unit_of(model, site):
  """The mask unit whose work mask gates a site (a layer feeds its neuron '<layer>_lif')."""
  site = site.partition(":")[0]
  neuron = site if site.endswith("_lif") else site + "_lif"
  if model.mask.granularity == "layer":
    return neuron
  return neuron.rpartition("/")[0]


def free_steps(model, params):
  """{site: [steps whose work is free]} from the accounting, for the sites inside masked modules."""
  counts = models.step_counts(model, params)
  return counts, lambda site: [t for t in range(T) if counts[unit_of(model, site)]["work"][t] == 0]


# ----------------------------------------------------------------------------------------------------------


# Both semantics at both granularities (the Spikformer, with its SPS stem and N <= dh attention order, at module
# granularity; the ViT, with the N > dh order, at layer granularity, where the neuron graph matters most).
CASES = [(arch, sem, gran) for arch, gran in (("spikformer", "module"), ("vit", "layer"))
         for sem in ("skip", "filter")]


def compiled(fn, *args):
  """fn jit-compiled for these arguments without XLA's backend optimisations: the tests compare outputs of one
  compiled program with each other, and this halves their compile time on CPU."""
  lowered = jax.jit(fn).lower(*args)
  try:
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
  except Exception:  # a backend without that option
    return lowered.compile()


@pytest.mark.slow
@pytest.mark.parametrize("arch,semantics,granularity", CASES)
def test_every_step_counted_free_can_be_removed_without_changing_anything(arch, semantics, granularity):
  model, img = build(arch, semantics, granularity)
  base = variables_of(arch, granularity)
  x = images(img)
  sites = [s for s in site_shapes(model, base, x) if not s.startswith("embedding") and s != "head"]
  names = {s: i for i, s in enumerate(sites)}

  def make(train):
    def run(v, which, step):
      edit = lambda site, rows: (jnp.where(which == names[site], zeroed_at(rows, step), rows) if site in names
                                 else rows)
      return apply(model, v, x, train=train, edit=edit)
    return compiled(run, base, jnp.int32(0), jnp.int32(0))

  runs = {train: make(train) for train in (False, True)}
  run = lambda v, which, step, train: runs[train](v, jnp.int32(which), jnp.int32(step))

  removed = kept = 0
  for masks in mask_sets(model, base, seed=len(sites)):
    v = with_masks(base, masks)
    _, free = free_steps(model, v["params"])
    for train in (False, True):
      ref_logits, ref_stats = run(v, -1, 0, train)
      for site in sites:
        for t in free(site):
          logits, stats = run(v, names[site], t, train)
          np.testing.assert_array_equal(logits, ref_logits, err_msg=f"{site} step {t} ({masks}, train={train})")
          if train:
            jax.tree_util.tree_map(np.testing.assert_array_equal, stats, ref_stats)
          removed += 1
        kept += T - len(free(site))
  assert removed > 50 and kept > 50  # both kinds occur


@pytest.mark.slow
@pytest.mark.parametrize("arch,semantics,granularity", CASES)
def test_sops_equal_an_independent_event_counter(arch, semantics, granularity):
  model, img = build(arch, semantics, granularity)
  base = variables_of(arch, granularity)
  x = images(img)
  shapes = site_shapes(model, base, x)
  cot = jax.random.normal(jax.random.key(3), (x.shape[0], K))

  def dependence_and_inputs(v):
    """Per site: |d logits / d input| summed per step [T] (the logits depend on that step's input iff > 0),
    and the inputs themselves."""
    seen = {}

    def loss(probes):
      def edit(site, rows):
        seen[site] = rows
        return rows + probes[site]
      logits, _ = apply(model, v, x, train=False, edit=edit)
      return jnp.sum(logits * cot), {k: jax.lax.stop_gradient(r) for k, r in seen.items()}

    probes = {s: jnp.zeros(shp, jnp.float32) for s, shp in shapes.items()}
    grads, inputs = jax.grad(loss, has_aux=True)(probes)
    dep = {s: jnp.sum(jnp.abs(g.reshape(T, -1)), axis=1) for s, g in grads.items()}
    return dep, inputs

  dependence_and_inputs = compiled(dependence_and_inputs, base)
  report_aux = compiled(lambda v: models.apply_model(model, v, x)[1], base)

  for masks in mask_sets(model, base, seed=3):
    v = with_masks(base, masks)
    dep, inputs = dependence_and_inputs(v)
    dep = {s: np.asarray(d) > 0 for s, d in dep.items()}
    counts, free = free_steps(model, v["params"])
    # The counter: events (input values; a residual-stream input of n counts n) per sample at each step the
    # logits depend on, times each event's fan-out.
    sops = 0.0
    for site, rows in inputs.items():
      ev_T = np.asarray(rows, np.float64).reshape(T, x.shape[0], -1).sum(axis=(1, 2)) / x.shape[0]
      if site.endswith("_lif") or site.endswith(":out"):  # neurons: no synaptic work (products: below)
        continue
      fan = _fan_out(model, site)
      sops += float(np.sum(ev_T * fan * dep[site]))
      # And the two directions of the accounting itself, per (site, step).
      if not site.startswith("embedding") and site != "head":
        for t in range(T):
          counted = t not in free(site)
          if not counted:
            assert not dep[site][t], f"{site} step {t} counted free but the logits depend on it ({masks})"
          elif ev_T[t] > 0:
            assert dep[site][t], f"{site} step {t} counted but nothing depends on it ({masks})"
    sops += _attention_sops(model, inputs, dep, x.shape[0])
    rep = energy.energy_report(model, x.shape[1:], report_aux(v))
    assert rep["totals"]["sops"] == pytest.approx(sops, rel=1e-5), masks
    assert rep["totals"]["sops"] > 0
    # The steps the report prints are the accounting's.
    for unit, c in counts.items():
      assert rep["modules"][unit]["simulated_steps"] == c["simulated_steps"]
      assert rep["modules"][unit]["steps"] == c["active_steps"]


def _fan_out(model, site):
  """Outputs each input event of a synaptic layer feeds."""
  arch = "spikformer" if model.stem == "sps" else "vit"
  params = flax.traverse_util.flatten_dict(variables_of(arch, model.mask.granularity)["params"], sep="/")
  kernel = params[f"{site}/kernel"]
  if kernel.ndim == 2:   # Dense [Din, Dout]
    return kernel.shape[1]
  kh, kw, _, cout = kernel.shape  # Conv 3x3 SAME, stride 1: each event feeds kh * kw * Cout outputs
  return kh * kw * cout


def _attention_sops(model, inputs, dep, B):
  """The attention products' ACs from their actual spike operands (the q, k, v neuron outputs), each at the
  steps the logits depend on that operand (through the product it is the event side of)."""
  total = 0.0
  for i in range(model.depth):
    mod = f"blocks_{i}/attn"
    spikes = {n: np.asarray(inputs[f"{mod}/{n}_lif:out"], np.float64) for n in "qkv"}
    N, D = spikes["q"].shape[-2], spikes["q"].shape[-1]
    dh = D // model.num_heads
    events = lambda n: spikes[n].reshape(T, -1).sum(axis=1) / B * dep[f"{mod}/{n}_lif:out"]
    if N > dh:   # K^T V: each K spike meets dh V entries; Q (K^T V): each Q spike meets dh entries
      total += float(np.sum(events("k") * dh + events("q") * dh))
    else:        # Q K^T: each Q spike meets N keys; (Q K^T) V: each V spike meets N query rows
      total += float(np.sum(events("q") * N + events("v") * N))
  return total


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_skip_a_masked_step_input_changes_nothing_downstream_and_filter_does(granularity):
  x = images((8, 8, 3))
  base = variables_of("vit", granularity)
  changed = {}
  for semantics in ("skip", "filter"):
    model, _ = build("vit", semantics, granularity)
    units = sorted(models.hard_masks(model, base["params"]))
    masks = {u: PATTERNS["interior"] if "attn" in u else PATTERNS["leading"] for u in units}
    v = with_masks(base, masks)

    def run(perturb, train):
      outputs = {}

      def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, (blocks.SpikingSelfAttention, blocks.SpikingMLP)) and context.method_name == "__call__":
          path = "/".join(mod.scope.path)
          # The module's masked steps: 1 and 2 for the attn (interior), 0 and 1 for the mlp (leading).
          masked = (1, 2) if path.endswith("attn") else (0, 1)
          rows = args[0]
          b = rows.shape[0] // T
          step = jnp.arange(rows.shape[0]) // b
          hit = jnp.isin(step, jnp.asarray(masked)).reshape(-1, 1, 1)
          if perturb:
            rows = jnp.where(hit, rows + 3.0 * jax.random.normal(jax.random.key(5), rows.shape), rows)
          y = next_fun(rows, *args[1:], **kwargs)
          outputs[path] = y
          return y
        return next_fun(*args, **kwargs)

      with nn.intercept_methods(interceptor):
        out = models.apply_model(model, v, x, train=train, with_aux=False)
      return out, outputs

    for train in (False, True):
      (ref, ref_out), (got, got_out) = run(False, train), run(True, train)
      same = jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                           (ref, ref_out), (got, got_out)))
      changed[(semantics, train)] = not same
  assert not changed[("skip", False)] and not changed[("skip", True)]
  # Under 'filter' the masked steps before an active one integrate: the same change shows (the test can fail).
  assert changed[("filter", False)] and changed[("filter", True)]


def test_batch_norm_statistics_cover_the_working_steps_only():
  for semantics, expected_rows in (("skip", [2, 3]), ("filter", [0, 1, 2, 3]), ("skip", [])):
    model, img = build("vit", semantics, "module")
    base = variables_of("vit", "module")
    units = sorted(models.hard_masks(model, base["params"]))
    pattern = [0, 0, 1, 1] if expected_rows else [0, 0, 0, 0]
    v = with_masks(base, {u: pattern for u in units})
    x = images(img)
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, layers.BatchNorm) and "/".join(context.module.scope.path) == "blocks_0/mlp/fc1_bn":
        seen["x"] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      _, stats = models.apply_model(model, v, x, train=True, with_aux=False)
    rows = np.asarray(seen["x"]).reshape(T, x.shape[0], -1, seen["x"].shape[-1])
    old = v["batch_stats"]["blocks_0"]["mlp"]["fc1_bn"]
    new = stats["blocks_0"]["mlp"]["fc1_bn"]
    if not expected_rows:  # a module that never works leaves its running statistics as they were
      jax.tree_util.tree_map(np.testing.assert_array_equal, new, old)
      continue
    feats = rows[expected_rows].reshape(-1, rows.shape[-1])
    np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * feats.mean(axis=0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * np.asarray(old["var"]) + 0.1 * feats.var(axis=0), rtol=1e-4,
                               atol=1e-5)


def test_step_counts_follow_the_semantics_and_the_model_sows_the_same_work_masks():
  for semantics in ("skip", "filter"):
    model, img = build("vit", semantics, "module")
    base = variables_of("vit", "module")
    v = with_masks(base, {"blocks_0/attn": [0, 1, 0, 1], "blocks_0/mlp": [0, 0, 1, 0]})
    counts = models.step_counts(model, v["params"])
    sim = {"skip": (2.0, 1.0), "filter": (4.0, 3.0)}[semantics]
    assert counts["blocks_0/attn"]["active_steps"] == 2.0 and counts["blocks_0/mlp"]["active_steps"] == 1.0
    assert (counts["blocks_0/attn"]["simulated_steps"], counts["blocks_0/mlp"]["simulated_steps"]) == sim
    aux = models.apply_model(model, v, images(img))[1]
    for unit, c in counts.items():
      assert [int(w) for w in np.asarray(aux["work"][unit])] == c["work"]
    # An energy report fed work masks of the other semantics refuses them.
    other = "filter" if semantics == "skip" else "skip"
    wrong = models.apply_model(models.with_mask(model, semantics=other), v, images(img))[1]
    with pytest.raises(ValueError, match="not the accounting's"):
      energy.energy_report(model, img, {**aux, "work": wrong["work"]})


def test_the_old_accounting_is_caught():
  """The bug this file guards against: under 'filter' a leading masked step's layer input is real work. Were
  it counted free (work = mask), the removal test would see the logits move."""
  model, img = build("vit", "filter", "module")
  base = variables_of("vit", "module")
  v = with_masks(base, {"blocks_0/attn": [0, 0, 1, 1], "blocks_0/mlp": [1, 1, 1, 1]})
  x = images(img)
  ref, _ = apply(model, v, x, train=False)
  edited, _ = apply(model, v, x, train=False,
                    edit=lambda s, r: zeroed_at(r, 0) if s == "blocks_0/attn/q" else r)
  assert float(jnp.max(jnp.abs(edited - ref))) > 0
  assert models.step_counts(model, v["params"])["blocks_0/attn"]["work"] == [1, 1, 1, 1]
