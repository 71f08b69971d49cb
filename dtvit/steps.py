"""The loss, the train step and the eval step: pure functions of (state, batch), jitted by `dtvit.train`.

A train state is a dict {'params', 'batch_stats', 'opt_state', 'step'}; a batch a dict of global arrays
{'image' [B, H, W, C], 'label' [B], 'target' [B, K]} (eval: 'image', 'label', 'mask' [B], 1 for real examples).
`make_diagnosis` builds (and jits once) the re-run of a train step that went non-finite, which says where it
first did; `diagnose_nonfinite` is the one-off call.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dtvit import compilation
from dtvit import losses
from dtvit import masks as masks_lib
from dtvit import models
from dtvit.models import paths

# (step, batch) -> batch, applied inside the jitted step (e.g. mixup / cutmix on device). `step` is the traced
# int32 step counter, so the function draws its keys from (seed, step) and a resumed run augments as the
# uninterrupted one did.
AugmentFn = Callable[[jax.Array, dict], dict]


def temperature_at(pc, step, train_steps):
  """The mask temperature at `step`: geometric from `temperature_start` to `temperature_end` over the phase."""
  frac = jnp.clip(step / max(train_steps, 1), 0.0, 1.0)
  return pc.temperature_start * (pc.temperature_end / pc.temperature_start) ** frac


def loss_option(pc) -> str:
  """The phase's `loss` ('final' | 'every_step'); 'final' for configs older than the key."""
  return pc.get("loss", "final")


def distill_weight(pc) -> float:
  """The phase's `distill_weight` (0: no distillation; also for configs older than the key)."""
  return float(pc.get("distill_weight", 0.0))


def twin_logits(twin_model, twin_variables, images) -> jax.Array:
  """The frozen ANN twin's logits [B, K]: evaluation mode (running batch statistics), no gradient."""
  return jax.lax.stop_gradient(models.apply_model(twin_model, twin_variables, images, with_aux=False))


def make_loss_fn(model, pc, *, phase: str, op_weights: dict | None, twin_model=None):
  """(params, batch_stats, batch, temperature, twin_variables=None) -> (loss, (cross-entropy, cost, distill,
  logits, new batch_stats)).

  loss = cross-entropy + `time_cost` * time-step cost + `distill_weight` * distillation. The cross-entropy is
  the time-averaged logits' (`pc.loss='final'`) or SEENN's mean over steps of the accumulated logits'
  ('every_step', `losses.every_step_cross_entropy`). The cost is 0 outside the 'snn' phase. The distillation
  term (`losses.distillation_kl` at `distill_temperature`, 0 without a twin) compares the model's time-averaged
  logits with those of `twin_model` (the ANN twin, phase 'ann') run on the same batch with `twin_variables`.
  'logits' are the time-averaged logits [B, K] either way.
  """
  use_cost = phase == "snn" and model.mask.enabled and pc.time_cost > 0
  every_step = loss_option(pc) == "every_step"
  weight = distill_weight(pc)
  if weight > 0 and twin_model is None:
    raise ValueError(f"{phase}.distill_weight={weight} needs the ANN twin (twin_model).")

  def loss_fn(params, batch_stats, batch, temperature, twin_variables=None):
    out, new_bs = models.apply_model(model, {"params": params, "batch_stats": batch_stats}, batch["image"],
                                     train=True, mask_temperature=temperature, with_aux=False,
                                     step_logits=every_step)
    if every_step:
      logits = jnp.mean(out, axis=0)
      ce = losses.every_step_cross_entropy(out, batch["target"], label_smoothing=pc.label_smoothing)
    else:
      logits = out
      ce = losses.cross_entropy(logits, batch["target"], label_smoothing=pc.label_smoothing)
    cost = jnp.zeros(())
    if use_cost:
      cost = masks_lib.time_step_cost(models.active_scores(model, params), kind=pc.cost_kind,
                                      op_weights=op_weights, target=pc.target_steps or None,
                                      temperature=temperature, monotone=model.mask.monotone,
                                      semantics=model.mask.semantics)
    distill = jnp.zeros(())
    if weight > 0:
      teacher = twin_logits(twin_model, twin_variables, batch["image"])
      distill = losses.distillation_kl(logits, teacher, temperature=pc.distill_temperature)
    loss = ce + pc.time_cost * cost + weight * distill
    return loss, (ce, cost, distill, logits, new_bs)

  return loss_fn


def all_finite(tree) -> jax.Array:
  """Whether every float leaf of `tree` is finite everywhere (a scalar bool array)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(model, tx, pc, *, phase: str, op_weights: dict | None, augment_fn: AugmentFn | None = None,
                    twin_model=None):
  """The jitted-to-be step: (state, batch, twin_variables=None) -> (state, metrics).

  `twin_model` / `twin_variables`: the frozen ANN twin to distil from (`pc.distill_weight` > 0); its forward pass
  runs inside the step, on the (augmented) batch the model sees.

  When the loss, a gradient, an updated parameter, an updated batch statistic or the updated optimizer state is
  not finite the step returns the state it was given (params, batch_stats, optimizer state untouched) and metric
  'finite' False; under `nonfinite='skip'` the step counter still advances past the batch.
  `augment_fn(step, batch)`, if given, transforms the batch first.
  """
  loss_fn = make_loss_fn(model, pc, phase=phase, op_weights=op_weights, twin_model=twin_model)

  def step_fn(state, batch, twin_variables=None):
    if augment_fn is not None:
      batch = augment_fn(state["step"], batch)
    temperature = temperature_at(pc, state["step"], pc.train_steps)
    (loss, (ce, cost, distill, logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], batch, temperature, twin_variables)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # What `make_diagnosis` checks, in the same terms: a non-finite optimizer state (e.g. Adam's second moment
    # overflowing on huge gradients) would poison every later update even where the parameters stay finite.
    finite = (jnp.isfinite(loss) & all_finite(grads) & all_finite(params) & all_finite(new_bs)
              & all_finite(opt_state))
    new_state = {"params": params, "batch_stats": new_bs, "opt_state": opt_state, "step": state["step"] + 1}
    # A non-finite step leaves the state as it was: the error policy can then say where it happened by
    # re-running the step (`diagnose_nonfinite`), and the skip policy moves on from the last good state.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    if pc.nonfinite == "skip":
      new_state["step"] = state["step"] + 1
    metrics = {"loss": loss, "cross_entropy": ce, "time_cost": cost,
               **({"distill": distill} if twin_model is not None else {}),
               "accuracy": jnp.mean(losses.correct(logits, batch["label"])), "temperature": temperature,
               "finite": finite}
    return new_state, metrics

  return step_fn


def make_eval_step(model):
  """(variables, batch) -> sums of correct / count over the batch's real examples; for the SNN also the aux
  rates and masks (per step, averaged over the batch)."""

  def eval_fn(variables, batch):
    logits, aux = models.apply_model(model, variables, batch["image"])
    w = batch["mask"]
    out = {"correct": jnp.sum(losses.correct(logits, batch["label"]) * w), "count": jnp.sum(w)}
    if model.phase == "snn":
      for key in ("input_rates", "attention_rates", "spike_rates", "masks"):
        out[key] = aux[key]
    return out

  return eval_fn


# ------------------------------------------------------------------------------------------------------------
# Where a step went non-finite.


def _forward_flags(model, variables, images, temperature) -> tuple[list[str], dict]:
  """(module paths in the order their outputs are computed, {path: whether its outputs are finite})."""
  order, flags = [], {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = paths.path_str(context.module.scope.path)
    floats = [x for x in jax.tree.leaves(out) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if context.method_name == "__call__" and path and floats:
      ok = all_finite(floats)
      if path in flags:  # a subclass calling its parent's __call__: one module, ordered by its first return
        flags[path] = flags[path] & ok
      else:
        order.append(path)
        flags[path] = ok
    return out

  with nn.intercept_methods(interceptor):
    models.apply_model(model, variables, images, train=True, mask_temperature=temperature, with_aux=False)
  return order, flags


def _finite_by_module(tree) -> dict[str, jax.Array]:
  """{module: whether all its float leaves in a params-like tree are finite}, in tree order."""
  by_module: dict[str, list] = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(x.dtype, jnp.inexact):
      by_module.setdefault(paths.module_of_param(path), []).append(jnp.all(jnp.isfinite(x)))
  return {m: jnp.all(jnp.stack(v)) for m, v in by_module.items()}


def _finite_by_leaf(tree) -> dict[str, jax.Array]:
  """{leaf path: whether it is finite} of the float leaves of any tree (e.g. an optimizer state), in tree order."""
  return {jax.tree_util.keystr(path): jnp.all(jnp.isfinite(x))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if jnp.issubdtype(x.dtype, jnp.inexact)}


def _describe(names: dict[str, list[str]], out: dict) -> str:
  forward, modules = names["forward"], names["modules"]
  # Modules in execution order; a parameter of the root module (e.g. 'cls') counts as used first.
  position = {m: (forward.index(m) if m in forward else -1) for m in modules}
  bad = {k: [n for n, ok in zip(names[k], out[k]) if not ok]
         for k in ("forward", "grads", "params", "batch_stats", "opt_state")}
  if bad["forward"]:
    return (f"first non-finite module: {bad['forward'][0]!r}, its output in the forward pass "
            f"({len(bad['forward'])} of {len(forward)} module outputs non-finite)")
  if not out["loss"]:
    return "first non-finite value: the loss (every module output was finite; check the targets and the loss)"
  if bad["grads"]:
    first = max(bad["grads"], key=lambda m: position[m])
    return (f"first non-finite module: {first!r}, its gradients in the backward pass (forward pass and loss "
            f"finite; {len(bad['grads'])} of {len(modules)} modules with non-finite gradients)")
  if bad["params"]:
    first = min(bad["params"], key=lambda m: position[m])
    return (f"first non-finite module: {first!r}, its parameters after the optimizer update (gradients finite; "
            f"the learning rate is too high for them)")
  if bad["batch_stats"]:
    first = min(bad["batch_stats"], key=lambda m: forward.index(m) if m in forward else -1)
    return (f"first non-finite module: {first!r}, its batch statistics after the step (outputs, gradients and "
            f"parameters finite; {len(bad['batch_stats'])} of {len(names['batch_stats'])} modules with "
            f"non-finite running statistics: activations too large, e.g. a learning rate too high)")
  if bad["opt_state"]:
    return (f"first non-finite value: the optimizer state {bad['opt_state'][0]} after the update (parameters "
            f"finite; {len(bad['opt_state'])} of {len(names['opt_state'])} optimizer state arrays non-finite: "
            f"gradients too large for the optimizer's moments, e.g. a learning rate too high)")
  return "not reproduced when the step was re-run (first non-finite module unknown)"


def make_diagnosis(model, tx, pc, *, phase: str, op_weights: dict | None, augment_fn: AugmentFn | None = None,
                   twin_model=None) -> Callable[..., str]:
  """(state, batch, step) -> a one-line description of where a non-finite train step first went non-finite.

  Re-runs the step from `state` on `batch` and checks everything the train step's 'finite' flag checks, in the
  order they are computed: the forward pass (the first leaf module whose output is non-finite, in execution
  order, e.g. 'blocks_0/attn/q'), then the loss, then the backward pass (the first module in backward order,
  i.e. the one closest to the loss, whose gradients are non-finite), then the optimizer update (the first
  module whose updated parameters are non-finite), then the updated batch statistics (the first module in
  execution order), then the updated optimizer state (its first non-finite array). `augment_fn` is the train
  step's (the step re-run sees the batch the step saw), `twin_model` its twin (the diagnosis takes the twin's
  variables as the step does). Jitted once: every call with the same shapes reuses it.
  """
  loss_fn = make_loss_fn(model, pc, phase=phase, op_weights=op_weights, twin_model=twin_model)
  names: dict[str, list[str]] = {}

  def diagnose_step(state, batch, step, twin_variables):
    if augment_fn is not None:
      batch = augment_fn(step, batch)
    temperature = temperature_at(pc, step, pc.train_steps)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    names["forward"], flags = _forward_flags(model, variables, batch["image"], temperature)
    (loss, aux), grads = jax.value_and_grad(
        lambda p: loss_fn(p, state["batch_stats"], batch, temperature, twin_variables), has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    checks = {"grads": _finite_by_module(grads),
              "params": _finite_by_module(optax.apply_updates(state["params"], updates)),
              "batch_stats": _finite_by_module(aux[-1]), "opt_state": _finite_by_leaf(opt_state)}
    names.update({k: list(v) for k, v in checks.items()}, modules=list(checks["grads"]))
    return {"forward": [flags[p] for p in names["forward"]], "loss": jnp.isfinite(loss),
            **{k: list(v.values()) for k, v in checks.items()}}

  jitted = compilation.jit(diagnose_step)

  def diagnose(state, batch, step: int, twin_variables=None) -> str:
    out = jax.device_get(jitted(state, batch, jnp.asarray(step, jnp.int32), twin_variables))
    return _describe(names, out)

  return diagnose


def diagnose_nonfinite(model, tx, pc, state, batch, step: int, *, phase: str, op_weights: dict | None,
                       augment_fn: AugmentFn | None = None, twin_model=None, twin_variables=None) -> str:
  """`make_diagnosis(...)(state, batch, step, twin_variables)`, compiled for this one call."""
  return make_diagnosis(model, tx, pc, phase=phase, op_weights=op_weights, augment_fn=augment_fn,
                        twin_model=twin_model)(state, batch, step, twin_variables)
