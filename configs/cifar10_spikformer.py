"""CIFAR-10, Spikformer-4-384, T_max = 8: ANN twin (300 epochs) -> SNN with learned time steps (100 epochs).

  python -m dtvit.main --config=configs/cifar10_spikformer.py --workdir=workdirs/c10_s4_384
  # the JPEG copy shipped beside the repo (no download; prepared once into data_dir/):
  python -m dtvit.main --config=configs/cifar10_spikformer.py:local --workdir=workdirs/c10_local
  # seconds on a CPU (tests):
  python -m dtvit.main --config=configs/cifar10_spikformer.py:tiny,local --workdir=/tmp/c10_tiny
Arguments (comma-separated): tiny, local, cifar100, T=<T_max>.
"""

from configs import common


def get_config(arg: str = ""):
  args = common.parse_arg(arg, ("tiny", "local", "cifar100", "T"), "cifar10_spikformer")
  c = common.get_base_config()
  name = "cifar100" if "cifar100" in args else "cifar10"
  c.data.name = name
  if "local" in args:
    if name == "cifar100":
      raise ValueError("cifar10_spikformer: no local archive of CIFAR-100 ships with the project; "
                       "prepare the stock cifar100 in data.data_dir.")
    c.data.name = "cifar10_local"
    c.data.archive = "../shared/data/cifar10-jpg.tar.gz"
    c.data.data_dir = "data_dir"
  c.data.augment.crop_padding = 4
  c.data.augment.flip = True
  c.model.arch = "spikformer"
  c.model.variant = "4-384"
  c.model.num_steps = int(args.get("T") or 8)
  common.paper_recipe(c, epochs_ann=300, epochs_snn=100, num_train=50_000)
  if "tiny" in args:
    common.make_tiny(c)
  return c
