"""ImageNet-1k, Spikformer-8-384 / 8-512 / 8-768 at 224x224, T_max = 8: the official Spikformer recipe.

Needs `imagenet2012` prepared as ArrayRecord in data.data_dir (`tfds build imagenet2012
--file_format=array_record` with the manual download, on a machine that has it).

  # hybrid (default): the ANN twin on the official recipe (310 epochs), then the SNN with masks (30 epochs)
  python -m dtvit.main --config=configs/imagenet_spikformer.py:variant=8-512 \
      --config.data.data_dir=/data/tfds --workdir=gs://bucket/in1k_s8_512
  # direct: the SNN with masks trained from scratch on the official recipe (310 epochs)
  python -m dtvit.main --config=configs/imagenet_spikformer.py:variant=8-512,direct \
      --config.data.data_dir=/data/tfds --workdir=gs://bucket/in1k_s8_512_direct
  python -m dtvit.main --config=configs/imagenet_spikformer.py:tiny --workdir=/tmp/in_tiny   # tests (needs data)
Arguments: direct | hybrid, tiny, variant=<8-384|8-512|8-768>, T=<T_max>, sj (SpikingJelly's neuron preset and
stem order).

Every training value is the official one (ZK-Zhou/spikformer imagenet/imagenet.yml, train.py, model.py;
`recipes.SPIKFORMER['imagenet']`; the value-by-value table with sources: experiments/paper_scale/README.md),
including the global batch of 192 (24 per GPU x 8 GPUs) at lr 5e-4, weight decay 0.05, and the training crop of
scale (1, 1): timm's RandomResizedCrop then falls back to the whole image squeezed to 224x224. Except:
- Method, neuron, the masks, steps, float32, mixup pairs: as configs/cifar10_spikformer.py says (the hybrid SNN
  phase: 30 epochs at lr 1e-4, ours).
- RandAugment: dtvit's 14-op set (timm's 15-op 'increasing' set minus Invert and SolarizeAdd, plus Identity;
  posterize keeps 8-4 bits where timm's keeps 4-0), 2 ops, each with p 0.5, magnitude N(9, 0.5), as timm
  draws them.
- Init: the blocks' 1x1 convs keep PyTorch's default init (they are Conv1d/Conv2d, which the official
  _init_weights leaves alone) as dtvit's Dense layers ('torch_default'); the head is trunc-normal 0.02.
"""

from dtvit import recipes


def get_config(arg: str = ""):
  args = recipes.parse_arg(arg, ("direct", "hybrid", "tiny", "variant", "T", "sj"), "imagenet_spikformer")
  if "direct" in args and "hybrid" in args:
    raise ValueError("imagenet_spikformer: give one of 'direct' and 'hybrid'.")
  c = recipes.get_base_config()
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.mean = (0.485, 0.456, 0.406)   # imagenet/imagenet.yml
  c.data.std = (0.229, 0.224, 0.225)
  c.model.arch = "spikformer"
  c.model.variant = args.get("variant") or "8-384"
  c.model.max_time_steps = int(args.get("T") or 8)
  recipes.paper_recipe(c, family="imagenet", mode="direct" if "direct" in args else "hybrid", num_train=1_281_167)
  c.eval_batch_size = 1000
  if "sj" in args:  # SpikingJelly 2.0's Spikformer: its neuron settings, its stem order (pool before the neuron)
    recipes.set_neuron_preset(c, "spikingjelly")
    c.model.stem_pool_first = True
  if "tiny" in args:
    recipes.make_tiny(c)
    c.model.variant = "tiny-imagenet"
    c.data.image_size = 64
  recipes.calibrate_masks(c)
  return c
