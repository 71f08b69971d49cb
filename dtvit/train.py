"""Training: the ANN twin, the SNN with learned time steps, an optional mask-frozen fine-tune; summary.

The path of a batch: `data.train_batches` (numpy, this process's slice) -> `sharding.global_batch`
(global array split over the 'data' mesh axis) -> `train_step` (one `jax.jit`: model forward on the folded
time x batch axis, cross-entropy + time-step cost, gradients, optax update) -> metrics.

The path of a run (`run`): for each phase in `config.phases` ('ann', 'snn', 'finetune'):
init (fresh, or params from the previous phase's / `init_from` checkpoint, thresholds from the ANN's clip
values) -> resume from this phase's latest checkpoint if any -> train -> checkpoint -> evaluate; then
`<workdir>/summary.json` with accuracies, time steps and energy.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dtvit import checkpointing
from dtvit import data
from dtvit import losses
from dtvit import masks as masks_lib
from dtvit import metrics as metrics_lib
from dtvit import models
from dtvit import optim
from dtvit import sharding

PHASES = ("ann", "snn", "finetune")
TRAINABLE = {"ann": ("weights", "neuron"), "snn": ("weights", "neuron", "scores"),
             "finetune": ("weights", "neuron")}
NONFINITE_POLICIES = ("error", "skip")


class NonFiniteError(FloatingPointError):
  """Raised when the loss or gradients stop being finite (config `nonfinite='error'`)."""


class Preempted(Exception):
  """Raised after SIGTERM once the current state is checkpointed."""


def parse_phases(config) -> list[str]:
  phases = [p.strip() for p in str(config.phases).split(",") if p.strip()]
  bad = [p for p in phases if p not in PHASES]
  if bad or not phases:
    raise ValueError(f"config.phases={config.phases!r}: each phase must be one of {PHASES} (comma-separated).")
  return phases


def validate_config(config) -> None:
  """Errors for invalid values, before anything is built or written."""
  phases = parse_phases(config)
  if config.model.num_steps < 1:
    raise ValueError(f"model.num_steps (T_max) must be >= 1, got {config.model.num_steps}.")
  for p in phases:
    pc = config[p]
    if pc.num_steps < 0:
      raise ValueError(f"{p}.num_steps must be >= 0, got {pc.num_steps}.")
    if pc.time_cost < 0:
      raise ValueError(f"{p}.time_cost must be >= 0 (a negative cost would reward more steps), got {pc.time_cost}.")
    if pc.cost_kind not in masks_lib.COSTS:
      raise ValueError(f"{p}.cost_kind={pc.cost_kind!r}; choose one of {masks_lib.COSTS}.")
    if pc.nonfinite not in NONFINITE_POLICIES:
      raise ValueError(f"{p}.nonfinite={pc.nonfinite!r}; choose one of {NONFINITE_POLICIES}.")
    if pc.temperature_start <= 0 or pc.temperature_end <= 0:
      raise ValueError(f"{p}: mask temperatures must be > 0.")
    if pc.batch_size < 1:
      raise ValueError(f"{p}.batch_size must be >= 1, got {pc.batch_size}.")
  for p in phases:
    models.build_model(config.model, 2, phase="snn" if p != "ann" else "ann")


# ------------------------------------------------------------------------------------------------------------
# Model, state and steps.


def phase_model(config, num_classes: int, phase: str) -> models.SpikingViT:
  model = models.build_model(config.model, num_classes, phase="ann" if phase == "ann" else "snn")
  if phase == "finetune":
    model = models.with_mask(model, hard=True)
  return model


def temperature_at(pc, step, num_steps):
  frac = jnp.clip(step / max(num_steps, 1), 0.0, 1.0)
  return pc.temperature_start * (pc.temperature_end / pc.temperature_start) ** frac


def make_loss_fn(model, pc, *, phase: str, op_weights: dict | None):
  """(params, batch_stats, batch, temperature) -> (loss, (cross-entropy, cost, logits, new batch_stats))."""
  use_cost = phase == "snn" and model.mask.enabled and pc.time_cost > 0

  def loss_fn(params, batch_stats, batch, temperature):
    logits, new_bs = models.apply_model(model, {"params": params, "batch_stats": batch_stats}, batch["image"],
                                        train=True, mask_temperature=temperature, with_aux=False)
    ce = losses.cross_entropy(logits, batch["target"], label_smoothing=pc.label_smoothing)
    cost = jnp.zeros(())
    if use_cost:
      cost = masks_lib.time_step_cost(models.active_scores(model, params), kind=pc.cost_kind,
                                      op_weights=op_weights, target=pc.target_steps or None,
                                      temperature=temperature, monotone=model.mask.monotone,
                                      semantics=model.mask.semantics)
    loss = ce + pc.time_cost * cost
    return loss, (ce, cost, logits, new_bs)

  return loss_fn


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(model, tx, pc, *, phase: str, op_weights: dict | None):
  """The jitted-to-be step: (state, batch) -> (state, metrics).

  batch: 'image', 'label', 'target' and 'stop' (bool [B], each process's SIGTERM flag on its slice); the
  metric 'stop' is their OR, so every process sees the same value at the same step and they checkpoint and
  exit together. When the loss, a gradient or an updated parameter is not finite the step returns the state
  it was given (params, batch_stats, optimizer state untouched) and metric 'finite' False; under
  `nonfinite='skip'` the step counter still advances past the batch.
  """
  loss_fn = make_loss_fn(model, pc, phase=phase, op_weights=op_weights)

  def step_fn(state, batch):
    temperature = temperature_at(pc, state["step"], pc.num_steps)
    (loss, (ce, cost, logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], batch, temperature)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params) & _all_finite(new_bs)
    new_state = {"params": params, "batch_stats": new_bs, "opt_state": opt_state, "step": state["step"] + 1}
    # A non-finite step leaves the state as it was: the error policy can then say where it happened by
    # re-running the step (`diagnose_nonfinite`), and the skip policy moves on from the last good state.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    if pc.nonfinite == "skip":
      new_state["step"] = state["step"] + 1
    metrics = {"loss": loss, "cross_entropy": ce, "time_cost": cost,
               "accuracy": jnp.mean(losses.correct(logits, batch["label"])), "temperature": temperature,
               "finite": finite, "stop": jnp.any(batch["stop"])}
    return new_state, metrics

  return step_fn


def _module_of(path) -> str:
  """'params' key path -> its module ('blocks_0/attn/q' for ('blocks_0', 'attn', 'q', 'kernel')); a parameter
  of the root module is named by itself ('cls')."""
  keys = [str(getattr(k, "key", k)) for k in path]
  return "/".join(keys[:-1]) or keys[-1]


def diagnose_nonfinite(model, tx, pc, state, batch, step: int, *, phase: str, op_weights: dict | None) -> str:
  """Re-runs a non-finite train step from `state` on `batch` and says where the values first went non-finite.

  In the order they are computed: the forward pass (the first leaf module whose output is non-finite, in
  execution order, e.g. 'blocks_0/attn/q'), then the loss, then the backward pass (the first module in
  backward order, i.e. the one closest to the loss, whose gradients are non-finite), then the optimizer
  update (the first module whose updated parameters are non-finite). Returns a one-line description.
  """
  loss_fn = make_loss_fn(model, pc, phase=phase, op_weights=op_weights)
  names: dict[str, list[str]] = {}

  def fn(state, batch, step):
    temperature = temperature_at(pc, step, pc.num_steps)
    order, flags = [], {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = "/".join(context.module.scope.path)
      floats = [x for x in jax.tree.leaves(out)
                if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
      if context.method_name == "__call__" and path and floats:
        ok = _all_finite(floats)
        if path in flags:  # a subclass calling its parent's __call__: one module, ordered by its first return
          flags[path] = flags[path] & ok
        else:
          order.append(path)
          flags[path] = ok
      return out

    with nn.intercept_methods(interceptor):
      models.apply_model(model, {"params": state["params"], "batch_stats": state["batch_stats"]}, batch["image"],
                         train=True, mask_temperature=temperature, with_aux=False)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p, state["batch_stats"], batch, temperature)[0])(
        state["params"])
    updates, _ = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    by_module: dict[str, dict[str, list]] = {"grads": {}, "params": {}}
    for tree, key in ((grads, "grads"), (params, "params")):
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        by_module[key].setdefault(_module_of(path), []).append(jnp.all(jnp.isfinite(x)))
    names["forward"], names["modules"] = order, list(by_module["grads"])
    return {"forward": [flags[p] for p in order], "loss": jnp.isfinite(loss),
            "grads": [jnp.all(jnp.stack(v)) for v in by_module["grads"].values()],
            "params": [jnp.all(jnp.stack(v)) for v in by_module["params"].values()]}

  out = jax.device_get(jax.jit(fn)(state, batch, jnp.asarray(step, jnp.int32)))
  forward, modules = names["forward"], names["modules"]
  # Modules in execution order; a parameter of the root module (e.g. 'cls') counts as used first.
  position = {m: (forward.index(m) if m in forward else -1) for m in modules}
  bad_forward = [p for p, ok in zip(forward, out["forward"]) if not ok]
  bad_grads = [m for m, ok in zip(modules, out["grads"]) if not ok]
  bad_params = [m for m, ok in zip(modules, out["params"]) if not ok]
  if bad_forward:
    return (f"first non-finite module: {bad_forward[0]!r}, its output in the forward pass "
            f"({len(bad_forward)} of {len(forward)} module outputs non-finite)")
  if not out["loss"]:
    return "first non-finite value: the loss (every module output was finite; check the targets and the loss)"
  if bad_grads:
    first = max(bad_grads, key=lambda m: position[m])
    return (f"first non-finite module: {first!r}, its gradients in the backward pass (forward pass and loss "
            f"finite; {len(bad_grads)} of {len(modules)} modules with non-finite gradients)")
  if bad_params:
    first = min(bad_params, key=lambda m: position[m])
    return (f"first non-finite module: {first!r}, its parameters after the optimizer update (gradients finite; "
            f"the learning rate is too high for them)")
  return "not reproduced when the step was re-run (first non-finite module unknown)"


def make_eval_step(model):
  """(variables, batch) -> (sums of correct/count, aux rates summed over the batch's steps)."""

  def eval_fn(variables, batch):
    logits, aux = models.apply_model(model, variables, batch["image"])
    w = batch["mask"]
    out = {"correct": jnp.sum(losses.correct(logits, batch["label"]) * w), "count": jnp.sum(w)}
    if model.phase == "snn":
      out["input_rates"] = aux["input_rates"]
      out["attention_rates"] = aux["attention_rates"]
      out["spike_rates"] = aux["spike_rates"]
      out["masks"] = aux["masks"]
    return out

  return eval_fn


def evaluate(model, variables, config, mesh, *, split: str = "test") -> dict:
  """Test accuracy, and for the SNN the per-step rates averaged over full batches."""
  gb = config.eval_batch_size
  sharding.check_batch_size(gb, mesh, "eval_batch_size")
  eval_fn = jax.jit(make_eval_step(model), out_shardings=sharding.replicated(mesh))
  correct = count = 0.0
  rate_sums, n_full = None, 0
  for local in data.eval_batches(config.data, split=split, global_batch_size=gb,
                                           max_examples=config.get("eval_examples", 0)):
    batch = sharding.global_batch(mesh, {k: local[k] for k in ("image", "label", "mask")})
    out = jax.device_get(eval_fn(variables, batch))
    correct += float(out["correct"])
    count += float(out["count"])
    if model.phase == "snn" and float(out["count"]) == gb:
      rates = {k: out[k] for k in ("input_rates", "attention_rates", "spike_rates", "masks")}
      rate_sums = rates if rate_sums is None else jax.tree.map(np.add, rate_sums, rates)
      n_full += 1
  result = {"accuracy": correct / max(count, 1.0), "count": int(count)}
  if rate_sums is not None:
    result["aux"] = jax.tree.map(lambda x: np.asarray(x) / n_full, rate_sums)
  return result


def init_state(model, tx, rng, image_shape, mesh, variables=None):
  if variables is None:
    variables = models.init(model, rng, image_shape)
  state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
           "opt_state": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}
  return sharding.replicate(mesh, state)


def abstract_like(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ------------------------------------------------------------------------------------------------------------
# Phases and runs.


class _SigtermFlag:
  """Turns SIGTERM (preemption) into a flag the loop checks after each step."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _source_checkpoint(config, workdir, phases, phase) -> str | None:
  """Where this phase's initial params come from (None: fresh init)."""
  pc = config[phase]
  if pc.init_from:
    return pc.init_from
  i = phases.index(phase)
  if i > 0:
    return os.path.join(workdir, phases[i - 1], "checkpoints")
  return None


def initial_variables(config, workdir, phases, phase, model, info, rng) -> dict:
  """A phase's starting variables: a fresh init, or the previous phase's / `init_from` checkpoint.

  Entering the SNN phase from a checkpoint sets each threshold from the ANN clip value
  (times `snn.threshold_scale`).
  """
  fresh = models.init(model, rng, info.image_shape)
  source = _source_checkpoint(config, workdir, phases, phase)
  if source is None:
    return fresh
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
  # Scores of another T_max (e.g. an ANN twin reused for several SNNs) start fresh; all else must match.
  variables = checkpointing.restore_variables(source, abstract, what=f"{phase}.init_from", fresh=fresh,
                                              reinit_on_mismatch=lambda p: p.endswith("/time_scores"))
  if phase == "snn":
    variables["params"] = models.ann_to_snn(variables["params"], scale=config[phase].threshold_scale)
  logging.info("%s: params from %s", phase, source)
  return variables


def train_phase(config, workdir: str, phase: str, *, mesh, info, phases, stop_at_step: int | None = None,
                batch_hook=None) -> dict:
  """Trains one phase (resuming from its latest checkpoint), evaluates it, returns its summary."""
  pc = config[phase]
  phase_dir = os.path.join(workdir, phase)
  model = phase_model(config, info.num_classes, phase)
  sharding.check_batch_size(pc.batch_size, mesh, f"{phase}.batch_size")
  tx, schedule = optim.make_optimizer(pc.optimizer, num_steps=pc.num_steps, trainable=TRAINABLE[phase])
  op_weights = None
  if phase == "snn" and pc.cost_kind == "op_weighted":
    from dtvit import energy as energy_lib  # pylint: disable=g-import-not-at-top
    op_weights = energy_lib.module_op_weights(model, info.image_shape)
  rng = jax.random.key(config.seed)

  ckpt = checkpointing.Checkpointer(os.path.join(phase_dir, "checkpoints"), max_to_keep=pc.max_to_keep)
  variables = None
  if ckpt.latest_step() is None:
    variables = initial_variables(config, workdir, phases, phase, model, info, rng)
  state = init_state(model, tx, rng, info.image_shape, mesh, variables)
  start, meta = 0, {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state))
    start = int(meta["step"])
    logging.info("%s: resumed from step %d", phase, start)

  writer = metrics_lib.create_default_writer(phase_dir)
  train_step = jax.jit(make_train_step(model, tx, pc, phase=phase, op_weights=op_weights),
                       in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                       out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
                       donate_argnums=(0,))
  end = pc.num_steps if stop_at_step is None else min(stop_at_step, pc.num_steps)
  # The metrics of the steps since the last log point and the logged history travel in the checkpoint, so a
  # resumed run logs and summarises exactly what an uninterrupted one does.
  averager = metrics_lib.Averager()
  since_log = meta.get("since_log", [])
  for m in since_log:
    averager.update(m)
  history = meta.get("history", [])
  t0 = time.time()
  if start < end:
    batches = data.train_batches(config.data, global_batch_size=pc.batch_size, seed=config.seed,
                                           start_step=start, num_classes=info.num_classes)
    bar = metrics_lib.progress_bar(pc.num_steps, initial=start, desc=phase)
    with _SigtermFlag() as sigterm:
      step = start
      try:
        for step in range(start, end):
          local = next(batches)
          if batch_hook is not None:
            local = batch_hook(phase, step, local)
          local = {k: local[k] for k in ("image", "label", "target")}
          local["stop"] = np.full(local["label"].shape, sigterm.raised)
          batch = sharding.global_batch(mesh, local)
          state, m = train_step(state, batch)
          finite, stop = (bool(x) for x in jax.device_get((m["finite"], m["stop"])))
          done = step + 1
          if not finite:
            where = diagnose_nonfinite(model, tx, pc, state, batch, step, phase=phase, op_weights=op_weights)
            if pc.nonfinite == "error":
              ckpt.wait()
              last_good = ckpt.latest_step()
              kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt.directory} and a rerun "
                      f"resumes from it" if last_good is not None else "no checkpoint had been written yet")
              raise NonFiniteError(
                  f"{phase}: non-finite values at step {done}: {where}. Training stopped; {kept}. Lower the "
                  f"learning rate, fix the data, or set {phase}.nonfinite='skip' to skip such batches.")
            logging.warning("%s: step %d skipped (params unchanged), %s", phase, done, where)
          else:
            metrics = {k: v for k, v in m.items() if k not in ("finite", "stop")}
            averager.update(metrics)
            since_log.append(metrics)
          bar.update(1)
          if done % pc.log_every == 0 or done == end:
            scalars = averager.result()
            averager.reset()
            since_log = []
            scalars["learning_rate"] = float(schedule(done))
            scalars.update(_mask_scalars(model, state["params"]))
            writer.write_scalars(done, scalars)
            history.append({"step": done, **{k: scalars.get(k, float("nan")) for k in ("loss", "accuracy")}})
          if done % pc.checkpoint_every == 0 or done == end or stop:
            ckpt.save(done, state, {"step": done, "phase": phase, "data_position": done,
                                    "since_log": jax.device_get(since_log), "history": history}, force=True)
          if stop:
            ckpt.wait()
            raise Preempted(f"SIGTERM during {phase}: checkpoint saved at step {done}; rerun the same command "
                            f"to resume.")
      finally:
        bar.close()
        ckpt.wait()
  ckpt.close()
  train_time = time.time() - t0

  summary: dict[str, Any] = {"steps": int(jax.device_get(state["step"])), "train_time_s": round(train_time, 1)}
  if history:
    summary["train_loss_first"] = history[0]["loss"]
    summary["train_loss_last"] = history[-1]["loss"]
  if stop_at_step is not None and end < pc.num_steps:
    summary["stopped_at"] = end
    writer.close()
    return summary
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  summary.update(evaluate_phase(model, variables, config, mesh, info, phase))
  writer.write_scalars(summary["steps"], {k: v for k, v in summary.items()
                                          if isinstance(v, float) and k.endswith("accuracy")})
  writer.close()
  return summary


def _mask_scalars(model, params) -> dict:
  if model.phase != "snn" or not model.mask.enabled:
    return {}
  counts = models.step_counts(model, jax.device_get(params))
  out = {"average_time_steps": float(np.mean([c["active_steps"] for c in counts.values()])),
         "average_simulated_steps": float(np.mean([c["simulated_steps"] for c in counts.values()]))}
  out.update({f"time_steps/{k}": c["active_steps"] for k, c in counts.items()})
  out.update({f"simulated_steps/{k}": c["simulated_steps"] for k, c in counts.items()})
  return out


def step_summary(model, params, image_shape) -> dict:
  """The SNN's time-step figures for summary.json, all from `models.step_counts` (see `dtvit.masks`).

  'average_time_steps': the mean over masked units (modules, or neurons with granularity 'layer') of their
  active (emitting) steps, the paper's T_avg; 'average_simulated_steps': the mean of their simulated steps (the
  steps whose work any output depends on); both also op-weighted. 'step_counts' lists every unit, and the
  unmasked stem ('embedding', masked: false) with its own steps."""
  from dtvit import energy as energy_lib  # pylint: disable=g-import-not-at-top
  counts = models.step_counts(model, params)
  op_weights = energy_lib.module_op_weights(model, image_shape)
  active = {k: c["active_steps"] for k, c in counts.items()}
  simulated = {k: c["simulated_steps"] for k, c in counts.items()}
  total = sum(op_weights[k] for k in counts)
  op = lambda steps: float(sum(op_weights[k] * v for k, v in steps.items()) / total) if total else None
  listed = {k: dict(c, masked=True) for k, c in counts.items()}
  if not model.mask.mask_stem:
    T = float(model.num_steps)
    listed["embedding"] = {"active_steps": T, "simulated_steps": T, "masked": False}
  return {
      "mask_semantics": model.mask.semantics,
      "time_steps_convention": ("average_time_steps = mean over masked units of their active (emitting) steps; "
                                "average_simulated_steps = mean over masked units of the steps whose work any "
                                "output depends on; the unmasked stem is listed in step_counts, not averaged"),
      "average_time_steps": float(np.mean(list(active.values()))),
      "average_simulated_steps": float(np.mean(list(simulated.values()))),
      "op_weighted_time_steps": op(active),
      "op_weighted_simulated_steps": op(simulated),
      "per_module_time_steps": dict(sorted(active.items())),
      "per_module_simulated_steps": dict(sorted(simulated.items())),
      "masks": {k: c["mask"] for k, c in sorted(counts.items())},
      "step_counts": dict(sorted(listed.items())),
  }


def evaluate_phase(model, variables, config, mesh, info, phase) -> dict:
  """The phase's test results: accuracy; for SNN phases also time steps, spike rates and energy."""
  if phase == "ann":
    return {"test_accuracy": evaluate(model, variables, config, mesh)["accuracy"]}
  from dtvit import energy as energy_lib  # pylint: disable=g-import-not-at-top
  hard = models.with_mask(model, hard=True)
  ev = evaluate(hard, variables, config, mesh)
  out = {"test_accuracy": ev["accuracy"]}
  out.update(step_summary(model, jax.device_get(variables["params"]), info.image_shape))
  out["T_max"] = model.num_steps
  if "aux" in ev:
    aux = ev["aux"]
    out["spike_rates"] = {k: np.round(v, 5).tolist() for k, v in sorted(aux["spike_rates"].items())}
    out["energy"] = energy_lib.energy_report(hard, info.image_shape, aux)
  if config.eval_fixed_steps and model.mask.enabled:
    fixed = models.with_mask(model, enabled=False)
    out["test_accuracy_fixed_T"] = evaluate(fixed, variables, config, mesh)["accuracy"]
  return out


def run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
        stop_at_step: int | None = None, batch_hook=None) -> dict:
  """Runs every phase of `config.phases` in `workdir`; writes and returns `<workdir>/summary.json`.

  `stop_at_step` stops the first unfinished phase after that many steps (for tests of resume).
  `batch_hook(phase, step, local_batch) -> local_batch` may edit this process's numpy train batch (dict of
  'image', 'label', 'target') before it is sharded; step counts from 0 (fault injection in tests).

  Raises `Preempted` after SIGTERM (state checkpointed at the current step), `NonFiniteError` on a non-finite
  step with `nonfinite='error'` (naming the step and the first module; the last good checkpoint is kept).
  """
  validate_config(config)
  phases = parse_phases(config)
  mesh = sharding.make_mesh(config.mesh.num_devices)
  for phase in phases:  # now, not after hours of training
    sharding.check_batch_size(config[phase].batch_size, mesh, f"{phase}.batch_size")
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  checkpointing.check_workdir(workdir, config.to_dict(), overwrite=overwrite)
  info = data.get_info(config.data)
  t0 = time.time()
  summary: dict[str, Any] = {"workdir": os.path.abspath(workdir), "phases": phases,
                             "devices": mesh.devices.size, "processes": jax.process_count()}
  for phase in phases:
    logging.info("=== phase %s ===", phase)
    result = train_phase(config, workdir, phase, mesh=mesh, info=info, phases=phases, stop_at_step=stop_at_step,
                         batch_hook=batch_hook)
    summary[phase] = result
    if "stopped_at" in result:
      return summary
  summary["wall_time_s"] = round(time.time() - t0, 1)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
