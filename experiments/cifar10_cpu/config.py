"""The CPU-scale CIFAR-10 recipe of the sweep in this folder (see README.md; `sweep.py` runs it).

Model: Spikformer-2-64 (depth 2, dim 64, 4 heads, MLP ratio 2), SPS stem pooling after its first two stages
(32x32 -> 8x8 = 64 tokens, so the three spiking stem convs past the first run at 16x16 and 8x8). It is the
smallest Spikformer-style model we found to learn CIFAR-10 well within the 2-core budget: the ANN twin trained at
~240 img/s and the T_max = 4 SNN runs at ~80 img/s (batch 64, 2 shared cores, XLA:CPU; train_time_s of the runs).

  python -m dtvit.main --config=experiments/cifar10_cpu/config.py:ann --workdir=runs/ann
  python -m dtvit.main --config=experiments/cifar10_cpu/config.py:fixed,T=2 \
      --config.snn.init_from=runs/ann/ann/checkpoints --workdir=runs/fixed_T2
  python -m dtvit.main --config=experiments/cifar10_cpu/config.py:learned,cost=0.03,kind=op_weighted \
      --config.snn.init_from=runs/ann/ann/checkpoints --workdir=runs/learned_op0.03

Arguments (comma-separated):
  ann                          the ANN twin (phase 'ann', ANN_EPOCHS epochs)
  fixed,T=<T>                  SNN with T steps, masks off (phase 'snn' from the twin, SNN_EPOCHS epochs)
  learned,cost=<w>[,kind=<k>][,semantics=<s>]
                               SNN with learned masks, T_max = 4, time-step cost weight w of kind k
                               ('expected' or 'op_weighted'; default 'expected'); masked steps 'skip'
                               (default) or 'filter' (see dtvit/masks.py)
  seed=<n>                     the run's seed (default 0): initialisation of the scores, data order
  smoke                        a tiny model, a few steps, a test subset: the same code paths (tests)
  digits                       scikit-learn's digits instead of CIFAR-10 (tests: no archive needed)
"""

from configs import common

ARCHIVE = "../shared/data/cifar10-jpg.tar.gz"
NUM_TRAIN = 50_000
BATCH_SIZE = 64
ANN_EPOCHS = 8
SNN_EPOCHS = 1
T_MAX = 4


def get_config(arg: str = ""):
  args = common.parse_arg(arg, ("ann", "fixed", "learned", "T", "cost", "kind", "semantics", "seed", "smoke",
                                "digits"),
                          "cifar10_cpu")
  runs = [r for r in ("ann", "fixed", "learned") if r in args]
  if len(runs) != 1:
    raise ValueError(f"cifar10_cpu: name exactly one of ann, fixed, learned in the config argument, got {arg!r}.")
  run = runs[0]
  c = common.get_base_config()
  if "digits" in args:
    c.data.name = "digits"
    c.data.augment.crop_padding = 1
    num_train, image_side = 1437, 8
  else:
    c.data.name = "cifar10_local"
    c.data.archive = ARCHIVE
    c.data.data_dir = "data_dir"
    c.data.augment.crop_padding = 4
    c.data.augment.flip = True
    num_train, image_side = NUM_TRAIN, 32
  c.eval_batch_size = 250

  m = c.model
  m.arch = "spikformer"
  m.variant = "2-128"
  m.depth, m.dim, m.num_heads, m.mlp_ratio = 2, 64, 4, 2.0
  m.stem_pools = (True, True, False, False) if image_side == 32 else (False, False, False, True)
  m.num_steps = T_MAX

  steps = lambda epochs: epochs * num_train // BATCH_SIZE
  c.ann = common.phase_config(steps=steps(ANN_EPOCHS), lr=2e-3, batch_size=BATCH_SIZE)
  c.ann.optimizer.weight_decay = 0.05
  c.ann.label_smoothing = 0.1
  c.ann.log_every = 100
  c.ann.checkpoint_every = 500
  c.snn = common.phase_config(steps=steps(SNN_EPOCHS), lr=5e-4, batch_size=BATCH_SIZE)
  c.snn.optimizer.weight_decay = 0.05
  c.snn.optimizer.score_lr = 0.3
  c.snn.label_smoothing = 0.1
  c.snn.log_every = 50
  c.snn.checkpoint_every = 200

  if "seed" in args:
    c.seed = int(args["seed"])
  if run == "ann":
    c.phases = "ann"
    if any(k in args for k in ("T", "cost", "kind", "semantics")):
      raise ValueError("cifar10_cpu: the ANN twin takes no T, cost, kind or semantics.")
  else:
    c.phases = "snn"
    if run == "fixed":
      if "T" not in args or any(k in args for k in ("cost", "kind", "semantics")):
        raise ValueError("cifar10_cpu: 'fixed' takes T=<steps> and no cost, kind or semantics (every step is "
                         "active, so there is nothing to skip or filter).")
      m.num_steps = int(args["T"])
      m.mask.enabled = False
      c.snn.time_cost = 0.0
    else:
      if "cost" not in args or "T" in args:
        raise ValueError("cifar10_cpu: 'learned' takes cost=<weight> (T_max is fixed at 4).")
      c.snn.time_cost = float(args["cost"])
      c.snn.cost_kind = args.get("kind") or "expected"
      m.mask.semantics = args.get("semantics") or "skip"
  if "smoke" in args:   # the same code paths on a tiny model: seconds to compile
    m.depth, m.dim, m.num_heads = 1, 16, 2
    c.eval_fixed_steps = False
    for p in ("ann", "snn"):
      c[p].num_steps = 6
      c[p].log_every = 2
      c[p].checkpoint_every = 3
    c.eval_examples = 480 if image_side == 32 else 240
    c.eval_batch_size = 40   # divisible by 8 devices
  return c
