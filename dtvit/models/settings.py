"""The static settings of a model's neurons and time-step masks (frozen: they are Flax module attributes)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax

from dtvit import masks as masks_lib
from dtvit import neuron_spec

PHASES = ("ann", "snn")
GRANULARITIES = ("module", "layer")
# False: plain backprop through time; 'blocks': the backward pass recomputes the stem and each block from its
# input (`dtvit.models.remat.recompute_in_backward`), bounding BPTT memory to one block's intermediates.
REMAT_MODES = (False, "blocks")
# 'fused': the fused neuron recurrence (`lif_fused.lif_multistep`, as the FFI kernel of `dtvit.cpu_kernels` on CPU)
# and the fast-gradient pool and Dense matmul of `dtvit.ops`; 'xla': the same with the neuron recurrence in
# pure JAX on CPU too; 'reference': `lax.scan`, `flax.linen.max_pool` and Flax's Dense. The same values and
# gradients (the kernel's to float rounding). Convolutions are lax's on all three.
KERNELS = ("fused", "xla", "reference")


@dataclasses.dataclass(frozen=True)
class NeuronConfig:
  """Neuron settings: the dynamics (`spec`, see `dtvit.neurons`) and the initial values of the trainable
  threshold and leak."""
  neuron: str = "lif"               # 'lif' (authors') | 'if' | 'spikingjelly_lif'
  surrogate: str = "pwl"            # 'pwl' | 'sigmoid' | 'atan'
  alpha: Optional[float] = None     # surrogate sharpness; None -> the surrogate's customary value
  tau: float = 2.0                  # 'spikingjelly_lif' time constant
  reset: Optional[str] = None       # None -> 'soft' for lif/if, 'hard' for spikingjelly_lif
  detach_reset: Optional[bool] = None
  init_threshold: float = 1.0       # threshold (SNN) = clip value (ANN) at init
  attn_threshold: float = 0.5       # the attention neuron's threshold at init
  init_leak: float = 1.0            # lambda at init ('lif'); clamped to [0, 1]
  init_membrane: float = 0.5        # U[0] / threshold; 0.5 rounds instead of floors (better conversion)
  surrogate_input: str = "normalized"  # the surrogate acts on U/Vth - 1 ('normalized') or U - Vth ('difference')
  remat: Any = False                # one of REMAT_MODES

  @functools.cached_property
  def spec(self) -> neuron_spec.NeuronSpec:
    """The dynamics with every default resolved (once per config)."""
    return neuron_spec.NeuronSpec.resolve(
        self.neuron, surrogate=self.surrogate, alpha=self.alpha, tau=self.tau, reset=self.reset,
        detach_reset=self.detach_reset, init_membrane=self.init_membrane, surrogate_input=self.surrogate_input)

  def validate(self):
    _ = self.spec  # checks the dynamics' choices
    if self.init_threshold <= 0 or self.attn_threshold <= 0:
      raise ValueError("Neuron thresholds must be > 0.")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"Unknown neuron.remat {self.remat!r}; choose one of {REMAT_MODES}.")

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
    "spikingjelly": dict(neuron="spikingjelly_lif", surrogate="sigmoid", alpha=4.0, tau=2.0, reset="hard",
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
  # Scores start uniform in score_init +- score_init_spread (0: all equal). A spread breaks the symmetry of the
  # time-step cost: equal scores all cross 0 at one step, so a hinge would switch every step off at once.
  score_init_spread: float = 0.0
  mask_stem: bool = False       # also give the stem a mask
  hard: bool = False            # force the hard mask (evaluation / inference)
  semantics: str = "skip"       # what a masked step is: 'skip' | 'filter' (see dtvit.masks)

  def score_initializer(self):
    """The scores' initializer: (key, shape) -> score_init + U(-score_init_spread, score_init_spread)."""
    if not self.score_init_spread:
      return jax.nn.initializers.constant(self.score_init)
    return lambda key, shape, dtype=jax.numpy.float32: self.score_init + jax.random.uniform(
        key, shape, dtype, -self.score_init_spread, self.score_init_spread)

  def validate(self):
    if self.score_init_spread < 0 or (self.score_init_spread and self.score_init_spread >= abs(self.score_init)):
      raise ValueError(f"model.mask.score_init_spread ({self.score_init_spread}) must be in [0, |score_init| = "
                       f"{abs(self.score_init)}), so that every score starts on the side of 0 score_init is on.")
    masks_lib.check_semantics(self.semantics)
    if self.mode not in masks_lib.MASK_MODES:
      raise ValueError(f"Unknown mask mode {self.mode!r}; choose one of {masks_lib.MASK_MODES}.")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"Unknown mask granularity {self.granularity!r}; choose one of {GRANULARITIES}.")


# Weight initialisers by name. 'lecun_normal' is Flax's default (dtvit's); 'trunc_normal_0.02' is timm's
# trunc_normal_(std=.02), which the official Spikformer applies to its nn.Linear layers (truncated at +-2 in
# absolute units, i.e. 100 std: a plain normal in effect); 'torch_default' is PyTorch's default for nn.Linear and
# nn.Conv (kaiming_uniform with a = sqrt(5): U(+-1/sqrt(fan_in))), what the official convs keep.
INITIALIZERS = {
    "lecun_normal": jax.nn.initializers.lecun_normal(),
    "trunc_normal_0.02": jax.nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0),
    "torch_default": jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
}
PRE_BN_LAYERS = ("q", "k", "v", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """Initialisation and the biases of the synaptic layers (the defaults: dtvit's; the Spikformer recipes select
  the official values)."""
  dense_init: str = "lecun_normal"  # the blocks' Dense layers (q, k, v, proj, fc1, fc2)
  conv_init: str = "lecun_normal"   # the stem's convs
  head_init: str = "lecun_normal"   # the classifier
  # Dense layers (names of PRE_BN_LAYERS) with a bias before their BN. BN subtracts the batch mean, so such a
  # bias changes no output and gets no gradient: it only makes parameter counts equal the official ones.
  pre_bn_bias: tuple = ()

  def validate(self):
    for key in ("dense_init", "conv_init", "head_init"):
      if getattr(self, key) not in INITIALIZERS:
        raise ValueError(f"Unknown model.{key} {getattr(self, key)!r}; choose one of {sorted(INITIALIZERS)}.")
    unknown = sorted(set(self.pre_bn_bias) - set(PRE_BN_LAYERS))
    if unknown:
      raise ValueError(f"model.pre_bn_bias names unknown layers {unknown}; choose from {PRE_BN_LAYERS}.")

  def init(self, key: str):
    return INITIALIZERS[getattr(self, key)]
