r"""What do non-prefix schedules cost? Times one case's scheduled inference with different implementations of
`SpikingModule.take_steps` / `pad_steps` (patched in this process only; dtvit is not modified), next to the dense
masked evaluation and a 'prefix twin' (the same model with prefix masks of the same step counts: its modules run
their first steps, so take/pad are plain slices and a concatenation with zeros; same FLOPs).

Variants (all give the same logits, checked):
- current: dtvit's code: a numpy-index gather x_TB[steps] and a scatter zeros.at[steps].set(y) (slices for prefixes);
- slices: take = concatenation of the contiguous runs' row slices; pad = concatenation of the output's runs and
  zero blocks (no gather, no scatter);
- gather+concat: the current take with the slices' pad (attributes the cost to the pad or the take).

Run (from the repository root):
  PYTHONPATH=. .venv/bin/python experiments/inference_benchmark/take_pad_variants.py --masks=0011,0101,1001,0110
"""

from __future__ import annotations

import argparse
import statistics
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dtvit import inference  # noqa: E402
from dtvit import models  # noqa: E402
from dtvit.models import blocks  # noqa: E402

import benchmark  # noqa: E402

ORIGINAL = {"take": blocks.SpikingModule.take_steps, "pad": blocks.SpikingModule.pad_steps}


def runs_of(steps):
  """Sorted step indices -> contiguous runs [(first, stop), ...]."""
  out = []
  for t in steps:
    if out and out[-1][1] == t:
      out[-1] = (out[-1][0], t + 1)
    else:
      out.append((t, t + 1))
  return out


def take_slices(self, x):
  run = self.run_steps
  if run is None or len(run) == self.num_steps:
    return x
  b = x.shape[0] // self.num_steps
  parts = [x[a * b:e * b] for a, e in runs_of(run)]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def pad_slices(self, y):
  run = self.run_steps
  if run is None or len(run) == self.num_steps:
    return y
  b = y.shape[0] // len(run)
  parts, t, i = [], 0, 0
  for a, e in runs_of(run):
    if a > t:
      parts.append(jnp.zeros(((a - t) * b,) + y.shape[1:], y.dtype))
    parts.append(y[i * b:(i + e - a) * b])
    i += e - a
    t = e
  if t < self.num_steps:
    parts.append(jnp.zeros(((self.num_steps - t) * b,) + y.shape[1:], y.dtype))
  return jnp.concatenate(parts)


VARIANTS = {"current": (ORIGINAL["take"], ORIGINAL["pad"]), "slices": (take_slices, pad_slices),
            "gather+concat": (ORIGINAL["take"], pad_slices)}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--arch", choices=("vit", "spikformer"), default="vit")
  p.add_argument("--masks", default=benchmark.INTERIOR)
  p.add_argument("--mask_stem", action="store_true")
  p.add_argument("--stem_mask", default=None)
  p.add_argument("--semantics", default="skip")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=16)
  p.add_argument("--calls", type=int, default=2)
  p.add_argument("--variants", default="current,slices,gather+concat")
  a = p.parse_args(argv)
  args = benchmark.parse_args([f"--arch={a.arch}", f"--masks={a.masks}", f"--semantics={a.semantics}",
                               f"--batch={a.batch}"] + (["--mask_stem", f"--stem_mask={a.stem_mask}"]
                                                        if a.mask_stem else []))
  T = args.num_steps
  masks_in = benchmark.case_masks(args)
  common = dict(depth=args.depth, dim=args.dim, num_heads=args.heads, mlp_ratio=args.mlp_ratio, max_time_steps=T,
                neuron=models.NeuronConfig(init_threshold=0.5),
                mask=models.MaskConfig(monotone=False, mask_stem=args.mask_stem, semantics=args.semantics))
  model = (models.vit("Ti", 10, patch_size=args.patch_size, **common) if args.arch == "vit"
           else models.spikformer("4-384", 10, **common))
  image_shape = (args.image_size, args.image_size, 3)
  variables = models.init(model, jax.random.key(0), image_shape)
  variables = {**variables, "params": benchmark.set_scores(variables["params"], masks_in)}
  images = jax.random.normal(jax.random.key(1), (args.batch, *image_shape))
  schedule = inference.make_schedule(model, variables["params"])
  print(f"load average {benchmark.load_average()}; {benchmark.case_label(args)}; schedule "
        + ", ".join(f"{k}={v}" for k, v in schedule.items() if len(v) < T), flush=True)

  fns = {"dense": jax.jit(lambda x: inference.dense_masked_eval(model, variables, x))}
  reference = fns["dense"](images)
  for name in a.variants.split(","):
    take, pad = VARIANTS[name]
    blocks.SpikingModule.take_steps, blocks.SpikingModule.pad_steps = take, pad
    try:
      fn, _ = inference.make_inference_fn(model, variables)
      out = jax.block_until_ready(fn(images))  # traced and compiled with this variant
      hlo = fn.lower(images).as_text()
      print(f"  {name}: {hlo.count('stablehlo.gather')} gathers, {hlo.count('stablehlo.scatter')} scatters, "
            f"{hlo.count('stablehlo.concatenate')} concatenations in the program", flush=True)
    finally:
      blocks.SpikingModule.take_steps, blocks.SpikingModule.pad_steps = ORIGINAL["take"], ORIGINAL["pad"]
    diff = float(jnp.max(jnp.abs(out - reference)))
    if diff != 0:
      raise AssertionError(f"variant {name}: logits differ from the dense evaluation by {diff}")
    fns[name] = fn
  twin_masks = {k: benchmark.prefix_mask(len(schedule.get(k, range(T))), T) for k in masks_in}
  twin_vars = {**variables, "params": benchmark.set_scores(variables["params"], twin_masks)}
  fns["prefix twin"], _ = inference.make_inference_fn(model, twin_vars)
  for f in fns.values():
    for _ in range(2):
      jax.block_until_ready(f(images))

  names = tuple(fns)
  times = {k: [] for k in names}
  for r in range(a.rounds):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      for _ in range(a.calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name](images))
        times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  ideal = (inference.matmul_flops(lambda x: models.apply_model(inference.scheduled_model(model, schedule),
                                                              variables, x, with_aux=False), images)
           / inference.matmul_flops(lambda x: inference.dense_masked_eval(model, variables, x), images))
  print(f"median ms per call over {a.rounds} rotating rounds x {a.calls} calls (ideal ratio {ideal:.3f}):")
  for name in names:
    rr = [statistics.median(times[name][i * a.calls:(i + 1) * a.calls]) /
          statistics.median(times["dense"][i * a.calls:(i + 1) * a.calls]) for i in range(a.rounds)]
    print(f"  {name:14s} {med[name] * 1e3:7.1f} ms  / dense {med[name] / med['dense']:.3f} "
          f"(per-round median {statistics.median(rr):.3f})  vs ideal {med[name] / med['dense'] / ideal - 1:+.1%}")
  print(f"load average {benchmark.load_average()}")


if __name__ == "__main__":
  main()
