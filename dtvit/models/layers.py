"""Building blocks of the spiking ViT family: neurons, time-step masks, synaptic layers, spiking attention, MLP,
blocks and stems.

Every module runs in one of two phases with one parameter tree:
- 'ann': the ANN twin. Each neuron is a clipped ReLU clip(x / c, 0, 1) with trainable clip value c (stored as
  the neuron's `threshold`), the activation an IF neuron with threshold c approximates by its firing rate.
- 'snn': T_max time steps. Activations are folded as [T*B, ...] so every stateless layer (Dense, Conv, BN,
  attention products) runs once over time x batch; only the neuron recurrence runs over time.

Time-step masks: a `TimeMask` owns scores [T_max] and returns the unit's binary mask. What a masked step means
is `MaskConfig.semantics` (see `dtvit.masks`): under 'skip' the unit's neurons hold their membranes and emit
nothing there; under 'filter' they integrate and their spikes are multiplied by the mask. Either way each unit
(module, or neuron with granularity 'layer') also gets its work mask (`masks.work_masks`: the steps whose work
some output depends on); its batch-norm statistics are taken over those steps only, and its synaptic layers'
input rates are counted at those steps only. Names (of modules, neurons, mask holders, side outputs) come from
`dtvit.models.paths`.

Side outputs go to the 'aux' collection (collected by `dtvit.models.apply_model`): masks, work masks, per-step
spike rates of each neuron, per-step input event rates of each synaptic layer (already multiplied by the work
mask of the unit it feeds), per-step logits. Static per-layer op counts are each counted layer's `op_counts`,
which `dtvit.energy` collects with a Flax method interceptor while it traces the model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtvit import masks as masks_lib
from dtvit import neurons as neurons_lib
from dtvit import ops
from dtvit.models import paths
from dtvit.models import schedule as schedule_lib
from dtvit.models.settings import LayerConfig, MaskConfig, NeuronConfig


def _keep_last(_, new):
  return new


def sow(module: nn.Module, name: str, value) -> None:
  module.sow("aux", name, value, init_fn=lambda: None, reduce_fn=_keep_last)


def step_rate(x: jax.Array, num_steps: int) -> jax.Array:
  """Mean of x per time step: [T*B, ...] -> [T] (float32)."""
  return jnp.mean(x.reshape(num_steps, -1).astype(jnp.float32), axis=1)


def _gate(rate_T, work_T):
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
      sow(self, paths.AUX_INPUT_RATE, _gate(step_rate(x, self.num_steps), work_T))
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
      sow(self, paths.AUX_INPUT_RATE, _gate(step_rate(x, self.num_steps), work_T))
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


class SpikingModule(nn.Module):
  """Base of the masked modules: common attributes, the unit masks and the 'synaptic layer -> BN -> neuron' unit.

  `UNITS` is the module's neuron graph (`paths`): {neuron: the neurons its spikes feed}. With granularity
  'layer' each neuron is a unit with its own mask; with 'module' they share one.
  """
  phase: str
  num_steps: int
  neuron: NeuronConfig
  mask: MaskConfig
  dtype: Any = jnp.float32
  fused: bool = True
  cpu_kernel: bool = True
  # Skipped-step inference (built by `dtvit.inference`): ((module path, steps), ...) with `steps` the sorted
  # tuple of step indices the module runs, or None to simulate all T_max steps (the training path).
  schedule: Any = None
  layer_cfg: LayerConfig = LayerConfig()  # initialisers and pre-BN biases

  UNITS: ClassVar[dict] = {}

  @property
  def run_steps(self) -> Optional[tuple]:
    """The step indices this module runs from the schedule, or None (not scheduled: all T_max steps)."""
    if self.schedule is None or self.phase != "snn":
      return None
    return dict(self.schedule).get(paths.path_str(self.scope.path))

  @property
  def scheduled_out(self) -> bool:
    """Whether the schedule runs none of this module's steps (its output is exactly 0)."""
    return self.run_steps is not None and not self.run_steps

  @property
  def sim_steps(self) -> int:
    """Simulated steps: T_max in the SNN (the scheduled steps' count when scheduled), 1 in the ANN twin (the
    masks keep T_max scores in both)."""
    return schedule_lib.num_run(self.run_steps, self.num_steps) if self.phase == "snn" else 1

  def take_steps(self, x):
    return schedule_lib.take_steps(x, self.run_steps, self.num_steps)

  def pad_steps(self, y):
    return schedule_lib.pad_steps(y, self.run_steps, self.num_steps)

  def common(self) -> dict:
    """The attributes a submodule shares with this one."""
    return dict(phase=self.phase, num_steps=self.num_steps, neuron=self.neuron, mask=self.mask, dtype=self.dtype,
                fused=self.fused, cpu_kernel=self.cpu_kernel, schedule=self.schedule, layer_cfg=self.layer_cfg)

  def unit_masks(self, temperature, enabled: bool = True) -> tuple[dict, dict]:
    """({neuron: mask [T]}, {neuron: work mask [T]}) for the neurons of `UNITS`, all None when the module is
    unmasked (ANN phase, masks disabled, `enabled=False`). [len(steps)] when scheduled.

    Creates the scores: granularity 'module' one `TimeMask`; 'layer' one per neuron. The work masks
    (`masks.work_masks`) are sown ('module': one, 'layer': one per neuron)."""
    names = tuple(self.UNITS)
    make = lambda name: TimeMask(self.num_steps, self.mask, self.phase, name=name)(temperature) if enabled else None
    run = self.run_steps
    if self.mask.granularity == "module":
      mask_T = schedule_lib.window(make(paths.MODULE_MASK), run)
      masks = dict.fromkeys(names, mask_T)
      if mask_T is None:
        return masks, dict(masks)
      work_T = masks_lib.work_masks({"m": mask_T}, {"m": (paths.OUTPUT,)}, self.mask.semantics)["m"]
      sow(self, paths.AUX_WORK, work_T)
      return masks, dict.fromkeys(names, work_T)
    masks = {n: schedule_lib.window(make(paths.neuron_mask(n)), run) for n in names}
    if any(m is None for m in masks.values()):
      return dict.fromkeys(names), dict.fromkeys(names)
    works = masks_lib.work_masks(masks, self.UNITS, self.mask.semantics)
    for n, w in works.items():
      sow(self, paths.neuron_work(n), w)
    return masks, works

  def neuron_layer(self, x, name, mask_T, *, threshold=None, static=False):
    return Neuron(self.phase, self.sim_steps, self.neuron,
                  self.neuron.init_threshold if threshold is None else threshold,
                  semantics=self.mask.semantics, fused=self.fused,
                  cpu_kernel=self.cpu_kernel, name=name)(x, mask_T, static=static)

  def dense_unit(self, x, features, layer, masks, works, *, train):
    """Dense -> BN -> neuron: the Dense's input counted and the BN's statistics taken at the neuron's working
    steps."""
    unit = paths.neuron_of(layer)
    y = Dense(features, use_bias=layer in self.layer_cfg.pre_bn_bias, kernel_init=self.layer_cfg.init("dense_init"),
              dtype=self.dtype, phase=self.phase, num_steps=self.sim_steps,
              dot_general=ops.dot_general if self.fused else None, name=layer)(x, works[unit])
    y = batch_norm(train, paths.batch_norm_of(layer))(y, works[unit])
    return self.neuron_layer(y, unit, masks[unit])

  def skipped_tokens(self, images_BHWC, downsampling: int):
    """A stem's output when scheduled out (every step masked): zero tokens [T_max*B, N, dim]."""
    b, h, w = images_BHWC.shape[:3]
    dtype = jnp.promote_types(images_BHWC.dtype, jnp.float32)  # BN (float32 params) promotes the stem output
    return jnp.zeros((self.num_steps * b, (h // downsampling) * (w // downsampling), self.dim), dtype)


class SpikingSelfAttention(SpikingModule):
  """Spikformer's SSA: Q, K, V = neuron(BN(Linear(x))); neuron_attn(Q K^T V * scale); neuron(BN(Linear(.)))."""
  num_heads: int = 1
  scale: float = 0.125

  UNITS: ClassVar[dict] = paths.ATTN_UNITS

  @nn.compact
  def __call__(self, x_XND, *, train: bool, temperature=1.0):
    D = x_XND.shape[-1]
    if D % self.num_heads:
      raise ValueError(f"dim {D} is not divisible by num_heads {self.num_heads}.")
    if self.scheduled_out:
      return jnp.zeros_like(x_XND)
    x_XND = self.take_steps(x_XND)
    heads = x_XND.shape[:-1] + (self.num_heads, D // self.num_heads)
    masks, works = self.unit_masks(temperature)
    q, k, v = (self.dense_unit(x_XND, D, n, masks, works, train=train).reshape(heads) for n in paths.QKV)
    y, first, second = SpikeProducts(name=paths.PRODUCTS)(q, k, v)
    attn = paths.ATTN_NEURON
    if self.phase == "snn":
      # The products feed the attention neuron: their work is needed at its working steps at which none of
      # Q, K, V is masked (a masked operand makes the product 0).
      prod_T = works[attn]
      if prod_T is not None:
        for n in paths.QKV:
          prod_T = prod_T * masks_lib.binary(masks[paths.neuron_of(n)])
      for name, operand in zip(paths.AUX_ATTENTION_RATES, (first, second)):
        sow(self, name, _gate(step_rate(operand, self.sim_steps), prod_T))
    y = (y * self.scale).reshape(x_XND.shape)
    y = self.neuron_layer(y, attn, masks[attn], threshold=self.neuron.attn_threshold)
    return self.pad_steps(self.dense_unit(y, D, paths.PROJ, masks, works, train=train))


class SpikingMLP(SpikingModule):
  """neuron(BN(fc2(neuron(BN(fc1(x)))))); the neurons replace GELU and BN replaces LayerNorm."""
  hidden_dim: int = 4

  UNITS: ClassVar[dict] = paths.MLP_UNITS

  @nn.compact
  def __call__(self, x_XND, *, train: bool, temperature=1.0):
    if self.scheduled_out:
      return jnp.zeros_like(x_XND)
    x_XND = self.take_steps(x_XND)
    masks, works = self.unit_masks(temperature)
    fc1, fc2 = paths.FC
    h = self.dense_unit(x_XND, self.hidden_dim, fc1, masks, works, train=train)
    return self.pad_steps(self.dense_unit(h, x_XND.shape[-1], fc2, masks, works, train=train))


class Block(SpikingModule):
  """x = x + attn(x); x = x + mlp(x)."""
  num_heads: int = 1
  mlp_dim: int = 4
  attn_scale: float = 0.125

  @nn.compact
  def __call__(self, x_XND, *, train: bool, temperature=1.0):
    x_XND = x_XND + SpikingSelfAttention(num_heads=self.num_heads, scale=self.attn_scale, name=paths.ATTN,
                                         **self.common())(x_XND, train=train, temperature=temperature)
    x_XND = x_XND + SpikingMLP(hidden_dim=self.mlp_dim, name=paths.MLP, **self.common())(
        x_XND, train=train, temperature=temperature)
    sow(self, paths.AUX_BLOCK_OUTPUT, x_XND)
    return x_XND


class SPSStem(SpikingModule):
  """Spiking patch splitting: 4 x (Conv3x3 -> BN -> neuron [-> MaxPool]) with D/8, D/4, D/2, D channels,
  then a relative position embedding Conv3x3 -> BN -> neuron added residually. Returns tokens [T*B, N, D].
  With `pool_first` a pooled stage is Conv3x3 -> BN -> MaxPool -> neuron.

  The first conv sees analog pixels; it and its BN run once per image and feed every step.
  """
  dim: int = 384
  pools: Sequence[bool] = (False, False, True, True)
  patch_size: int = 4
  pool_first: bool = False

  UNITS: ClassVar[dict] = paths.SPS_UNITS

  def conv(self, features, layer, kind="synaptic"):
    return conv(features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, phase=self.phase,
                num_steps=self.sim_steps, kind=kind, kernel_init=self.layer_cfg.init("conv_init"),
                name=layer)

  @nn.compact
  def __call__(self, images_BHWC, *, train: bool, temperature=1.0):
    if self.scheduled_out:
      return self.skipped_tokens(images_BHWC, 2 ** sum(bool(p) for p in self.pools))
    masks, works = self.unit_masks(temperature, enabled=self.mask.mask_stem)
    x = images_BHWC
    for i, (layer, c) in enumerate(zip(paths.SPS_CONVS, (self.dim // 8, self.dim // 4, self.dim // 2, self.dim))):
      unit = paths.neuron_of(layer)
      # The analog stage runs once per image ([B, ...], no time axis): its statistics cover the images.
      work_T = None if i == 0 else works[unit]
      x = self.conv(c, layer, "analog" if i == 0 else "synaptic")(x, work_T)
      x = batch_norm(train, paths.batch_norm_of(layer))(x, work_T)
      if self.pools[i] and self.pool_first:
        x = max_pool(x, self.fused)
      x = self.neuron_layer(x, unit, masks[unit], static=(i == 0))
      if self.pools[i] and not self.pool_first:
        x = max_pool(x, self.fused)
    unit = paths.neuron_of(paths.RPE)
    r = self.conv(self.dim, paths.RPE)(x, works[unit])
    r = batch_norm(train, paths.batch_norm_of(paths.RPE))(r, works[unit])
    x = x + self.neuron_layer(r, unit, masks[unit])
    return self.pad_steps(x.reshape(x.shape[0], -1, self.dim))


class PatchStem(SpikingModule):
  """Plain ViT embedding: Conv(patch, stride patch) + pos_embedding -> BN -> neuron, on analog pixels (run once
  per image). Returns tokens [T*B, N, D]."""
  dim: int = 384
  pools: Sequence[bool] = ()
  patch_size: int = 16

  UNITS: ClassVar[dict] = paths.PATCH_UNITS

  @nn.compact
  def __call__(self, images_BHWC, *, train: bool, temperature=1.0):
    if self.scheduled_out:
      return self.skipped_tokens(images_BHWC, self.patch_size)
    masks, _ = self.unit_masks(temperature, enabled=self.mask.mask_stem)
    p = self.patch_size
    x = conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, phase=self.phase,
             num_steps=self.sim_steps, kind="analog", kernel_init=self.layer_cfg.init("conv_init"),
             name=paths.PATCH)(images_BHWC)
    x = x.reshape(x.shape[0], -1, self.dim)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.dim), jnp.float32)
    x = batch_norm(train, paths.batch_norm_of(paths.PATCH))(x + pos.astype(x.dtype))
    unit = paths.neuron_of(paths.PATCH)
    return self.pad_steps(self.neuron_layer(x, unit, masks[unit], static=True))
