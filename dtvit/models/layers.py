"""Building blocks of the spiking ViT family: the neuron layer, the time-step mask holder, the synaptic layers
(Dense, Conv, BatchNorm) and the spike products of attention. The masked modules built from them (attention,
MLP, blocks, stems) are in `dtvit.models.blocks`.

Every module runs in one of two phases with one parameter tree:
- 'ann': the ANN twin. Each neuron is a clipped ReLU clip(x / c, 0, 1) with trainable clip value c (stored as
  the neuron's `threshold`), the activation an IF neuron with threshold c approximates by its firing rate.
- 'snn': T_max time steps. Activations are folded as [T*B, ...] so every stateless layer (Dense, Conv, BN,
  attention products) runs once over time x batch; only the neuron recurrence runs over time.

Time-step masks: a `TimeMask` owns scores [T_max] and returns the unit's binary mask. What a masked step means
is `MaskConfig.semantics` (see `dtvit.masks`): under 'skip' the unit's neurons hold their membranes and emit
nothing there; under 'filter' they integrate and their spikes are multiplied by the mask. The synaptic layers
take the work mask of the unit they feed (`work_T`): a batch norm's statistics are taken over those steps only,
and a layer's input rates are counted at those steps only. Names (of modules, neurons, mask holders, side
outputs) come from `dtvit.models.paths`.

Side outputs go to the 'aux' collection (collected by `dtvit.models.apply_model`): masks, work masks, per-step
spike rates of each neuron, per-step input event rates of each synaptic layer (already multiplied by the work
mask of the unit it feeds), per-step logits. Static per-layer op counts are each counted layer's `op_counts`,
which `dtvit.energy` collects with a Flax method interceptor while it traces the model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtvit import masks as masks_lib
from dtvit import neurons as neurons_lib
from dtvit import ops
from dtvit.models import paths
from dtvit.models.settings import MaskConfig, NeuronConfig


def _keep_last(_, new):
  return new


def sow(module: nn.Module, name: str, value) -> None:
  module.sow("aux", name, value, init_fn=lambda: None, reduce_fn=_keep_last)


def step_rate(x: jax.Array, num_steps: int) -> jax.Array:
  """Mean of x per time step: [T*B, ...] -> [T] (float32)."""
  return jnp.mean(x.reshape(num_steps, -1).astype(jnp.float32), axis=1)



def gate(rate_T, work_T):
  """A per-step rate counted only at the working steps (`work_T` None: every step)."""
  return rate_T if work_T is None else rate_T * work_T


def _ops(kind: str, macs: int) -> dict:
  return {"kind": kind, "macs": int(macs)}


class TimeMask(nn.Module):
  """Holds a unit's time-step scores [T_max] and returns its mask [T_max] (None in the ANN phase)."""
  num_steps: int
  cfg: MaskConfig
  phase: str

  @nn.compact
  def __call__(self, temperature=1.0):
    scores_T = self.param(paths.SCORES, self.cfg.score_initializer(), (self.num_steps,), jnp.float32)
    if self.phase == "ann" or not self.cfg.enabled:
      return None
    if self.cfg.hard:
      mask_T = masks_lib.hard_mask(scores_T, monotone=self.cfg.monotone)
    else:
      mask_T = masks_lib.time_step_mask(scores_T, mode=self.cfg.mode, temperature=temperature,
                                        monotone=self.cfg.monotone)
    sow(self, paths.AUX_MASK, mask_T)
    return mask_T


class Neuron(nn.Module):
  """Clipped ReLU (ANN) or LIF/IF over T_max steps (SNN), with trainable threshold and leak scalars.

  SNN input: [T*B, ...] currents, or with `static=True` a time-constant input [B, ...] (direct encoding).
  Output: [T*B, ...] binary spikes, zero where mask[t] = 0: under `semantics='skip'` the mask acts inside the
  recurrence (membrane held at masked steps), under 'filter' it multiplies the emitted spikes.
  """
  phase: str
  num_steps: int
  cfg: NeuronConfig
  init_threshold: float
  semantics: str = "skip"
  fused: bool = True
  cpu_kernel: bool = True  # with `fused`: the neuron's CPU kernel on CPU (`dtvit.cpu_kernels`)

  @nn.compact
  def __call__(self, x, mask_T=None, *, static: bool = False):
    threshold = self.param(paths.THRESHOLD, nn.initializers.constant(self.init_threshold), (), jnp.float32)
    leak = self.param(paths.LEAK, nn.initializers.constant(self.cfg.init_leak), (), jnp.float32)
    # A threshold driven to <= 0 by an optimiser step would fire on every step; keep it positive.
    threshold = jnp.maximum(threshold, 1e-3)
    if self.phase == "ann":
      return jnp.clip(x / threshold.astype(x.dtype), 0.0, 1.0)
    T = self.num_steps
    inside = mask_T is not None and self.semantics == "skip"
    current = x if static else x.reshape(T, x.shape[0] // T, *x.shape[1:])
    spikes_TX = neurons_lib.multistep(current, self.cfg.spec, leak=leak, threshold=threshold,
                                      num_steps=T if static else None, step_mask_T=mask_T if inside else None,
                                      fused=self.fused, cpu_kernel=self.cpu_kernel)
    if mask_T is not None and not inside:
      spikes_TX = spikes_TX * mask_T.reshape((T,) + (1,) * (spikes_TX.ndim - 1)).astype(spikes_TX.dtype)
    spikes = spikes_TX.reshape((-1,) + spikes_TX.shape[2:])
    sow(self, paths.AUX_SPIKE_RATE, step_rate(spikes, T))
    return spikes


class Dense(nn.Dense):
  """nn.Dense that, in the SNN, sows its per-step input event rate (times `work_T`, the work mask of the unit
  it feeds: the steps its output is used at)."""
  phase: str = "snn"
  num_steps: int = 1
  kind: str = "synaptic"

  def __call__(self, x, work_T=None):
    if self.phase == "snn":
      sow(self, paths.AUX_INPUT_RATE, gate(step_rate(x, self.num_steps), work_T))
    return super().__call__(x)

  def op_counts(self, args, y) -> dict:
    """{layer: {'kind', 'macs'}}: the dense MACs of one sample at one step."""
    del y
    return {paths.path_str(self.scope.path): _ops(self.kind, args[0][0].size * self.features)}


class Conv(nn.Conv):
  """nn.Conv that, in the SNN, sows its per-step input event rate. `kind='analog'` marks the layer that sees
  the pixels: it runs once per image, not once per step."""
  phase: str = "snn"
  num_steps: int = 1
  kind: str = "synaptic"

  def __call__(self, x, work_T=None):
    y = super().__call__(x)
    if self.phase == "snn" and self.kind != "analog":
      sow(self, paths.AUX_INPUT_RATE, gate(step_rate(x, self.num_steps), work_T))
    return y

  def op_counts(self, args, y) -> dict:
    k = 1
    for d in self.kernel_size:
      k *= d
    macs = y[0].size * k * args[0].shape[-1] // self.feature_group_count
    return {paths.path_str(self.scope.path): _ops(self.kind, macs)}


class BatchNorm(nn.BatchNorm):
  """nn.BatchNorm whose training statistics cover only the steps a unit works at (`work_T`, [T] in {0, 1}).

  Input [T*B, ...]: rows of steps with work_T = 0 do not enter the batch mean and variance (nor, through them,
  the running averages), so nothing computed at a step whose work is free can change the outputs at other
  steps. A unit that works at no step normalises with the statistics of every step (its output is unused then;
  this avoids 0/0) and leaves its running averages unchanged. Without `work_T` it is nn.BatchNorm exactly."""

  def __call__(self, x, work_T=None):
    if work_T is None or self.use_running_average:
      return super().__call__(x)
    T = work_T.shape[0]
    works = jnp.any(work_T > 0)
    rows = jnp.repeat(jnp.where(works, work_T > 0, True), x.shape[0] // T)
    old = {k: self.get_variable("batch_stats", k) for k in ("mean", "var")}
    y = super().__call__(x, mask=rows.reshape((-1,) + (1,) * (x.ndim - 1)))
    for k, v in old.items():
      if v is not None and self.is_mutable_collection("batch_stats"):
        self.put_variable("batch_stats", k, jnp.where(works, self.get_variable("batch_stats", k), v))
    return y


def conv(*args, **kwargs) -> Conv:
  """A `Conv` (lax's convolution on both kernel paths; see `dtvit.ops`)."""
  return Conv(*args, **kwargs)


def batch_norm(train: bool, name: str) -> BatchNorm:
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def max_pool(x, fast: bool):
  """3x3/2 max pooling: `ops.max_pool` (same values and gradients, ~5x faster backward on CPU) or Flax's."""
  pool = ops.max_pool if fast else nn.max_pool
  return pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class SpikeProducts(nn.Module):
  """The spike products Q K^T V of spiking attention ([T*B, N, H, dh] each, no softmax), in the cheaper
  association order (exact in float32: small integers). Returns (y, first, second): the product and its two
  spike operands (the first product's, then the second's spike operand), whose rates count the products' ACs."""

  def __call__(self, q, k, v):
    N, dh = q.shape[-3], q.shape[-1]
    if N > dh:
      kv = jnp.einsum("xnhd,xnhe->xhde", k, v)
      return jnp.einsum("xnhd,xhde->xnhe", q, kv), k, q
    a = jnp.einsum("xnhd,xmhd->xhnm", q, k)
    return jnp.einsum("xhnm,xmhd->xnhd", a, v), q, v  # (Q K^T) V: the second product's spike operand is V

  def op_counts(self, args, out) -> dict:
    del out
    q = args[0]
    N, H, dh = q.shape[-3:]
    module = paths.path_str(self.scope.path[:-1])
    first, macs = ("kv", H * N * dh * dh) if N > dh else ("qk", H * N * N * dh)
    return {paths.attention_product(module, first): _ops("attention", macs),
            paths.attention_product(module, "qkv"): _ops("attention", macs)}

