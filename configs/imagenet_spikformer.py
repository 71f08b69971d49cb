"""ImageNet-1k, Spikformer-8-384 / 8-512 / 8-768 at 224x224, T_max = 8.

Needs `imagenet2012` prepared as ArrayRecord in data.data_dir (`tfds build imagenet2012
--file_format=array_record` with the manual download, on a machine that has it).

  python -m dtvit.main --config=configs/imagenet_spikformer.py:variant=8-512 \
      --config.data.data_dir=/data/tfds --workdir=gs://bucket/in1k_s8_512
  python -m dtvit.main --config=configs/imagenet_spikformer.py:tiny --workdir=/tmp/in_tiny   # tests (needs data)
Arguments: tiny, variant=<8-384|8-512|8-768>, T=<T_max>.
"""

from configs import common


def get_config(arg: str = ""):
  args = common.parse_arg(arg, ("tiny", "variant", "T"), "imagenet_spikformer")
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
  if "tiny" in args:
    common.make_tiny(c)
    c.model.variant = "tiny-imagenet"
    c.data.image_size = 64
  return c
