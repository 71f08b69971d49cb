"""Plain ViTs made spiking: patch embedding, BN instead of LayerNorm, neurons instead of GELU, softmax-free
spiking attention (see ../shared/PAPER.md)."""

from __future__ import annotations

from dtvit.models.layers import SpikingViT

# name -> (depth, dim, num_heads, mlp_ratio).
VARIANTS = {
    "tiny": (1, 32, 2, 2.0),
    "Ti": (12, 192, 3, 4.0),
    "S": (12, 384, 6, 4.0),
    "B": (12, 768, 12, 4.0),
}


def vit(variant: str, num_classes: int, *, patch_size: int = 16, **kwargs) -> SpikingViT:
  """A spiking ViT of the given variant, e.g. `vit('S', 1000, patch_size=16)`; `vit('Ti', 10, patch_size=4)`
  for 32x32 images."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown ViT variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  depth, dim, heads, mlp_ratio = VARIANTS[variant]
  sizes = dict(depth=depth, dim=dim, num_heads=heads, mlp_ratio=mlp_ratio)
  sizes.update(kwargs)
  return SpikingViT(num_classes=num_classes, stem="patch", patch_size=patch_size, **sizes)
