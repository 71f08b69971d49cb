"""CIFAR-100, Spikformer-4-384, T_max = 8 (the CIFAR-10 recipe on CIFAR-100).

  python -m dtvit.main --config=configs/cifar100_spikformer.py --workdir=workdirs/c100_s4_384
  python -m dtvit.main --config=configs/cifar100_spikformer.py:tiny --workdir=/tmp/c100_tiny
Arguments: tiny, T=<T_max>, sj (SpikingJelly's neuron preset and stem order).

Its settings differ from the original Spikformer's CIFAR-100 run (the CIFAR-10 recipe on CIFAR-100, T=4, 300
epochs of direct SNN training) and from SpikingJelly's Spikformer exactly as configs/cifar10_spikformer.py's
do (its docstring lists them and why): ANN twin then SNN with learned time-step masks at T_max = 8, the authors'
soft-reset LIF instead of Spikformer's (`sj` selects SpikingJelly's neuron and stem order), the stem's pool after
its neuron, the shared augmentation and schedule.
"""

from configs import cifar10_spikformer
from configs import common


def get_config(arg: str = ""):
  args = common.parse_arg(arg, ("tiny", "T", "sj"), "cifar100_spikformer")
  return cifar10_spikformer.get_config(",".join(["cifar100"] + [f"{k}={v}" if v else k for k, v in args.items()]))
