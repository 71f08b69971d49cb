r"""Dense masked inference vs skipped-step inference, timed side by side on one model.

Run (from the repository root):
  .venv/bin/python experiments/inference_benchmark/benchmark.py
  .venv/bin/python experiments/inference_benchmark/benchmark.py --arch=spikformer --mask_stem --stem_steps=2

The model has random weights (the timing does not depend on what was learned, only on the schedule) and a
chosen monotone hard-mask pattern: block i's attn and mlp keep the first `--block_steps[i]` of T steps. The
default (4, 3, 1, 0) with T = 4 keeps 16 of 32 module-steps active: ideal ratio 0.5. Both functions are
jit-compiled, warmed up, then called in alternating rounds (the order flips each round, so drifts in machine
load hit both); the report gives median seconds per call and
- ideal (module-steps): active module-steps / all module-steps, over the masked modules;
- ideal (matmul FLOPs): FLOPs of the skipped program / FLOPs of the dense one, counted from the jaxprs. This
  includes the unmasked parts (stem, unless --mask_stem; head), so it bounds what skipping can achieve;
- measured: median time skipped / median time dense.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dtvit import inference  # noqa: E402
from dtvit import models  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", choices=("vit", "spikformer"), default="vit")
  p.add_argument("--dim", type=int, default=192)
  p.add_argument("--heads", type=int, default=3)
  p.add_argument("--mlp_ratio", type=float, default=4.0)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--patch_size", type=int, default=4, help="ViT patch size")
  p.add_argument("--num_steps", type=int, default=4, help="T_max")
  p.add_argument("--block_steps", type=str, default="4,3,1,0",
                 help="active steps of each block's attn and mlp; the number of entries is the depth")
  p.add_argument("--mask_stem", action="store_true", help="give the stem a mask too")
  p.add_argument("--stem_steps", type=int, default=None, help="the stem's active steps (with --mask_stem)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--calls", type=int, default=2, help="calls per function per round")
  return p.parse_args(argv)


def monotone_scores(active: int, T: int) -> jax.Array:
  return jnp.where(jnp.arange(T) < active, 1.0, -1.0)


def set_scores(params, scores):
  params = jax.tree.map(lambda a: a, params)
  for name, s in scores.items():
    node = params
    for part in name.split("/"):
      node = node[part]
    node["time_mask"]["time_scores"] = s
  return params


def main(argv=None):
  args = parse_args(argv)
  T = args.num_steps
  block_steps = [int(s) for s in args.block_steps.split(",")]
  depth = len(block_steps)
  common = dict(depth=depth, dim=args.dim, num_heads=args.heads, mlp_ratio=args.mlp_ratio, num_steps=T,
                neuron=models.NeuronConfig(init_threshold=0.5),
                mask=models.MaskConfig(monotone=True, mask_stem=args.mask_stem))
  if args.arch == "vit":
    model = models.vit("Ti", 10, patch_size=args.patch_size, **common)
  else:
    model = models.spikformer("4-384", 10, **common)
  image_shape = (args.image_size, args.image_size, 3)
  variables = models.init(model, jax.random.key(0), image_shape)
  scores = {}
  for i, t in enumerate(block_steps):
    scores[f"blocks_{i}/attn"] = scores[f"blocks_{i}/mlp"] = monotone_scores(t, T)
  if args.mask_stem:
    scores["embedding"] = monotone_scores(T if args.stem_steps is None else args.stem_steps, T)
  variables = {**variables, "params": set_scores(variables["params"], scores)}
  masks = models.hard_masks(model, variables["params"])

  images = jax.random.normal(jax.random.key(1), (args.batch, *image_shape))
  dense_fn = jax.jit(lambda x: inference.dense_masked_eval(model, variables, x))
  fast_fn, schedule = inference.make_inference_fn(model, variables)
  fast_model = inference.scheduled_model(model, schedule)

  # FLOPs of the two programs (the same function bodies the jits compile).
  f_dense = inference.matmul_flops(lambda x: inference.dense_masked_eval(model, variables, x), images)
  f_fast = inference.matmul_flops(lambda x: models.apply_model(fast_model, variables, x, with_aux=False), images)
  active = sum(float(jnp.sum(m)) for m in masks.values())
  ideal = active / (len(masks) * T)

  t0 = time.perf_counter()
  out_dense = jax.block_until_ready(dense_fn(images))
  t_compile_dense = time.perf_counter() - t0
  t0 = time.perf_counter()
  out_fast = jax.block_until_ready(fast_fn(images))
  t_compile_fast = time.perf_counter() - t0
  max_diff = float(jnp.max(jnp.abs(out_dense - out_fast)))
  for _ in range(2):  # warm-up
    jax.block_until_ready(dense_fn(images))
    jax.block_until_ready(fast_fn(images))

  times = {"dense": [], "skipped": []}
  fns = {"dense": dense_fn, "skipped": fast_fn}
  for r in range(args.rounds):
    order = ("dense", "skipped") if r % 2 == 0 else ("skipped", "dense")
    for name in order:
      for _ in range(args.calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name](images))
        times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  # Spread: the ratio's range over rounds (per-round medians), a rough noise bar.
  per_round = [statistics.median(times["skipped"][i * args.calls:(i + 1) * args.calls]) /
               statistics.median(times["dense"][i * args.calls:(i + 1) * args.calls]) for i in range(args.rounds)]
  measured = med["skipped"] / med["dense"]

  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, jax {jax.__version__}, "
        f"backend {jax.default_backend()}")
  print(f"model: {args.arch} depth={depth} dim={args.dim} heads={args.heads} mlp_ratio={args.mlp_ratio} "
        f"T={T} image={args.image_size} batch={args.batch} mask_stem={args.mask_stem}")
  print("schedule (T_run per masked module): " + ", ".join(f"{k}={v}" for k, v in sorted(schedule.items())))
  print(f"max |logits dense - skipped| = {max_diff:.3g}")
  print(f"compile+first call: dense {t_compile_dense:.2f} s, skipped {t_compile_fast:.2f} s")
  print(f"median per call over {args.rounds} alternating rounds x {args.calls} calls: "
        f"dense {med['dense'] * 1e3:.1f} ms, skipped {med['skipped'] * 1e3:.1f} ms")
  print(f"ideal ratio (active module-steps {active:.0f} / {len(masks) * T}): {ideal:.3f}")
  print(f"ideal ratio (matmul FLOPs incl. {'head' if args.mask_stem else 'unmasked stem and head'}): "
        f"{f_fast / f_dense:.3f}  ({f_fast / 1e9:.2f} / {f_dense / 1e9:.2f} GFLOP)")
  print(f"measured time ratio: {measured:.3f}  (per-round range {min(per_round):.3f}-{max(per_round):.3f}); "
        f"vs module-step ideal: {measured / ideal - 1:+.1%}, vs FLOP ideal: {measured / (f_fast / f_dense) - 1:+.1%}")
  return {"measured": measured, "ideal": ideal, "flop_ratio": f_fast / f_dense, "max_diff": max_diff}


if __name__ == "__main__":
  main()
