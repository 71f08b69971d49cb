"""A neuron's settings (`NeuronSpec`) and its spike function with surrogate gradients, in pure JAX.

No Flax here. `NeuronSpec` holds the expressions of one step (charge, the spike decision, the reset), written
once and used by every implementation of the recurrence: the `lax.scan` reference in `dtvit.neurons` and the
fused one in `dtvit.lif_fused` (the conventions are in `dtvit.neurons`' docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

NEURONS = ("lif", "if", "spikingjelly_lif")
SURROGATES = ("pwl", "sigmoid", "atan")
RESETS = ("soft", "hard")
SURROGATE_INPUTS = ("normalized", "difference")
DEFAULT_ALPHA = {"pwl": 0.3, "sigmoid": 4.0, "atan": 2.0}  # each surrogate's customary sharpness


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {kind} {value!r}; choose one of {', '.join(repr(c) for c in choices)}.")


@dataclasses.dataclass(frozen=True)
class NeuronSpec:
  """A neuron's dynamics with every setting resolved (build it with `NeuronSpec.resolve`).

  neuron: 'lif' | 'if' | 'spikingjelly_lif'; surrogate: 'pwl' | 'sigmoid' | 'atan' with sharpness `alpha`; tau: the
  'spikingjelly_lif' time constant; reset: 'soft' | 'hard'; detach_reset: no gradient through the reset;
  init_membrane: U[0] as a fraction of the threshold (0.5 makes an IF neuron's rate round, not floor, its
  time-averaged input); surrogate_input: 'normalized' | 'difference' (`dtvit.neurons`' docstring).
  """
  neuron: str = "lif"
  surrogate: str = "pwl"
  alpha: float = 0.3
  tau: float = 2.0
  reset: str = "soft"
  detach_reset: bool = False
  init_membrane: float = 0.0
  surrogate_input: str = "normalized"

  @classmethod
  def resolve(cls, neuron: str = "lif", *, surrogate: str = "pwl", alpha: float | None = None, tau: float = 2.0,
              reset: str | None = None, detach_reset: bool | None = None, init_membrane: float = 0.0,
              surrogate_input: str = "normalized") -> "NeuronSpec":
    """Checks the settings and fills the defaults: `reset` 'hard' for 'spikingjelly_lif' and 'soft' otherwise,
    `detach_reset` True for 'spikingjelly_lif' (its published form), `alpha` the surrogate's customary value."""
    _check_choice("neuron", neuron, NEURONS)
    _check_choice("surrogate", surrogate, SURROGATES)
    _check_choice("surrogate input", surrogate_input, SURROGATE_INPUTS)
    reset = reset or ("hard" if neuron == "spikingjelly_lif" else "soft")
    _check_choice("reset", reset, RESETS)
    if tau <= 0:
      raise ValueError(f"tau must be > 0, got {tau}.")
    return cls(neuron=neuron, surrogate=surrogate, alpha=float(DEFAULT_ALPHA[surrogate] if alpha is None else alpha),
               tau=float(tau), reset=reset,
               detach_reset=bool(neuron == "spikingjelly_lif" if detach_reset is None else detach_reset),
               init_membrane=float(init_membrane), surrogate_input=surrogate_input)

  def leak_factor(self, leak) -> jax.Array:
    """lam of U[t] = lam U[t-1] + I[t]: the trainable leak clipped to [0, 1] for 'lif' (a gain above 1 would
    make the neuron unstable), 1 for 'if'; unused by 'spikingjelly_lif'."""
    if self.neuron == "lif":
      return jnp.clip(jnp.asarray(leak, jnp.float32), 0.0, 1.0)
    return jnp.ones((), jnp.float32)

  def charge(self, u, i, lam):
    """The membrane before reset, H[t], from U[t-1] and I[t]."""
    return u + (i - u) / self.tau if self.neuron == "spikingjelly_lif" else lam * u + i

  def distance(self, h, vth):
    """The spike function's argument x: U/Vth - 1 or U - Vth."""
    return h / vth - 1.0 if self.surrogate_input == "normalized" else h - vth

  def fires(self, h, vth):
    """The spike decision H[t] >= Vth, for Vth > 0 exactly `distance(h, vth) >= 0` in both conventions (a float
    h < Vth has h/Vth <= 1 - 2^-24, which rounds below 1), without the division: XLA:CPU keeps a division as a
    fusion boundary, whose output then stayed alive from the forward to the backward pass (where CSE merged
    the backward's recomputation into it). `dtvit.models.layers.Neuron` keeps Vth >= 1e-3."""
    return h >= vth

  def after_reset(self, h, s, vth):
    return h - vth * s if self.reset == "soft" else h * (1.0 - s)


def surrogate_grad(x: jax.Array, surrogate: str = "pwl", alpha: float = 0.3) -> jax.Array:
  """The surrogate derivative dS/dx at the distance to threshold x.

  'pwl' -> alpha * max(0, 1 - |x|) (the authors' piecewise linear, alpha = gamma = 0.3); 'sigmoid' ->
  alpha * sig(alpha x) * (1 - sig(alpha x)) (Spikformer, alpha = 4); 'atan' -> alpha / 2 / (1 + (pi/2 alpha
  x)^2) (alpha = 2).
  """
  _check_choice("surrogate", surrogate, SURROGATES)
  if surrogate == "pwl":
    return alpha * jnp.maximum(0.0, 1.0 - jnp.abs(x))
  if surrogate == "sigmoid":
    sg = jax.nn.sigmoid(alpha * x)
    return alpha * sg * (1.0 - sg)
  return alpha / 2.0 / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def spike(x: jax.Array, surrogate: str = "pwl", alpha: float = 0.3) -> jax.Array:
  """Heaviside step H(x) = 1[x >= 0] forward; `surrogate_grad(x)` as its derivative."""
  x = jnp.asarray(x)
  return (x >= 0).astype(x.dtype)


@spike.defjvp
def _spike_jvp(surrogate, alpha, primals, tangents):
  (x,), (dx,) = primals, tangents
  x = jnp.asarray(x)
  return spike(x, surrogate, alpha), surrogate_grad(x, surrogate, alpha).astype(x.dtype) * dx


# The shapes every implementation of the recurrence checks alike.


def num_steps_of(current_TX, num_steps: int | None) -> int:
  if num_steps is None:
    if current_TX.ndim < 1:
      raise ValueError("multistep needs a time axis: current_TX must be [T, ...] (or pass num_steps).")
    return current_TX.shape[0]
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  return int(num_steps)


def check_step_mask(step_mask_T, num_steps: int):
  if step_mask_T is None:
    return None
  step_mask_T = jnp.asarray(step_mask_T)
  if step_mask_T.shape != (num_steps,):
    raise ValueError(f"step_mask_T must be one value per time step, shape ({num_steps},); got "
                     f"{step_mask_T.shape}.")
  return step_mask_T


def initial_membrane(shape, spec: NeuronSpec, vth, mdtype):
  """U[0]: `spec.init_membrane` times the threshold."""
  return jnp.full(shape, spec.init_membrane, mdtype) * vth

