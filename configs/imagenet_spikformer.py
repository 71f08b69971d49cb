"""ImageNet-1k, Spikformer-8-384 / 8-512 / 8-768 at 224x224, T_max = 8.

Needs `imagenet2012` prepared as ArrayRecord in data.data_dir (`tfds build imagenet2012
--file_format=array_record` with the manual download, on a machine that has it).

  python -m dtvit.main --config=configs/imagenet_spikformer.py:variant=8-512 \
      --config.data.data_dir=/data/tfds --workdir=gs://bucket/in1k_s8_512
  python -m dtvit.main --config=configs/imagenet_spikformer.py:tiny --workdir=/tmp/in_tiny   # tests (needs data)
Arguments: tiny, variant=<8-384|8-512|8-768>, T=<T_max>, sj (SpikingJelly's neuron preset and stem order).

How this recipe differs from the original Spikformer's ImageNet run (ZK-Zhou/spikformer, imagenet/: T=4, 300
epochs of direct SNN training, AdamW lr 5e-4 wd 5e-2, cosine with 20 warm-up epochs, RandAugment m9, mixup 0.8,
cutmix 1.0, random erasing 0.25, label smoothing 0.1) and from SpikingJelly 2.0's `Spikformer`, and why:
- Method (../shared/PAPER.md): an ANN twin for 300 epochs (lr 1e-3 at batch 1024), then 30 epochs of BPTT for
  the SNN (lr 1e-4) with T_max = 8 and learned time-step masks, instead of a fixed T = 4 trained directly
  (for that: `--config=configs/imagenet_spikformer.py:sj,T=4 --config.phases=snn
  --config.model.mask.enabled=False --config.snn.time_cost=0`, with the SNN phase's steps and lr raised).
- Neuron: the authors' soft-reset 'lif' (trainable threshold and leak, piecewise-linear surrogate on U/Vth - 1,
  U[0] = 0.5 Vth) instead of Spikformer's LIF (tau 2, hard reset detached, sigmoid surrogate alpha 4 on U - Vth,
  U[0] = 0): the paper's convention and the one that converts from the ANN twin (see
  configs/cifar10_spikformer.py). `sj` sets SpikingJelly's (`NeuronConfig.preset('spikingjelly')`).
- Stem order: each of the 4 stages is conv -> BN -> LIF -> pool, as the original; SpikingJelly (patch_size 16)
  pools the BN output before the LIF, which `sj` selects (`model.stem_pool_first`).
- Weight decay 0.06 (the CIFAR value; the original's ImageNet run used 0.05), warm-up 5% of the steps, decay to
  0, gradient clipping at norm 1, no random erasing (dtvit's pipeline lacks it), float32 rather than AMP.
- The same function laid out differently, as on CIFAR: no Linear bias before BN, Q/K/V as three Dense + BN,
  the first conv run once per image, the head averaging per-step logits.
"""

from configs import common


def get_config(arg: str = ""):
  args = common.parse_arg(arg, ("tiny", "variant", "T", "sj"), "imagenet_spikformer")
  c = common.get_base_config()
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.augment.crop_padding = 0
  c.data.augment.flip = True
  c.data.augment.random_resized_crop = True
  c.model.arch = "spikformer"
  c.model.variant = args.get("variant") or "8-384"
  c.model.num_steps = int(args.get("T") or 8)
  common.paper_recipe(c, epochs_ann=300, epochs_snn=30, num_train=1_281_167, batch_size=1024)
  c.ann.optimizer.lr = c.snn.optimizer.lr * 10
  c.eval_batch_size = 1000
  if "sj" in args:  # SpikingJelly 2.0's Spikformer: its neuron settings, its stem order (pool before the neuron)
    common.set_neuron_preset(c, "spikingjelly")
    c.model.stem_pool_first = True
  if "tiny" in args:
    common.make_tiny(c)
    c.model.variant = "tiny-imagenet"
    c.data.image_size = 64
  return c
