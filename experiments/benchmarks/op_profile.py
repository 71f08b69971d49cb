r"""Where each framework's train step spends its time: per-op profiles of dtvit and SpikingJelly, grouped alike.

Run (after `bash experiments/benchmarks/setup_torch_venv.sh`), on a quiet machine, ~2 min:
  .venv/bin/python -m experiments.benchmarks.op_profile            # benchmark model, T = 4
  .venv/bin/python -m experiments.benchmarks.op_profile --T 8 --mask off
  .venv/bin/python -m experiments.benchmarks.op_profile --what infer --size paper   # Spikformer-4-384, batch 64

dtvit: a `jax.profiler` trace of 2 train steps (compiled with `dtvit.compilation`'s options, as dtvit runs
them); each op's duration is joined with its `op_name` in the optimised HLO and grouped by the layer the name
points to. XLA:CPU runs its Eigen convolutions asynchronously on its thread pool: their trace events show the
dispatch only, so the convolutions are timed separately here, layer by layer (forward, input gradient, kernel
gradient at the model's shapes), and on SpikingJelly's side with torch's convolutions at the same shapes.
SpikingJelly: torch.profiler's self CPU time per aten op over 2 steps (`sj_worker.py`'s `profile`), grouped by
op type. Op times are summed over threads on dtvit's side (XLA runs independent ops concurrently) and are
wall times of the calling thread on torch's side (its ops parallelise inside), so compare shares and groups,
and take the step times from benchmark.py.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


import jax

from dtvit import compilation
from experiments.benchmarks import benchmark

_GROUPS = [("neuron (LIF)", r"_lif|neuron"), ("batch norm", r"_bn\b|_bn/|batch_norm|norm"),
           ("max pool", r"pool"), ("attention products", r"products"), ("dense / 1x1", r"dot_general|Dense"),
           ("conv", r"conv|rpe"), ("optimizer", r"adam|optax|update")]


def _group(name: str) -> str:
  for g, pat in _GROUPS:
    if re.search(pat, name):
      return g
  return "other"


def dtvit_profile(args) -> dict:
  """{group: ms per step} of dtvit's train step (op durations from a jax.profiler trace)."""
  variant = "fixed-T" if args.mask == "off" else "fast"
  d = benchmark.make_dtvit(args, args.T, variant=variant, with_infer=args.what == "infer")
  hlo = d[f"{args.what}_compiled"].as_text()
  meta = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]+)\"", line)
    if m:
      meta[m.group(1)] = m.group(2)
  for _ in range(2):
    jax.block_until_ready(d[args.what]())
  tmp = tempfile.mkdtemp()
  try:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(2):
        jax.block_until_ready(d[args.what]())
    trace = json.load(gzip.open(glob.glob(tmp + "/**/*perfetto_trace.json.gz", recursive=True)[0]))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  groups = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in meta:
      name = meta[e["name"]]
      groups[_group(name) + (" backward" if "transpose(" in name else " forward")] += e.get("dur", 0) / 2e3
  return dict(groups)


def _sj_group(op: str) -> str:
  if "convolution" in op:
    return "conv (incl. 1x1 Q/K/V, proj, MLP)" + (" backward" if "backward" in op else " forward")
  if "batch_norm" in op:
    return "batch norm" + (" backward" if "backward" in op else " forward")
  if "max_pool" in op:
    return "max pool"
  if op in ("aten::bmm", "aten::matmul", "aten::mm"):
    return "attention products"
  if "Optimizer" in op or "lerp" in op or "sqrt" in op or "addcdiv" in op:
    return "optimizer"
  return "elementwise (neuron, residuals, casts, copies)"


def sj_profile(args) -> dict:
  w = benchmark.Worker(args.torch_python, "cpu")
  try:
    w(cmd="build", **benchmark.model_cfg(args, args.T))
    r = w(cmd="profile", T=args.T, what=args.what, n=2)
  finally:
    w.close()
  groups = collections.Counter()
  for name, us, _ in r["ops"]:
    groups[_sj_group(name)] += us / 2e3
  return {"groups": dict(groups), "wall_ms": r["wall_s"] / 2 * 1e3,
          "top": [(n, us / 2e3, c // 2) for n, us, c in r["ops"][:15]]}


def conv_shapes(args):
  """(name, N, H, C_in, C_out) of the SPS stem's 3x3 convs that run once per step, at the benchmark's size."""
  n, h, d = args.batch * args.T, args.image, args.dim
  return [("conv1", n, h, d // 8, d // 4), ("conv2", n, h, d // 4, d // 2), ("conv3", n, h // 2, d // 2, d),
          ("rpe", n, h // 4, d, d)]


def jax_conv_times(shapes, reps=7) -> dict:
  dn = ("NHWC", "HWIO", "NHWC")
  out = {}
  for name, n, h, c, d in shapes:
    k = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(k[0], (n, h, h, c)), jax.random.normal(k[1], (3, 3, c, d)) * 0.1
    g = jax.random.normal(k[2], (n, h, h, d))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    fns = {"forward": (lambda x, w, g: conv(x, w)),
           "input grad": (lambda x, w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0]),
           "kernel grad": (lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])}
    out[name] = {}
    for part, fn in fns.items():
      f = compilation.jit(fn)
      jax.block_until_ready(f(x, w, g))
      ts = []
      for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w, g))
        ts.append(time.perf_counter() - t0)
      out[name][part] = min(ts) * 1e3
  return out


_TORCH_CONVS = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
out = {}
for name, n, h, c, d in json.loads(sys.argv[1]):
  x = torch.randn(n, c, h, h, requires_grad=True); conv = torch.nn.Conv2d(c, d, 3, padding=1, bias=False)
  g = torch.randn(n, d, h, h)
  def best(f, reps=7):
    f(); ts = []
    for _ in range(reps):
      t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3
  def fwd():
    with torch.no_grad():
      conv(x)
  def both():
    y = conv(x); y.backward(g)
  f = best(fwd)
  out[name] = {"forward": f, "forward + both gradients": best(both)}
print(json.dumps(out))
"""


def torch_conv_times(args, shapes) -> dict:
  r = subprocess.run([args.torch_python, "-c", _TORCH_CONVS, json.dumps(shapes), str(os.cpu_count())],
                     capture_output=True, text=True, check=True)
  return json.loads(r.stdout)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--T", type=int, default=4)
  p.add_argument("--mask", default="on", choices=("on", "off"), help="dtvit's time-step masks (off: fixed T)")
  p.add_argument("--torch-python", default=str(benchmark.DEFAULT_TORCH_PY))
  p.add_argument("--what", default="train", choices=("train", "infer"))
  p.add_argument("--size", default="benchmark", choices=("benchmark", "paper"),
                 help="the benchmark model (depth 2, dim 128, batch 32) or the paper's (benchmark.PAPER)")
  p.add_argument("--out", default=None, help="also write the results as JSON here")
  a = p.parse_args(argv)
  size = dict(batch=32, dim=128, depth=2, heads=4) if a.size == "benchmark" else dict(benchmark.PAPER)
  args = argparse.Namespace(image=32, classes=10, sj_analog_per_step=False, **size, **vars(a))
  res = {"machine": benchmark.machine_info(), "T": a.T, "mask": a.mask}
  res["dtvit"] = dtvit_profile(args)
  res["sj"] = sj_profile(args)
  shapes = conv_shapes(args)
  res["convs"] = {"dtvit": jax_conv_times(shapes), "sj": torch_conv_times(args, shapes), "shapes": shapes}
  res["machine"]["load_average_end"] = os.getloadavg()

  print(f"CPU: {res['machine']['cpu']}, {res['machine']['cores']} cores; load average "
        f"{res['machine']['load_average_start'][0]:.1f} -> {res['machine']['load_average_end'][0]:.1f}; "
        f"{a.size} model {size}, {a.what} step, T={a.T}, dtvit masks {a.mask}")
  tot = sum(res["dtvit"].values())
  print(f"\ndtvit op time per {a.what} step, summed over threads (convolutions excluded, see below): {tot:.0f} ms")
  for g, ms in sorted(res["dtvit"].items(), key=lambda kv: -kv[1]):
    print(f"  {ms:7.1f} ms  {g}")
  sj = res["sj"]
  print(f"\nSpikingJelly self op time per {a.what} step (step wall {sj['wall_ms']:.0f} ms under the profiler): "
        f"{sum(sj['groups'].values()):.0f} ms")
  for g, ms in sorted(sj["groups"].items(), key=lambda kv: -kv[1]):
    print(f"  {ms:7.1f} ms  {g}")
  print("  top ops:", ", ".join(f"{n} {ms:.1f} ms ({c}x)" for n, ms, c in sj["top"][:10]))
  print("\n3x3 convolutions per step at the model's shapes, best of 7, ms: dtvit forward / input grad / kernel grad "
        "(sum); torch forward, forward + both gradients")
  tj = tt = 0.0
  for name, n, h, c, d in shapes:
    j, t = res["convs"]["dtvit"][name], res["convs"]["sj"][name]
    s = j["forward"] + j["input grad"] + j["kernel grad"]
    tj, tt = tj + s, tt + t["forward + both gradients"]
    print(f"  {name} [{n}, {h}, {h}, {c}] -> {d}: dtvit {j['forward']:.1f} / {j['input grad']:.1f} / "
          f"{j['kernel grad']:.1f} ({s:.1f}); torch {t['forward']:.1f}, {t['forward + both gradients']:.1f}")
  print(f"  all four: dtvit {tj:.1f} ms, torch {tt:.1f} ms")
  if a.out:
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
