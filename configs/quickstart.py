"""Quickstart: a dynamic-time-step spiking ViT on scikit-learn's bundled digits (no download), ANN -> SNN.

  python -m dtvit.main --config=configs/quickstart.py --workdir=workdirs/quickstart    # (make demo)
  python -m dtvit.main --config=configs/quickstart.py:tiny --workdir=/tmp/qs_tiny    # seconds, for tests
"""

from dtvit import recipes


def get_config(arg: str = ""):
  c = recipes.get_base_config()
  c.data.name = "digits"
  c.data.augment.crop_padding = 1
  c.eval_batch_size = 360

  c.model.arch = "spikformer"
  c.model.variant = "2-128"
  c.model.dim = 64
  c.model.num_heads = 4
  c.model.depth = 2
  c.model.mlp_ratio = 2.0
  c.model.stem_pools = (False, False, False, True)   # 8x8 digits -> 4x4 = 16 tokens
  c.model.max_time_steps = 4

  c.ann.train_steps = 600
  c.ann.batch_size = 64
  c.ann.optimizer.lr = 2e-3
  c.ann.log_every = 100
  c.snn.train_steps = 300
  c.snn.batch_size = 64
  c.snn.optimizer.lr = 1e-3
  c.snn.optimizer.score_lr = 0.3
  c.snn.time_cost = 0.02
  c.snn.log_every = 50

  if arg == "tiny":
    c.model.dim = 16
    c.model.num_heads = 2
    c.model.depth = 1
    c.model.max_time_steps = 3
    c.ann.train_steps = 6
    c.snn.train_steps = 6
    c.ann.batch_size = c.snn.batch_size = 16
    c.ann.log_every = c.snn.log_every = 2
    c.eval_batch_size = 120
  elif arg:
    raise ValueError(f"Unknown quickstart argument {arg!r}; use '' or 'tiny'.")
  return c
