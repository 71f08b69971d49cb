"""One call from a workdir to a callable model, for notebooks and scripts: `dtvit.load(workdir)`.

  import dtvit
  run = dtvit.load("workdirs/quickstart")        # the latest phase of the run that has a checkpoint
  batch = next(run.batches())                     # {'image' [B, H, W, C] normalised, 'label' [B], 'mask' [B]}
  logits = run(batch["image"])                    # [B, K]; the SNN with its learned (hard) masks
  print(run.phase, run.steps_per_module)          # 'snn' {'blocks_0/attn': 3.0, 'blocks_0/mlp': 2.0, ...}
  fast, schedule = run.inference_fn()             # the same logits, masked steps not computed
  ann = run.variant(phase="ann")                  # the ANN twin with the same parameters
  x = run.preprocess(raw_uint8_images)            # normalised as in training (`<workdir>/data_spec.json`)
  print(run.class_names[int(run.predict(x)[0])])  # e.g. '7'

What it reads (the layout `dtvit.train.run` writes): `<workdir>/config.json` (the run's config),
`<workdir>/<phase>/checkpoints/` (Orbax, via `dtvit.checkpointing.restore_variables`: params and batch_stats of
the latest finished step) and `<workdir>/summary.json` (the run's test results). A run without a complete
summary.json (every phase of its config at its train_steps) is unfinished: `load` refuses it unless asked with
`allow_unfinished=True` (the CLIs' `--allow_unfinished`), and then logs a warning naming the phase and step.
`run.phase`, `run.step` and `run.finished` say what was loaded.

Images are what the run's input pipeline yields: float32 [B, H, W, C], normalised by the data set's mean and
std (`run.batches()` gives them). The model is the phase's evaluation model: for 'snn' and 'finetune' the SNN
with hard masks (binary, as `summary.json` reports), for 'ann' the ANN twin.

This module imports only the standard library at import time, so `import dtvit` stays light; JAX, Flax and
Orbax load on the first call of `load`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
from typing import Any, Iterator

PHASES = ("ann", "snn", "finetune")
MASK_MODES = ("hard", "off")
USER_ERROR_EXIT_STATUS = 1  # as `dtvit.main`'s


class UnfinishedRunError(ValueError):
  """`load` of a run whose summary.json does not show every phase of its config finished."""


@dataclasses.dataclass(frozen=True, eq=False)
class Loaded:
  """A trained model restored from a workdir. Build with `dtvit.load`.

  Attributes:
    workdir: the run's directory (absolute).
    phase: 'ann' | 'snn' | 'finetune': which phase's checkpoint the variables come from.
    config: the run's config (`ml_collections.ConfigDict` of `<workdir>/config.json`).
    info: the data set's `data.DatasetInfo` (num_classes, image_shape (H, W, C), split sizes).
    model: the `SpikingViT` this object runs: phase 'ann' (ANN twin) or 'snn' with hard masks (or masks off,
      see `variant`).
    variables: {'params', 'batch_stats'} restored from the checkpoint.
    masks: {masked module: float32 [T_max] in {0, 1}} the hard masks the SNN uses ({} for the ANN twin; all
      ones with masks off or disabled in the config).
    step_counts: {mask unit: {'active_steps', 'simulated_steps', 'mask', 'work'}} under the model's
      `mask.semantics` (`models.step_counts`): the one source of every step count and average below; {} for
      the ANN twin.
    summary: this phase's entry of `<workdir>/summary.json` (test accuracy, time steps, energy, ...), or None
      when the run has not written one yet.
    checkpoint_dir: where the variables were restored from.
    step: the checkpoint step the variables come from.
    finished: whether the run finished every phase of its config (an unfinished one loads only when asked).
  """
  workdir: str
  phase: str
  config: Any
  info: Any
  model: Any
  variables: dict
  masks: dict
  step_counts: dict
  summary: dict | None
  checkpoint_dir: str
  step: int = -1
  finished: bool = True

  @property
  def source(self) -> str:
    """Which phase and step this is, in words: "phase 'snn' at step 24 of 24 (finished run /w)"."""
    total = self.config[self.phase].train_steps
    return (f"phase {self.phase!r} at step {self.step} of {total} ({'finished' if self.finished else 'UNFINISHED'}"
            f" run {self.workdir})")

  @property
  def is_snn(self) -> bool:
    return self.model.phase == "snn"

  @property
  def max_time_steps(self) -> int:
    """T_max of the SNN (1 for the ANN twin)."""
    return int(self.model.max_time_steps) if self.is_snn else 1

  @property
  def steps_per_module(self) -> dict:
    """{masked module: its active steps} (the sum of its hard mask); {} for the ANN twin."""
    return {k: c["active_steps"] for k, c in self.step_counts.items()}

  @property
  def simulated_steps_per_module(self) -> dict:
    """{masked module: its simulated steps} (the steps whose work any output depends on, under the model's
    `mask.semantics`); {} for the ANN twin."""
    return {k: c["simulated_steps"] for k, c in self.step_counts.items()}

  @property
  def average_time_steps(self) -> float | None:
    """The paper's T_avg: mean over masked modules of their active steps (None for the ANN twin)."""
    from dtvit import masks as masks_lib
    return masks_lib.average_steps(self.step_counts, "active_steps")

  @property
  def average_simulated_steps(self) -> float | None:
    """The mean over masked modules of their simulated steps (None for the ANN twin)."""
    from dtvit import masks as masks_lib
    return masks_lib.average_steps(self.step_counts, "simulated_steps")

  # -- what an image must be ------------------------------------------------------------------------------------

  @functools.cached_property
  def data_spec(self) -> dict:
    """{'image_shape', 'mean', 'std', 'resize_method', 'center_crop', 'class_names', ...}: what the model
    expects of an image (`<workdir>/data_spec.json`, written by training; recomputed from the config's data
    section for older runs). See `dtvit.data.spec`."""
    from dtvit.data import spec
    return spec.read_spec(self.workdir, self.config.data)

  @property
  def class_names(self) -> list[str]:
    """The class names in label order ('0'..'9' for the digits, CIFAR's names, an image folder's subfolders)."""
    return list(self.data_spec["class_names"])

  def preprocess(self, images):
    """Raw images -> this model's input, float32 numpy [B, H, W, C] normalised as in training: one image
    [h, w(, c)], a batch [B, h, w, c] or a list of images of any sizes; uint8 in [0, 255] or float in [0, 1];
    each resized (or centre-cropped, for variable-size data) as the evaluation pipeline does."""
    from dtvit.data import spec
    return spec.preprocess(self.data_spec, images)

  # -- running the model ---------------------------------------------------------------------------------------

  def _images(self, images):
    import jax.numpy as jnp
    x = jnp.asarray(images, jnp.float32)
    want = tuple(self.info.image_shape)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      hint = " (one image: pass images[None])" if tuple(x.shape) == want else ""
      raise ValueError(f"Expected images [batch, {', '.join(map(str, want))}] (normalised as by "
                       f"`.batches()`), got shape {tuple(x.shape)}{hint}.")
    return x

  def __call__(self, images):
    """Logits [B, K] of images [B, H, W, C] (jit-compiled once per batch shape)."""
    return _jitted("logits")(self.model, self.variables, self._images(images))

  def predict(self, images):
    """Predicted classes, int32 numpy [B]."""
    import numpy as np
    return np.asarray(self(images).argmax(-1), np.int32)

  def apply(self, images):
    """(logits [B, K], aux): aux as `models.apply_model` returns it: 'masks' {module: [T]}, 'spike_rates'
    {neuron: [T]}, 'input_rates', 'attention_rates', 'step_logits' [T, B, K], 'block_outputs'
    {block: [T*B, N, D]} (the ANN twin: T = 1 and no masks/rates)."""
    return _jitted("apply")(self.model, self.variables, self._images(images))

  def inference_fn(self):
    """(fn, schedule): `dtvit.inference.make_inference_fn` for these variables: a jitted fn(images) -> logits
    that does not compute the masked (module, step) pairs, and {module: steps run}. SNN only."""
    if not self.is_snn:
      raise ValueError("inference_fn needs the SNN; this is the ANN twin (load phase='snn' or "
                       "call .variant(phase='snn')).")
    if not self.model.mask.hard:
      raise ValueError("inference_fn runs the hard masks; this variant has masks off (use .variant(masks='hard')).")
    from dtvit import inference
    fn, schedule = inference.make_inference_fn(self.model, self.variables)
    images = self._images
    return (lambda x: fn(images(x))), schedule

  def variant(self, *, phase: str | None = None, masks: str | None = None) -> Loaded:
    """The same variables run another way: `phase` 'ann' (the ANN twin: clipped ReLUs whose clip values are
    these thresholds) or 'snn'; `masks` 'hard' (the learned masks) or 'off' (every one of the T_max steps)."""
    from dtvit import models
    if phase not in (None, "ann", "snn"):
      raise ValueError(f"variant: phase must be 'ann' or 'snn', got {phase!r}.")
    if masks not in (None,) + MASK_MODES:
      raise ValueError(f"variant: masks must be one of {MASK_MODES}, got {masks!r}.")
    configured = bool(self.config.model.mask.enabled)
    mode = masks or ("off" if configured and not self.model.mask.enabled else "hard")
    model = self.model.clone(phase=phase or self.model.phase)
    if mode == "off":
      model = models.with_mask(model, enabled=False)
    else:
      model = models.with_mask(model, enabled=configured, hard=True)
    hard, counts = _masks_of(model, self.variables["params"])
    return dataclasses.replace(self, model=model, masks=hard, step_counts=counts)

  # -- data ------------------------------------------------------------------------------------------------------

  def batches(self, split: str = "test", batch_size: int | None = None) -> Iterator[dict]:
    """One pass over the run's data split, as its evaluation saw it: dicts of numpy 'image' [B, H, W, C]
    (normalised), 'label' [B], 'mask' [B] (0 on the padding of the last batch). Default batch size: the
    run's eval_batch_size."""
    from dtvit import data
    return data.eval_batches(self.config.data, split=split, global_batch_size=batch_size or self.config.eval_batch_size,
                             process_index=0, process_count=1)

  def __repr__(self) -> str:
    m = self.model
    what = "ANN twin" if not self.is_snn else ("SNN, masks off" if not m.mask.enabled else "SNN, hard masks")
    steps = (f", T_max={self.max_time_steps}, T_avg={self.average_time_steps:.2f}, "
             f"simulated={self.average_simulated_steps:.2f} ({m.mask.semantics})" if self.steps_per_module else
             f", T_max={self.max_time_steps}" if self.is_snn else "")
    return (f"Loaded({self.workdir!r}, phase={self.phase!r}, step={self.step}"
            f"{'' if self.finished else ' (unfinished run)'}: {what}, {m.stem} stem, depth {m.depth}, dim {m.dim}"
            f"{steps})")


@functools.lru_cache(maxsize=None)
def _jitted(kind: str):
  """One jitted function per kind for all `Loaded` objects, the model a static argument: equal models (same
  config, phase and mask settings) share their compiled code, e.g. after loading the same run twice."""
  from dtvit import compilation, models
  with_aux = kind == "apply"
  return compilation.jit(
      lambda model, variables, images: models.apply_model(model, variables, images, with_aux=with_aux),
      static_argnums=0)


def _masks_of(model, params) -> tuple[dict, dict]:
  """({unit: hard mask float32 [T_max]}, `models.step_counts`); both {} for the ANN twin."""
  import numpy as np
  from dtvit import models
  if model.phase != "snn":
    return {}, {}
  counts = models.step_counts(model, params)
  return {k: np.asarray(c["mask"], np.float32) for k, c in counts.items()}, counts


def read_config(workdir: str):
  """The run's config, `<workdir>/config.json` as an `ml_collections.ConfigDict`."""
  import ml_collections
  from dtvit import storage
  storage.check(workdir, "workdir")
  workdir = storage.abspath(workdir)
  if not storage.isdir(workdir):
    raise FileNotFoundError(f"dtvit.load: workdir {workdir} does not exist. Pass the --workdir of a "
                            f"training run (python -m dtvit.main ... --workdir=DIR).")
  path = storage.join(workdir, "config.json")
  if not storage.isfile(path):
    raise FileNotFoundError(f"dtvit.load: {workdir} has no config.json, so it is not a dtvit workdir (the "
                            f"training run writes config.json there first). Its entries: "
                            f"{sorted(storage.listdir(workdir))[:10]}.")
  from dtvit import workdir as workdir_lib  # jax only when loading
  raw = workdir_lib.read_config(workdir)  # today's names, paths resolved; damaged: one line naming the fix
  mask = raw.get("model", {}).get("mask")
  if isinstance(mask, dict) and "semantics" not in mask:
    # Runs from before `mask.semantics` existed trained with spikes filtered by the mask (membranes integrating
    # at masked steps): load them as 'filter', which is that model.
    mask["semantics"] = "filter"
  return ml_collections.ConfigDict(raw)


def read_summary(workdir: str) -> dict | None:
  """`<workdir>/summary.json` (written when a run finishes), or None."""
  from dtvit import storage
  from dtvit import workdir as workdir_lib
  return workdir_lib.read_json(storage.join(workdir, "summary.json"), expect=dict)


def unfinished(workdir: str, config, summary: dict | None) -> str:
  """'' when `summary` (the run's summary.json) shows every phase of `config` at its train_steps, else how far
  the run got, e.g. "ann at step 325 of 3000, snn not started"."""
  phases = run_phases(config)
  if (summary is not None and summary.get("phases") == phases
      and all(summary.get(p, {}).get("steps", -1) >= config[p].train_steps for p in phases)):
    return ""
  from dtvit import storage
  from dtvit import workdir as workdir_lib
  where = []
  for p in phases:
    steps = workdir_lib.committed_steps(storage.join(workdir, p, "checkpoints"))
    where.append(f"{p} at step {max(steps)} of {config[p].train_steps}" if steps else f"{p} not started")
  return ", ".join(where)


@contextlib.contextmanager
def user_errors(prog: str):
  """Turns a user's mistake in a command after training (a missing or empty workdir, an unfinished run, a damaged
  record, an unreadable image, a read-only output folder: ValueError or OSError) into one line on stderr and exit
  status 1, as `dtvit.main` does; set DTVIT_TRACEBACK=1 to see the traceback instead."""
  try:
    yield
  except (ValueError, OSError) as e:
    if os.environ.get("DTVIT_TRACEBACK"):
      raise
    print(f"error: {prog}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_STATUS)


def run_phases(config) -> list[str]:
  """The phases the run's config lists, in order."""
  return [p.strip() for p in str(config.phases).split(",") if p.strip()]


def load(workdir: str, phase: str | None = None, *, allow_unfinished: bool = False) -> Loaded:
  """Restores a training run's model, variables and hard masks; see the module docstring.

  Args:
    workdir: a training run's directory (`--workdir` of `python -m dtvit.main`).
    phase: 'ann' | 'snn' | 'finetune', or None for the latest phase of the run (in `config.phases` order) that
      has a finished checkpoint.
    allow_unfinished: load a run that has not finished every phase of its config (its latest checkpoint of
      `phase`), with a warning; else such a run raises UnfinishedRunError.
  Raises:
    FileNotFoundError: no such workdir, no config.json, the phase did not run there, or it has no finished
      checkpoint.
    UnfinishedRunError: the run has not finished and `allow_unfinished` is False.
    ValueError: an unknown phase, a damaged config.json or summary.json, or a checkpoint that does not fit the
      config's model.
  """
  if phase is not None and phase not in PHASES:
    raise ValueError(f"dtvit.load: unknown phase {phase!r}; choose one of {PHASES} or None (the latest).")
  from dtvit import storage
  config = read_config(workdir)
  workdir = storage.abspath(workdir)
  progress = unfinished(workdir, config, read_summary(workdir))
  if progress and not allow_unfinished:
    raise UnfinishedRunError(
        f"dtvit.load: the run in {workdir} is unfinished ({progress}): its checkpoints are not the trained "
        f"model. Finish it (rerun its dtvit.main command), or load its latest checkpoint anyway with "
        f"--allow_unfinished (dtvit.load(..., allow_unfinished=True)).")
  run = _load(workdir, config, phase)
  run = dataclasses.replace(run, finished=not progress)
  if progress:
    logging.getLogger("dtvit").warning("dtvit.load: using %s, as asked (allow_unfinished; %s).", run.source,
                                       progress)
  else:
    logging.getLogger("dtvit").info("dtvit.load: using %s.", run.source)
  return run


def _load(workdir: str, config, phase: str | None) -> Loaded:
  from dtvit import storage
  phases = run_phases(config)
  present = [p for p in PHASES if storage.isdir(storage.join(workdir, p, "checkpoints"))]
  if phase is not None:
    if phase not in present:
      raise FileNotFoundError(
          f"dtvit.load: {workdir} has no checkpoints of phase {phase!r} (the run's phases: {phases}; phases with "
          f"a checkpoint directory: {present}).")
    return _load_phase(workdir, config, phase)
  candidates = [p for p in reversed(phases) if p in present]
  errors = []
  for p in candidates:
    try:
      return _load_phase(workdir, config, p)
    except FileNotFoundError as e:  # e.g. a phase that has started but not saved yet: try the one before
      errors.append(str(e))
  raise FileNotFoundError(f"dtvit.load: no phase of the run in {workdir} has a finished checkpoint yet (phases "
                          f"{phases}). " + " ".join(errors))


def _load_phase(workdir: str, config, phase: str) -> Loaded:
  import jax
  import jax.numpy as jnp
  from dtvit import checkpointing
  from dtvit import data
  from dtvit import models

  info = data.get_info(config.data)
  model = models.build_model(config.model, info.num_classes, phase="ann" if phase == "ann" else "snn")
  if phase != "ann":
    model = models.with_mask(model, hard=True)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *info.image_shape), jnp.float32),
                                               train=False))
  abstract = {k: v for k, v in abstract.items() if k in ("params", "batch_stats")}
  from dtvit import storage
  from dtvit import workdir as workdir_lib
  ckpt_dir = storage.join(workdir, phase, "checkpoints")
  step = max(workdir_lib.committed_steps(ckpt_dir), default=None)
  variables = checkpointing.restore_variables(ckpt_dir, abstract, what=f"dtvit.load(phase={phase!r})", step=step)
  masks, counts = _masks_of(model, variables["params"])
  summary = read_summary(workdir)
  return Loaded(workdir=workdir, phase=phase, config=config, info=info, model=model, variables=variables,
                masks=masks, step_counts=counts, summary=(summary or {}).get(phase), checkpoint_dir=ckpt_dir,
                step=step)
