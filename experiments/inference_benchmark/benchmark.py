r"""Dense masked inference vs scheduled (skipped-step) inference, timed side by side on one model.

Run (from the repository root):
  PYTHONPATH=. .venv/bin/python experiments/inference_benchmark/benchmark.py --suite --out=results.json
  PYTHONPATH=. .venv/bin/python experiments/inference_benchmark/benchmark.py                 # one case
  PYTHONPATH=. .venv/bin/python experiments/inference_benchmark/benchmark.py --arch=spikformer --batch=16 \
      --mask_stem --stem_mask=0101 --masks=0011,0101,1001,0110 --semantics=filter

The model has random weights (the timing does not depend on what was learned, only on the schedule) and chosen
hard masks (`MaskConfig(monotone=False)`, scores +1 / -1 so that the hard mask is exactly the pattern):
- `--block_steps 4,3,1,0` (default): block i's attn and mlp keep their first k_i steps (a monotone, prefix
  pattern; the number of entries is the depth);
- `--masks 0011,0101,1001,0110`: explicit per-module masks, one binary string per module, cycled over the
  modules in the order blocks_0/attn, blocks_0/mlp, blocks_1/attn, ... (`--depth` blocks);
- `--mask_stem` gives the stem a mask too: `--stem_steps k` (first k steps) or `--stem_mask 0101`.
`--semantics` ('skip' | 'filter', `MaskConfig.semantics`) says what a masked step is: under 'skip' a module runs
only its active steps, wherever they are; under 'filter' it runs every step up to its last active one. The
schedule `inference.make_inference_fn` compiles from the masks says which steps each module runs.

Both functions (`inference.dense_masked_eval`, all T_max steps with the masks applied, and the scheduled function)
are jit-compiled, warmed up, then called in alternating rounds (the order flips each round, so drifts in machine
load hit both); the report gives median seconds per call and
- ideal: matmul/conv FLOPs of the scheduled program / FLOPs of the dense one, counted from their jaxprs
  (`inference.matmul_flops`). It includes the parts that are never skipped (the stem when unmasked, the head),
  so it is what skipping can reach;
- the simulated-steps ratio: sum over mask units of `simulated_steps` / (units x T_max), from
  `models.step_counts` (the accounting: the masked modules only, not weighted by their cost);
- measured: median time scheduled / median time dense; "within 15%" is |measured / ideal - 1| <= 0.15.
The logits of the two functions are compared too (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dtvit import inference  # noqa: E402
from dtvit import models  # noqa: E402
from dtvit.models import paths  # noqa: E402

TOLERANCE = 0.15
INTERIOR = "0011,0101,1001,0110"  # leading and interior zeros, 2 of 4 steps each


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", choices=("vit", "spikformer"), default="vit")
  p.add_argument("--dim", type=int, default=192)
  p.add_argument("--heads", type=int, default=3)
  p.add_argument("--mlp_ratio", type=float, default=4.0)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--patch_size", type=int, default=4, help="ViT patch size")
  p.add_argument("--num_steps", type=int, default=4, help="T_max")
  p.add_argument("--semantics", choices=("skip", "filter"), default="skip")
  p.add_argument("--block_steps", type=str, default="4,3,1,0",
                 help="monotone pattern: active steps of each block's attn and mlp; the number of entries is "
                      "the depth (ignored with --masks)")
  p.add_argument("--masks", type=str, default=None,
                 help="explicit masks, binary strings cycled over blocks_0/attn, blocks_0/mlp, blocks_1/attn, ...")
  p.add_argument("--depth", type=int, default=4, help="the depth with --masks")
  p.add_argument("--mask_stem", action="store_true", help="give the stem a mask too")
  p.add_argument("--stem_steps", type=int, default=None, help="the stem's active steps (first k; with --mask_stem)")
  p.add_argument("--stem_mask", type=str, default=None, help="the stem's mask as a binary string (with --mask_stem)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--calls", type=int, default=2, help="calls per function per round")
  p.add_argument("--warmup", type=int, default=2, help="warm-up calls per function")
  p.add_argument("--prefix_twin", action="store_true",
                 help="also time a 'prefix twin': the same model with prefix masks of the same scheduled step "
                      "counts (its modules run their first steps: slices instead of gather/scatter; same FLOPs, "
                      "different logits), to isolate what non-prefix schedules cost")
  p.add_argument("--suite", action="store_true",
                 help="run the standard cases (3 models x {monotone, interior} x {skip, filter}) and print a table")
  p.add_argument("--only", type=str, default=None,
                 help="with --suite: run only the cases whose label contains this string")
  p.add_argument("--out", type=str, default=None, help="write the results as JSON to this path")
  return p.parse_args(argv)


def parse_mask(s: str, T: int) -> list[int]:
  if len(s) != T or set(s) - {"0", "1"}:
    raise ValueError(f"A mask is a string of {T} binary digits, got {s!r}.")
  return [int(c) for c in s]


def prefix_mask(k: int, T: int) -> list[int]:
  if not 0 <= k <= T:
    raise ValueError(f"A number of active steps must be in [0, {T}], got {k}.")
  return [1] * k + [0] * (T - k)


def case_masks(args) -> dict[str, list[int]]:
  """{masked module: its hard mask [T] as 0/1} for the case the arguments describe."""
  T = args.num_steps
  out = {}
  if args.masks:
    pats = [parse_mask(s, T) for s in args.masks.split(",")]
    names = [f"blocks_{i}/{m}" for i in range(args.depth) for m in ("attn", "mlp")]
    out.update({n: pats[j % len(pats)] for j, n in enumerate(names)})
  else:
    for i, k in enumerate(int(s) for s in args.block_steps.split(",")):
      out[f"blocks_{i}/attn"] = out[f"blocks_{i}/mlp"] = prefix_mask(k, T)
  if args.mask_stem:
    if args.stem_mask is not None:
      out["embedding"] = parse_mask(args.stem_mask, T)
    else:
      out["embedding"] = prefix_mask(T if args.stem_steps is None else args.stem_steps, T)
  elif args.stem_mask is not None or args.stem_steps is not None:
    raise ValueError("--stem_mask / --stem_steps need --mask_stem.")
  return out


def set_scores(params, masks: dict[str, list[int]]):
  """A copy of params whose mask scores are +1 at the pattern's 1s and -1 at its 0s."""
  return paths.with_scores(params, {name: jnp.where(jnp.asarray(m) > 0, 1.0, -1.0).astype(jnp.float32)
                                    for name, m in masks.items()})


def mask_str(m) -> str:
  return "".join(str(int(v)) for v in m)


def run_case(args) -> dict:
  T = args.num_steps
  masks_in = case_masks(args)
  depth = max(paths.block_number(n) for n in masks_in if paths.block_number(n) is not None) + 1
  common = dict(depth=depth, dim=args.dim, num_heads=args.heads, mlp_ratio=args.mlp_ratio, max_time_steps=T,
                neuron=models.NeuronConfig(init_threshold=0.5),
                mask=models.MaskConfig(monotone=False, mask_stem=args.mask_stem, semantics=args.semantics))
  if args.arch == "vit":
    model = models.vit("Ti", 10, patch_size=args.patch_size, **common)
  else:
    model = models.spikformer("4-384", 10, **common)
  image_shape = (args.image_size, args.image_size, 3)
  variables = models.init(model, jax.random.key(0), image_shape)
  variables = {**variables, "params": set_scores(variables["params"], masks_in)}
  hard = models.hard_masks(model, variables["params"])
  if sorted(hard) != sorted(masks_in) or any(mask_str(hard[k]) != mask_str(v) for k, v in masks_in.items()):
    raise AssertionError(f"hard masks {hard} differ from the pattern {masks_in}")
  counts = models.step_counts(model, variables["params"])
  active = sum(c["active_steps"] for c in counts.values())
  simulated = sum(c["simulated_steps"] for c in counts.values())
  slots = len(counts) * T

  images = jax.random.normal(jax.random.key(1), (args.batch, *image_shape))
  dense_fn = jax.jit(lambda x: inference.dense_masked_eval(model, variables, x))
  fast_fn, schedule = inference.make_inference_fn(model, variables)
  fast_model = inference.scheduled_model(model, schedule)

  # FLOPs of the two programs (the same function bodies the jits compile).
  f_dense = inference.matmul_flops(lambda x: inference.dense_masked_eval(model, variables, x), images)
  f_fast = inference.matmul_flops(lambda x: models.apply_model(fast_model, variables, x, with_aux=False), images)
  ideal = f_fast / f_dense

  t0 = time.perf_counter()
  out_dense = jax.block_until_ready(dense_fn(images))
  t_compile_dense = time.perf_counter() - t0
  t0 = time.perf_counter()
  out_fast = jax.block_until_ready(fast_fn(images))
  t_compile_fast = time.perf_counter() - t0
  max_diff = float(jnp.max(jnp.abs(out_dense - out_fast)))
  for _ in range(args.warmup):
    jax.block_until_ready(dense_fn(images))
    jax.block_until_ready(fast_fn(images))

  fns = {"dense": dense_fn, "scheduled": fast_fn}
  if args.prefix_twin:
    # The twin's masks are prefixes with the scheduled step counts, so that it runs its first steps and they
    # are active (the weights, hence the masks, are constants in the jitted programs: a module run at steps
    # where its mask is 0 could be folded away by the compiler and would not be the same work).
    twin_masks = {k: prefix_mask(len(schedule.get(k, range(T))), T) for k in masks_in}
    twin_vars = {**variables, "params": set_scores(variables["params"], twin_masks)}
    fns["prefix_twin"], twin_schedule = inference.make_inference_fn(model, twin_vars)
    if any(len(twin_schedule.get(k, range(T))) != len(schedule.get(k, range(T))) for k in masks_in):
      raise AssertionError(f"the prefix twin's schedule {twin_schedule} does not match {schedule}")
    twin_model = inference.scheduled_model(model, twin_schedule)
    f_twin = inference.matmul_flops(lambda x: models.apply_model(twin_model, twin_vars, x, with_aux=False), images)
    for _ in range(args.warmup + 1):
      jax.block_until_ready(fns["prefix_twin"](images))
  times = {k: [] for k in fns}
  names = tuple(fns)
  for r in range(args.rounds):
    k = r % len(names)  # rotate the order (with 2 functions: flip it) so drifts in load hit all alike
    order = names[k:] + names[:k]
    for name in order:
      for _ in range(args.calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name](images))
        times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  # The ratio within each round (same load for both sides): its median and range are a rough noise bar.
  c = args.calls
  per_round = [statistics.median(times["scheduled"][i * c:(i + 1) * c]) /
               statistics.median(times["dense"][i * c:(i + 1) * c]) for i in range(args.rounds)]
  measured = med["scheduled"] / med["dense"]
  dev = measured / ideal - 1

  label = case_label(args)
  print(f"== {label}")
  print(f"model: {args.arch} depth={depth} dim={args.dim} heads={args.heads} mlp_ratio={args.mlp_ratio} T={T} "
        f"image={args.image_size} batch={args.batch} mask_stem={args.mask_stem} semantics={args.semantics}")
  print("masks: " + ", ".join(f"{k}={mask_str(v)}" for k, v in sorted(masks_in.items())))
  print("schedule (steps each masked module runs; all T_max when not listed): " +
        ", ".join(f"{k}={v}" for k, v in sorted(schedule.items()) if len(v) < T))
  print(f"step_counts: active {active:.0f} / {slots}, simulated {simulated:.0f} / {slots} "
        f"(simulated-steps ratio {simulated / slots:.3f})")
  print(f"max |logits dense - scheduled| = {max_diff:.3g}")
  print(f"compile+first call: dense {t_compile_dense:.2f} s, scheduled {t_compile_fast:.2f} s")
  print(f"median per call over {args.rounds} alternating rounds x {c} calls: "
        f"dense {med['dense'] * 1e3:.1f} ms, scheduled {med['scheduled'] * 1e3:.1f} ms")
  print(f"ideal ratio (matmul FLOPs incl. {'head' if args.mask_stem else 'unmasked stem and head'}): "
        f"{ideal:.3f}  ({f_fast / 1e9:.2f} / {f_dense / 1e9:.2f} GFLOP)")
  print(f"measured time ratio: {measured:.3f}  (per-round median {statistics.median(per_round):.3f}, "
        f"range {min(per_round):.3f}-{max(per_round):.3f}); vs ideal {dev:+.1%} -> "
        f"{'within' if abs(dev) <= TOLERANCE else 'NOT within'} {TOLERANCE:.0%}", flush=True)
  twin = {}
  if args.prefix_twin:
    twin_round = [statistics.median(times["scheduled"][i * c:(i + 1) * c]) /
                  statistics.median(times["prefix_twin"][i * c:(i + 1) * c]) for i in range(args.rounds)]
    twin = {"prefix_twin_ms": med["prefix_twin"] * 1e3, "flops_prefix_twin": f_twin,
            "scheduled_over_prefix_twin": med["scheduled"] / med["prefix_twin"]}
    print(f"prefix twin (same step counts, first steps; {f_twin / 1e9:.2f} GFLOP): {med['prefix_twin'] * 1e3:.1f} ms; "
          f"scheduled / prefix twin {med['scheduled'] / med['prefix_twin']:.3f} (per-round median "
          f"{statistics.median(twin_round):.3f}, range {min(twin_round):.3f}-{max(twin_round):.3f})", flush=True)
  return {"label": label, "arch": args.arch, "batch": args.batch, "mask_stem": args.mask_stem,
          "semantics": args.semantics, "masks": {k: mask_str(v) for k, v in sorted(masks_in.items())},
          "schedule": {k: list(v) for k, v in sorted(schedule.items())},
          "active_steps": active, "simulated_steps": simulated, "unit_steps": slots,
          "simulated_ratio": simulated / slots, "flops_dense": f_dense, "flops_scheduled": f_fast,
          "ideal": ideal, "dense_ms": med["dense"] * 1e3, "scheduled_ms": med["scheduled"] * 1e3,
          "measured": measured, "per_round": per_round, "deviation": dev, "within": abs(dev) <= TOLERANCE,
          "max_diff": max_diff, "rounds": args.rounds, "calls": c,
          "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}, **twin}


def case_label(args) -> str:
  model = "ViT 4x192" if args.arch == "vit" else (
      "Spikformer 4x192, stem masked" if args.mask_stem else "Spikformer 4x192, stem unmasked")
  pattern = f"masks {args.masks}" if args.masks else f"prefix {args.block_steps}"
  if args.mask_stem:
    pattern += f", stem {args.stem_mask or args.stem_steps}"
  return f"{model} | {pattern} | {args.semantics}"


def suite_cases(args) -> list[list[str]]:
  """The standard cases: each model x {monotone prefix, leading/interior zeros} x {skip, filter}."""
  r = [f"--rounds={args.rounds}", f"--calls={args.calls}", f"--warmup={args.warmup}"]
  models_ = [["--arch=vit", "--batch=32"], ["--arch=spikformer", "--batch=16"],
             ["--arch=spikformer", "--batch=16", "--mask_stem"]]
  cases = []
  for m in models_:
    stem = "--mask_stem" in m
    patterns = [["--block_steps=4,3,1,0"] + (["--stem_mask=1100"] if stem else []),
                [f"--masks={INTERIOR}"] + (["--stem_mask=0101"] if stem else [])]
    for pat in patterns:
      for sem in ("skip", "filter"):
        cases.append(m + pat + [f"--semantics={sem}"] + r)
  return cases


def print_table(results: list[dict]) -> None:
  print("\n| case | semantics | masks (blocks; stem) | simulated-steps ratio | dense ms | scheduled ms | "
        "measured ratio | ideal (FLOPs) | measured/ideal - 1 | within 15% | max logit diff |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    m = r["label"].split(" | ")[1]  # the pattern as given: 'prefix 4,3,1,0' or 'masks 0011,...' (+ stem)
    print(f"| {r['label'].split(' | ')[0]} ({r['batch']}) | {r['semantics']} | {m} | {r['simulated_ratio']:.3f} | "
          f"{r['dense_ms']:.1f} | {r['scheduled_ms']:.1f} | {r['measured']:.3f} | {r['ideal']:.3f} | "
          f"{r['deviation']:+.1%} | {'yes' if r['within'] else '**no**'} | {r['max_diff']:.3g} |")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def load_average() -> str:
  try:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "n/a"


def main(argv=None):
  args = parse_args(argv)
  print(f"machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPUs visible, jax {jax.__version__}, "
        f"backend {jax.default_backend()}; load average (1, 5, 15 min) {load_average()}", flush=True)
  if args.suite:
    results = []
    for case in suite_cases(args):
      if args.only and args.only not in case_label(parse_args(case)):
        continue
      results.append(run_case(parse_args(case)))
    print_table(results)
    print(f"load average at the end (1, 5, 15 min): {load_average()}")
  else:
    results = [run_case(args)]
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"jax": jax.__version__, "backend": jax.default_backend(), "cpu": cpu_model(),
                 "cpus": os.cpu_count(), "results": results}, f, indent=1)
  return results


if __name__ == "__main__":
  main()
