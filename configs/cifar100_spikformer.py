"""CIFAR-100, Spikformer-4-384, T_max = 8 (the CIFAR-10 recipe on CIFAR-100).

  python -m dtvit.main --config=configs/cifar100_spikformer.py --workdir=workdirs/c100_s4_384
  python -m dtvit.main --config=configs/cifar100_spikformer.py:tiny --workdir=/tmp/c100_tiny
Arguments: tiny, T=<T_max>.
"""

from configs import cifar10_spikformer
from configs import common


def get_config(arg: str = ""):
  args = common.parse_arg(arg, ("tiny", "T"), "cifar100_spikformer")
  return cifar10_spikformer.get_config(",".join(["cifar100"] + [f"{k}={v}" if v else k for k, v in args.items()]))
