"""The training loop of one phase: the gated asynchronous step loop, non-finite steps, logging, periodic
evaluation and checkpoints.

The host never waits for a step by itself: it dispatches `sync_every` steps, then reads their flags (finite,
stop) in one transfer; the device gates off every step after a bad one or a stop (`_gated`), so the outcome is
bitwise the one of a loop that waits after every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dtvit import compilation
from dtvit import evaluate as evaluate_lib
from dtvit import metrics as metrics_lib
from dtvit import models
from dtvit import preemption
from dtvit import sharding
from dtvit import steps

_BATCH_KEYS = ("image", "label", "target", "index")  # 'index': record indices under data.placement='device'


class NonFiniteError(FloatingPointError):
  """Raised when a step goes non-finite (config `nonfinite='error'`), or after `max_consecutive_skips` skipped
  steps in a row (`nonfinite='skip'`; then `skipping` is True)."""
  skipping = False


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
            log: metrics_lib.MetricLog) -> tuple[int | None, bool]:
  """Reads the flags of the pending steps (one transfer; waits for the last) and takes them in order: a finite
  step's metrics go to the log; the first non-finite one raises under 'error' and is counted as skipped under
  'skip' (`_stop_on_nonfinite`; `state` is the one it started from: the steps after it were gated off).
  Returns (the position in `pending` of the first step after which the gate closed, or None; whether it closed
  because a process asked to stop)."""
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


def _check(ph: Phase, ckpt, stepper: _Stepper, state, pending: list[_Pending], log: metrics_lib.MetricLog,
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


def _save(ph: Phase, ckpt, done: int, state, log: metrics_lib.MetricLog, *, stop: bool) -> None:
  ckpt.save(done, state, {"step": done, "phase": ph.name, "data_position": done, **log.meta()}, force=True)
  if stop:
    ckpt.wait()
    raise preemption.Preempted(f"SIGTERM during {ph.name}: checkpoint saved at step {done}; rerun the same command "
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


def _log_and_evaluate(ph: Phase, log: metrics_lib.MetricLog, state, done: int, end: int, periodic_eval) -> None:
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
  log = metrics_lib.MetricLog(writer, meta, metrics_lib.Throughput(ph.pc.train_steps, ph.pc.batch_size))
  bar = metrics_lib.progress_bar(ph.pc.train_steps, initial=start, desc=ph.name)
  pending, go, local, batch = [], stepper.go, None, None
  with preemption.SignalFlag() as sigterm:
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
