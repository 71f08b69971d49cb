"""Optimizers: one optax transform with parameter groups (weights / neuron params / time-step scores).

Each phase trains some groups and freezes the others with `optax.set_to_zero()`:
- 'ann': weights and the clip values (neuron params); the scores are unused and frozen.
- 'snn': weights, thresholds and leaks, and the time-step scores, jointly.
- 'finetune': masks frozen (scores), weights and neuron params trained.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import optax

from dtvit.models import paths

GROUPS = ("weights", "neuron", "scores")
OPTIMIZERS = ("adamw", "sgd")


def _per_leaf(fn):
  """params -> a tree like params holding fn(path, leaf) at each leaf (path: a tuple of names)."""

  def tree(params):
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({p: fn(p, v) for p, v in flat.items()})

  return tree


# Each leaf's group name ('weights' / 'neuron' / 'scores'), and where weight decay applies (matrices and conv
# kernels only); `dtvit.models.paths` knows which names are which.
param_groups = _per_leaf(lambda path, _: paths.param_group(path))
_decay_mask = _per_leaf(paths.decays)
_is_score = _per_leaf(lambda path, _: paths.param_group(path) == "scores")


def learning_rate_schedule(opt_cfg, train_steps: int):
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * end_lr_factor` at step train_steps -
  `cooldown_steps`, then constant there (timm's `cooldown_epochs` at `min_lr`)."""
  cooldown = int(opt_cfg.get("cooldown_steps", 0))
  if not 0 <= cooldown < max(train_steps, 1):
    raise ValueError(f"optimizer.cooldown_steps={cooldown} must be in [0, train_steps={train_steps}).")
  decay_steps = train_steps - cooldown
  warmup = min(int(opt_cfg.get("warmup_steps", 0)), max(decay_steps - 1, 0))
  end = opt_cfg.lr * opt_cfg.get("end_lr_factor", 0.0)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else opt_cfg.lr, peak_value=opt_cfg.lr, warmup_steps=warmup,
      decay_steps=max(decay_steps, warmup + 1), end_value=end)
  if not cooldown:
    return schedule
  return optax.join_schedules([schedule, optax.constant_schedule(end)], [decay_steps])


SCORE_OPTIMIZERS = ("sgd", "adam")
SCORE_MOMENTUM = 0.9  # the default of optimizer.score_momentum


def score_travel_steps(*, score_lr: float, num_modules: int, time_cost: float, score_init: float = 1.0,
                       temperature: float = 1.0, momentum: float = SCORE_MOMENTUM) -> float:
  """The steps in which a time-step cost alone brings a score from `score_init` to 0 under the 'sgd' score
  optimizer (constant rate, `momentum`), in the continuous limit.

  While a cost counting each module's steps through sigmoid(s / tau) is active (the 'expected' cost, or a hinge
  above its target), each score's gradient is (time_cost / num_modules) sigmoid'(s / tau) / tau; momentum
  multiplies the rate by 1 / (1 - momentum). With 1 / sigmoid'(u) = e^u + 2 + e^-u, the travel time is
    steps = (1 - momentum) num_modules tau^2 (2 sinh(s0 / tau) + 2 s0 / tau) / (score_lr time_cost).
  tests/paper_scale_test.py checks it against the real optimizer and cost.
  """
  if min(score_lr, num_modules, time_cost, temperature) <= 0 or score_init <= 0 or not 0 <= momentum < 1:
    raise ValueError("score_travel_steps: score_lr, num_modules, time_cost, temperature and score_init must be > 0 "
                     "and momentum in [0, 1).")
  u = score_init / temperature
  return (1 - momentum) * num_modules * temperature ** 2 * (2 * math.sinh(u) + 2 * u) / (score_lr * time_cost)


def calibrated_score_lr(*, train_steps: int, reach_fraction: float, num_modules: int, time_cost: float,
                        score_init: float = 1.0, temperature: float = 1.0, score_optimizer: str = "sgd",
                        momentum: float = SCORE_MOMENTUM) -> float:
  """The score learning rate for which `score_travel_steps` is `reach_fraction` x train_steps."""
  if score_optimizer != "sgd":
    raise ValueError(f"calibrated_score_lr: the calibration is for the 'sgd' score optimizer (the cost's gradient "
                     f"sets the speed), not {score_optimizer!r}.")
  if train_steps <= 0 or not 0 < reach_fraction <= 1:
    raise ValueError(f"calibrated_score_lr: train_steps ({train_steps}) must be > 0 and reach_fraction "
                     f"({reach_fraction}) in (0, 1].")
  at_unit_lr = score_travel_steps(score_lr=1.0, num_modules=num_modules, time_cost=time_cost, score_init=score_init,
                                  temperature=temperature, momentum=momentum)
  return at_unit_lr / (reach_fraction * train_steps)


def _score_optimizer(name: str, lr: float, momentum: float = SCORE_MOMENTUM):
  if name not in SCORE_OPTIMIZERS:
    raise ValueError(f"Unknown score_optimizer {name!r}; choose one of {SCORE_OPTIMIZERS}.")
  return optax.sgd(lr, momentum=momentum or None) if name == "sgd" else optax.adam(lr)


def make_optimizer(opt_cfg, *, train_steps: int, trainable: tuple[str, ...]):
  """The phase's optimizer.

  Args:
    opt_cfg: {'name': 'adamw'|'sgd', 'lr', 'warmup_steps', 'end_lr_factor', 'cooldown_steps', 'weight_decay',
      'grad_clip', 'clip_scores', 'momentum' (sgd), 'neuron_lr_mult', 'score_optimizer' ('sgd'|'adam'),
      'score_lr', 'score_momentum' (sgd)}. The global-norm clip covers the scores only with `clip_scores`
      (default True): otherwise it clips the weights and neuron parameters jointly and leaves the scores'
      gradients as they are, so that a large weight gradient cannot slow the time-step cost's pull on the scores
      by the clip factor.
    train_steps: the phase's steps (for the schedule).
    trainable: the groups that train; the others are frozen.

  Returns:
    (optax transform, learning-rate schedule of the weights).
  """
  name = opt_cfg.get("name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
  unknown = set(trainable) - set(GROUPS)
  if unknown:
    raise ValueError(f"Unknown parameter groups {sorted(unknown)}; the groups are {GROUPS}.")
  if opt_cfg.lr <= 0:
    raise ValueError(f"The learning rate must be > 0, got {opt_cfg.lr}.")
  schedule = learning_rate_schedule(opt_cfg, train_steps)

  def base(lr, weight_decay):
    if name == "adamw":
      return optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=weight_decay, mask=_decay_mask)
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=_decay_mask),
                       optax.sgd(lr, momentum=opt_cfg.get("momentum", 0.9), nesterov=True))

  neuron_mult = opt_cfg.get("neuron_lr_mult", 1.0)
  score_lr = opt_cfg.get("score_lr", 0.0) or opt_cfg.lr
  transforms = {
      "weights": base(schedule, opt_cfg.get("weight_decay", 0.0)),
      "neuron": base(lambda step: schedule(step) * neuron_mult, 0.0),
      # The scores keep a constant rate: the time-step cost must keep acting late in the phase. Plain SGD
      # (default) keeps time_cost meaningful as the exchange rate between cross-entropy and steps; Adam would
      # normalise it away and let gradient noise alone move the scores.
      "scores": _score_optimizer(opt_cfg.get("score_optimizer", "sgd"), score_lr,
                                 opt_cfg.get("score_momentum", SCORE_MOMENTUM)),
  }
  transforms = {g: (t if g in trainable else optax.set_to_zero()) for g, t in transforms.items()}
  tx = optax.partition(transforms, param_groups)
  clip = opt_cfg.get("grad_clip", 0.0)
  if clip:
    clipper = optax.clip_by_global_norm(clip) if opt_cfg.get("clip_scores", True) else clip_except_scores(clip)
    tx = optax.chain(clipper, tx)
  return tx, schedule


def clip_except_scores(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` over every leaf but the time-step scores, which pass unchanged."""

  def update_fn(updates, state, params=None):
    del params
    is_score = _is_score(updates)
    others = [g for g, s in zip(jax.tree.leaves(updates), jax.tree.leaves(is_score)) if not s]
    norm = optax.tree.norm(others)
    factor = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
    return jax.tree.map(lambda g, s: g if s else (g * factor).astype(g.dtype), updates, is_score), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
