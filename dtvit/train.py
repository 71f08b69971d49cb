"""Training a run: its config checks, its phases in order, and each phase's setup and summary.

The path of a run (`run`): for each phase in `config.phases` ('ann', 'snn', 'finetune'): the train state, created
on the mesh (fresh, or params from the previous phase's / `init_from` checkpoint, thresholds from the ANN's clip
values), or restored from this phase's latest checkpoint (`dtvit.state`) -> the phase's training loop
(`dtvit.loop`) -> checkpoint -> `evaluate.evaluate_phase`; then `<workdir>/summary.json` with accuracies, time
steps and energy.

The path of a batch: `data.train_batches` (numpy, this process's slice) -> `sharding.global_batch` (global array
split over the 'data' mesh axis) -> the train step (`steps.make_train_step` under one `jax.jit`: model forward on
the folded time x batch axis, cross-entropy + time-step cost, gradients, optax update) -> metrics.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from dtvit import checkpointing
from dtvit import config_lib
from dtvit import data
from dtvit import energy as energy_lib
from dtvit import evaluate as evaluate_lib
from dtvit import loop
from dtvit import losses
from dtvit import masks as masks_lib
from dtvit import metrics as metrics_lib
from dtvit import models
from dtvit import optim
from dtvit import preemption
from dtvit import recipes
from dtvit import sharding
from dtvit import state as state_lib
from dtvit import steps
from dtvit import storage
from dtvit import workdir as workdir_lib
from dtvit import workdir_lock
from dtvit.data import resident

PHASES = workdir_lib.PHASES  # ("ann", "snn", "finetune")
TRAINABLE = {"ann": ("weights", "neuron"), "snn": ("weights", "neuron", "scores"),
             "finetune": ("weights", "neuron")}
NONFINITE_POLICIES = ("error", "skip")
_HPARAM_METRICS = ("loss", "accuracy", "val_accuracy", "test_accuracy")
# The errors a run raises, where `dtvit.main` and users catch them.
NonFiniteError = loop.NonFiniteError
Preempted = preemption.Preempted


def parse_phases(config) -> list[str]:
  phases = [p.strip() for p in str(config.phases).split(",") if p.strip()]
  bad = [p for p in phases if p not in PHASES]
  if bad or not phases:
    raise ValueError(f"config.phases={config.phases!r}: each phase must be one of {PHASES} (comma-separated).")
  return phases


def validate_config(config) -> None:
  config_lib.check_renamed_values(config.to_dict())
  """Errors for invalid values, before anything is built or written."""
  phases = parse_phases(config)
  if config.model.max_time_steps < 1:
    raise ValueError(f"model.max_time_steps (T_max) must be >= 1, got {config.model.max_time_steps}.")
  for p in phases:
    pc = config[p]
    if pc.train_steps < 0:
      raise ValueError(f"{p}.train_steps must be >= 0, got {pc.train_steps}.")
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
  if state_lib.twin_source(config, "", phases, phase) is None:
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
# The phases and the run.


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



def _periodic_eval(config, ph: loop.Phase):
  """variables -> {'<split>_accuracy': ...} on `data.periodic_eval_split` (SNN phases with hard masks, as at
  the end), or None when `eval_every` is 0."""
  if not ph.pc.eval_every:
    return None
  split = config.data.periodic_eval_split
  model = ph.model if ph.name == "ann" else models.with_mask(ph.model, hard=True)
  return lambda variables: {f"{split}_accuracy": evaluate_lib.evaluate(model, variables, config, ph.mesh,
                                                                       split=split)["accuracy"]}



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
  phase_dir = storage.join(workdir, phase)
  model = models.phase_model(config.model, info.num_classes, phase)
  sharding.check_batch_size(pc.batch_size, mesh, f"{phase}.batch_size")
  tx, schedule = optim.make_optimizer(pc.optimizer, train_steps=pc.train_steps, trainable=TRAINABLE[phase])
  op_counts = None if phase == "ann" else energy_lib.op_counts(model, info.image_shape)  # traced once per phase
  op_weights = None if phase == "ann" else energy_lib.module_op_weights(model, counts=op_counts)
  ph = loop.Phase(phase, pc, model, tx, schedule, op_weights, mesh, make_augment_fn(config, info, pc))
  ckpt = checkpointing.Checkpointer(workdir_lib.checkpoint_dir(workdir, phase), max_to_keep=pc.max_to_keep,
                                    save_interval_steps=pc.checkpoint_every, save_first=False)
  state, meta = state_lib.start(config, workdir, phases, phase, model, tx, info, ckpt, mesh=mesh)
  twin = state_lib.twin_variables(config, workdir, phases, phase, info, jax.random.key(config.seed), mesh=mesh)
  distill = None
  if twin is not None:
    ph = dataclasses.replace(ph, twin=twin[0], twin_variables=twin[1])
    distill = {"source": twin[2], "weight": float(pc.distill_weight), "temperature": float(pc.distill_temperature),
               "twin_macs_per_image": energy_lib.ann_macs(twin[0], info.image_shape),
               **state_lib.twin_cost(ph, twin[0], twin[1], state, info.image_shape, info.num_classes)}
  start, history = int(meta.get("step", 0)), meta.get("history", [])
  end = pc.train_steps if stop_at_step is None else min(stop_at_step, pc.train_steps)
  t0, c0 = time.time(), time.process_time()
  clock = {"train_time_s": float(meta.get("train_time_s", 0.0)), "cpu_time_s": float(meta.get("cpu_time_s", 0.0))}
  before = dict(clock)
  # The time at each save goes into its meta; the summary reports the last save's, as a later resume would.
  ckpt.extra_meta = lambda: clock.update(train_time_s=before["train_time_s"] + time.time() - t0,
                                         cpu_time_s=before["cpu_time_s"] + time.process_time() - c0) or dict(clock)
  # Closed however the phase ends (a non-finite step, a preemption), so what was logged reaches the disk.
  with metrics_lib.NoRewrites(metrics_lib.create_default_writer(phase_dir), phase_dir) as writer:
    if start == 0:
      writer.write_hparams(metrics_lib.flatten_hparams(config.to_dict()), metrics=_HPARAM_METRICS)
    if start < end:
      batches, table = train_feed(config, pc, info, mesh, start)
      ph = dataclasses.replace(ph, table=table)
      state, history = loop.train_loop(ph, state, meta, batches, ckpt=ckpt, writer=writer, start=start, end=end,
                                  batch_hook=batch_hook, periodic_eval=_periodic_eval(config, ph))
    ckpt.close()
    summary = _phase_summary(state, history, clock)
    if distill is not None:
      summary["distill"] = distill
    if stop_at_step is not None and end < pc.train_steps:
      summary["stopped_at"] = end
    else:
      variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
      summary.update(evaluate_lib.evaluate_phase(model, variables, config, mesh, info, phase,
                                                 op_counts=op_counts))
      writer.write_scalars(summary["steps"], {k: v for k, v in summary.items()
                                              if isinstance(v, float) and k.endswith("accuracy")})
  return summary



def _base_defaults() -> dict:
  """{dotted key: default} of the base config (`dtvit.recipes`), for resuming runs older than a key."""
  return config_lib.flatten(recipes.get_base_config().to_dict())


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
  good checkpoint is kept; its `phase` and `lr` attributes say what to change),
  `checkpointing.WeightsOnlyCheckpointError` before anything is written when an unfinished or changed run would
  resume from a weights-only checkpoint (`dtvit.slim`), which has no optimizer state.
  """
  storage.check(workdir, "workdir")  # gs:// without gcsfs: one line naming the install extra, nothing written
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
  if launch.earlier and not launch.overwrite:  # nothing written yet: a slim run's records stay as they are
    for phase in phases:
      checkpointing.check_resumable(workdir_lib.checkpoint_dir(workdir, phase))
  info = data.get_info(config.data)
  resident.check(config.data)
  _check_sources(config, phases)
  workdir_lib.record_launch(launch)
  data.write_spec(workdir, config.data)  # normalisation and class names, for use without the data
  t0 = time.time()
  # The workdir's name (its path relative to its parent, a sweep's root): no path of this machine in the record.
  summary: dict[str, Any] = {"workdir": storage.basename(storage.abspath(workdir)), "phases": phases,
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
