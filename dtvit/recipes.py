"""Fields every recipe shares, with their defaults, and the helpers recipes use. A recipe (a file of the
repository's configs/, or a user's own) calls `get_base_config()` and overrides:

  from dtvit import recipes
  def get_config(arg=""):
    c = recipes.get_base_config()
    ...

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
  c.train_steps = steps                # optimizer steps of this phase
  c.batch_size = batch_size          # global batch size (split over processes and devices)
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"         # 'adamw' | 'sgd'
  c.optimizer.lr = lr
  c.optimizer.warmup_steps = max(steps // 20, 1)
  c.optimizer.end_lr_factor = 0.0
  c.optimizer.weight_decay = 0.06
  c.optimizer.momentum = 0.9         # sgd only
  c.optimizer.grad_clip = 1.0        # global-norm clip; 0 = off
  c.optimizer.clip_scores = True     # the clip covers the time-step scores too (False: weights and neurons only)
  c.optimizer.cooldown_steps = 0     # the last this many steps stay at lr * end_lr_factor (timm's cooldown)
  c.optimizer.neuron_lr_mult = 1.0   # learning rate of thresholds/leaks relative to the weights
  c.optimizer.score_optimizer = "sgd"  # time-step scores: 'sgd' (momentum 0.9) | 'adam'
  c.optimizer.score_lr = 0.0         # learning rate of the time-step scores (constant); 0 = optimizer.lr
  c.optimizer.score_momentum = 0.9   # 'sgd' scores: momentum (0 = plain SGD)
  c.label_smoothing = 0.0
  c.mixup_off_step = 0               # mixup / cutmix (data.augment) stop at this step of the phase; 0 = never
  c.init_from = ""                   # a checkpoint dir whose params start this phase ('' = previous phase)
  c.threshold_scale = 1.0            # ann -> snn: threshold = scale * clip value
  # Time-step cost (SNN phases): loss = CE + time_cost * cost(scores).
  c.time_cost = 0.0                  # lambda_T; 0 = no pressure on the masks
  c.cost_kind = "expected"           # 'expected' | 'op_weighted' | 'hinge' | 'hinge_hard' (dtvit.masks)
  c.target_steps = 0.0               # for the hinges: the target average number of steps
  c.temperature_start = 1.0          # mask temperature, annealed geometrically over the phase
  c.temperature_end = 1.0
  # The classification loss: 'final' = cross-entropy of the time-averaged logits; 'every_step' (SEENN / DT-SNN,
  # for per-sample early exit) = the mean over steps t of the cross-entropy of the accumulated logits up to t.
  c.loss = "final"
  # Distillation from the frozen ANN twin (SNN phases): loss += distill_weight * T^2 * KL(softmax(twin / T) ||
  # softmax(snn / T)), T = distill_temperature, on the time-averaged logits. The twin (phase 'ann', evaluation
  # mode) is the ANN checkpoint `distill_from` names; '' = the phase's `init_from`, else this run's 'ann' phase.
  c.distill_weight = 0.0             # 0 = off
  c.distill_temperature = 1.0
  c.distill_from = ""
  c.log_every = 50
  c.eval_every = 0                   # > 0: accuracy on data.periodic_eval_split ('val': data.val_examples held
                                     # out from train) every this many steps and at the end; 0 = off
  c.checkpoint_every = 500
  c.max_to_keep = 2
  c.sync_every = 10                  # the host reads the steps' finite / stop flags every this many steps (and at
                                     # log, eval, checkpoint steps): steps queue on the device in between (their
                                     # batches stay alive until then, for a re-run); a SIGTERM or Ctrl-C is acted
                                     # on within this many steps. The results do not depend on it.
  c.nonfinite = "error"              # 'error' | 'skip': what a step whose loss, gradients, parameters, batch
                                     # statistics or optimizer state go non-finite does ('skip': the state
                                     # stays as it was and the step counter moves past the batch)
  c.max_consecutive_skips = 100      # under 'skip': this many skipped steps in a row stop the run with an error
                                     # (the state is broken, not a batch); >= 1
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
  m.max_time_steps = 4                    # T_max
  m.patch_size = 4                   # 'vit' only
  m.depth = 0                        # 0: the variant's; else an override
  m.dim = 0
  m.num_heads = 0
  m.mlp_ratio = 0.0
  m.stem_pools = ()                  # 'spikformer': which of the 4 SPS stages pool; () = the variant's
  m.stem_pool_first = False          # 'spikformer': pool before the stem neuron (SpikingJelly's order)
  m.dtype = "float32"                # matmul dtype: 'float32' | 'bfloat16' (membranes stay float32)
  m.attn_scale = 0.125
  m.kernels = "fused"                # 'xla' (no CPU neuron kernel) or 'reference' (lax.scan, Flax pool): same numbers
  # Initialisers (dtvit.models.settings.INITIALIZERS) of the blocks' Dense layers, the stem convs, the head.
  m.dense_init = "lecun_normal"
  m.conv_init = "lecun_normal"
  m.head_init = "lecun_normal"
  m.pre_bn_bias = ()                 # Dense layers ('q', 'k', 'v', 'proj', 'fc1', 'fc2') with a (no-op) bias before BN
  n = m.neuron = ml_collections.ConfigDict()
  n.neuron = "lif"                   # 'lif' (authors') | 'if' | 'spikingjelly_lif' (Spikformer's: SpikingJelly's LIF)
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
  k.score_init_spread = 0.0          # scores start uniform in score_init +- this (breaks the cost's symmetry)
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


def local_cifar10_data(c: ml_collections.ConfigDict, archive: str, *, digits: bool = False) -> tuple[int, int]:
  """The CPU experiments' data: CIFAR-10 from a local JPEG archive (prepared into ./data_dir; random crop after
  padding by 4, horizontal flip), or, with `digits`, scikit-learn's digits (tests: no archive). Returns
  (train examples, image side)."""
  if digits:
    c.data.name = "digits"
    c.data.augment.crop_padding = 1
    return 1437, 8
  c.data.name = "cifar10_local"
  c.data.archive = archive
  c.data.data_dir = "data_dir"
  c.data.augment.crop_padding = 4
  c.data.augment.flip = True
  return 50_000, 32


def parse_arg(arg: str, allowed: tuple[str, ...], config_name: str) -> dict[str, str]:
  """'tiny,local' or 'variant=8-512,tiny' -> {'tiny': '', 'local': ''} / {'variant': '8-512', ...}."""
  out = {}
  for item in filter(None, (a.strip() for a in (arg or "").split(","))):
    key, _, value = item.partition("=")
    if key not in allowed:
      raise ValueError(f"{config_name}: unknown argument {key!r}; allowed: {', '.join(allowed)}.")
    out[key] = value
  return out


# The official Spikformer training recipes (ZK-Zhou/spikformer), by dataset family. Sources, line by line, and
# the values dtvit resolves to: experiments/paper_scale/README.md's reference table (experiments/paper_scale/
# reference.py holds it as data; tests/paper_scale_test.py checks every recipe against it).
SPIKFORMER = {
    "cifar": dict(  # cifar10/cifar10.yml (CIFAR-100: the same recipe; no file of its own in the repository)
        epochs=300, cooldown_epochs=10, warmup_epochs=20, batch_size=128, lr=5e-4, min_lr=1e-5, weight_decay=0.06,
        label_smoothing=0.1, mixup=0.5, cutmix=0.0, mixup_off_epoch=200, randaugment_ops=1,
        randaugment_magnitude=9, randaugment_magnitude_std=0.4, randaugment_op_set="spikformer_official",
        randaugment_prob=0.5, random_erasing=0.25, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), eval_crop_pct=1.0,
        interpolation="bicubic", dense_init="trunc_normal_0.02", pre_bn_bias=("q", "k", "v", "proj", "fc1", "fc2")),
    "imagenet": dict(  # imagenet/imagenet.yml, imagenet/train.py, imagenet/model.py
        epochs=300, cooldown_epochs=10, warmup_epochs=20, batch_size=192, lr=5e-4, min_lr=1e-5, weight_decay=0.05,
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_off_epoch=0, randaugment_ops=2,
        randaugment_magnitude=9, randaugment_magnitude_std=0.5, randaugment_op_set="dtvit",
        randaugment_prob=0.5, random_erasing=0.25, rrc_scale=(1.0, 1.0), rrc_ratio=(3 / 4, 4 / 3), eval_crop_pct=1.0,
        interpolation="bicubic", dense_init="torch_default", pre_bn_bias=("proj", "fc1", "fc2")),
}
# The SNN phase after the ANN twin (mode 'hybrid'); nothing official exists for it [ours].
HYBRID_SNN = {"cifar": dict(epochs=100, warmup_epochs=5, lr=1e-4),
              "imagenet": dict(epochs=30, warmup_epochs=1, lr=1e-4)}
MODES = ("hybrid", "direct")
# The learned-mask phase: a hinge on the reported T_avg, at the paper's CIFAR-10 operating point (4.97 of T_max
# 8, scaled with T_max), with the score learning rate calibrated so that the cost alone moves a score from its
# initial value to 0 in SCORE_REACH_FRACTION of the phase (`calibrate_masks`; experiments/paper_scale/README.md).
TARGET_FRACTION = 4.97 / 8
SCORE_REACH_FRACTION = 0.25
SCORE_INIT_SPREAD = 0.5  # scores start in [0.5, 1.5]: they cross 0 one by one, so the hinge can stop at its target


def official_phase(o: dict, *, epochs: int, warmup_epochs: float, lr: float, num_train: int, cooldown_epochs: int,
                   mixup_off_epoch: int) -> ml_collections.ConfigDict:
  """One phase on the official schedule: linear warm-up, cosine to min_lr, then `cooldown_epochs` at min_lr."""
  steps = lambda e: int(e * num_train // o["batch_size"])
  pc = phase_config(steps=steps(epochs), lr=lr, batch_size=o["batch_size"])
  pc.optimizer.warmup_steps = steps(warmup_epochs)
  pc.optimizer.cooldown_steps = steps(cooldown_epochs)
  pc.optimizer.end_lr_factor = o["min_lr"] / o["lr"]
  pc.optimizer.weight_decay = o["weight_decay"]
  pc.optimizer.grad_clip = 0.0        # the official runs clip nothing (train.py: --clip-grad default None)
  pc.optimizer.clip_scores = False    # if clipping is turned on, it leaves the time-step scores alone
  pc.label_smoothing = o["label_smoothing"]
  pc.mixup_off_step = steps(mixup_off_epoch)
  pc.log_every = 200
  pc.checkpoint_every = 2000
  return pc


def _official_data_and_model(c: ml_collections.ConfigDict, o: dict) -> None:
  a = c.data.augment
  a.crop_padding = 0
  a.flip = True
  a.random_resized_crop = True
  a.rrc_min_scale, a.rrc_max_scale = o["rrc_scale"]
  a.rrc_min_ratio, a.rrc_max_ratio = o["rrc_ratio"]
  a.randaugment_ops = o["randaugment_ops"]
  a.randaugment_magnitude = o["randaugment_magnitude"]
  a.randaugment_magnitude_std = o["randaugment_magnitude_std"]
  a.randaugment_op_set = o["randaugment_op_set"]
  a.randaugment_prob = o["randaugment_prob"]
  a.random_erasing = o["random_erasing"]
  a.mixup_alpha, a.cutmix_alpha = o["mixup"], o["cutmix"]
  c.data.resize_method = o["interpolation"]
  c.data.eval_crop_pct = o["eval_crop_pct"]
  c.model.dense_init = o["dense_init"]
  c.model.conv_init = "torch_default"      # the official convs keep PyTorch's init (_init_weights: Linear only)
  c.model.head_init = "trunc_normal_0.02"  # the head is an nn.Linear
  c.model.pre_bn_bias = o["pre_bn_bias"]


def paper_recipe(c: ml_collections.ConfigDict, *, family: str, mode: str, num_train: int) -> None:
  """The official Spikformer training recipe (`SPIKFORMER[family]`) with the paper's learned masks.

  mode 'direct': the SNN with masks trained from scratch on the official recipe (phases 'snn').
  mode 'hybrid': the ANN twin on the official recipe, then the SNN with masks (`HYBRID_SNN`, ours) from it.
  Both SNN phases train the masks to T_avg = TARGET_FRACTION x T_max (`calibrate_masks`, which the recipe calls
  last, after any change of T_max or steps)."""
  if family not in SPIKFORMER or mode not in MODES:
    raise ValueError(f"paper_recipe: family {family!r} / mode {mode!r}; choose a family of {sorted(SPIKFORMER)} "
                     f"and a mode of {MODES}.")
  o = SPIKFORMER[family]
  _official_data_and_model(c, o)
  kw = dict(num_train=num_train, cooldown_epochs=o["cooldown_epochs"])
  official = official_phase(o, epochs=o["epochs"] + o["cooldown_epochs"], warmup_epochs=o["warmup_epochs"],
                            lr=o["lr"], mixup_off_epoch=o["mixup_off_epoch"], **kw)
  h = HYBRID_SNN[family]
  # The hybrid SNN phase switches mixing off at the same fraction of its epochs as the official run does.
  off = round(h["epochs"] * o["mixup_off_epoch"] / o["epochs"])
  kw["cooldown_epochs"] = 0
  snn = official if mode == "direct" else official_phase(o, epochs=h["epochs"], warmup_epochs=h["warmup_epochs"],
                                                         lr=h["lr"], mixup_off_epoch=off, **kw)
  c.phases = "snn" if mode == "direct" else "ann,snn"
  c.ann = official.copy_and_resolve_references()
  c.snn = snn.copy_and_resolve_references()
  c.model.mask.score_init_spread = SCORE_INIT_SPREAD
  # Plain SGD for the scores: with momentum, scores near 0 keep moving after the hinge stops pushing (at the
  # target), switching off steps past it.
  c.snn.optimizer.score_momentum = 0.0
  c.snn.cost_kind = "hinge_hard"
  c.snn.time_cost = 1.0
  c.snn.target_steps = round(TARGET_FRACTION * c.model.max_time_steps, 4)
  c.finetune = phase_config(steps=0, lr=2e-5, batch_size=o["batch_size"])


def calibrate_masks(c: ml_collections.ConfigDict, phase: str = "snn",
                    reach_fraction: float = SCORE_REACH_FRACTION) -> None:
  """Sets `<phase>.optimizer.score_lr` so that the phase's time-step cost alone moves a score from
  `model.mask.score_init` to 0 in `reach_fraction` of the phase's steps (`optim.calibrated_score_lr`), for the
  config's model (its number of masked modules), cost weight, temperature and step count."""
  from dtvit import models
  from dtvit import optim
  from dtvit.models import paths
  pc = c[phase]
  if c.model.mask.granularity != "module":
    raise ValueError("calibrate_masks: the calibration counts one score vector per module; with "
                     "model.mask.granularity='layer' set the score lr by hand.")
  if pc.temperature_start != pc.temperature_end:
    raise ValueError("calibrate_masks: the calibration assumes a constant mask temperature "
                     f"(temperature_start = temperature_end), got {pc.temperature_start} -> {pc.temperature_end}.")
  model = models.build_model(c.model, 10, phase="snn")
  pc.optimizer.score_lr = optim.calibrated_score_lr(
      train_steps=pc.train_steps, reach_fraction=reach_fraction, num_modules=len(paths.masked_modules(model)),
      time_cost=pc.time_cost, score_init=c.model.mask.score_init, temperature=pc.temperature_start,
      score_optimizer=pc.optimizer.score_optimizer, momentum=pc.optimizer.score_momentum)


def make_tiny(c: ml_collections.ConfigDict, *, steps: int = 4, batch_size: int = 16) -> None:
  """Shrinks a recipe to seconds on a CPU: same code paths, tiny model, a few steps."""
  c.model.depth = 1
  c.model.dim = 16
  c.model.num_heads = 2
  c.model.mlp_ratio = 2.0
  t_max = c.model.max_time_steps
  c.model.max_time_steps = min(t_max, 3)
  for p in ("ann", "snn", "finetune"):
    if c[p].target_steps:  # the same share of T_max
      c[p].target_steps = round(c[p].target_steps * c.model.max_time_steps / t_max, 4)
    if c[p].train_steps:
      c[p].train_steps = steps
      c[p].optimizer.cooldown_steps = 0
    c[p].batch_size = batch_size
    c[p].log_every = 2
    c[p].checkpoint_every = steps
  c.eval_batch_size = 64


def set_neuron_preset(c, name: str, **overrides):
  """Sets every field of `c.model.neuron` that a named preset fixes (dtvit.models.settings.NEURON_PRESETS, e.g.
  'spikingjelly': all settings equal SpikingJelly's Spikformer); `overrides` change some of them."""
  from dtvit.models import settings
  if name not in settings.NEURON_PRESETS:
    raise ValueError(f"Unknown neuron preset {name!r}; choose one of {sorted(settings.NEURON_PRESETS)}.")
  for k, v in {**settings.NEURON_PRESETS[name], **overrides}.items():
    c.model.neuron[k] = v
  return c

