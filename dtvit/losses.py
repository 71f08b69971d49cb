"""Losses in pure JAX: cross-entropy on soft targets with label smoothing, accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BK: jax.Array, targets_BK: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy against soft targets [B, K] (one-hot or mixed), with label smoothing."""
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
  k = logits_BK.shape[-1]
  targets_BK = targets_BK * (1.0 - label_smoothing) + label_smoothing / k
  per_example_B = -jnp.sum(targets_BK * jax.nn.log_softmax(logits_BK.astype(jnp.float32)), axis=-1)
  return jnp.mean(per_example_B)


def correct(logits_BK: jax.Array, labels_B: jax.Array) -> jax.Array:
  """1.0 where the top prediction is the label, [B]."""
  return (jnp.argmax(logits_BK, axis=-1) == labels_B).astype(jnp.float32)
