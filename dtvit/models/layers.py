"""Building blocks shared by the spiking ViT family: neurons, time-step masks, spiking attention and MLP.

Every module runs in one of two phases with one parameter tree:
- 'ann': the ANN twin. Each neuron is a clipped ReLU clip(x / c, 0, 1) with trainable clip value c (stored as
  the neuron's `threshold`), the activation an IF neuron with threshold c approximates by its firing rate.
- 'snn': T_max time steps. Activations are folded as [T*B, ...] so every stateless layer (Dense, Conv, BN,
  attention products) runs once over time x batch; only the neuron recurrence is a `lax.scan` over time.

Time-step masks: a `TimeMask` owns scores [T_max] (param `time_scores`) and returns the module's binary mask.
What a masked step means is `MaskConfig.semantics` (see `dtvit.masks`): under 'skip' the module's neurons hold
their membranes and emit nothing there; under 'filter' they integrate and their spikes are multiplied by the
mask. Either way each unit (module, or neuron with granularity 'layer') also gets its work mask
(`masks.work_masks`: the steps whose work some output depends on); its batch-norm statistics are taken over
those steps only, and its synaptic layers' input rates are counted at those steps only.

Side outputs go to the 'aux' collection (collected by `dtvit.models.apply_model`): masks, work masks, per-step
spike rates of each neuron, per-step input event rates of each synaptic layer (already multiplied by the work
mask of the unit it feeds: zero at the steps whose work nothing depends on), per-step logits. Static per-layer
op counts are recorded at trace time through `record_ops` (see `dtvit.energy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dtvit import masks as masks_lib
from dtvit import neurons as neurons_lib
from dtvit import ops
from dtvit.models import paths

PHASES = ("ann", "snn")
GRANULARITIES = ("module", "layer")


REMAT_MODES = (False, True, "spikes", "blocks")


@dataclasses.dataclass(frozen=True)
class NeuronConfig:
  """Static neuron settings (see `dtvit.neurons`)."""
  neuron: str = "lif"               # 'lif' (authors') | 'if' | 'spikformer'
  surrogate: str = "pwl"            # 'pwl' | 'sigmoid' | 'atan'
  alpha: Optional[float] = None     # surrogate sharpness; None -> the surrogate's customary value
  tau: float = 2.0                  # 'spikformer' time constant
  reset: Optional[str] = None       # None -> 'soft' for lif/if, 'hard' for spikformer
  detach_reset: Optional[bool] = None
  init_threshold: float = 1.0       # threshold (SNN) = clip value (ANN) at init
  attn_threshold: float = 0.5       # the attention neuron's threshold at init
  init_leak: float = 1.0            # lambda at init ('lif'); clamped to [0, 1]
  init_membrane: float = 0.5        # U[0] / threshold; 0.5 rounds instead of floors (better conversion)
  surrogate_input: str = "normalized"  # the surrogate acts on U/Vth - 1 ('normalized') or U - Vth ('difference')
  # True: jax.checkpoint the scan step; 'spikes': see ops.checkpoint_spikes; 'blocks': the backward pass
  # recomputes the stem and each block from its input (`recompute_in_backward`), bounding BPTT memory.
  remat: Any = False
  unroll: int = 1

  def validate(self):
    if self.neuron not in neurons_lib.NEURONS:
      raise ValueError(f"Unknown neuron {self.neuron!r}; choose one of {neurons_lib.NEURONS}.")
    if self.surrogate not in neurons_lib.SURROGATES:
      raise ValueError(f"Unknown surrogate {self.surrogate!r}; choose one of {neurons_lib.SURROGATES}.")
    if self.reset is not None and self.reset not in neurons_lib.RESETS:
      raise ValueError(f"Unknown reset {self.reset!r}; choose one of {neurons_lib.RESETS}.")
    if self.init_threshold <= 0 or self.attn_threshold <= 0:
      raise ValueError("Neuron thresholds must be > 0.")
    if self.tau <= 0:
      raise ValueError(f"tau must be > 0, got {self.tau}.")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"Unknown neuron.remat {self.remat!r}; choose one of {REMAT_MODES}.")
    if self.surrogate_input not in neurons_lib.SURROGATE_INPUTS:
      raise ValueError(f"Unknown neuron.surrogate_input {self.surrogate_input!r}; choose one of "
                       f"{neurons_lib.SURROGATE_INPUTS}.")

  @classmethod
  def preset(cls, name: str, **overrides) -> "NeuronConfig":
    """A named neuron preset (`NEURON_PRESETS`) with some fields overridden."""
    if name not in NEURON_PRESETS:
      raise ValueError(f"Unknown neuron preset {name!r}; choose one of {sorted(NEURON_PRESETS)}.")
    return cls(**{**NEURON_PRESETS[name], **overrides})


# Named neuron settings. 'spikingjelly': every setting equals SpikingJelly 2.0's Spikformer (LIFNode tau 2,
# v_threshold 1 and 0.5 for the attention neuron, hard reset to 0 detached, sigmoid surrogate alpha 4 acting
# on U - Vth, membranes starting at 0); with it dtvit's Spikformer (stem_pool_first=True) reproduces
# SpikingJelly's (tests/spikformer_golden_test.py). 'spikformer_normalized' is the same with the surrogate on
# U/Vth - 1 (dtvit's convention: at Vth = 0.5 it doubles the slope).
NEURON_PRESETS = {
    "spikingjelly": dict(neuron="spikformer", surrogate="sigmoid", alpha=4.0, tau=2.0, reset="hard",
                         detach_reset=True, init_threshold=1.0, attn_threshold=0.5, init_leak=1.0,
                         init_membrane=0.0, surrogate_input="difference"),
}
NEURON_PRESETS["spikformer_normalized"] = dict(NEURON_PRESETS["spikingjelly"], surrogate_input="normalized")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """Static time-step mask settings (see `dtvit.masks`)."""
  enabled: bool = True          # False: every step active (fixed-T SNN); the scores stay in the params
  mode: str = "ste"             # 'ste' | 'sigmoid'
  monotone: bool = False        # m[t] = prod_{k<=t} b[k]
  granularity: str = "module"   # 'module': each block's attn and mlp; 'layer': every neuron
  score_init: float = 1.0       # > 0: all steps open at the start
  mask_stem: bool = False       # also give the stem a mask
  hard: bool = False            # force the hard mask (evaluation / inference)
  semantics: str = "skip"       # what a masked step is: 'skip' | 'filter' (see dtvit.masks)

  def validate(self):
    masks_lib.check_semantics(self.semantics)
    if self.mode not in masks_lib.MASK_MODES:
      raise ValueError(f"Unknown mask mode {self.mode!r}; choose one of {masks_lib.MASK_MODES}.")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"Unknown mask granularity {self.granularity!r}; choose one of {GRANULARITIES}.")


# ----------------------------------------------------------------------------------------------------------
# Static op counts, recorded while a model is traced (e.g. under jax.eval_shape) inside `record_ops()`.

_OP_RECORDERS: list = []


@contextlib.contextmanager
def record_ops():
  """Collects {layer path: {'kind', 'macs'}} for every synaptic layer traced inside the context.

  'macs' is the dense multiply-accumulate count for one sample at one time step. 'kind' is 'analog' for the
  layer that sees the pixels (MACs, computed once), 'synaptic' for layers fed by spikes (ACs in the SNN),
  'attention' for products of two spike tensors (ACs).
  """
  rec: dict = {}
  _OP_RECORDERS.append(rec)
  try:
    yield rec
  finally:
    _OP_RECORDERS.pop()


def _record(module: nn.Module, kind: str, macs: int, suffix: str = "") -> None:
  if _OP_RECORDERS:
    path = "/".join(module.scope.path) + suffix
    _OP_RECORDERS[-1][path] = {"kind": kind, "macs": int(macs)}


def _keep_last(_, new):
  return new


def sow(module: nn.Module, name: str, value) -> None:
  module.sow("aux", name, value, init_fn=lambda: None, reduce_fn=_keep_last)


def step_rate(x: jax.Array, num_steps: int) -> jax.Array:
  """Mean of x per time step: [T*B, ...] -> [T] (float32)."""
  return jnp.mean(x.reshape(num_steps, -1).astype(jnp.float32), axis=1)


# ----------------------------------------------------------------------------------------------------------


class TimeMask(nn.Module):
  """Holds a module's time-step scores [T_max] and returns its mask [T_max] (None in the ANN phase)."""
  num_steps: int
  cfg: MaskConfig
  phase: str

  @nn.compact
  def __call__(self, temperature=1.0):
    scores_T = self.param("time_scores", nn.initializers.constant(self.cfg.score_init), (self.num_steps,),
                          jnp.float32)
    if self.phase == "ann" or not self.cfg.enabled:
      return None
    if self.cfg.hard:
      mask_T = masks_lib.hard_mask(scores_T, monotone=self.cfg.monotone)
    else:
      mask_T = masks_lib.time_step_mask(scores_T, mode=self.cfg.mode, temperature=temperature,
                                        monotone=self.cfg.monotone)
    sow(self, "mask", mask_T)
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

  @nn.compact
  def __call__(self, x, mask_T=None, *, static: bool = False):
    threshold = self.param("threshold", nn.initializers.constant(self.init_threshold), (), jnp.float32)
    leak = self.param("leak", nn.initializers.constant(self.cfg.init_leak), (), jnp.float32)
    # A threshold driven to <= 0 by an optimiser step would fire on every step; keep it positive.
    threshold = jnp.maximum(threshold, 1e-3)
    if self.phase == "ann":
      return jnp.clip(x / threshold.astype(x.dtype), 0.0, 1.0)
    T = self.num_steps
    kw = dict(neuron=self.cfg.neuron, leak=leak, threshold=threshold, tau=self.cfg.tau,
              surrogate=self.cfg.surrogate, alpha=self.cfg.alpha, reset=self.cfg.reset,
              detach_reset=self.cfg.detach_reset, remat=self.cfg.remat if self.cfg.remat != "blocks" else False,
              unroll=self.cfg.unroll,
              init_membrane=self.cfg.init_membrane, surrogate_input=self.cfg.surrogate_input)
    inside = mask_T is not None and self.semantics == "skip"
    if inside:
      kw["step_mask_T"] = mask_T
    if static:
      spikes_TX = neurons_lib.multistep(x, num_steps=T, **kw)
    else:
      spikes_TX = neurons_lib.multistep(x.reshape(T, x.shape[0] // T, *x.shape[1:]), **kw)
    if mask_T is not None and not inside:
      spikes_TX = spikes_TX * mask_T.reshape((T,) + (1,) * (spikes_TX.ndim - 1)).astype(spikes_TX.dtype)
    spikes = spikes_TX.reshape((-1,) + spikes_TX.shape[2:])
    sow(self, "spike_rate", step_rate(spikes, T))
    return spikes


class Dense(nn.Dense):
  """nn.Dense that records its op count and, in the SNN, its per-step input event rate (times `work_T`, the
  work mask of the unit it feeds: the steps its output is used at)."""
  phase: str = "snn"
  num_steps: int = 1
  kind: str = "synaptic"

  def __call__(self, x, work_T=None):
    _record(self, self.kind, x[0].size * self.features)
    if self.phase == "snn":
      sow(self, "input_rate", _gate(step_rate(x, self.num_steps), work_T))
    return super().__call__(x)


class Conv(nn.Conv):
  """nn.Conv that records its op count and, in the SNN, its per-step input event rate.

  `kind='analog'` marks the layer that sees the pixels: it runs once per image, not once per step.
  """
  phase: str = "snn"
  num_steps: int = 1
  kind: str = "synaptic"
  # lax's conv with a fast kernel gradient while `ops.fast_ops()` (exactly lax's own otherwise).
  conv_general_dilated: Any = ops.conv_general_dilated

  def __call__(self, x, work_T=None):
    y = super().__call__(x)
    k = 1
    for d in self.kernel_size:
      k *= d
    _record(self, self.kind, y[0].size * k * x.shape[-1] // self.feature_group_count)
    if self.phase == "snn" and self.kind != "analog":
      sow(self, "input_rate", _gate(step_rate(x, self.num_steps), work_T))
    return y


class BatchNorm(nn.BatchNorm):
  """nn.BatchNorm whose training statistics cover only the steps a unit works at (`work_T`, [T] in {0, 1}).

  Input [T*B, ...]: rows of steps with work_T = 0 do not enter the batch mean and variance (nor, through them,
  the running averages), so nothing computed at a step whose work is free can change the outputs at other
  steps. A unit that works at no step normalises with the statistics of every step (its output is unused then;
  this avoids 0/0) and leaves its running averages unchanged. Without `work_T` it is nn.BatchNorm exactly."""

  def __call__(self, x, work_T=None):  # pylint: disable=arguments-differ
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


def batch_norm(train: bool, name: str) -> BatchNorm:
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class SpikingModule(nn.Module):
  """Base of the masked modules: common attributes, the unit masks and the 'synaptic layer -> BN -> neuron' unit.

  `UNITS` is the module's neuron graph: {neuron: the neurons its spikes feed}, `masks.OUTPUT` for the module's
  output. With granularity 'layer' each neuron is a unit with its own mask; with 'module' they share one.
  """
  phase: str
  num_steps: int
  neuron: NeuronConfig
  mask: MaskConfig
  dtype: Any = jnp.float32
  # Skipped-step inference (built by `dtvit.inference`): ((module path, steps), ...) with `steps` the sorted
  # tuple of step indices the module runs, or None to simulate all T_max steps (the training path).
  schedule: Any = None

  UNITS: ClassVar[dict] = {}

  @property
  def run_steps(self) -> Optional[tuple]:
    """The step indices this module runs from the schedule, or None (not scheduled: all T_max steps)."""
    if self.schedule is None or self.phase != "snn":
      return None
    return dict(self.schedule).get("/".join(self.scope.path))

  @property
  def sim_steps(self) -> int:
    """Simulated steps: T_max in the SNN (the scheduled steps' count when scheduled), 1 in the ANN twin (the
    masks keep T_max scores in both)."""
    if self.phase != "snn":
      return 1
    run = self.run_steps
    return self.num_steps if run is None else len(run)

  def _prefix(self) -> Optional[int]:
    run = self.run_steps
    return len(run) if run is not None and tuple(run) == tuple(range(len(run))) else None

  def take_steps(self, x):
    """[T_max*B, ...] -> the scheduled steps' rows [len(steps)*B, ...] (unchanged when not scheduled)."""
    run = self.run_steps
    if run is None or len(run) == self.num_steps:
      return x
    b = x.shape[0] // self.num_steps
    if self._prefix() is not None:
      return x[: b * len(run)]
    x_TB = x.reshape((self.num_steps, b) + x.shape[1:])
    return x_TB[np.asarray(run)].reshape((-1,) + x.shape[1:])

  def pad_steps(self, y):
    """[len(steps)*B, ...] -> [T_max*B, ...], zeros at the other steps: the schedule leaves out only steps at
    which the module's output is exactly 0."""
    run = self.run_steps
    if run is None or len(run) == self.num_steps:
      return y
    b = y.shape[0] // len(run)
    zeros = lambda steps: jnp.zeros((steps * b,) + y.shape[1:], y.dtype)
    # Contiguous pieces of y and zero blocks for the gaps, concatenated: a scatter (`.at[].set`) into a zero
    # [T_max*B, ...] buffer measured ~25% slower on XLA:CPU (experiments/inference_benchmark/).
    pieces, t, i = [], 0, 0
    while i < len(run):
      j = i
      while j + 1 < len(run) and run[j + 1] == run[j] + 1:
        j += 1
      if run[i] > t:
        pieces.append(zeros(run[i] - t))
      pieces.append(y[i * b:(j + 1) * b])
      t, i = run[j] + 1, j + 1
    if t < self.num_steps:
      pieces.append(zeros(self.num_steps - t))
    return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]

  def skipped_output(self, images_BHWC, downsampling: int):
    """A stem's output when scheduled out (every step masked): zero tokens [T_max*B, N, dim]."""
    b, h, w = images_BHWC.shape[:3]
    dtype = jnp.promote_types(images_BHWC.dtype, jnp.float32)  # BN (float32 params) promotes the stem output
    return jnp.zeros((self.num_steps * b, (h // downsampling) * (w // downsampling), self.dim), dtype)

  def _window(self, mask_T):
    run = self.run_steps
    return mask_T if mask_T is None or run is None else mask_T[np.asarray(run)]

  def unit_masks(self, temperature, enabled: bool = True) -> tuple[dict, dict]:
    """({neuron: mask [T]}, {neuron: work mask [T]}) for the neurons of `UNITS`, all None when the module is
    unmasked (ANN phase, masks disabled, `enabled=False`). [len(steps)] when scheduled.

    Creates the scores: granularity 'module' one `TimeMask` 'time_mask'; 'layer' one '<neuron>_mask' each. The
    work masks (`masks.work_masks`) are sown as 'work' ('module') or '<neuron>_work' ('layer')."""
    names = tuple(self.UNITS)
    if self.mask.granularity == "module":
      mask_T = TimeMask(self.num_steps, self.mask, self.phase, name="time_mask")(temperature) if enabled else None
      masks = dict.fromkeys(names, self._window(mask_T))
      if mask_T is None:
        return masks, dict(masks)
      work_T = masks_lib.work_masks({"m": masks[names[0]]}, {"m": (masks_lib.OUTPUT,)}, self.mask.semantics)["m"]
      sow(self, "work", work_T)
      return masks, dict.fromkeys(names, work_T)
    masks = {n: (self._window(TimeMask(self.num_steps, self.mask, self.phase, name=f"{n}_mask")(temperature))
                 if enabled else None) for n in names}
    if any(m is None for m in masks.values()):
      return dict.fromkeys(names), dict.fromkeys(names)
    works = masks_lib.work_masks(masks, self.UNITS, self.mask.semantics)
    for n, w in works.items():
      sow(self, f"{n}_work", w)
    return masks, works

  def neuron_layer(self, x, name, mask_T, *, threshold=None, static=False):
    return Neuron(self.phase, self.sim_steps, self.neuron,
                  self.neuron.init_threshold if threshold is None else threshold,
                  semantics=self.mask.semantics, name=name)(x, mask_T, static=static)

  def dense_unit(self, x, features, name, masks, works, *, train):
    """Dense -> BN -> neuron `name`_lif: the Dense's input counted and the BN's statistics taken at the
    neuron's working steps."""
    unit = f"{name}_lif"
    y = Dense(features, use_bias=False, dtype=self.dtype, phase=self.phase, num_steps=self.sim_steps,
              name=name)(x, works[unit])
    y = batch_norm(train, f"{name}_bn")(y, works[unit])
    return self.neuron_layer(y, unit, masks[unit])


_OUT = masks_lib.OUTPUT


class SpikingSelfAttention(SpikingModule):
  """Spikformer's SSA: Q, K, V = neuron(BN(Linear(x))); neuron_attn(Q K^T V * scale); neuron(BN(Linear(.)))."""
  num_heads: int = 1
  scale: float = 0.125

  # Q, K and V spikes meet in the products Q K^T V before the attention neuron: each matters at a step only
  # if the other two are active there too.
  UNITS: ClassVar[dict] = paths.ATTN_UNITS

  @nn.compact
  def __call__(self, x_XND, *, train: bool, temperature=1.0):
    D = x_XND.shape[-1]
    if D % self.num_heads:
      raise ValueError(f"dim {D} is not divisible by num_heads {self.num_heads}.")
    if self.run_steps is not None and not self.run_steps:  # scheduled out: the output is exactly 0
      return jnp.zeros_like(x_XND)
    x_XND = self.take_steps(x_XND)
    H, dh = self.num_heads, D // self.num_heads
    masks, works = self.unit_masks(temperature)
    qkv = {}
    for n in ("q", "k", "v"):
      qkv[n] = self.dense_unit(x_XND, D, n, masks, works, train=train).reshape(x_XND.shape[:-1] + (H, dh))
    q, k, v = qkv["q"], qkv["k"], qkv["v"]
    N = x_XND.shape[-2]
    # Spike products are exact in float32 (small integers), so the cheaper association order is used.
    if N > dh:
      _record(self, "attention", H * N * dh * dh, "/kv")
      _record(self, "attention", H * N * dh * dh, "/qkv")
      kv = jnp.einsum("xnhd,xnhe->xhde", k, v)
      y = jnp.einsum("xnhd,xhde->xnhe", q, kv)
      first, second = k, q
    else:
      _record(self, "attention", H * N * N * dh, "/qk")
      _record(self, "attention", H * N * N * dh, "/qkv")
      a = jnp.einsum("xnhd,xmhd->xhnm", q, k)
      y = jnp.einsum("xhnm,xmhd->xnhd", a, v)
      first, second = q, v  # (Q K^T) V: the spike operand of the second product is V
    if self.phase == "snn":
      # The products feed the attention neuron: their work is needed at its working steps at which none of
      # Q, K, V is masked (a masked operand makes the product 0).
      prod_T = works["attn_lif"]
      if prod_T is not None:
        for n in ("q_lif", "k_lif", "v_lif"):
          prod_T = prod_T * masks_lib.binary(masks[n])
      sow(self, "attention_rate_1", _gate(step_rate(first, self.sim_steps), prod_T))
      sow(self, "attention_rate_2", _gate(step_rate(second, self.sim_steps), prod_T))
    y = (y * self.scale).reshape(x_XND.shape)
    y = self.neuron_layer(y, "attn_lif", masks["attn_lif"], threshold=self.neuron.attn_threshold)
    return self.pad_steps(self.dense_unit(y, D, "proj", masks, works, train=train))


def _gate(rate_T, work_T):
  return rate_T if work_T is None else rate_T * work_T


class SpikingMLP(SpikingModule):
  """neuron(BN(fc2(neuron(BN(fc1(x)))))); the neurons replace GELU and BN replaces LayerNorm."""
  hidden_dim: int = 4

  UNITS: ClassVar[dict] = paths.MLP_UNITS

  @nn.compact
  def __call__(self, x_XND, *, train: bool, temperature=1.0):
    if self.run_steps is not None and not self.run_steps:  # scheduled out: the output is exactly 0
      return jnp.zeros_like(x_XND)
    x_XND = self.take_steps(x_XND)
    masks, works = self.unit_masks(temperature)
    h = self.dense_unit(x_XND, self.hidden_dim, "fc1", masks, works, train=train)
    return self.pad_steps(self.dense_unit(h, x_XND.shape[-1], "fc2", masks, works, train=train))


class Block(SpikingModule):
  """x = x + attn(x); x = x + mlp(x)."""
  num_heads: int = 1
  mlp_dim: int = 4
  attn_scale: float = 0.125

  @nn.compact
  def __call__(self, x_XND, *, train: bool, temperature=1.0):
    common = dict(phase=self.phase, num_steps=self.num_steps, neuron=self.neuron, mask=self.mask,
                  dtype=self.dtype, schedule=self.schedule)
    x_XND = x_XND + SpikingSelfAttention(num_heads=self.num_heads, scale=self.attn_scale, name="attn",
                                         **common)(x_XND, train=train, temperature=temperature)
    x_XND = x_XND + SpikingMLP(hidden_dim=self.mlp_dim, name="mlp", **common)(
        x_XND, train=train, temperature=temperature)
    sow(self, "output", x_XND)
    return x_XND


def max_pool(x, phase):
  del phase
  if ops.fast_ops():  # same values and gradients (first maximum of each window), ~5x faster backward on CPU
    return ops.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class SpikingViT(nn.Module):
  """A spiking vision transformer: stem -> blocks -> mean over tokens -> Linear -> mean over time.

  Attributes:
    num_classes: output classes.
    stem: 'sps' (Spikformer's spiking patch splitting) or 'patch' (a plain ViT patch embedding).
    depth, dim, num_heads, mlp_ratio: transformer sizes.
    patch_size: the 'patch' stem's patch size.
    stem_pools: for 'sps', which of the 4 conv stages end with a 3x3/2 max pool.
    stem_pool_first: for 'sps', pool each pooled stage's batch-norm output before its neuron (conv -> BN ->
      pool -> neuron, as SpikingJelly's Spikformer; the neuron runs at the pooled resolution, 4x fewer
      neurons) instead of pooling its spikes (conv -> BN -> neuron -> pool, the original Spikformer). In the
      ANN phase both orders give the same values (max pooling commutes with the clipped ReLU).
    phase: 'ann' | 'snn' (static); the parameter tree is the same in both.
    num_steps: T_max, the number of simulated steps (static; the SNN's time axis).
    neuron, mask: `NeuronConfig`, `MaskConfig`.
    attn_scale: the scale of Q K^T V.
    dtype: matmul dtype (bf16 on accelerators); membranes stay float32.
    schedule: None (dense: all T_max steps, the training path), or ((module path, steps), ...) for
      skipped-step inference with hard masks: each listed masked module runs only the step indices `steps`
      (a sorted tuple) and is skipped when it is empty. Built from trained masks by `dtvit.inference`.
  """
  num_classes: int
  stem: str = "sps"
  depth: int = 4
  dim: int = 384
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 4
  stem_pools: Sequence[bool] = (False, False, True, True)
  stem_pool_first: bool = False
  phase: str = "snn"
  num_steps: int = 4
  neuron: NeuronConfig = NeuronConfig()
  mask: MaskConfig = MaskConfig()
  attn_scale: float = 0.125
  dtype: Any = jnp.float32
  schedule: Any = None

  def validate(self):
    if self.phase not in PHASES:
      raise ValueError(f"Unknown phase {self.phase!r}; choose 'ann' or 'snn'.")
    if int(self.num_steps) != self.num_steps or self.num_steps < 1:
      raise ValueError(f"T_max (num_steps) must be an integer >= 1, got {self.num_steps}.")
    if self.stem not in ("sps", "patch"):
      raise ValueError(f"Unknown stem {self.stem!r}; choose 'sps' or 'patch'.")
    if self.stem == "sps" and len(self.stem_pools) != 4:
      raise ValueError(f"stem_pools needs 4 entries (one per SPS stage), got {self.stem_pools}.")
    if self.dim % self.num_heads:
      raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}.")
    if self.stem == "sps" and self.dim % 8:
      raise ValueError(f"The SPS stem needs dim divisible by 8 (channels D/8, D/4, D/2, D), got {self.dim}.")
    self.neuron.validate()
    self.mask.validate()
    if self.schedule is not None:
      self._validate_schedule()

  def _validate_schedule(self):
    if self.phase != "snn":
      raise ValueError("A skipped-step schedule needs phase='snn'.")
    if self.mask.enabled and not self.mask.hard:
      raise ValueError("A skipped-step schedule needs hard masks: use models.with_mask(model, hard=True).")
    known = set(paths.masked_modules(self))
    for entry in self.schedule:
      if not (isinstance(entry, tuple) and len(entry) == 2):
        raise ValueError(f"Schedule entries are (module path, steps) pairs, got {entry!r}.")
      name, run = entry
      if name not in known:
        raise ValueError(f"Schedule names unknown or unmasked module {name!r}; masked modules: {sorted(known)}.")
      if (not isinstance(run, tuple) or any(int(t) != t or not 0 <= t < self.num_steps for t in run)
          or list(run) != sorted(set(run))):
        raise ValueError(f"The steps of {name!r} must be a sorted tuple of distinct step indices in "
                         f"[0, {self.num_steps}), got {run!r}.")
      if not self.mask.enabled and len(run) != self.num_steps:
        raise ValueError(f"Masks are disabled, so every step of {name!r} is active; it cannot skip steps.")

  def downsampling(self) -> int:
    return self.patch_size if self.stem == "patch" else 2 ** sum(bool(p) for p in self.stem_pools)

  def check_input(self, images):
    f = self.downsampling()
    if images.ndim != 4:
      raise ValueError(f"Expected images [batch, height, width, channels], got shape {images.shape}.")
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"Image size {images.shape[1]}x{images.shape[2]} is not divisible by the stem's "
                       f"downsampling factor {f}; resize the images or change the patch size / stem pools.")

  @nn.compact
  def __call__(self, images_BHWC, *, train: bool = False, mask_temperature=1.0):
    """Returns logits [B, num_classes], time-averaged in the SNN."""
    self.validate()
    self.check_input(images_BHWC)
    T = self.num_steps if self.phase == "snn" else 1
    common = dict(phase=self.phase, num_steps=self.num_steps, neuron=self.neuron, mask=self.mask,
                  dtype=self.dtype, schedule=self.schedule)
    x = images_BHWC.astype(self.dtype)
    stem_cls = SPSStem if self.stem == "sps" else PatchStem
    stem_kw = dict(pool_first=self.stem_pool_first) if self.stem == "sps" else {}
    remat = train and self.phase == "snn" and self.neuron.remat == "blocks"
    call = functools.partial(recompute_in_backward, train=train) if remat else (
        lambda module, x, t: module(x, train=train, temperature=t))
    stem = stem_cls(dim=self.dim, pools=tuple(self.stem_pools), patch_size=self.patch_size, name="embedding",
                    **stem_kw, **common)
    x_XND = call(stem, x, mask_temperature)
    mlp_dim = int(self.dim * self.mlp_ratio)
    for i in range(self.depth):
      block = Block(num_heads=self.num_heads, mlp_dim=mlp_dim, attn_scale=self.attn_scale, name=f"blocks_{i}",
                    **common)
      x_XND = call(block, x_XND, mask_temperature)
    feats_XD = jnp.mean(x_XND, axis=1)
    logits_XK = Dense(self.num_classes, dtype=self.dtype, phase=self.phase, num_steps=T, name="head")(
        feats_XD).astype(jnp.float32)
    logits_TBK = logits_XK.reshape(T, -1, self.num_classes)
    if self.phase == "snn":
      sow(self, "step_logits", logits_TBK)
    return jnp.mean(logits_TBK, axis=0)


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

  @nn.compact
  def __call__(self, images_BHWC, *, train: bool, temperature=1.0):
    if self.run_steps is not None and not self.run_steps:
      return self.skipped_output(images_BHWC, 2 ** sum(bool(p) for p in self.pools))
    masks, works = self.unit_masks(temperature, enabled=self.mask.mask_stem)
    x = images_BHWC
    chans = (self.dim // 8, self.dim // 4, self.dim // 2, self.dim)
    for i, c in enumerate(chans):
      unit = f"conv{i}_lif"
      x = Conv(c, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, phase=self.phase,
               num_steps=self.sim_steps, kind="analog" if i == 0 else "synaptic", name=f"conv{i}")(
                   x, None if i == 0 else works[unit])
      # The analog stage runs once per image ([B, ...], no time axis): its statistics cover the images.
      x = batch_norm(train, f"conv{i}_bn")(x, None if i == 0 else works[unit])
      if self.pools[i] and self.pool_first:
        x = max_pool(x, self.phase)
      x = self.neuron_layer(x, unit, masks[unit], static=(i == 0))
      if self.pools[i] and not self.pool_first:
        x = max_pool(x, self.phase)
    r = Conv(self.dim, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, phase=self.phase,
             num_steps=self.sim_steps, name="rpe")(x, works["rpe_lif"])
    r = batch_norm(train, "rpe_bn")(r, works["rpe_lif"])
    x = x + self.neuron_layer(r, "rpe_lif", masks["rpe_lif"])
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
    if self.run_steps is not None and not self.run_steps:
      return self.skipped_output(images_BHWC, self.patch_size)
    masks, _ = self.unit_masks(temperature, enabled=self.mask.mask_stem)
    p = self.patch_size
    x = Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, phase=self.phase,
             num_steps=self.sim_steps, kind="analog", name="patch")(images_BHWC)
    x = x.reshape(x.shape[0], -1, self.dim)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.dim), jnp.float32)
    x = batch_norm(train, "patch_bn")(x + pos.astype(x.dtype))
    return self.pad_steps(self.neuron_layer(x, "patch_lif", masks["patch_lif"], static=True))
