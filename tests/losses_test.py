"""dtvit.losses and the train step's loss options against hand computations: the every-step loss (SEENN /
DT-SNN) and distillation from the ANN twin."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import losses
from dtvit import models
from dtvit import steps


def _log_softmax(z):
  m = max(z)
  lse = m + math.log(sum(math.exp(v - m) for v in z))
  return [v - lse for v in z]


def _hand_every_step(step_logits, targets, smoothing):
  """Plain python: for each t the accumulated logits o_t[b] = mean of steps 1..t, their smoothed CE averaged
  over the batch; then the mean over t."""
  T, B, K = len(step_logits), len(step_logits[0]), len(step_logits[0][0])
  per_t = []
  for t in range(1, T + 1):
    total = 0.0
    for b in range(B):
      o = [sum(step_logits[s][b][k] for s in range(t)) / t for k in range(K)]
      lp = _log_softmax(o)
      y = [targets[b][k] * (1 - smoothing) + smoothing / K for k in range(K)]
      total += -sum(y[k] * lp[k] for k in range(K))
    per_t.append(total / B)
  return sum(per_t) / T


def _hand_kl(student, teacher, temperature):
  """Plain python: T^2 * mean over b of sum_k p_k (log p_k - log q_k), p = softmax(teacher / T),
  q = softmax(student / T)."""
  total = 0.0
  for s, t in zip(student, teacher):
    lp = _log_softmax([v / temperature for v in t])
    lq = _log_softmax([v / temperature for v in s])
    total += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
  return temperature ** 2 * total / len(student)


def test_every_step_cross_entropy_is_the_mean_over_steps_of_the_accumulated_outputs_ce():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 3, 5)).astype(np.float32) * 3
  targets = np.eye(5, dtype=np.float32)[[0, 3, 4]]
  targets[1] = 0.3 * targets[1] + 0.7 * np.eye(5, dtype=np.float32)[1]  # a mixed (mixup) target
  for smoothing in (0.0, 0.1):
    got = float(losses.every_step_cross_entropy(jnp.asarray(x), jnp.asarray(targets), label_smoothing=smoothing))
    assert got == pytest.approx(_hand_every_step(x.tolist(), targets.tolist(), smoothing), rel=1e-6)
  # Not the final-output CE (the steps' outputs differ), and equal to it with one step.
  final = float(losses.cross_entropy(jnp.asarray(x.mean(0)), jnp.asarray(targets)))
  assert abs(float(losses.every_step_cross_entropy(jnp.asarray(x), jnp.asarray(targets))) - final) > 1e-2
  assert float(losses.every_step_cross_entropy(jnp.asarray(x[:1]), jnp.asarray(targets))) == pytest.approx(
      float(losses.cross_entropy(jnp.asarray(x[0]), jnp.asarray(targets))), rel=1e-6)


def test_distillation_kl_is_teacher_to_student_scaled_by_t_squared():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(6, 4)) * 2, rng.normal(size=(6, 4)) * 2
  for temperature in (1.0, 2.0, 4.0):
    got = float(losses.distillation_kl(jnp.asarray(s), jnp.asarray(t), temperature=temperature))
    assert got == pytest.approx(_hand_kl(s.tolist(), t.tolist(), temperature), rel=1e-5)
  # KL(teacher || student), not the reverse direction; zero for equal logits; no gradient into the teacher.
  assert float(losses.distillation_kl(jnp.asarray(s), jnp.asarray(t))) != pytest.approx(_hand_kl(t, s, 1.0), rel=1e-3)
  assert float(losses.distillation_kl(jnp.asarray(s), jnp.asarray(s))) == pytest.approx(0.0, abs=1e-6)
  g = jax.grad(lambda tt: losses.distillation_kl(jnp.asarray(s), tt))(jnp.asarray(t))
  np.testing.assert_array_equal(g, 0.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.distillation_kl(jnp.asarray(s), jnp.asarray(t), temperature=0.0)


def test_train_loss_options_match_a_hand_computation_on_the_model(tiny_config):
  """The train step's loss with loss='every_step' and distillation from an ANN twin equals the hand-written
  sum: every-step CE of the model's own step logits + time_cost * cost + w * T^2 KL(twin || snn)."""
  config = tiny_config(**{"snn.loss": "every_step", "snn.distill_weight": 0.7, "snn.distill_temperature": 2.0,
                          "snn.label_smoothing": 0.1, "snn.time_cost": 0.05})
  pc = config.snn
  snn = models.phase_model(config.model, 10, "snn")
  twin = models.phase_model(config.model, 10, "ann")
  variables = models.init(snn, jax.random.key(0), (8, 8, 1))
  twin_vars = models.init(twin, jax.random.key(1), (8, 8, 1))
  images = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  labels = jnp.asarray([1, 7, 3, 3])
  batch = {"image": images, "label": labels, "target": jax.nn.one_hot(labels, 10)}
  loss_fn = steps.make_loss_fn(snn, pc, phase="snn", op_weights=None, twin_model=twin)
  loss, (ce, cost, distill, logits, _) = loss_fn(variables["params"], variables["batch_stats"], batch, 1.0,
                                                 twin_vars)
  _, aux, _ = models.apply_model(snn, variables, images, train=True)
  step_logits = np.asarray(aux["step_logits"], np.float64)
  teacher = np.asarray(models.apply_model(twin, twin_vars, images, with_aux=False), np.float64)
  hand_ce = _hand_every_step(step_logits.tolist(), np.asarray(batch["target"]).tolist(), 0.1)
  hand_kl = _hand_kl(step_logits.mean(0).tolist(), teacher.tolist(), 2.0)
  assert float(ce) == pytest.approx(hand_ce, rel=1e-5)
  assert float(distill) == pytest.approx(hand_kl, rel=1e-4, abs=1e-7)
  assert float(cost) > 0
  assert float(loss) == pytest.approx(hand_ce + 0.05 * float(cost) + 0.7 * hand_kl, rel=1e-5)
  np.testing.assert_allclose(logits, step_logits.mean(0), rtol=1e-5, atol=1e-6)
  # The default ('final', no twin) is the CE of the time-averaged logits, unchanged.
  config.snn.loss, config.snn.distill_weight = "final", 0.0
  plain = steps.make_loss_fn(snn, config.snn, phase="snn", op_weights=None)
  _, (ce0, _, d0, _, _) = plain(variables["params"], variables["batch_stats"], batch, 1.0)
  smoothed = np.asarray(batch["target"]) * 0.9 + 0.01
  lp = step_logits.mean(0) - np.log(np.exp(step_logits.mean(0)).sum(-1, keepdims=True))
  assert float(ce0) == pytest.approx(float(-(smoothed * lp).sum(-1).mean()), rel=1e-5)
  assert float(d0) == 0.0
