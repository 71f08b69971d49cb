"""The masked modules of the spiking ViT family, built from `dtvit.models.layers`: spiking self-attention, the
MLP, the block and the two stems (SPS, patch).

Each is a `SpikingModule`: its neurons form units (the module, or each neuron with granularity 'layer'), each
unit with a time-step mask (`layers.TimeMask`) and a work mask (`masks.work_masks`: the steps whose work some
output depends on). A unit's synaptic layers count their input rates, and its batch norms take their
statistics, at its working steps only. Under skipped-step inference (`dtvit.inference`) a module runs only the
rows of its scheduled steps (`schedule`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dtvit import masks as masks_lib
from dtvit import ops
from dtvit.models import paths
from dtvit.models import schedule as schedule_lib
from dtvit.models.layers import Dense, Neuron, SpikeProducts, TimeMask, batch_norm, conv, gate, max_pool, sow, step_rate
from dtvit.models.settings import LayerConfig, MaskConfig, NeuronConfig


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
        sow(self, name, gate(step_rate(operand, self.sim_steps), prod_T))
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
