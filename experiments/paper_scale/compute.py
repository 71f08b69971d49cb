"""The compute the paper's settings need: model sizes, MACs, training FLOPs and steps, and throughput ESTIMATES.

  python experiments/paper_scale/compute.py                 # the tables of README.md (seconds: shapes only)
  python experiments/paper_scale/compute.py --memory        # + BPTT activation memory per image (XLA:CPU
                                                            #   buffer assignment; ~1 min per setting)
  python experiments/paper_scale/compute.py --memory_from=experiments/paper_scale/compute.json  # the same, quick
  python experiments/paper_scale/compute.py --json=out.json --ann_util=0.4 --snn_util=0.15

Everything comes from the configs of experiments/paper_scale/settings.py (the recipes in configs/) and from the
models' own op counts (`dtvit.energy.ann_macs` of the ANN twin, traced with `jax.eval_shape`: nothing is
computed). Formulas, per phase:
  images          = num_steps x batch_size                        (epochs = images / train-set size)
  ANN train FLOPs = 3 x 2 x MACs x images                         (forward 1x, backward 2x; 2 FLOPs per MAC)
  SNN train FLOPs = 3 x 2 x MACs x T_max x images                 (BPTT through T_max steps)
MACs count the synaptic layers only (convs, linears, attention products; `dtvit/energy.py`), not batch norm,
neuron updates or pooling; the SNN count treats the analog first conv as run at every step (it runs once), an
overcount of 0.1% (CIFAR) to 1.4% (ImageNet 8-384).

Throughput and wall time are ESTIMATES, not measurements (no accelerator was lent when this was written):
  images/s per chip = utilisation x peak / (train FLOPs per image)
  wall time         = train FLOPs / (chips x utilisation x peak)
with the dense bf16 peaks in ACCELERATORS (so runs should use --config.model.dtype=bfloat16) and the assumed
utilisations --ann_util / --snn_util, and perfect data-parallel scaling over the chips of a slice.
`experiments/gpu/run_gpu_check.sh` measures real throughput when a GPU is lent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time


import jax
import jax.numpy as jnp
import numpy as np

from dtvit import energy
from dtvit import models
from experiments.paper_scale import settings as settings_lib

FLOPS_PER_MAC = 2
TRAIN_FACTOR = 3   # forward + backward (about twice the forward)
ANN_UTIL = 0.30    # assumed fraction of the bf16 peak a training step reaches: ANN twin
SNN_UTIL = 0.10    # SNN BPTT: the same matmuls per step, plus T_max x the elementwise neuron work (memory-bound)
MEMORY_HEADROOM = 0.85  # fraction of a device's memory activations may fill (params, optimizer, workspace)


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  chip: str
  peak_flops: float   # dense bf16 FLOP/s per chip (one JAX device)
  memory_gb: float    # memory per chip, GB (1e9 bytes)
  chips: int          # JAX devices of the configuration the wall time is given for


ACCELERATORS = (
    Accelerator("1x H200", "H200", 989e12, 141.0, 1),
    Accelerator("8x H200 (one host)", "H200", 989e12, 141.0, 8),
    Accelerator("TPU v4-32 (16 chips)", "TPU v4", 275e12, 32 * 2**30 / 1e9, 16),
    Accelerator("TPU v5e-16 (16 chips)", "TPU v5e", 197e12, 16 * 2**30 / 1e9, 16),
)


def phase_train_flops(macs: int, num_steps: int, batch_size: int, time_steps: int = 1) -> int:
  """3 x 2 x MACs x time_steps x images: the training FLOPs of one phase (time_steps = T_max for the SNN)."""
  return TRAIN_FACTOR * FLOPS_PER_MAC * int(macs) * int(time_steps) * int(num_steps) * int(batch_size)


def setting_compute(name: str) -> dict:
  """The compute row of one setting: model, ANN-twin MACs and params, and per phase steps, images, FLOPs."""
  s = settings_lib.setting(name)
  config = settings_lib.get_config(name)
  data = settings_lib.dataset(config)
  image_shape = (data.image_side, data.image_side, 3)
  model = models.build_model(config.model, data.num_classes, phase="ann")
  macs = energy.ann_macs(model, image_shape)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
  side = data.image_side // 2 ** sum(bool(p) for p in model.stem_pools)
  row = {
      "setting": s.name, "description": s.description, "recipe": s.recipe, "recipe_arg": s.arg,
      "dataset": config.data.name, "num_classes": data.num_classes, "num_train": data.num_train,
      "image_shape": list(image_shape),
      "model": {"variant": config.model.variant, "depth": model.depth, "dim": model.dim,
                "num_heads": model.num_heads, "mlp_ratio": model.mlp_ratio, "tokens": side * side,
                "params": params, "dtype": config.model.dtype},
      "T_max": model.max_time_steps, "ann_macs": macs, "phases": config.phases,
  }
  for phase in ("ann", "snn"):
    pc = config[phase]
    images = pc.train_steps * pc.batch_size
    t = model.max_time_steps if phase == "snn" else 1
    row[phase] = {"num_steps": pc.train_steps, "batch_size": pc.batch_size, "images": images,
                  "epochs": images / data.num_train, "lr": pc.optimizer.lr,
                  "flops_per_image": TRAIN_FACTOR * FLOPS_PER_MAC * macs * t,
                  "train_flops": phase_train_flops(macs, pc.train_steps, pc.batch_size, t)}
  return row


def estimates(row: dict, *, ann_util: float = ANN_UTIL, snn_util: float = SNN_UTIL) -> dict:
  """{phase: {accelerator: {'images_per_s_per_chip', 'hours'}}} from the FLOP counts (ESTIMATES)."""
  out = {}
  for phase, util in (("ann", ann_util), ("snn", snn_util)):
    p = row[phase]
    out[phase] = {}
    for acc in ACCELERATORS:
      rate = util * acc.peak_flops
      out[phase][acc.name] = {"images_per_s_per_chip": rate / p["flops_per_image"],
                              "hours": p["train_flops"] / (acc.chips * rate) / 3600}
  return out


def activation_bytes_per_image(name: str, phase: str, *, batch: int = 2) -> float:
  """Temporary memory of one gradient step per image, from XLA's buffer assignment on this host's CPU.

  Compiles (does not run) value_and_grad of the phase's model on `batch` images. XLA:CPU fuses differently from
  XLA:GPU/TPU, so this is an order of magnitude, not the accelerator's figure.
  """
  config = settings_lib.get_config(name)
  data = settings_lib.dataset(config)
  model = models.build_model(config.model, data.num_classes, phase=phase)
  shape = (data.image_side, data.image_side, 3)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                             jax.ShapeDtypeStruct((1, *shape), jnp.float32))

  def grad_fn(params, batch_stats, images):
    def loss(p):
      logits, new_bs = models.apply_model(model, {"params": p, "batch_stats": batch_stats}, images, train=True,
                                          with_aux=False)
      return jnp.sum(logits), new_bs
    return jax.grad(loss, has_aux=True)(params)

  compiled = jax.jit(grad_fn).lower(variables["params"], variables["batch_stats"],
                                    jax.ShapeDtypeStruct((batch, *shape), jnp.float32)).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise RuntimeError("This JAX backend reports no memory analysis; run --memory on a CPU host.")
  return analysis.temp_size_in_bytes / batch


def min_devices(batch_size: int, bytes_per_image: float, memory_gb: float) -> int | None:
  """The fewest devices that divide `batch_size` and hold its activations (None: not even one image each)."""
  for n in range(1, batch_size + 1):
    if batch_size % n == 0 and batch_size // n * bytes_per_image <= MEMORY_HEADROOM * memory_gb * 1e9:
      return n
  return None


def _si(x: float) -> str:
  exp = int(math.floor(math.log10(abs(x)))) if x else 0
  return f"{x / 10 ** exp:.2f}e{exp}"


def _hours(h: float) -> str:
  if h < 1:
    return f"{h * 60:.0f} min"
  return f"{h:,.1f} h" if h < 48 else f"{h:,.0f} h ({h / 24:,.1f} d)"


def compute_table(rows) -> str:
  lines = ["| setting | model (depth-dim, heads, tokens) | params | T_max | ANN MACs / image | ANN: epochs, "
           "steps x batch | ANN train FLOPs | SNN: epochs, steps x batch | SNN train FLOPs |",
           "| --- | --- | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
  for r in rows:
    m = r["model"]
    lines.append(
        f"| {r['setting']} | {m['depth']}-{m['dim']}, {m['num_heads']} heads, {m['tokens']} tokens "
        f"| {m['params'] / 1e6:.2f} M | {r['T_max']} | {r['ann_macs'] / 1e9:.3f} G "
        f"| {r['ann']['epochs']:.0f}, {r['ann']['num_steps']:,} x {r['ann']['batch_size']} "
        f"| {_si(r['ann']['train_flops'])} "
        f"| {r['snn']['epochs']:.0f}, {r['snn']['num_steps']:,} x {r['snn']['batch_size']} "
        f"| {_si(r['snn']['train_flops'])} |")
  return "\n".join(lines)


def _chips():
  """One accelerator per chip type, in ACCELERATORS' order."""
  chips = {}
  for a in ACCELERATORS:
    chips.setdefault(a.chip, a)
  return list(chips.values())


def estimate_table(rows, ests, mem=None) -> str:
  """The estimates; with `mem` ({setting: {phase: bytes per image}}) a wall time gets ' *' where the
  configuration has too few chips to hold the phase's global batch (`min_devices`)."""
  chips, names = _chips(), [a.name for a in ACCELERATORS]
  lines = ["| setting | phase | " + " | ".join(f"img/s per {a.chip}" for a in chips) + " | "
           + " | ".join(f"wall, {n}" for n in names) + " |",
           "| --- | --- |" + " ---: |" * (len(chips) + len(names))]
  for r, e in zip(rows, ests):
    for phase in ("ann", "snn"):
      cells = [f"{e[phase][a.name]['images_per_s_per_chip']:,.0f}" for a in chips]
      for a in ACCELERATORS:
        cell = _hours(e[phase][a.name]["hours"])
        if mem:
          need = min_devices(r[phase]["batch_size"], mem[r["setting"]][phase], a.memory_gb)
          if need is None or a.chips < need:
            cell += " *"
        cells.append(cell)
      lines.append(f"| {r['setting']} | {phase} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def memory_table(rows, mem) -> str:
  chips = _chips()
  lines = ["| setting | phase | activations / image (XLA:CPU) | global batch | "
           + " | ".join(f"min {a.chip} ({a.memory_gb:.0f} GB)" for a in chips) + " |",
           "| --- | --- | ---: | ---: |" + " ---: |" * len(chips)]
  for r in rows:
    for phase in ("ann", "snn"):
      b = mem[r["setting"]][phase]
      batch = r[phase]["batch_size"]
      cells = [str(min_devices(batch, b, a.memory_gb) or "none") for a in chips]
      lines.append(f"| {r['setting']} | {phase} | {b / 1e9:.3f} GB | {batch} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="", help="comma-separated settings (default: all)")
  p.add_argument("--ann_util", type=float, default=ANN_UTIL, help="assumed utilisation of the bf16 peak, ANN")
  p.add_argument("--snn_util", type=float, default=SNN_UTIL, help="assumed utilisation of the bf16 peak, SNN")
  p.add_argument("--memory", action="store_true", help="also compile each phase's gradient on the CPU and "
                 "report activation memory per image (slow: ~1 min per setting)")
  p.add_argument("--memory_from", default="", help="take the memory figures from a JSON that --memory --json "
                 "wrote (e.g. experiments/paper_scale/compute.json) instead of compiling")
  p.add_argument("--json", default="", help="also write the rows as JSON to this path")
  args = p.parse_args(argv)
  for u in ("ann_util", "snn_util"):
    if not 0 < getattr(args, u) <= 1:
      p.error(f"--{u} must be in (0, 1], got {getattr(args, u)}.")
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(settings_lib.BY_NAME)
  for n in names:
    if n not in settings_lib.BY_NAME:  # an error before any work
      p.error(f"--only: unknown setting {n!r}; choose from {', '.join(settings_lib.BY_NAME)}.")
  rows = [setting_compute(n) for n in names]
  ests = [estimates(r, ann_util=args.ann_util, snn_util=args.snn_util) for r in rows]
  mem = {}
  if args.memory and args.memory_from:
    p.error("give --memory or --memory_from, not both.")
  if args.memory_from:
    with open(args.memory_from) as f:
      mem = json.load(f).get("activation_bytes_per_image") or {}
    missing = [n for n in names if n not in mem]
    if missing:
      p.error(f"--memory_from={args.memory_from} has no memory figures for {', '.join(missing)}; rerun --memory.")
  if args.memory:
    for r in rows:
      mem[r["setting"]] = {}
      for phase in ("ann", "snn"):
        t0 = time.time()
        mem[r["setting"]][phase] = activation_bytes_per_image(r["setting"], phase)
        print(f"  memory {r['setting']} {phase}: {mem[r['setting']][phase] / 1e9:.3f} GB / image "
              f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
  print("Compute per setting (from the configs; MACs of the ANN twin from dtvit.energy.ann_macs):\n")
  print(compute_table(rows))
  print("\nESTIMATED throughput and wall time (not measured): dense bf16 peaks "
        + ", ".join(f"{a.chip} {a.peak_flops / 1e12:.0f} TFLOP/s" for a in _chips())
        + f" per chip; assumed utilisation ANN {args.ann_util:.0%}, SNN {args.snn_util:.0%}; "
          "perfect data-parallel scaling"
        + ("; * = too few chips to hold the global batch (memory table below)" if mem else "") + ":\n")
  print(estimate_table(rows, ests, mem))
  if mem:
    print(f"\nActivation memory of one gradient step per image (XLA:CPU buffer assignment, the config's dtype; "
          f"an order of magnitude for GPU/TPU) and the fewest devices that divide the global batch and hold its "
          f"activations in {MEMORY_HEADROOM:.0%} of their memory:\n")
    print(memory_table(rows, mem))
  out = {"rows": rows, "estimates": ests, "assumptions": {
      "ann_util": args.ann_util, "snn_util": args.snn_util,
      "accelerators": [dataclasses.asdict(a) for a in ACCELERATORS]}}
  if mem:
    out["activation_bytes_per_image"] = mem
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # shapes and CPU compiles only: never hold an accelerator
  main()
