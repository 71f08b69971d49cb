"""Bounded BPTT memory: recompute a module's forward in the backward pass (`NeuronConfig.remat='blocks'`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def recompute_in_backward(module: nn.Module, x, temperature, *, train: bool):
  """`module(x, train=train, temperature=temperature)` keeping only x (and the module's variables) for the
  backward pass, which recomputes the module's forward from x and then differentiates it.

  Unlike `jax.checkpoint`, whose recomputation XLA:CPU merges back into the forward pass (CSE after the
  optimization barrier is expanded) or schedules early, the recomputation here reads `x + 0 * g[0]`: it
  cannot start before the cotangent g of the module's output exists, so the module's intermediates (conv
  inputs, batch-norm statistics, membranes of every step) live for one module at a time. The forward is
  computed twice; values and gradients are those of the plain call (batch norm normalises with the same batch
  statistics; its running averages are updated once, by the forward pass).
  """
  definition = module.clone(parent=None)
  temperature = jnp.asarray(temperature, jnp.float32)

  def fn(mdl, x, t):
    return mdl(x, train=train, temperature=t)

  def forward(mdl, x, t):
    variables = {"params": mdl.variables["params"], "batch_stats": mdl.variables.get("batch_stats", {})}
    return fn(mdl, x, t), (variables, x, t)

  def backward(res, g):
    variables, x, t = res
    # A data dependency on the cotangent: the recomputation waits for the backward pass to reach this module.
    x = x + jnp.zeros((), x.dtype) * g.reshape(-1)[0].astype(x.dtype)

    def pure(params, x, t):
      return definition.apply({**variables, "params": params}, x, train=train, temperature=t,
                              mutable=["batch_stats"])[0]

    _, vjp = jax.vjp(pure, variables["params"], x, t)
    params_t, x_t, t_t = vjp(g)
    return {"params": params_t}, x_t, t_t

  return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)(module, x, temperature)
