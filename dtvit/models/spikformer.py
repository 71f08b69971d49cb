"""Spikformer-style spiking ViTs: SPS stem + spiking self-attention blocks (see ../shared/PAPER.md)."""

from __future__ import annotations

from dtvit.models.layers import SpikingViT

# name -> (depth, dim, num_heads, mlp_ratio, stem_pools). CIFAR variants pool after the last two SPS stages
# (32x32 -> 8x8 tokens), ImageNet variants after each (224x224 -> 14x14).
VARIANTS = {
    "tiny": (1, 32, 2, 2.0, (False, False, True, True)),
    "2-128": (2, 128, 4, 4.0, (False, False, True, True)),
    "4-256": (4, 256, 8, 4.0, (False, False, True, True)),
    "4-384": (4, 384, 12, 4.0, (False, False, True, True)),
    "tiny-imagenet": (1, 32, 2, 2.0, (True, True, True, True)),
    "8-384": (8, 384, 12, 4.0, (True, True, True, True)),
    "8-512": (8, 512, 8, 4.0, (True, True, True, True)),
    "8-768": (8, 768, 12, 4.0, (True, True, True, True)),
}


def spikformer(variant: str, num_classes: int, **kwargs) -> SpikingViT:
  """A Spikformer of the given variant, e.g. `spikformer('4-384', 10, phase='snn', num_steps=4)`.

  Keyword arguments override the variant's sizes or set the other `SpikingViT` attributes.
  """
  if variant not in VARIANTS:
    raise ValueError(f"Unknown Spikformer variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  depth, dim, heads, mlp_ratio, pools = VARIANTS[variant]
  sizes = dict(depth=depth, dim=dim, num_heads=heads, mlp_ratio=mlp_ratio, stem_pools=pools)
  sizes.update(kwargs)
  return SpikingViT(num_classes=num_classes, stem="sps", **sizes)
