"""Losses in pure JAX: cross-entropy on soft targets with label smoothing, the every-step loss of SEENN / DT-SNN,
distillation from the ANN twin, accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# What the SNN phases train on (config `<phase>.loss`): 'final' the cross-entropy of the time-averaged logits;
# 'every_step' the mean over t of the cross-entropy of the accumulated logits up to step t (`every_step_cross_entropy`).
LOSSES = ("final", "every_step")


def cross_entropy(logits_BK: jax.Array, targets_BK: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy against soft targets [B, K] (one-hot or mixed), with label smoothing."""
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
  k = logits_BK.shape[-1]
  targets_BK = targets_BK * (1.0 - label_smoothing) + label_smoothing / k
  per_example_B = -jnp.sum(targets_BK * jax.nn.log_softmax(logits_BK.astype(jnp.float32)), axis=-1)
  return jnp.mean(per_example_B)


def accumulated_logits(step_logits_TBK: jax.Array) -> jax.Array:
  """[T, B, K] -> [T, B, K]: at t the mean of the step logits 1..t, o_t = (1/t) sum_{k<=t} logits_k (the output
  a sample that stops after step t predicts from; o_T is the model's time-averaged output)."""
  T = step_logits_TBK.shape[0]
  x = step_logits_TBK.astype(jnp.float32)
  return jnp.cumsum(x, axis=0) / jnp.arange(1, T + 1, dtype=jnp.float32)[:, None, None]


def every_step_cross_entropy(step_logits_TBK: jax.Array, targets_BK: jax.Array, *,
                             label_smoothing: float = 0.0) -> jax.Array:
  """SEENN's loss: (1/T) sum_t cross_entropy(o_t, targets), o_t the accumulated logits (`accumulated_logits`)
  and each term the mean over the batch with label smoothing, as `cross_entropy`. With T = 1 it is
  `cross_entropy` of the one step's logits."""
  acc_TBK = accumulated_logits(step_logits_TBK)
  per_step_T = jax.vmap(lambda o_BK: cross_entropy(o_BK, targets_BK, label_smoothing=label_smoothing))(acc_TBK)
  return jnp.mean(per_step_T)


def distillation_kl(student_BK: jax.Array, teacher_BK: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Knowledge distillation (Hinton et al. 2015): T^2 * mean over the batch of KL(p_teacher || p_student), with
  p = softmax(logits / T). The teacher's logits get no gradient. Scaling by T^2 keeps the gradient's size
  independent of T."""
  if not temperature > 0:
    raise ValueError(f"The distillation temperature must be > 0, got {temperature}.")
  t = jnp.float32(temperature)
  teacher_BK = jax.lax.stop_gradient(teacher_BK.astype(jnp.float32))
  log_p_BK = jax.nn.log_softmax(teacher_BK / t)
  log_q_BK = jax.nn.log_softmax(student_BK.astype(jnp.float32) / t)
  kl_B = jnp.sum(jnp.exp(log_p_BK) * (log_p_BK - log_q_BK), axis=-1)
  return t * t * jnp.mean(kl_B)


def correct(logits_BK: jax.Array, labels_B: jax.Array) -> jax.Array:
  """1.0 where the top prediction is the label, [B]."""
  return (jnp.argmax(logits_BK, axis=-1) == labels_B).astype(jnp.float32)
