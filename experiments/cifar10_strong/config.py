"""A strong CPU-scale CIFAR-10 recipe: a Spikformer-style twin chosen by a measured scan (see README.md).

  # the scan: a few Spikformer sizes, SCAN_EPOCHS each (ANN only): accuracy against images/s
  python -m dtvit.sweep --config=experiments/cifar10_strong/config.py:scan --root=experiments/cifar10_strong/scan
  # the twin and the SNN runs from it
  python -m dtvit.sweep --config=experiments/cifar10_strong/config.py --root=experiments/cifar10_strong/runs

`get_config(arg)`: the chosen model (`SIZE`), the ANN twin's recipe, and the SNN phase from the twin's checkpoint
(skip masks, T_max = 4, distillation from the twin, SNN_EPOCHS of fine-tuning).
`get_sweep(arg)`: with `scan`, the scan's points (`scan_<name>`: ANN only, a short cosine schedule each);
otherwise the twin (`ann`) and, from its checkpoint, in this order: learned masks at the headline cost
(`learned_skip_<cost>`), fixed T = 1..4 (`fixed_T<T>`), fixed T = 4 trained with the every-step loss for
per-sample exit (`fixed_T4_every_step`), learned masks at the second cost, then the extra seeds
(`<run>_seed<k>`: 3 seeds of the headline learned run, 2 of fixed T = 2 and 3), and last the headline learned
run fine-tuned LONG_EPOCHS instead of SNN_EPOCHS, then the same for its controls LONG_CONTROLS, the fixed T on
either side of its simulated steps (`<run>_<n>ep`; with `smoke`, 3x the smoke steps). Every SNN
run keeps its final checkpoint, so `dtvit.evaluate --early_exit` can evaluate any of them under per-sample exit.

Arguments (comma-separated, for both):
  scan        the scan's sweep (get_sweep) / a short ANN schedule (get_config)
  size=<n>    one of SIZES (default SIZE)
  smoke       a tiny model, a few steps, a test subset: the same code paths (tests)
  digits      scikit-learn's digits instead of CIFAR-10 (tests: no archive needed)
  steps=<n>   every phase trains n steps (get_config; the `_<n>ep` point keeps its own): a quick trial of a
              point, or a run long enough to stop
"""

from dtvit import recipes
from dtvit import sweep

ARCHIVE = "../shared/data/cifar10-jpg.tar.gz"
NUM_TRAIN = 50_000
BATCH_SIZE = 128
# Spikformer-style sizes: (depth, dim, heads, mlp ratio, which of the 4 SPS stages pool). Pooling after stages
# 2 and 3 keeps the first two convs at 32x32 (the stem is where a small model's accuracy comes from) and gives
# 8x8 = 64 tokens.
SIZES = {
    "2-128": (2, 128, 4, 4.0, (False, True, True, False)),
    "4-128": (4, 128, 4, 4.0, (False, True, True, False)),
    "2-192": (2, 192, 6, 4.0, (False, True, True, False)),
    "2-256": (2, 256, 8, 4.0, (False, True, True, False)),
    "2-256e": (2, 256, 8, 4.0, (True, True, False, False)),
}
SIZE = "2-192"
SCAN_EPOCHS = 2
ANN_EPOCHS = 50
SNN_EPOCHS = 2
LONG_EPOCHS = 4              # the headline learned run once more, fine-tuned this long: what longer training buys
LONG_CONTROLS = ("fixed_T3", "fixed_T2")   # the same longer fine-tuning for the fixed T around its T_sim
T_MAX = 4
TWIN = "{root}/ann/ann/checkpoints"
COSTS = (0.01, 0.03)         # time-step cost weights: the headline first (cifar10_cpu: T_sim ~2.5 at 0.01)
SEEDS = {"learned_skip_0.01": (1, 2), "fixed_T2": (1,), "fixed_T3": (1,)}
DISTILL_WEIGHT, DISTILL_TEMPERATURE = 1.0, 2.0
SMOKE_STEPS = 6
_ARGS = ("scan", "size", "smoke", "digits", "steps")


def _args(arg: str) -> dict:
  args = recipes.parse_arg(arg, _ARGS, "cifar10_strong")
  if args.get("size") and args["size"] not in SIZES:
    raise ValueError(f"cifar10_strong: size={args['size']!r}; choose one of {', '.join(SIZES)}.")
  if "steps" in args and not args["steps"].isdigit() or args.get("steps") == "0":
    raise ValueError(f"cifar10_strong: steps={args['steps']!r}; give a positive number of steps, e.g. steps=100.")
  return args


def get_sweep(arg: str = ""):
  """The scan's points (with `scan`), or the twin and the SNN runs from it."""
  args = _args(arg)
  if "scan" in args:
    if "smoke" in args:   # two tiny sizes: the scan's code paths in seconds
      return [sweep.named(f"scan_{d}-16", {"model.depth": d, "model.dim": 16, "model.num_heads": 2})
              for d in (1, 2)]
    return [sweep.named(f"scan_{s}", _size_overrides(s)) for s in SIZES]
  snn = {"snn.init_from": TWIN}
  fixed = {f"fixed_T{t}": {**snn, "model.max_time_steps": t, "model.mask.enabled": False, "snn.time_cost": 0.0}
           for t in range(1, T_MAX + 1)}
  learned = {f"learned_skip_{c:g}": {**snn, "snn.time_cost": c} for c in COSTS}
  first = list(learned)[0]
  runs = {first: learned[first], **fixed,
          f"fixed_T{T_MAX}_every_step": {**fixed[f"fixed_T{T_MAX}"], "snn.loss": "every_step"},
          **{n: p for n, p in learned.items() if n != first}}
  seeds = {f"{n}_seed{k}": {**runs[n], "seed": k} for n, ks in SEEDS.items() for k in ks}
  long_steps = 3 * SMOKE_STEPS if "smoke" in args else LONG_EPOCHS * NUM_TRAIN // BATCH_SIZE
  long = {f"{n}_{LONG_EPOCHS}ep": {**runs[n], "snn.train_steps": long_steps,
                                   "snn.optimizer.warmup_steps": max(long_steps // 20, 1)}
          for n in (first, *LONG_CONTROLS)}
  return [sweep.named("ann", {"phases": "ann"})] + [sweep.named(n, p) for n, p in {**runs, **seeds, **long}.items()]


def _size_overrides(size: str) -> dict:
  depth, dim, heads, mlp_ratio, pools = SIZES[size]
  return {"model.depth": depth, "model.dim": dim, "model.num_heads": heads, "model.mlp_ratio": mlp_ratio,
          "model.stem_pools": pools}


def get_config(arg: str = ""):
  args = _args(arg)
  c = recipes.get_base_config()
  num_train, image_side = recipes.local_cifar10_data(c, ARCHIVE, digits="digits" in args)
  c.data.placement = "device"   # crops and flips inside the step: the host does no per-image work
  c.eval_batch_size = 250

  m = c.model
  m.arch = "spikformer"
  m.variant = "2-128"
  depth, dim, heads, mlp_ratio, pools = SIZES[args.get("size") or SIZE]
  m.depth, m.dim, m.num_heads, m.mlp_ratio = depth, dim, heads, mlp_ratio
  m.stem_pools = pools if image_side == 32 else (False, False, False, True)
  m.max_time_steps = T_MAX
  m.mask.semantics = "skip"

  steps = lambda epochs: int(epochs * num_train // BATCH_SIZE)
  ann_epochs = SCAN_EPOCHS if "scan" in args else ANN_EPOCHS
  c.ann = recipes.phase_config(steps=steps(ann_epochs), lr=2e-3, batch_size=BATCH_SIZE)
  c.ann.optimizer.weight_decay = 0.05
  c.ann.label_smoothing = 0.1
  c.ann.log_every = 100
  c.ann.checkpoint_every = 250
  c.snn = recipes.phase_config(steps=steps(SNN_EPOCHS), lr=5e-4, batch_size=BATCH_SIZE)
  c.snn.optimizer.weight_decay = 0.05
  c.snn.optimizer.score_lr = 0.3
  c.snn.label_smoothing = 0.1
  c.snn.log_every = 50
  c.snn.checkpoint_every = 100
  c.snn.max_to_keep = 1
  c.snn.distill_weight = DISTILL_WEIGHT
  c.snn.distill_temperature = DISTILL_TEMPERATURE
  c.phases = "ann" if "scan" in args else "snn"
  if "smoke" in args:   # the same code paths on a tiny model: seconds to compile
    m.depth, m.dim, m.num_heads = 1, 16, 2
    c.eval_fixed_steps = False
    for p in ("ann", "snn"):
      c[p].train_steps = SMOKE_STEPS
      c[p].batch_size = 16
      c[p].log_every = 2
      c[p].checkpoint_every = 3
    c.eval_examples = 480 if image_side == 32 else 240
    c.eval_batch_size = 40   # divisible by 8 devices
  if "steps" in args:
    for p in ("ann", "snn"):
      c[p].train_steps = int(args["steps"])
  return c
