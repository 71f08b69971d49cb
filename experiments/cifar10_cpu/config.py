"""The CPU-scale CIFAR-10 recipe and its sweep, as data (see README.md; `dtvit.sweep` runs it).

Model: Spikformer-2-64 (depth 2, dim 64, 4 heads, MLP ratio 2), SPS stem pooling after its first two stages
(32x32 -> 8x8 = 64 tokens, so the three spiking stem convs past the first run at 16x16 and 8x8). It is the
smallest Spikformer-style model we found to learn CIFAR-10 well within the 2-core budget: the ANN twin trained at
~240 img/s and the T_max = 4 SNN runs at ~80 img/s (batch 64, 2 shared cores, XLA:CPU; train_time_s of the runs).

  python -m dtvit.sweep --config=experiments/cifar10_cpu/config.py --root=experiments/cifar10_cpu/runs
  python -m dtvit.main --config=experiments/cifar10_cpu/config.py --config.phases=ann --workdir=/tmp/c10/ann
  python -m dtvit.main --config=experiments/cifar10_cpu/config.py --config.snn.time_cost=0.03 \
      --config.snn.init_from=/tmp/c10/ann/ann/checkpoints --workdir=/tmp/c10/learned_skip_0.03

`get_config(arg)`: the SNN phase with learned masks at T_max steps, no time-step cost, from the checkpoint in
`snn.init_from` (the ANN twin). `get_sweep(arg)`: the sweep's runs as overrides of it, in the order they run: the
ANN twin (`ann`: phases=ann), fixed T = 1..T_max (`fixed_T<T>`: masks off, no cost), learned masks at T_max for
each cost weight under both mask semantics (`learned_<semantics>_<cost>`, and `learned_<semantics>_op_<cost>`
with the op-weighted cost), then second seeds (`<run>_seed1`) of SEED_RUNS: the seed-to-seed spread a gain must
exceed; then the runs of the per-sample exit comparison (`exit_compare.py`): `fixed_T<T_max>_every_step` (fixed T
trained with snn.loss='every_step', for per-image early exit), `learned_skip_0.03_distill` and
`fixed_T<T_max>_distill` (distillation from the twin), and `exit_learned_skip_0.03` (learned_skip_0.03 again, its
checkpoint kept for evaluation under exit: the combination).
Every SNN run starts from the twin's checkpoint, `{root}/ann/ann/checkpoints`.

Arguments (comma-separated, for both):
  T_max=<n>   the learned runs' T_max and the largest fixed T (default 4; another T_max needs another --root)
  smoke       a tiny model, a few steps, a test subset: the same code paths (tests)
  digits      scikit-learn's digits instead of CIFAR-10 (tests: no archive needed)
"""

from dtvit import recipes
from dtvit import sweep

ARCHIVE = "../shared/data/cifar10-jpg.tar.gz"
NUM_TRAIN = 50_000
BATCH_SIZE = 64
ANN_EPOCHS = 8
SNN_EPOCHS = 1
DEFAULT_T_MAX = 4
COST_WEIGHTS = (0.03, 0.01, 0.1)    # in run order: the middle cost first, so that it lands first
OP_WEIGHTED_COSTS = (0.03,)
SEMANTICS = ("skip", "filter")
# Second seeds (data order and augmentation; the same ANN twin): the seed-to-seed spread of the comparison.
SEED_RUNS = ("fixed_T2", "fixed_T3", "learned_skip_0.03", "learned_filter_0.03")
TWIN = "{root}/ann/ann/checkpoints"
# Distillation from the twin: weight 1 on T^2 KL(twin || snn) beside the cross-entropy, at temperature
# 2 (a common choice for CIFAR knowledge distillation; the T^2 factor keeps the gradient's scale).
DISTILL_WEIGHT = 1.0
DISTILL_TEMPERATURE = 2.0
_ARGS = ("T_max", "smoke", "digits")


def _t_max(args: dict) -> int:
  t_max = int(args.get("T_max") or DEFAULT_T_MAX)
  if t_max < 1:
    raise ValueError(f"cifar10_cpu: T_max={t_max}; give 1 or more.")
  return t_max


def get_sweep(arg: str = ""):
  """The sweep's runs: dicts of dotted overrides of get_config(arg), each named (see the module docstring)."""
  t_max = _t_max(recipes.parse_arg(arg, _ARGS, "cifar10_cpu"))
  ann = sweep.named("ann", {"phases": "ann"})
  fixed = [sweep.named(f"fixed_T{t}", {"model.max_time_steps": t, "model.mask.enabled": False, "snn.time_cost": 0.0,
                                       "snn.init_from": TWIN}) for t in range(1, t_max + 1)]
  learned = [sweep.named(f"learned_{sem}_{op}{w:g}", {"snn.time_cost": w, "snn.cost_kind": kind,
                                                      "model.mask.semantics": sem, "snn.init_from": TWIN})
             for costs, kind, op in ((COST_WEIGHTS, "expected", ""), (OP_WEIGHTED_COSTS, "op_weighted", "op_"))
             for w in costs for sem in SEMANTICS]
  seeds = [sweep.named(p[sweep.NAME_KEY] + "_seed1", {**sweep.overrides(p), "seed": 1})
           for p in fixed + learned if p[sweep.NAME_KEY] in SEED_RUNS]
  return sweep.chain([ann], fixed, learned, seeds, _exit_and_distill_points(t_max))


def _exit_and_distill_points(t_max: int) -> list[dict]:
  """The exit comparison's runs, after the others: fixed T = T_max trained with SEENN's every-step loss (for
  per-image exit), distillation from the twin for the learned 'skip' run at cost 0.03 and for fixed T = T_max,
  and the learned 'skip' run at cost 0.03 once more (its checkpoint is kept: the learned masks under exit)."""
  fixed = {"model.max_time_steps": t_max, "model.mask.enabled": False, "snn.time_cost": 0.0, "snn.init_from": TWIN}
  learned = {"snn.time_cost": 0.03, "snn.cost_kind": "expected", "model.mask.semantics": "skip",
             "snn.init_from": TWIN}
  distill = {"snn.distill_weight": DISTILL_WEIGHT, "snn.distill_temperature": DISTILL_TEMPERATURE}
  return [sweep.named(f"fixed_T{t_max}_every_step", {**fixed, "snn.loss": "every_step"}),
          sweep.named("learned_skip_0.03_distill", {**learned, **distill}),
          sweep.named(f"fixed_T{t_max}_distill", {**fixed, **distill}),
          sweep.named("exit_learned_skip_0.03", learned)]


def get_config(arg: str = ""):
  args = recipes.parse_arg(arg, _ARGS, "cifar10_cpu")
  c = recipes.get_base_config()
  num_train, image_side = recipes.local_cifar10_data(c, ARCHIVE, digits="digits" in args)
  c.eval_batch_size = 250

  m = c.model
  m.arch = "spikformer"
  m.variant = "2-128"
  m.depth, m.dim, m.num_heads, m.mlp_ratio = 2, 64, 4, 2.0
  m.stem_pools = (True, True, False, False) if image_side == 32 else (False, False, False, True)
  m.max_time_steps = _t_max(args)
  m.mask.semantics = "skip"

  steps = lambda epochs: epochs * num_train // BATCH_SIZE
  c.ann = recipes.phase_config(steps=steps(ANN_EPOCHS), lr=2e-3, batch_size=BATCH_SIZE)
  c.ann.optimizer.weight_decay = 0.05
  c.ann.label_smoothing = 0.1
  c.ann.log_every = 100
  c.ann.checkpoint_every = 500
  c.snn = recipes.phase_config(steps=steps(SNN_EPOCHS), lr=5e-4, batch_size=BATCH_SIZE)
  c.snn.optimizer.weight_decay = 0.05
  c.snn.optimizer.score_lr = 0.3
  c.snn.label_smoothing = 0.1
  c.snn.log_every = 50
  c.snn.checkpoint_every = 200
  c.phases = "snn"
  if "smoke" in args:   # the same code paths on a tiny model: seconds to compile
    m.depth, m.dim, m.num_heads = 1, 16, 2
    c.eval_fixed_steps = False
    for p in ("ann", "snn"):
      c[p].train_steps = 6
      c[p].log_every = 2
      c[p].checkpoint_every = 3
    c.eval_examples = 480 if image_side == 32 else 240
    c.eval_batch_size = 40   # divisible by 8 devices
  return c
