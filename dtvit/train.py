"""Training: the ANN twin, the SNN with learned time steps, an optional mask-frozen fine-tune; the run's phases.

The path of a batch: `data.train_batches` (numpy, this process's slice) -> `sharding.global_batch`
(global array split over the 'data' mesh axis) -> the train step (`steps.make_train_step` under one `jax.jit`:
model forward on the folded time x batch axis, cross-entropy + time-step cost, gradients, optax update) ->
metrics.

The path of a run (`run`): for each phase in `config.phases` ('ann', 'snn', 'finetune'): the train state, created
on the mesh (fresh, or params from the previous phase's / `init_from` checkpoint, thresholds from the ANN's clip
values), or restored from this phase's latest checkpoint -> `train_loop` -> checkpoint ->
`evaluate.evaluate_phase`; then `<workdir>/summary.json` with accuracies, time steps and energy.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from dtvit import checkpointing
from dtvit import energy as energy_lib
from dtvit import evaluate as evaluate_lib
from dtvit import data
from dtvit import masks as masks_lib
from dtvit import metrics as metrics_lib
from dtvit import models
from dtvit import optim
from dtvit import sharding
from dtvit import steps
from dtvit import workdir as workdir_lib
from dtvit.models import paths

PHASES = ("ann", "snn", "finetune")
TRAINABLE = {"ann": ("weights", "neuron"), "snn": ("weights", "neuron", "scores"),
             "finetune": ("weights", "neuron")}
NONFINITE_POLICIES = ("error", "skip")
_BATCH_KEYS = ("image", "label", "target")


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
# The train state, created on the mesh.


def _init_fn(model, image_shape):
  """rng -> fresh variables {'params', 'batch_stats'} (as `models.init`, traceable)."""

  def init(rng):
    variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.float32), train=False)
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}

  return init


def _abstract(fn, mesh, *args):
  """`fn(*args)`'s outputs as `jax.ShapeDtypeStruct`s with the state's shardings, without computing them."""
  shapes = jax.eval_shape(fn, *args)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      sharding.state_shardings(mesh, shapes))


def _run_once(fn, mesh, *args):
  """`fn(*args)` under one jit whose outputs are created with the state's shardings, never on one device
  first. It runs once, so XLA's backend optimisations (seconds of compile time on CPU) are skipped, as in
  `models.init`; they also change the initialisers' last bits, so this keeps the values `models.init` gives."""
  shardings = jax.tree.map(lambda x: x.sharding, _abstract(fn, mesh, *args))
  lowered = jax.jit(fn, out_shardings=shardings).lower(*args)
  try:
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})(*args)
  except Exception:  # pylint: disable=broad-except  # a backend without that option
    return lowered.compile()(*args)


def _state_fn(model, tx, image_shape):
  """(rng, variables or None) -> train state {'params', 'batch_stats', 'opt_state', 'step'}; a fresh init when
  `variables` is None."""

  def make(rng, variables):
    if variables is None:
      variables = _init_fn(model, image_shape)(rng)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}

  return make


def create_state(model, tx, rng, image_shape, mesh, variables=None) -> dict:
  """The train state on the mesh: from `variables` ({'params', 'batch_stats'}), or a fresh init from `rng`."""
  return _run_once(_state_fn(model, tx, image_shape), mesh, rng, variables)


def abstract_state(model, tx, image_shape, mesh) -> dict:
  """The train state's shapes, dtypes and shardings (`jax.ShapeDtypeStruct`s), without computing it."""
  return _abstract(_state_fn(model, tx, image_shape), mesh, jax.random.key(0), None)


def _source_checkpoint(config, workdir, phases, phase) -> str | None:
  """Where this phase's initial params come from (None: fresh init)."""
  pc = config[phase]
  if pc.init_from:
    return pc.init_from
  i = phases.index(phase)
  if i > 0:
    return os.path.join(workdir, phases[i - 1], "checkpoints")
  return None


def initial_variables(config, workdir, phases, phase, model, info, rng, *, mesh) -> dict | None:
  """A phase's starting variables on the mesh: the previous phase's / `init_from` checkpoint, or None (a fresh
  init, made with the state).

  Entering the SNN phase from a checkpoint sets each threshold from the ANN clip value
  (times `snn.threshold_scale`).
  """
  source = _source_checkpoint(config, workdir, phases, phase)
  if source is None:
    return None
  init = _init_fn(model, info.image_shape)
  abstract = _abstract(init, mesh, rng)
  # Scores of another T_max (e.g. an ANN twin reused for several SNNs) start fresh; all else must match.
  variables = checkpointing.restore_variables(source, abstract, what=f"{phase}.init_from",
                                              fresh=lambda: _run_once(init, mesh, rng),
                                              reinit_on_mismatch=paths.is_scores_path)
  if phase == "snn":
    variables["params"] = models.ann_to_snn(variables["params"], scale=config[phase].threshold_scale)
  logging.info("%s: params from %s", phase, source)
  return variables


# ------------------------------------------------------------------------------------------------------------
# The training loop.


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


class _MetricLog:
  """A phase's metrics since the last log point and its logged history. Both travel in the checkpoint
  (`meta`), so a resumed run logs and summarises exactly what an uninterrupted one does."""

  def __init__(self, writer, meta: dict):
    self.writer = writer
    self.averager = metrics_lib.Averager()
    self.since_log = list(meta.get("since_log", []))
    for m in self.since_log:
      self.averager.update(m)
    self.history = list(meta.get("history", []))

  def add(self, metrics: dict) -> None:
    self.averager.update(metrics)
    self.since_log.append(metrics)

  def write(self, step: int, extra: dict) -> None:
    scalars = self.averager.result()
    self.averager.reset()
    self.since_log = []
    scalars.update(extra)
    self.writer.write_scalars(step, scalars)
    self.history.append({"step": step, **{k: scalars.get(k, float("nan")) for k in ("loss", "accuracy")}})

  def meta(self) -> dict:
    return {"since_log": jax.device_get(self.since_log), "history": self.history}


@dataclasses.dataclass(frozen=True)
class Phase:
  """What a phase's training loop needs besides its state."""
  name: str                 # 'ann' | 'snn' | 'finetune'
  pc: Any                   # config[name]
  model: models.SpikingViT
  tx: Any                   # the optax transform
  schedule: Any             # step -> the weights' learning rate
  op_weights: dict | None   # `energy.module_op_weights` of the SNN phases (from the phase's one op-count trace)
  mesh: Any
  augment_fn: Any = None    # (step, batch) -> batch inside the train step: mixup / cutmix


def _mixing(config):
  """The on-device mixup / cutmix of the train batches (`data.mix_batch`, keyed by (seed, step)), or None when
  both are off."""
  aug = config.data.augment
  if aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0:
    return None

  def mix(step, batch):
    image, target = data.mix_batch(data.mix_key(config.seed, step), batch["image"], batch["target"],
                                   mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha)
    return dict(batch, image=image, target=target)

  return mix


def _stop_on_nonfinite(ph: Phase, ckpt, state, batch, step: int) -> None:
  """Says where the step went non-finite; raises under `nonfinite='error'`, warns under 'skip'."""
  where = steps.diagnose_nonfinite(ph.model, ph.tx, ph.pc, state, batch, step, phase=ph.name,
                                   op_weights=ph.op_weights)
  if ph.pc.nonfinite == "skip":
    logging.warning("%s: step %d skipped (params unchanged), %s", ph.name, step + 1, where)
    return
  ckpt.wait()
  last_good = ckpt.latest_step()
  kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt.directory} and a rerun resumes from it"
          if last_good is not None else "no checkpoint had been written yet")
  raise NonFiniteError(
      f"{ph.name}: non-finite values at step {step + 1}: {where}. Training stopped; {kept}. Lower the learning "
      f"rate, fix the data, or set {ph.name}.nonfinite='skip' to skip such batches.")


def train_loop(ph: Phase, state, meta: dict, batches, *, ckpt, writer, start: int, end: int,
               batch_hook=None) -> tuple[dict, list[dict]]:
  """Trains steps [start, end) on `batches` (this process's numpy batches from step `start` on); returns the
  state and the logged history.

  Logs every `log_every` steps; checkpoints every `checkpoint_every` steps (the `Checkpointer`'s interval), at
  `end`, and at the step after a SIGTERM reached any process, then raises `Preempted`.
  """
  state_sharding = sharding.state_shardings(ph.mesh, state)
  train_step = jax.jit(steps.make_train_step(ph.model, ph.tx, ph.pc, phase=ph.name, op_weights=ph.op_weights,
                                             augment_fn=ph.augment_fn),
                       in_shardings=(state_sharding, sharding.batch_sharded(ph.mesh)),
                       out_shardings=(state_sharding, sharding.replicated(ph.mesh)), donate_argnums=(0,))
  log = _MetricLog(writer, meta)
  bar = metrics_lib.progress_bar(ph.pc.num_steps, initial=start, desc=ph.name)
  with _SigtermFlag() as sigterm:
    try:
      for step in range(start, end):
        local = next(batches)
        if batch_hook is not None:
          local = batch_hook(ph.name, step, local)
        batch = sharding.global_batch(ph.mesh, {k: local[k] for k in _BATCH_KEYS})
        state, metrics = train_step(state, batch)
        done = step + 1
        if bool(jax.device_get(metrics.pop("finite"))):
          log.add(metrics)
        else:
          _stop_on_nonfinite(ph, ckpt, state, batch, step)
        bar.update(1)
        if done % ph.pc.log_every == 0 or done == end:
          log.write(done, {"learning_rate": float(ph.schedule(done)),
                           **evaluate_lib.step_scalars(ph.model, state["params"])})
        # Every process asks at the same step, so all checkpoint the same step and stop together.
        stop = sharding.any_process(sigterm.raised)
        if stop or done == end or ckpt.should_save(done):
          ckpt.save(done, state, {"step": done, "phase": ph.name, "data_position": done, **log.meta()}, force=True)
        if stop:
          ckpt.wait()
          raise Preempted(f"SIGTERM during {ph.name}: checkpoint saved at step {done}; rerun the same command "
                          f"to resume.")
    finally:
      bar.close()
      ckpt.wait()
  return state, log.history


# ------------------------------------------------------------------------------------------------------------
# Phases and runs.


def _start(ph: Phase, config, workdir, phases, info, ckpt) -> tuple[dict, dict]:
  """The phase's state and checkpoint meta: restored from its latest checkpoint, else created (meta {})."""
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_state(ph.model, ph.tx, info.image_shape, ph.mesh))
    logging.info("%s: resumed from step %d", ph.name, int(meta["step"]))
    return state, meta
  rng = jax.random.key(config.seed)
  variables = initial_variables(config, workdir, phases, ph.name, ph.model, info, rng, mesh=ph.mesh)
  return create_state(ph.model, ph.tx, rng, info.image_shape, ph.mesh, variables), {}


def train_phase(config, workdir: str, phase: str, *, mesh, info, phases, stop_at_step: int | None = None,
                batch_hook=None) -> dict:
  """Trains one phase (resuming from its latest checkpoint), evaluates it, returns its summary."""
  pc = config[phase]
  phase_dir = os.path.join(workdir, phase)
  model = models.phase_model(config.model, info.num_classes, phase)
  sharding.check_batch_size(pc.batch_size, mesh, f"{phase}.batch_size")
  tx, schedule = optim.make_optimizer(pc.optimizer, num_steps=pc.num_steps, trainable=TRAINABLE[phase])
  op_counts = None if phase == "ann" else energy_lib.op_counts(model, info.image_shape)  # traced once per phase
  op_weights = None if phase == "ann" else energy_lib.module_op_weights(model, counts=op_counts)
  ph = Phase(phase, pc, model, tx, schedule, op_weights, mesh, _mixing(config))
  ckpt = checkpointing.Checkpointer(os.path.join(phase_dir, "checkpoints"), max_to_keep=pc.max_to_keep,
                                    save_interval_steps=pc.checkpoint_every, save_first=False)
  state, meta = _start(ph, config, workdir, phases, info, ckpt)
  start, history = int(meta.get("step", 0)), meta.get("history", [])
  end = pc.num_steps if stop_at_step is None else min(stop_at_step, pc.num_steps)
  writer = metrics_lib.create_default_writer(phase_dir)
  t0 = time.time()
  if start < end:
    batches = data.train_batches(config.data, global_batch_size=pc.batch_size, seed=config.seed,
                                           start_step=start, num_classes=info.num_classes)
    state, history = train_loop(ph, state, meta, batches, ckpt=ckpt, writer=writer, start=start, end=end,
                                batch_hook=batch_hook)
  ckpt.close()
  summary: dict[str, Any] = {"steps": int(jax.device_get(state["step"])), "train_time_s": round(time.time() - t0, 1)}
  if history:
    summary["train_loss_first"] = history[0]["loss"]
    summary["train_loss_last"] = history[-1]["loss"]
  if stop_at_step is not None and end < pc.num_steps:
    summary["stopped_at"] = end
  else:
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    summary.update(evaluate_lib.evaluate_phase(model, variables, config, mesh, info, phase, op_counts=op_counts))
    writer.write_scalars(summary["steps"], {k: v for k, v in summary.items()
                                            if isinstance(v, float) and k.endswith("accuracy")})
  writer.close()
  return summary


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
  workdir_lib.check_workdir(workdir, config.to_dict(), overwrite=overwrite)
  info = data.get_info(config.data)
  data.write_spec(workdir, config.data)  # normalisation and class names, for use without the data
  t0 = time.time()
  summary: dict[str, Any] = {"workdir": os.path.abspath(workdir), "phases": phases,
                             "devices": mesh.devices.size, "processes": jax.process_count()}
  for phase in phases:
    logging.info("=== phase %s ===", phase)
    summary[phase] = train_phase(config, workdir, phase, mesh=mesh, info=info, phases=phases,
                                 stop_at_step=stop_at_step, batch_hook=batch_hook)
    if "stopped_at" in summary[phase]:
      return summary
  summary["wall_time_s"] = round(time.time() - t0, 1)
  workdir_lib.write_summary(workdir, summary)
  return summary
