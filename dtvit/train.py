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
import numpy as np

from dtvit import checkpointing
from dtvit import compilation
from dtvit import energy as energy_lib
from dtvit import evaluate as evaluate_lib
from dtvit import data
from dtvit import inference
from dtvit.data import resident
from dtvit import losses
from dtvit import masks as masks_lib
from dtvit import metrics as metrics_lib
from dtvit import models
from dtvit import optim
from dtvit import sharding
from dtvit import steps
from dtvit import workdir as workdir_lib
from dtvit import workdir_lock
from dtvit.models import paths

PHASES = workdir_lib.PHASES  # ("ann", "snn", "finetune")
TRAINABLE = {"ann": ("weights", "neuron"), "snn": ("weights", "neuron", "scores"),
             "finetune": ("weights", "neuron")}
NONFINITE_POLICIES = ("error", "skip")
_BATCH_KEYS = ("image", "label", "target", "index")  # 'index': record indices under data.placement='device'
_HPARAM_METRICS = ("loss", "accuracy", "val_accuracy", "test_accuracy")


class NonFiniteError(FloatingPointError):
  """Raised when a step goes non-finite (config `nonfinite='error'`), or after `max_consecutive_skips` skipped
  steps in a row (`nonfinite='skip'`; then `skipping` is True)."""
  skipping = False


class Preempted(Exception):
  """Raised after SIGTERM (preemption) or SIGINT (Ctrl-C) once the current state is checkpointed; `signum` says
  which (`dtvit.main` exits with 128 + signum: 143 or 130)."""
  signum = signal.SIGTERM


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
    if pc.get("max_consecutive_skips", 1) < 1:
      raise ValueError(f"{p}.max_consecutive_skips must be >= 1, got {pc.max_consecutive_skips}.")
    if pc.temperature_start <= 0 or pc.temperature_end <= 0:
      raise ValueError(f"{p}: mask temperatures must be > 0.")
    if pc.batch_size < 1:
      raise ValueError(f"{p}.batch_size must be >= 1, got {pc.batch_size}.")
    if pc.sync_every < 1:
      raise ValueError(f"{p}.sync_every must be >= 1 (1: read every step's flags at once), got {pc.sync_every}.")
    _check_loss_options(config, phases, p)
    _check_periodic_eval(config, p)
  for p in phases:
    models.build_model(config.model, 2, phase="snn" if p != "ann" else "ann")


def _check_loss_options(config, phases, phase: str) -> None:
  pc = config[phase]
  if steps.loss_option(pc) not in losses.LOSSES:
    raise ValueError(f"{phase}.loss={pc.loss!r}; choose one of {losses.LOSSES}.")
  weight = steps.distill_weight(pc)
  if not weight >= 0:
    raise ValueError(f"{phase}.distill_weight must be >= 0 (0 = no distillation), got {weight}.")
  if weight == 0:
    return
  if phase == "ann":
    raise ValueError("ann.distill_weight must be 0: the ANN twin is the teacher, it cannot distil from itself.")
  if not pc.distill_temperature > 0:
    raise ValueError(f"{phase}.distill_temperature must be > 0, got {pc.distill_temperature}.")
  if _twin_source(config, "", phases, phase) is None:
    raise ValueError(f"{phase}.distill_weight={weight} needs an ANN twin: set {phase}.distill_from (or "
                     f"{phase}.init_from) to an ANN phase's checkpoint directory, or run the 'ann' phase first.")


def _check_periodic_eval(config, phase: str) -> None:
  every, split = config[phase].eval_every, config.data.periodic_eval_split
  if every < 0:
    raise ValueError(f"{phase}.eval_every must be >= 0 (0 = no evaluation during training), got {every}.")
  if split not in ("val", "test"):
    raise ValueError(f"data.periodic_eval_split={split!r}; choose 'val' (held out from train) or 'test'.")
  if every and split == "val" and config.data.val_examples <= 0:
    raise ValueError(f"{phase}.eval_every={every} evaluates the 'val' split, which is empty: set "
                     f"data.val_examples (train examples to hold out, e.g. 500), or data.periodic_eval_split=test.")


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


def _twin_source(config, workdir, phases, phase) -> str | None:
  """The ANN twin's checkpoint directory for distillation in `phase`: `distill_from`, else `init_from`, else this
  run's 'ann' phase when it runs before `phase`; None when there is none."""
  pc = config[phase]
  if pc.get("distill_from", ""):
    return pc.distill_from
  if pc.init_from:
    return pc.init_from
  if "ann" in phases and phases.index("ann") < phases.index(phase):
    return os.path.join(workdir, "ann", "checkpoints")
  return None


def twin_variables(config, workdir, phases, phase, info, rng, *, mesh):
  """(the ANN twin's model, its variables on the mesh, its source) for distillation in `phase`, or None when
  `distill_weight` is 0. The variables are read from the checkpoint at every launch (they never change), so a
  resumed run distils from the same twin."""
  if steps.distill_weight(config[phase]) <= 0:
    return None
  source = _twin_source(config, workdir, phases, phase)
  twin = models.phase_model(config.model, info.num_classes, "ann")
  init = _init_fn(twin, info.image_shape)
  variables = checkpointing.restore_variables(source, _abstract(init, mesh, rng), what=f"{phase} ANN twin",
                                              fresh=lambda: _run_once(init, mesh, rng),
                                              reinit_on_mismatch=paths.is_scores_path)
  logging.info("%s: distilling from the ANN twin of %s", phase, source)
  return twin, variables, source


def twin_cost(ph, twin, twin_vars, state, image_shape, num_classes) -> dict:
  """What the twin adds to a train step, as matmul FLOPs of one global batch (`inference.matmul_flops`, counted
  from the traced programs: no timing noise): the twin's forward pass, and the train step's loss and gradient
  with and without it."""
  pc = ph.pc
  images = jax.ShapeDtypeStruct((pc.batch_size, *image_shape), jnp.float32)
  batch = {"image": images, "label": jax.ShapeDtypeStruct((pc.batch_size,), jnp.int32),
           "target": jax.ShapeDtypeStruct((pc.batch_size, num_classes), jnp.float32)}
  spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  params, bs, tv = spec(state["params"]), spec(state["batch_stats"]), spec(twin_vars)
  temperature = jax.ShapeDtypeStruct((), jnp.float32)

  def grad_flops(fn, *args):
    return inference.matmul_flops(jax.value_and_grad(fn, has_aux=True), params, bs, batch, temperature, *args)

  with_twin = steps.make_loss_fn(ph.model, pc, phase=ph.name, op_weights=ph.op_weights, twin_model=twin)
  without = steps.make_loss_fn(ph.model, _no_distill(pc), phase=ph.name, op_weights=ph.op_weights)
  forward = inference.matmul_flops(lambda v, x: steps.twin_logits(twin, v, x), tv, images)
  step_with, step_without = grad_flops(with_twin, tv), grad_flops(without)
  return {"twin_forward_flops_per_step": forward, "train_step_flops_with_twin": step_with,
          "train_step_flops_without_twin": step_without,
          "twin_share_of_step_flops": round((step_with - step_without) / step_with, 4) if step_with else None}


def _no_distill(pc):
  c = pc.copy_and_resolve_references()
  c.distill_weight = 0.0
  return c


# ------------------------------------------------------------------------------------------------------------
# The training loop.


class _SigtermFlag:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the loop checks after each step, so either
  checkpoints the current step and raises `Preempted` (its `signum` and message name the signal). A second
  Ctrl-C stops at once with KeyboardInterrupt, without that checkpoint."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.raised = False
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.raised = True
    self.signum = self.signum or signum
    if signum == signal.SIGINT:  # os.write: logging may hold its lock in the interrupted frame
      os.write(2, b"\nCtrl-C: checkpointing after this step, then stopping (Ctrl-C again: stop now, unsaved)\n")

  def __exit__(self, exc_type, exc, tb):
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    if isinstance(exc, Preempted) and self.signum is not None:
      exc.signum = self.signum
      name = signal.Signals(self.signum).name
      if name != "SIGTERM":
        exc.args = (str(exc).replace("SIGTERM", name, 1),)


class _MetricLog:
  """A phase's metrics since the last log point and its logged history. Both travel in the checkpoint
  (`meta`), so a resumed run logs and summarises exactly what an uninterrupted one does. `meter` measures the
  throughput between log points (steps/s, images/s, ETA), written with the other scalars."""

  def __init__(self, writer, meta: dict, meter: metrics_lib.Throughput | None = None):
    self.writer = writer
    self.meter = meter
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
  augment_fn: Any = None    # (step, batch) -> batch inside the train step: the resident gather, mixup / cutmix
  table: dict | None = None  # data.placement='device': the resident train split, replicated (resident.py)
  twin: Any = None          # distillation: the ANN twin's model (phase 'ann'), or None
  twin_variables: Any = None  # and its variables on the mesh (an argument of the jitted step, not a constant)


def make_augment_fn(config, info, pc=None):
  """What the train step does to its batch first, on device (keyed by (seed, step)), or None: under
  `data.placement='device'` the gather, crop, flip and normalisation of the resident records
  (`resident.make_fetch`), then mixup / cutmix (`data.mix_batch`) when either is on, switched off from the
  phase's step `pc.mixup_off_step` on (0 or no `pc`: never)."""
  aug = config.data.augment
  fetch = None
  if config.data.placement == "device":
    fetch = resident.make_fetch(config.data, seed=config.seed, num_classes=info.num_classes)
  if aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0:
    return fetch

  off_step = pc.get("mixup_off_step", 0) if pc is not None else 0

  def augment(step, batch):
    if fetch is not None:
      batch = fetch(step, batch)
    image, target = data.scheduled_mix_batch(data.mix_key(config.seed, step), step, batch["image"],
                                             batch["target"], off_step=off_step, mixup_alpha=aug.mixup_alpha,
                                             cutmix_alpha=aug.cutmix_alpha)
    return dict(batch, image=image, target=target)

  return augment


def train_feed(config, pc, info, mesh, start: int):
  """(this process's numpy train batches from step `start` on, the resident table on the mesh or None)."""
  if config.data.placement != "device":
    return data.train_batches(config.data, global_batch_size=pc.batch_size, seed=config.seed,
                              start_step=start, num_classes=info.num_classes), None
  table = resident.load_table(config.data)
  batches = resident.index_batches(info.num_train, global_batch_size=pc.batch_size, seed=config.seed,
                                   start_step=start, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  rep = sharding.replicated(mesh)
  return batches, {k: jax.make_array_from_callback(v.shape, rep, lambda i, v=v: v[i]) for k, v in table.items()}


def _kept(ckpt) -> str:
  ckpt.wait()
  last_good = ckpt.latest_step()
  return (f"the last good checkpoint (step {last_good}) is kept in {ckpt.directory} and a rerun resumes from it"
          if last_good is not None else "no checkpoint had been written yet")


def _stop_on_nonfinite(ph: Phase, ckpt, stepper: _Stepper, state, batch, step: int) -> None:
  """Says where the step went non-finite; raises under `nonfinite='error'`. Under 'skip' warns once per run of
  consecutive skips (the first, diagnosed) and raises when the run reaches `max_consecutive_skips`."""
  if ph.pc.nonfinite == "skip" and stepper.skipped:
    stepper.skipped.append(step + 1)
  else:
    stepper.where = stepper.diagnose(state, batch, step)
    if ph.pc.nonfinite != "skip":
      raise NonFiniteError(
          f"{ph.name}: non-finite values at step {step + 1}: {stepper.where}. Training stopped; {_kept(ckpt)}. "
          f"Lower the learning rate, fix the data, or set {ph.name}.nonfinite='skip' to skip such batches.")
    stepper.skipped = [step + 1]
    logging.warning("%s: step %d skipped (params unchanged), %s. Further skips in a row are reported when they "
                    "end (at most %s.max_consecutive_skips=%d).", ph.name, step + 1, stepper.where, ph.name,
                    ph.pc.max_consecutive_skips)
  if len(stepper.skipped) >= ph.pc.max_consecutive_skips:
    first, n = stepper.skipped[0], len(stepper.skipped)
    error = NonFiniteError(
        f"{ph.name}: {n} consecutive steps skipped (steps {first} to {step + 1}, {ph.name}.max_consecutive_skips="
        f"{ph.pc.max_consecutive_skips}): every batch goes non-finite from the last good state, so skipping "
        f"cannot go on; at step {first}: {stepper.where}. Training stopped; {_kept(ckpt)}. Lower the learning "
        f"rate or fix the data.")
    error.skipping = True
    raise error


def _end_of_skips(ph: Phase, stepper: _Stepper, step: int) -> None:
  """Reports a run of consecutive skips that a finite step (`step`, 0-based) ended."""
  if len(stepper.skipped) > 1:
    logging.warning("%s: steps %d to %d skipped (%d in a row, params unchanged); step %d is finite again.",
                    ph.name, stepper.skipped[0], stepper.skipped[-1], len(stepper.skipped), step + 1)
  stepper.skipped = []


_FLAG_KEYS = ("finite", "stop", "go")


def _gated(step_fn):
  """The train step with two flags that let the host read a step's flags one step late.

  (state, batch, go, stop_D[, twin variables]) -> (state, metrics): the step runs only where `go` (the previous
  step's 'go');
  otherwise the state comes back unchanged. 'go' is sticky: it turns False at the first step that is not
  finite or after which a process asked to stop, and stays False until the host passes True again. So when
  the host reads the flags of several steps at once, the state is the one to diagnose or re-run from after a
  bad step, and the one to checkpoint after a stop; the steps queued after it changed nothing. stop_D: bool
  [devices], each process's SIGTERM flag on its devices; metrics 'stop' is their OR, so every process reads
  the same answer at the same step."""

  def gated(state, batch, go, stop_D, *twin):
    new_state, metrics = step_fn(state, batch, *twin)
    new_state = jax.tree.map(lambda new, old: jnp.where(go, new, old), new_state, state)
    stop = jnp.any(stop_D)
    return new_state, dict(metrics, stop=stop, go=go & metrics["finite"] & ~stop)

  return gated


class _Stepper:
  """The jitted gated train step of a phase, its constant flag arrays, its non-finite diagnosis (jitted at its
  first use, once) and the run of consecutive skipped steps (1-based) under `nonfinite='skip'`."""

  def __init__(self, ph: Phase, state):
    self._ph, self._diagnose, self.skipped, self.where = ph, None, [], ""
    state_sharding = sharding.state_shardings(ph.mesh, state)
    rep, data_sharded = sharding.replicated(ph.mesh), sharding.batch_sharded(ph.mesh)
    step_fn = steps.make_train_step(ph.model, ph.tx, ph.pc, phase=ph.name, op_weights=ph.op_weights,
                                    augment_fn=ph.augment_fn, twin_model=ph.twin)
    batch_sharding = data_sharded if ph.table is None else {"index": data_sharded, **{k: rep for k in ph.table}}
    self._twin = () if ph.twin is None else (ph.twin_variables,)
    twin_sharding = tuple(jax.tree.map(lambda x: x.sharding, t) for t in self._twin)
    self._fn = compilation.jit(_gated(step_fn),
                               in_shardings=(state_sharding, batch_sharding, rep, data_sharded, *twin_sharding),
                               out_shardings=(state_sharding, rep), donate_argnums=(0,))
    self.go = jax.device_put(jnp.array(True), rep)
    local = len(ph.mesh.local_devices)
    self._stop = {f: jax.make_array_from_process_local_data(data_sharded, np.full((local,), f)) for f in (0, 1)}

  def __call__(self, state, batch, go, stop: bool):
    return self._fn(state, batch, go, self._stop[int(stop)], *self._twin)

  def diagnose(self, state, batch, step: int) -> str:
    """`steps.make_diagnosis` of this phase: where the step from `state` on `batch` went non-finite."""
    if self._diagnose is None:
      ph = self._ph
      self._diagnose = steps.make_diagnosis(ph.model, ph.tx, ph.pc, phase=ph.name, op_weights=ph.op_weights,
                                            augment_fn=ph.augment_fn, twin_model=ph.twin)
    return self._diagnose(state, batch, step, *self._twin)


@dataclasses.dataclass
class _Pending:
  """A dispatched step whose flags the host has not read yet."""
  step: int       # 0-based; the state after it has counter step + 1
  batch: dict     # its global batch, to diagnose it
  metrics: dict   # device arrays, with 'finite', 'stop', 'go'


def _settle(ph: Phase, ckpt, stepper: _Stepper, state, pending: list[_Pending],
            log: _MetricLog) -> tuple[int | None, bool]:
  """Reads the flags of the pending steps (one transfer; waits for the last) and takes them in order: a finite
  step's metrics go to the log; the first non-finite one raises under 'error' and is counted as skipped under
  'skip' (`_stop_on_nonfinite`; `state` is the one it started from: the steps after it were gated off). Returns (the position in `pending` of the
  first step after which the gate closed, or None; whether it closed because a process asked to stop)."""
  flags = jax.device_get([{k: p.metrics.pop(k) for k in _FLAG_KEYS} for p in pending])
  for i, (p, f) in enumerate(zip(pending, flags)):
    if f["finite"]:
      log.add(p.metrics)
      if stepper.skipped:
        _end_of_skips(ph, stepper, p.step)
    else:
      _stop_on_nonfinite(ph, ckpt, stepper, state, p.batch, p.step)
    if not f["go"]:
      return i, bool(f["stop"])
  return None, False


def _check(ph: Phase, ckpt, stepper: _Stepper, state, pending: list[_Pending], log: _MetricLog,
           sigterm) -> tuple[dict, int | None]:
  """Settles the pending steps; under 'skip' re-runs the steps queued after a skipped one (they were gated
  off), and settles those. Returns (the state with every pending step applied or skipped, the step count
  at which a process asked to stop, or None)."""
  while pending:
    closed, stop = _settle(ph, ckpt, stepper, state, pending, log)
    if closed is None:
      break
    if stop:
      return state, pending[closed].step + 1
    queued, pending, go = pending[closed + 1:], [], stepper.go
    for p in queued:
      state, metrics = stepper(state, p.batch, go, sigterm.raised)
      pending.append(_Pending(p.step, p.batch, metrics))
      go = metrics["go"]
  return state, None


def _save(ph: Phase, ckpt, done: int, state, log: _MetricLog, *, stop: bool) -> None:
  ckpt.save(done, state, {"step": done, "phase": ph.name, "data_position": done, **log.meta()}, force=True)
  if stop:
    ckpt.wait()
    raise Preempted(f"SIGTERM during {ph.name}: checkpoint saved at step {done}; rerun the same command "
                    f"to resume.")


def _at_sync_point(ph: Phase, ckpt, done: int, start: int, end: int) -> bool:
  """Where the loop waits for the step it just dispatched and acts on the state: the first (its time is not
  throughput), log, evaluation and checkpoint steps, and the last. The same steps in every process."""
  pc = ph.pc
  return (done in (start + 1, end) or done % pc.log_every == 0 or ckpt.should_save(done)
          or (pc.eval_every > 0 and done % pc.eval_every == 0))


def _at_check_point(ph: Phase, ckpt, done: int, start: int, end: int) -> bool:
  """Where the loop reads the flags of the steps dispatched since the last such point: every `sync_every`
  steps and at sync points. The same steps in every process."""
  return done % ph.pc.sync_every == 0 or _at_sync_point(ph, ckpt, done, start, end)


def _log_and_evaluate(ph: Phase, log: _MetricLog, state, done: int, end: int, periodic_eval) -> None:
  if done % ph.pc.log_every == 0 or done == end:
    rates = log.meter.rates(done)  # first: the work below is not training
    log.write(done, {"learning_rate": float(ph.schedule(done)),
                     **evaluate_lib.step_scalars(ph.model, state["params"]), **rates})
  if periodic_eval is not None and (done % ph.pc.eval_every == 0 or done == end):
    log.meter.pause()
    log.writer.write_scalars(done, periodic_eval({"params": state["params"], "batch_stats": state["batch_stats"]}))
    log.meter.resume()


def train_loop(ph: Phase, state, meta: dict, batches, *, ckpt, writer, start: int, end: int,
               batch_hook=None, periodic_eval=None) -> tuple[dict, list[dict]]:
  """Trains steps [start, end) on `batches` (this process's numpy batches from step `start` on); returns the
  state and the logged history.

  Logs every `log_every` steps (with steps/s, images/s and the ETA); `periodic_eval(variables) -> {tag:
  value}` every `eval_every` steps and at `end`; checkpoints every `checkpoint_every` steps (the
  `Checkpointer`'s interval), at `end`, and at the step after a SIGTERM reached any process, then raises
  `Preempted`.

  The host never waits for a step by itself: it dispatches `sync_every` steps, then reads their flags
  (finite, stop) in one transfer (`_check`); the device gates off every step after a bad one or a stop
  (`_gated`), so the outcome is the one of a loop that waits after every step, bitwise. It also waits at sync
  points (`_at_sync_point`), where logging, evaluation and checkpoints need the state anyway.
  """
  stepper = _Stepper(ph, state)
  log = _MetricLog(writer, meta, metrics_lib.Throughput(ph.pc.num_steps, ph.pc.batch_size))
  bar = metrics_lib.progress_bar(ph.pc.num_steps, initial=start, desc=ph.name)
  pending, go, local, batch = [], stepper.go, None, None
  with _SigtermFlag() as sigterm:
    try:
      for step in range(start, end):
        previous, local = local, next(batches)
        if batch_hook is not None:
          local = batch_hook(ph.name, step, local)
        if local is not previous:  # resident index chunks serve several steps: sent once
          batch = sharding.global_batch(ph.mesh, {k: v for k, v in local.items() if k in _BATCH_KEYS})
          batch.update(ph.table or {})
        state, metrics = stepper(state, batch, go, sigterm.raised)
        bar.update(1)
        pending.append(_Pending(step, batch, metrics))
        go, done = metrics["go"], step + 1
        if not _at_check_point(ph, ckpt, done, start, end):
          continue
        state, stopped = _check(ph, ckpt, stepper, state, pending, log, sigterm)
        pending, go = [], stepper.go
        if stopped is not None and stopped < done:  # the steps after the stop were gated off
          _save(ph, ckpt, stopped, state, log, stop=True)
        if _at_sync_point(ph, ckpt, done, start, end):
          _log_and_evaluate(ph, log, state, done, end, periodic_eval)
          if done == start + 1 or done % ph.pc.log_every == 0:
            log.meter.start(done)  # the next interval starts after this point's work
        if stopped is not None or done == end or ckpt.should_save(done):
          _save(ph, ckpt, done, state, log, stop=stopped is not None)
    finally:
      bar.close()
      ckpt.wait()
  return state, log.history


# ------------------------------------------------------------------------------------------------------------
# Phases and runs.


def _periodic_eval(config, ph: Phase):
  """variables -> {'<split>_accuracy': ...} on `data.periodic_eval_split` (SNN phases with hard masks, as at
  the end), or None when `eval_every` is 0."""
  if not ph.pc.eval_every:
    return None
  split = config.data.periodic_eval_split
  model = ph.model if ph.name == "ann" else models.with_mask(ph.model, hard=True)
  return lambda variables: {f"{split}_accuracy": evaluate_lib.evaluate(model, variables, config, ph.mesh,
                                                                       split=split)["accuracy"]}


def _start(ph: Phase, config, workdir, phases, info, ckpt) -> tuple[dict, dict]:
  """The phase's state and checkpoint meta: restored from its newest readable checkpoint (an unreadable one is
  moved aside, `Checkpointer.restore_latest`), else created (meta {})."""
  if ckpt.latest_step() is not None:
    restored = ckpt.restore_latest(abstract_state(ph.model, ph.tx, info.image_shape, ph.mesh))
    if restored is not None:
      logging.info("%s: resumed from step %d", ph.name, int(restored[1]["step"]))
      return restored
    logging.warning("%s: no readable checkpoint left; the phase starts afresh.", ph.name)
  rng = jax.random.key(config.seed)
  variables = initial_variables(config, workdir, phases, ph.name, ph.model, info, rng, mesh=ph.mesh)
  return create_state(ph.model, ph.tx, rng, info.image_shape, ph.mesh, variables), {}


class _NoRewrites:
  """A metric writer that leaves out the values of steps its event files already hold for a tag, so a run
  resumed from a checkpoint older than its last log line adds no duplicate TensorBoard steps. (The resumed run
  recomputes those steps bitwise; after an allowed config change the first launch's values stay.)"""

  def __init__(self, writer, logdir: str):
    self._writer = writer
    self._last = {tag: max(s for s, _ in points) for tag, points in metrics_lib.read_scalars(logdir).items()}

  def _tag(self, key: str) -> str:
    prefix = getattr(self._writer, "prefix", "")
    return f"{prefix}/{key}" if prefix else key

  def write_scalars(self, step: int, scalars) -> None:
    new = {k: v for k, v in scalars.items() if step > self._last.get(self._tag(k), -1)}
    if new:
      self._writer.write_scalars(step, new)

  def __getattr__(self, name):
    return getattr(self._writer, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._writer.close()


def _phase_summary(state, history, clock: dict) -> dict:
  summary: dict[str, Any] = {"steps": int(jax.device_get(state["step"])),
                             "train_time_s": round(clock["train_time_s"], 1),
                             "cpu_time_s": round(clock["cpu_time_s"], 1)}
  if history:
    summary["train_loss_first"] = history[0]["loss"]
    summary["train_loss_last"] = history[-1]["loss"]
  return summary


def train_phase(config, workdir: str, phase: str, *, mesh, info, phases, stop_at_step: int | None = None,
                batch_hook=None) -> dict:
  """Trains one phase (resuming from its latest checkpoint), evaluates it, returns its summary.

  `train_time_s` is the training time of every launch up to the phase's last checkpoint (it travels in the
  checkpoint meta; time spent after the last checkpoint of a killed launch is redone, not counted twice), and
  `cpu_time_s` the CPU time of this process's threads (all cores) over the same span.
  """
  pc = config[phase]
  phase_dir = os.path.join(workdir, phase)
  model = models.phase_model(config.model, info.num_classes, phase)
  sharding.check_batch_size(pc.batch_size, mesh, f"{phase}.batch_size")
  tx, schedule = optim.make_optimizer(pc.optimizer, num_steps=pc.num_steps, trainable=TRAINABLE[phase])
  op_counts = None if phase == "ann" else energy_lib.op_counts(model, info.image_shape)  # traced once per phase
  op_weights = None if phase == "ann" else energy_lib.module_op_weights(model, counts=op_counts)
  ph = Phase(phase, pc, model, tx, schedule, op_weights, mesh, make_augment_fn(config, info, pc))
  ckpt = checkpointing.Checkpointer(workdir_lib.checkpoint_dir(workdir, phase), max_to_keep=pc.max_to_keep,
                                    save_interval_steps=pc.checkpoint_every, save_first=False)
  state, meta = _start(ph, config, workdir, phases, info, ckpt)
  twin = twin_variables(config, workdir, phases, phase, info, jax.random.key(config.seed), mesh=mesh)
  distill = None
  if twin is not None:
    ph = dataclasses.replace(ph, twin=twin[0], twin_variables=twin[1])
    distill = {"source": twin[2], "weight": float(pc.distill_weight), "temperature": float(pc.distill_temperature),
               "twin_macs_per_image": energy_lib.ann_macs(twin[0], info.image_shape),
               **twin_cost(ph, twin[0], twin[1], state, info.image_shape, info.num_classes)}
  start, history = int(meta.get("step", 0)), meta.get("history", [])
  end = pc.num_steps if stop_at_step is None else min(stop_at_step, pc.num_steps)
  t0, c0 = time.time(), time.process_time()
  clock = {"train_time_s": float(meta.get("train_time_s", 0.0)), "cpu_time_s": float(meta.get("cpu_time_s", 0.0))}
  before = dict(clock)
  # The time at each save goes into its meta; the summary reports the last save's, as a later resume would.
  ckpt.extra_meta = lambda: clock.update(train_time_s=before["train_time_s"] + time.time() - t0,
                                         cpu_time_s=before["cpu_time_s"] + time.process_time() - c0) or dict(clock)
  # Closed however the phase ends (a non-finite step, a preemption), so what was logged reaches the disk.
  with _NoRewrites(metrics_lib.create_default_writer(phase_dir), phase_dir) as writer:
    if start == 0:
      writer.write_hparams(metrics_lib.flatten_hparams(config.to_dict()), metrics=_HPARAM_METRICS)
    if start < end:
      batches, table = train_feed(config, pc, info, mesh, start)
      ph = dataclasses.replace(ph, table=table)
      state, history = train_loop(ph, state, meta, batches, ckpt=ckpt, writer=writer, start=start, end=end,
                                  batch_hook=batch_hook, periodic_eval=_periodic_eval(config, ph))
    ckpt.close()
    summary = _phase_summary(state, history, clock)
    if distill is not None:
      summary["distill"] = distill
    if stop_at_step is not None and end < pc.num_steps:
      summary["stopped_at"] = end
    else:
      variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
      summary.update(evaluate_lib.evaluate_phase(model, variables, config, mesh, info, phase,
                                                 op_counts=op_counts))
      writer.write_scalars(summary["steps"], {k: v for k, v in summary.items()
                                              if isinstance(v, float) and k.endswith("accuracy")})
  return summary


def _base_defaults() -> dict:
  """{dotted key: default} of the base config (`configs.common`), for resuming runs older than a key."""
  from configs import common  # pylint: disable=g-import-not-at-top  # the recipes' package, installed with dtvit
  return workdir_lib.flatten_config(common.get_base_config().to_dict())


def _check_sources(config, phases) -> None:
  """Every `init_from` checkpoint exists and holds a finished step (checked before anything is written)."""
  for phase in phases:
    if config[phase].init_from:
      checkpointing.check_source(config[phase].init_from, f"{phase}.init_from")
    if config[phase].get("distill_from", ""):
      checkpointing.check_source(config[phase].distill_from, f"{phase}.distill_from")


def run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False, allow_changes=(),
        stop_at_step: int | None = None, batch_hook=None) -> dict:
  """Runs every phase of `config.phases` in `workdir`; writes and returns `<workdir>/summary.json`.

  A workdir holding a run resumes it: keys that do not change the result so far may differ, any other only when
  named in `allow_changes` (dotted keys; `dtvit.workdir` has the rules; each launch is kept in
  `<workdir>/config_history.json`). `overwrite` moves that run aside instead. A finished run is not touched: its
  summary is returned. config.json is written only once the config, data and `init_from` checks pass.

  `stop_at_step` stops the first unfinished phase after that many steps (for tests of resume).
  `batch_hook(phase, step, local_batch) -> local_batch` may edit this process's numpy train batch (dict of
  'image', 'label', 'target') before it is sharded; step counts from 0 (fault injection in tests).

  Raises `workdir_lock.WorkdirBusyError` when another run holds `workdir` (`dtvit.workdir_lock`, taken before
  the workdir is read), `Preempted` after SIGTERM or SIGINT (state checkpointed at the current step),
  `NonFiniteError` on a non-finite step with `nonfinite='error'` (naming the step and the first module; the last
  good checkpoint is kept; its `phase` and `lr` attributes say what to change).
  """
  validate_config(config)
  phases = parse_phases(config)
  mesh = sharding.make_mesh(config.mesh.num_devices)
  for phase in phases:  # now, not after hours of training
    sharding.check_batch_size(config[phase].batch_size, mesh, f"{phase}.batch_size")
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  with workdir_lock.hold(workdir):  # one run per workdir, from before its records are read to the end
    return _run_locked(config, workdir, phases, mesh, overwrite=overwrite, allow_changes=allow_changes,
                       stop_at_step=stop_at_step, batch_hook=batch_hook)


def _run_locked(config, workdir, phases, mesh, *, overwrite, allow_changes, stop_at_step, batch_hook) -> dict:
  launch = workdir_lib.plan_launch(workdir, config.to_dict(), overwrite=overwrite, allow_changes=allow_changes,
                                   defaults=_base_defaults())
  finished = workdir_lib.finished_summary(launch)
  if finished is not None:
    logging.info("%s holds this run, finished (summary.json); nothing to do.%s", workdir,
                 f" The allowed changes {list(launch.allowed)} would need a new run." if launch.allowed else "")
    return finished
  info = data.get_info(config.data)
  resident.check(config.data)
  _check_sources(config, phases)
  workdir_lib.record_launch(launch)
  data.write_spec(workdir, config.data)  # normalisation and class names, for use without the data
  t0 = time.time()
  summary: dict[str, Any] = {"workdir": os.path.abspath(workdir), "phases": phases,
                             "devices": mesh.devices.size, "processes": jax.process_count()}
  for phase in phases:
    logging.info("=== phase %s ===", phase)
    try:
      summary[phase] = train_phase(config, workdir, phase, mesh=mesh, info=info, phases=phases,
                                   stop_at_step=stop_at_step, batch_hook=batch_hook)
    except NonFiniteError as e:
      e.phase, e.lr = phase, float(config[phase].optimizer.lr)
      skip = "" if getattr(e, "skipping", False) else f"; {phase}.nonfinite='skip' needs no permission"
      e.args = (f"{e} (A rerun resumes with a lower {phase}.optimizer.lr when allowed: "
                f"--allow_changes={phase}.optimizer.lr, or train.run(..., allow_changes=['{phase}.optimizer.lr'])"
                f"{skip}.)",)
      raise
    if "stopped_at" in summary[phase]:
      return summary
  summary["wall_time_s"] = round(time.time() - t0, 1)
  workdir_lib.write_summary(workdir, summary)
  return summary
