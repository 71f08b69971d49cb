"""Fields every recipe shares, with their defaults. A recipe calls `get_base_config()` and overrides.

Layout:
  seed, workdir-independent run settings
  data.*     data sources, augmentation and batching (dtvit/data/)
  model.*    architecture, T_max, neuron and mask settings (dtvit/models)
  phases     which phases run, in order: 'ann', 'snn', 'finetune' (comma-separated)
  ann.*, snn.*, finetune.*   one training phase each (optimizer, steps, logging, time-step cost...)
  mesh.*     devices
"""

import ml_collections

from dtvit import data


def phase_config(*, steps: int, lr: float, batch_size: int) -> ml_collections.ConfigDict:
  """One training phase."""
  c = ml_collections.ConfigDict()
  c.num_steps = steps                # optimizer steps of this phase
  c.batch_size = batch_size          # global batch size (split over processes and devices)
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"         # 'adamw' | 'sgd'
  c.optimizer.lr = lr
  c.optimizer.warmup_steps = max(steps // 20, 1)
  c.optimizer.end_lr_factor = 0.0
  c.optimizer.weight_decay = 0.06
  c.optimizer.momentum = 0.9         # sgd only
  c.optimizer.grad_clip = 1.0        # global-norm clip; 0 = off
  c.optimizer.neuron_lr_mult = 1.0   # learning rate of thresholds/leaks relative to the weights
  c.optimizer.score_optimizer = "sgd"  # time-step scores: 'sgd' (momentum 0.9) | 'adam'
  c.optimizer.score_lr = 0.0         # learning rate of the time-step scores (constant); 0 = optimizer.lr
  c.label_smoothing = 0.0
  c.mixup_off_step = 0               # mixup / cutmix (data.augment) stop at this step of the phase; 0 = never
  c.init_from = ""                   # a checkpoint dir whose params start this phase ('' = previous phase)
  c.threshold_scale = 1.0            # ann -> snn: threshold = scale * clip value
  # Time-step cost (SNN phases): loss = CE + time_cost * cost(scores).
  c.time_cost = 0.0                  # lambda_T; 0 = no pressure on the masks
  c.cost_kind = "expected"           # 'expected' | 'op_weighted' | 'hinge'
  c.target_steps = 0.0               # for 'hinge'
  c.temperature_start = 1.0          # mask temperature, annealed geometrically over the phase
  c.temperature_end = 1.0
  c.log_every = 50
  c.eval_every = 0                   # > 0: accuracy on data.periodic_eval_split ('val': data.val_examples held
                                     # out from train) every this many steps and at the end; 0 = off
  c.checkpoint_every = 500
  c.max_to_keep = 2
  c.nonfinite = "error"              # 'error' | 'skip': what a non-finite loss/gradient does
  return c


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = data.default_data_config()
  c.eval_batch_size = 256
  c.eval_examples = 0                # > 0: evaluate an evenly strided subset of the test split (quick runs)

  m = c.model = ml_collections.ConfigDict()
  m.arch = "spikformer"              # 'spikformer' | 'vit'
  m.variant = "4-384"                # see dtvit/models/spiking_vit.py (SPIKFORMER_VARIANTS, VIT_VARIANTS)
  m.num_steps = 4                    # T_max
  m.patch_size = 4                   # 'vit' only
  m.depth = 0                        # 0: the variant's; else an override
  m.dim = 0
  m.num_heads = 0
  m.mlp_ratio = 0.0
  m.stem_pools = ()                  # 'spikformer': which of the 4 SPS stages pool; () = the variant's
  m.stem_pool_first = False          # 'spikformer': pool before the stem neuron (SpikingJelly's order)
  m.dtype = "float32"                # matmul dtype: 'float32' | 'bfloat16' (membranes stay float32)
  m.attn_scale = 0.125
  m.kernels = "fused"                # or 'reference' (lax.scan, lax conv, Flax pool): same numbers, slower
  # Initialisers (dtvit.models.settings.INITIALIZERS) of the blocks' Dense layers, the stem convs, the head.
  m.dense_init = "lecun_normal"
  m.conv_init = "lecun_normal"
  m.head_init = "lecun_normal"
  m.pre_bn_bias = ()                 # Dense layers ('q', 'k', 'v', 'proj', 'fc1', 'fc2') with a (no-op) bias before BN
  n = m.neuron = ml_collections.ConfigDict()
  n.neuron = "lif"                   # 'lif' (authors') | 'if' | 'spikformer'
  n.surrogate = "pwl"                # 'pwl' | 'sigmoid' | 'atan'
  n.alpha = ml_collections.FieldReference(None, field_type=float)  # None: the surrogate's customary value
  n.tau = 2.0
  n.reset = ml_collections.FieldReference(None, field_type=str)    # None: the neuron's convention
  n.detach_reset = ml_collections.FieldReference(None, field_type=bool)
  n.init_threshold = 1.0
  n.attn_threshold = 0.5
  n.init_leak = 1.0
  n.init_membrane = 0.5              # U[0] / threshold (0.5: rate rounds the input; better ANN -> SNN)
  n.surrogate_input = "normalized"   # the surrogate acts on U/Vth - 1 | 'difference': on U - Vth (SpikingJelly)
  # False | 'blocks': the backward pass recomputes the stem and each block from its input (bounded BPTT memory,
  # ~1.15x step time).
  n.remat = ml_collections.FieldReference(False, field_type=object)
  k = m.mask = ml_collections.ConfigDict()
  k.enabled = True                   # False: fixed T = T_max
  k.mode = "ste"                     # 'ste' | 'sigmoid'
  k.monotone = False
  k.granularity = "module"           # 'module' | 'layer'
  k.score_init = 1.0
  k.mask_stem = False
  # What a masked step is: 'skip' (membranes held, no work: a module costs its active steps) | 'filter' (the
  # neurons integrate at every step up to the last active one and emit only at active steps; that work counts).
  k.semantics = "skip"

  c.phases = "ann,snn"
  c.ann = phase_config(steps=1000, lr=1e-3, batch_size=128)
  c.snn = phase_config(steps=1000, lr=1e-4, batch_size=128)
  c.snn.time_cost = 0.01
  c.snn.optimizer.score_lr = 0.05
  c.finetune = phase_config(steps=0, lr=3e-5, batch_size=128)
  c.eval_fixed_steps = True          # also evaluate the SNN with every step on (masks off)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = -1            # -1: all devices
  c.distributed = False              # call jax.distributed.initialize() (multi-host launch)
  return c


def parse_arg(arg: str, allowed: tuple[str, ...], config_name: str) -> dict[str, str]:
  """'tiny,local' or 'variant=8-512,tiny' -> {'tiny': '', 'local': ''} / {'variant': '8-512', ...}."""
  out = {}
  for item in filter(None, (a.strip() for a in (arg or "").split(","))):
    key, _, value = item.partition("=")
    if key not in allowed:
      raise ValueError(f"{config_name}: unknown argument {key!r}; allowed: {', '.join(allowed)}.")
    out[key] = value
  return out


def paper_recipe(c: ml_collections.ConfigDict, *, epochs_ann: int, epochs_snn: int, num_train: int,
                 batch_size: int = 128) -> None:
  """The Spikformer training recipe (AdamW lr 5e-4, wd 0.06, cosine, label smoothing 0.1, RandAugment,
  mixup/cutmix) for the ANN twin, then BPTT fine-tuning of the SNN with learned masks."""
  steps = lambda epochs: epochs * num_train // batch_size
  c.ann = phase_config(steps=steps(epochs_ann), lr=5e-4, batch_size=batch_size)
  c.ann.label_smoothing = 0.1
  c.ann.log_every = 200
  c.ann.checkpoint_every = 2000
  c.snn = phase_config(steps=steps(epochs_snn), lr=1e-4, batch_size=batch_size)
  c.snn.label_smoothing = 0.1
  c.snn.time_cost = 0.01
  c.snn.optimizer.score_lr = 0.01
  c.snn.log_every = 200
  c.snn.checkpoint_every = 2000
  c.finetune = phase_config(steps=0, lr=2e-5, batch_size=batch_size)
  c.data.augment.randaugment_ops = 2
  c.data.augment.randaugment_magnitude = 9
  c.data.augment.mixup_alpha = 0.8
  c.data.augment.cutmix_alpha = 1.0


def make_tiny(c: ml_collections.ConfigDict, *, steps: int = 4, batch_size: int = 16) -> None:
  """Shrinks a recipe to seconds on a CPU: same code paths, tiny model, a few steps."""
  c.model.depth = 1
  c.model.dim = 16
  c.model.num_heads = 2
  c.model.mlp_ratio = 2.0
  c.model.num_steps = min(c.model.num_steps, 3)
  for p in ("ann", "snn", "finetune"):
    if c[p].num_steps:
      c[p].num_steps = steps
    c[p].batch_size = batch_size
    c[p].log_every = 2
    c[p].checkpoint_every = steps
  c.eval_batch_size = 64


def set_neuron_preset(c, name: str, **overrides):
  """Sets every field of `c.model.neuron` that a named preset fixes (dtvit.models.settings.NEURON_PRESETS, e.g.
  'spikingjelly': all settings equal SpikingJelly's Spikformer); `overrides` change some of them."""
  from dtvit.models import settings  # pylint: disable=g-import-not-at-top
  if name not in settings.NEURON_PRESETS:
    raise ValueError(f"Unknown neuron preset {name!r}; choose one of {sorted(settings.NEURON_PRESETS)}.")
  for k, v in {**settings.NEURON_PRESETS[name], **overrides}.items():
    c.model.neuron[k] = v
  return c

