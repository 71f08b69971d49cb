"""CIFAR-10, a plain spiking ViT (Ti by default, patch 4, 64 tokens), T_max = 8.

  python -m dtvit.main --config=configs/cifar10_vit.py --workdir=workdirs/c10_vit_ti
  python -m dtvit.main --config=configs/cifar10_vit.py:variant=S,local --workdir=workdirs/c10_vit_s
Arguments: tiny, local, variant=<Ti|S|B>, T=<T_max>.
"""

from configs import cifar10_spikformer
from dtvit import recipes


def get_config(arg: str = ""):
  args = recipes.parse_arg(arg, ("tiny", "local", "variant", "T"), "cifar10_vit")
  base = [k for k in ("local",) if k in args] + ([f"T={args['T']}"] if args.get("T") else [])
  c = cifar10_spikformer.get_config(",".join(base))
  c.model.arch = "vit"
  c.model.variant = args.get("variant") or "Ti"
  c.model.patch_size = 4
  if "tiny" in args:
    recipes.make_tiny(c)
  recipes.calibrate_masks(c)  # the ViT's own number of masked modules
  return c
