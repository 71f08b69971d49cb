"""The train state and where it comes from: a fresh init on the mesh, a phase's own latest checkpoint (resume),
the previous phase's or `init_from` checkpoint (ANN clip values -> SNN thresholds), and the ANN twin that an SNN
phase distils from.

The state is a dict {'params', 'batch_stats', 'opt_state', 'step'}, created under one jit with the shardings of
`sharding.state_shardings`, never on one device first.
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

from dtvit import checkpointing
from dtvit import inference
from dtvit import models
from dtvit import sharding
from dtvit import steps
from dtvit import storage
from dtvit.models import paths


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
  except Exception:  # a backend without that option
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
    return storage.join(workdir, phases[i - 1], "checkpoints")
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


def twin_source(config, workdir, phases, phase) -> str | None:
  """The ANN twin's checkpoint directory for distillation in `phase`: `distill_from`, else `init_from`, else this
  run's 'ann' phase when it runs before `phase`; None when there is none."""
  pc = config[phase]
  if pc.get("distill_from", ""):
    return pc.distill_from
  if pc.init_from:
    return pc.init_from
  if "ann" in phases and phases.index("ann") < phases.index(phase):
    return storage.join(workdir, "ann", "checkpoints")
  return None


def twin_variables(config, workdir, phases, phase, info, rng, *, mesh):
  """(the ANN twin's model, its variables on the mesh, its source) for distillation in `phase`, or None when
  `distill_weight` is 0. The variables are read from the checkpoint at every launch (they never change), so a
  resumed run distils from the same twin."""
  if steps.distill_weight(config[phase]) <= 0:
    return None
  source = twin_source(config, workdir, phases, phase)
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



def start(config, workdir, phases, phase, model, tx, info, ckpt, *, mesh) -> tuple[dict, dict]:
  """A phase's state and checkpoint meta: restored from its newest readable checkpoint (an unreadable one is
  moved aside, `Checkpointer.restore_latest`), else created (meta {})."""
  if ckpt.latest_step() is not None:
    restored = ckpt.restore_latest(abstract_state(model, tx, info.image_shape, mesh))
    if restored is not None:
      logging.info("%s: resumed from step %d", phase, int(restored[1]["step"]))
      return restored
    logging.warning("%s: no readable checkpoint left; the phase starts afresh.", phase)
  rng = jax.random.key(config.seed)
  variables = initial_variables(config, workdir, phases, phase, model, info, rng, mesh=mesh)
  return create_state(model, tx, rng, info.image_shape, mesh, variables), {}
