"""CIFAR-10, Spikformer-4-384, T_max = 8: ANN twin (300 epochs) -> SNN with learned time steps (100 epochs).

  python -m dtvit.main --config=configs/cifar10_spikformer.py --workdir=workdirs/c10_s4_384
  # the JPEG copy shipped beside the repo (no download; prepared once into data_dir/):
  python -m dtvit.main --config=configs/cifar10_spikformer.py:local --workdir=workdirs/c10_local
  # seconds on a CPU (tests):
  python -m dtvit.main --config=configs/cifar10_spikformer.py:tiny,local --workdir=/tmp/c10_tiny
  # SpikingJelly's Spikformer neuron and stem order (the model tests/spikformer_golden_test.py checks against it):
  python -m dtvit.main --config=configs/cifar10_spikformer.py:sj --workdir=workdirs/c10_sj
Arguments (comma-separated): tiny, local, cifar100, T=<T_max>, sj (SpikingJelly's neuron preset and stem order).

How this recipe differs from the original Spikformer (ZK-Zhou/spikformer, cifar10/: 4-384, T=4, 300 epochs of
direct SNN training, batch 128, AdamW lr 5e-4 wd 6e-2, cosine with 20 warm-up epochs, label smoothing 0.1) and
from SpikingJelly 2.0's `Spikformer`, and why:
- Method (the paper this project reproduces, ../shared/PAPER.md): an ANN twin (clipped ReLU, trainable clip)
  for 300 epochs, then 100 epochs of BPTT for the SNN (lr 1e-4) whose thresholds start at the ANN's clip values,
  with T_max = 8 and learned time-step masks (time_cost 0.01), instead of a fixed T = 4 trained directly.
  A fixed T trained directly: `--config=configs/cifar10_spikformer.py:sj,T=4 --config.phases=snn
  --config.model.mask.enabled=False --config.snn.time_cost=0` (and the original's 300 epochs at lr 5e-4:
  --config.snn.num_steps=117187 --config.snn.optimizer.lr=5e-4).
- Neuron: the authors' 'lif' (U = lambda U + I, soft reset, trainable threshold and leak, piecewise-linear
  surrogate gamma 0.3 on U/Vth - 1, U[0] = 0.5 Vth), not Spikformer's LIF (tau 2, hard reset detached, sigmoid
  surrogate alpha 4 on U - Vth, U[0] = 0, fixed thresholds 1 and 0.5): the paper's convention, and the one that
  converts: with a soft reset the firing rate tracks the ANN's clip(I/Vth, 0, 1), and U[0] = 0.5 Vth rounds
  instead of floors. `sj` sets SpikingJelly's (`NeuronConfig.preset('spikingjelly')`; thresholds stay trainable,
  `--config.snn.optimizer.neuron_lr_mult=0` fixes them).
- Stem order: conv -> BN -> LIF -> pool, as the original Spikformer; SpikingJelly pools the BN output before the
  LIF (4x fewer stem neurons), which `sj` selects (`model.stem_pool_first`). Both orders agree in the ANN phase.
- Augmentation (common.paper_recipe, one recipe for CIFAR and ImageNet): RandAugment 2 ops m9, mixup 0.8 and
  cutmix 1.0 throughout; the original's CIFAR run had RandAugment 1 op m9, mixup 0.5 switched off after epoch
  200, no cutmix, random erasing 0.25 (which dtvit's pipeline lacks). Schedule: warm-up 5% of the steps, decay
  to 0, gradient clipping at norm 1 (original: 20 warm-up epochs, min lr 1e-5, no clipping); float32, not AMP.
- The same function, laid out differently: Linear layers without bias before their BN (the original's bias is
  absorbed by BN's); Q, K, V as three Dense + BN (SpikingJelly fuses them into one conv); the first conv + BN
  runs once per image instead of T times (direct encoding, the same values); the head averages per-step logits
  (linear, so the original's head on time-averaged features).
"""

from configs import common


def get_config(arg: str = ""):
  args = common.parse_arg(arg, ("tiny", "local", "cifar100", "T", "sj"), "cifar10_spikformer")
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
  if "sj" in args:  # SpikingJelly 2.0's Spikformer: its neuron settings, its stem order (pool before the neuron)
    common.set_neuron_preset(c, "spikingjelly")
    c.model.stem_pool_first = True
  if "tiny" in args:
    common.make_tiny(c)
  return c

