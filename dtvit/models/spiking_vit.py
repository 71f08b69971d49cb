"""The spiking ViT: stem -> transformer blocks -> mean over tokens -> Linear -> mean over time, and its variant
tables: Spikformer (SPS stem + spiking self-attention blocks) and plain ViTs made spiking (patch embedding, BN
instead of LayerNorm, neurons instead of GELU, softmax-free spiking attention); see ../shared/PAPER.md."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dtvit.models import blocks
from dtvit.models import layers
from dtvit.models import paths
from dtvit.models.remat import recompute_in_backward
from dtvit.models.settings import KERNELS, PHASES, LayerConfig, MaskConfig, NeuronConfig


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
    max_time_steps: T_max, the number of simulated steps (static; the SNN's time axis).
    neuron, mask: `NeuronConfig`, `MaskConfig`.
    attn_scale: the scale of Q K^T V.
    dtype: matmul dtype (bf16 on accelerators); membranes stay float32.
    kernels: 'fused' (the fused neuron recurrence, as a CPU kernel on CPU, the fast-gradient pool and Dense
      matmul), 'xla' (the same with the recurrence in pure JAX everywhere) or 'reference' (`lax.scan`, Flax's
      pool and Dense): the same values and gradients (settings.KERNELS).
    layer_cfg: `LayerConfig`, the initialisers and pre-BN biases.
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
  max_time_steps: int = 4
  neuron: NeuronConfig = NeuronConfig()
  mask: MaskConfig = MaskConfig()
  attn_scale: float = 0.125
  dtype: Any = jnp.float32
  kernels: str = "fused"
  schedule: Any = None
  layer_cfg: LayerConfig = LayerConfig()

  def validate(self):
    if self.phase not in PHASES:
      raise ValueError(f"Unknown phase {self.phase!r}; choose 'ann' or 'snn'.")
    if int(self.max_time_steps) != self.max_time_steps or self.max_time_steps < 1:
      raise ValueError(f"T_max (max_time_steps) must be an integer >= 1, got {self.max_time_steps}.")
    if self.stem not in ("sps", "patch"):
      raise ValueError(f"Unknown stem {self.stem!r}; choose 'sps' or 'patch'.")
    if self.stem == "sps" and len(self.stem_pools) != 4:
      raise ValueError(f"stem_pools needs 4 entries (one per SPS stage), got {self.stem_pools}.")
    if self.dim % self.num_heads:
      raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}.")
    if self.stem == "sps" and self.dim % 8:
      raise ValueError(f"The SPS stem needs dim divisible by 8 (channels D/8, D/4, D/2, D), got {self.dim}.")
    if self.kernels not in KERNELS:
      raise ValueError(f"Unknown kernels {self.kernels!r}; choose one of {KERNELS}.")
    self.neuron.validate()
    self.mask.validate()
    self.layer_cfg.validate()
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
      if (not isinstance(run, tuple) or any(int(t) != t or not 0 <= t < self.max_time_steps for t in run)
          or list(run) != sorted(set(run))):
        raise ValueError(f"The steps of {name!r} must be a sorted tuple of distinct step indices in "
                         f"[0, {self.max_time_steps}), got {run!r}.")
      if not self.mask.enabled and len(run) != self.max_time_steps:
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
  def __call__(self, images_BHWC, *, train: bool = False, mask_temperature=1.0, step_logits: bool = False):
    """Returns logits [B, num_classes], time-averaged in the SNN; with `step_logits` the per-step logits
    [T, B, num_classes] instead (T = 1 for the ANN), whose mean over axis 0 is that output."""
    self.validate()
    self.check_input(images_BHWC)
    T = self.max_time_steps if self.phase == "snn" else 1
    common = dict(phase=self.phase, num_steps=self.max_time_steps, neuron=self.neuron, mask=self.mask,
                  dtype=self.dtype, fused=self.kernels != "reference", cpu_kernel=self.kernels == "fused",
                  schedule=self.schedule, layer_cfg=self.layer_cfg)
    remat = train and self.phase == "snn" and self.neuron.remat == "blocks"
    call = functools.partial(recompute_in_backward, train=train) if remat else (
        lambda module, x, t: module(x, train=train, temperature=t))
    if self.stem == "sps":
      stem = blocks.SPSStem(dim=self.dim, pools=tuple(self.stem_pools), pool_first=self.stem_pool_first,
                            name=paths.STEM, **common)
    else:
      stem = blocks.PatchStem(dim=self.dim, patch_size=self.patch_size, name=paths.STEM, **common)
    x_XND = call(stem, images_BHWC.astype(self.dtype), mask_temperature)
    for i in range(self.depth):
      block = blocks.Block(num_heads=self.num_heads, mlp_dim=int(self.dim * self.mlp_ratio),
                           attn_scale=self.attn_scale, name=paths.block(i), **common)
      x_XND = call(block, x_XND, mask_temperature)
    feats_XD = jnp.mean(x_XND, axis=1)
    head = layers.Dense(self.num_classes, dtype=self.dtype, phase=self.phase, num_steps=T,
                        kernel_init=self.layer_cfg.init("head_init"), name=paths.HEAD)
    logits_XK = head(feats_XD).astype(jnp.float32)
    logits_TBK = logits_XK.reshape(T, -1, self.num_classes)
    if self.phase == "snn":
      layers.sow(self, paths.AUX_STEP_LOGITS, logits_TBK)
    return logits_TBK if step_logits else jnp.mean(logits_TBK, axis=0)


# Spikformer: name -> (depth, dim, num_heads, mlp_ratio, stem_pools). CIFAR variants pool after the last two
# SPS stages (32x32 -> 8x8 tokens), ImageNet variants after each (224x224 -> 14x14).
SPIKFORMER_VARIANTS = {
    "tiny": (1, 32, 2, 2.0, (False, False, True, True)),
    "2-128": (2, 128, 4, 4.0, (False, False, True, True)),
    "4-256": (4, 256, 8, 4.0, (False, False, True, True)),
    "4-384": (4, 384, 12, 4.0, (False, False, True, True)),
    "tiny-imagenet": (1, 32, 2, 2.0, (True, True, True, True)),
    "8-384": (8, 384, 12, 4.0, (True, True, True, True)),
    "8-512": (8, 512, 8, 4.0, (True, True, True, True)),
    "8-768": (8, 768, 12, 4.0, (True, True, True, True)),
}

# ViT: name -> (depth, dim, num_heads, mlp_ratio).
VIT_VARIANTS = {
    "tiny": (1, 32, 2, 2.0),
    "Ti": (12, 192, 3, 4.0),
    "S": (12, 384, 6, 4.0),
    "B": (12, 768, 12, 4.0),
}


def spikformer(variant: str, num_classes: int, **kwargs) -> SpikingViT:
  """A Spikformer of the given variant, e.g. `spikformer('4-384', 10, phase='snn', max_time_steps=4)`.

  Keyword arguments override the variant's sizes or set the other `SpikingViT` attributes.
  """
  if variant not in SPIKFORMER_VARIANTS:
    raise ValueError(f"Unknown Spikformer variant {variant!r}; choose one of {sorted(SPIKFORMER_VARIANTS)}.")
  depth, dim, heads, mlp_ratio, pools = SPIKFORMER_VARIANTS[variant]
  sizes = dict(depth=depth, dim=dim, num_heads=heads, mlp_ratio=mlp_ratio, stem_pools=pools)
  return SpikingViT(num_classes=num_classes, stem="sps", **{**sizes, **kwargs})


def vit(variant: str, num_classes: int, *, patch_size: int = 16, **kwargs) -> SpikingViT:
  """A spiking ViT of the given variant, e.g. `vit('S', 1000, patch_size=16)`; `vit('Ti', 10, patch_size=4)`
  for 32x32 images."""
  if variant not in VIT_VARIANTS:
    raise ValueError(f"Unknown ViT variant {variant!r}; choose one of {sorted(VIT_VARIANTS)}.")
  depth, dim, heads, mlp_ratio = VIT_VARIANTS[variant]
  sizes = dict(depth=depth, dim=dim, num_heads=heads, mlp_ratio=mlp_ratio)
  return SpikingViT(num_classes=num_classes, stem="patch", patch_size=patch_size, **{**sizes, **kwargs})
