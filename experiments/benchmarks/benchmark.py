r"""dtvit vs SpikingJelly: train-step time, inference time and peak memory of the same Spikformer, side by side.

Run (after `bash experiments/benchmarks/setup_torch_venv.sh`):
  .venv/bin/python experiments/benchmarks/benchmark.py            # full run with the paper-size model, ~15 min
  .venv/bin/python experiments/benchmarks/benchmark.py --curves   # cost curves vs T, batch, width (curves.py)
  .venv/bin/python experiments/benchmarks/benchmark.py --quick    # T in {1, 4}, 2 rounds, a few minutes
Writes experiments/benchmarks/results/<name>.json and the table between the RESULTS markers of
experiments/benchmarks/README.md (`--no-readme` to skip).

Both sides build Spikformer with the SPS stem (4 conv stages D/8..D, max pools after the last two), an RPE conv,
`depth` blocks of spiking self-attention + MLP (ratio 4) and a linear head averaged over time, with the
Spikformer neuron (tau 2, Vth 1 and 0.5 for the attention neuron, hard reset detached, sigmoid surrogate alpha 4),
batch norm everywhere, float32, AdamW. SpikingJelly runs in its own venv as a subprocess (sj_worker.py),
exchanging JSON lines; it idles while dtvit is timed and vice versa. Each round times every configuration once,
the order of the two frameworks alternating between rounds; the tables give medians over rounds (the machine is
shared, so medians of wall time and of process CPU time are both reported).

Memory: dtvit from XLA's buffer assignment, `jit(...).lower(...).compile().memory_analysis()`:
temp + argument + output - alias bytes (argument: params, optimizer state, batch). SpikingJelly: peak RSS of one
step minus the RSS before it (a fresh worker, after a warm-up step and malloc_trim), i.e. without the resident
params and optimizer state (about 8 MB here).

The neuron is `NeuronConfig.preset('spikingjelly')`: SpikingJelly's in every setting, its surrogate acting on
U - Vth included (the variant 'normalized' times dtvit's own convention, U/Vth - 1).
Both pool the stem's batch-norm output before the neuron (conv -> BN -> pool -> LIF), as SpikingJelly's
Spikformer does: dtvit's `stem_pool_first=True`. (dtvit's default is the original Spikformer's conv -> BN -> LIF ->
pool, whose two pooled stem neurons run at 4x the resolution; the variant 'pool-after' times it.)
Both do the same work otherwise: the same model, AdamW (lr 5e-4, weight decay 0.06 on every parameter, betas
0.9/0.999, eps 1e-8 on both sides), the same batch; the analog first conv + BN runs once per image on both sides
(SpikingJelly's own model repeats the image T times and runs it T times; sj_worker.py's `_OnceOverTime` makes it
run once and broadcast, as dtvit's direct encoding does; `--sj-analog-per-step` times SpikingJelly's own).
Differences that remain:
- dtvit carries its time-step masks (a few multiplies per neuron output, masked batch-norm statistics and the
  mask scores' gradients), as in training; SpikingJelly has none. This is work only dtvit does.
- SpikingJelly computes Q, K, V as one 1x1 conv -> BN -> LIF over 3D channels; dtvit as three Dense -> BN -> LIF
  over D (the same FLOPs; one concatenated Q/K/V matmul measured no faster in dtvit and was dropped).
- Memory is measured differently: dtvit's peak counts the step's arguments (params, optimizer state, batch),
  SpikingJelly's excludes the resident params and optimizer state; the XLA temp column is the like-for-like one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dtvit import compilation, models, neuron_spec, neurons  # noqa: E402
from dtvit.models import MaskConfig, NeuronConfig  # noqa: E402

DEFAULT_TORCH_PY = HERE / ".venv-torch" / "bin" / "python"
MB = 1e6
PAPER = dict(depth=4, dim=384, heads=12, batch=64)  # Spikformer-4-384 on CIFAR, the paper's batch size


# ----------------------------------------------------------------------------------------------------------
# dtvit side.


def make_dtvit(args, T: int, *, phase: str = "snn", variant: str = "fast", with_infer: bool = True, **size):
  """Compiled train and inference steps of dtvit's Spikformer for one (T, phase, variant); `size` overrides
  args' batch, dim, depth, heads.

  variant: 'fast' (default kernels), 'ref' (the model's kernels='reference'), 'remat:blocks' (the stem and each
  block recomputed in the backward pass), 'bf16' (model dtype bfloat16),
  'pool-after' (the original Spikformer stem order, neuron before pool; not SpikingJelly's model), or
  'normalized' (dtvit's own surrogate convention, on U/Vth - 1, instead of SpikingJelly's U - Vth), or
  'xla-default' (compiled without `dtvit.compilation`'s CPU options: XLA's default convolutions), or
  'fixed-T' (time-step masks off: every step of every module runs, which is exactly SpikingJelly's work), or
  'xla-lif' (the model's kernels='xla': the neuron recurrence in pure JAX, not `dtvit.cpu_kernels`' kernel).
  """
  args = argparse.Namespace(**{**vars(args), **size})
  neuron_kw = {}
  if variant.startswith("remat:"):
    neuron_kw["remat"] = variant.split(":", 1)[1]
  dtype = jnp.bfloat16 if variant == "bf16" else jnp.float32  # bf16 matmuls and convs, float32 membranes
  model = models.spikformer("2-128", args.classes, depth=args.depth, dim=args.dim, num_heads=args.heads,
                            max_time_steps=T, phase=phase, neuron=NeuronConfig.preset(
                                "spikformer_normalized" if variant == "normalized" else "spikingjelly",
                                **neuron_kw), dtype=dtype,
                            stem_pool_first=variant != "pool-after",
                            mask=MaskConfig(enabled=variant != "fixed-T"),
                            kernels={"ref": "reference", "xla-lif": "xla"}.get(variant, "fused"))
  variables = models.init(model, jax.random.key(0), (args.image, args.image, 3))
  tx = optax.adamw(5e-4, weight_decay=0.06)
  # The train step donates its state: give it its own copy of the arrays the inference step keeps using.
  params = jax.tree.map(jnp.copy, variables["params"])
  state = (params, jax.tree.map(jnp.copy, variables["batch_stats"]), tx.init(params))
  x = jax.random.normal(jax.random.key(1), (args.batch, args.image, args.image, 3), jnp.float32)
  y = jnp.arange(args.batch) % args.classes

  def train_step(state, x, y):
    params, batch_stats, opt_state = state

    def loss_fn(p):
      logits, new_stats = models.apply_model(model, {"params": p, "batch_stats": batch_stats}, x, train=True,
                                             with_aux=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss

  def infer_step(variables, x):
    return models.apply_model(model, variables, x, train=False, with_aux=False)

  t0 = time.perf_counter()
  # dtvit's own jits (`compilation.jit`) pass `compilation.options()`; 'xla-default' times XLA's defaults.
  copts = None if variant == "xla-default" else compilation.options()
  train = jax.jit(train_step, donate_argnums=0, compiler_options=copts).lower(state, x, y).compile()
  infer = jax.jit(infer_step, compiler_options=copts).lower(variables, x).compile() if with_infer else None
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run_train():
    holder["state"], loss = train(holder["state"], x, y)
    return loss

  def run_infer():
    return infer(variables, x)

  return {"train": run_train, "infer": run_infer, "compile_s": compile_s, "train_compiled": train,
          "infer_compiled": infer,
          "memory": {"train": _xla_memory(train), "infer": _xla_memory(infer) if infer else {}}}


def _xla_memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("temp", "argument", "output", "alias")}
  out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
  return out


def time_jax(fn, n: int = 1) -> dict:
  wall, cpu = [], []
  for _ in range(n):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return {"wall": wall, "cpu": cpu}


# ----------------------------------------------------------------------------------------------------------
# SpikingJelly side (a worker process in the torch venv).


class Worker:
  """A sj_worker.py subprocess speaking JSON lines."""

  def __init__(self, python: str, device: str):
    self.proc = subprocess.Popen([python, str(HERE / "sj_worker.py"), "--device", device], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)

  def __call__(self, **cmd):
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"SpikingJelly worker died on {cmd.get('cmd')} (rc={self.proc.poll()})")
    out = json.loads(line)
    if not out.pop("ok"):
      raise RuntimeError(f"SpikingJelly worker: {out['error']}")
    return out

  def close(self):
    with contextlib.suppress(Exception):
      self(cmd="exit")
    self.proc.wait(timeout=30)


def model_cfg(args, T, **size):
  cfg = dict(T=T, batch=args.batch, dim=args.dim, depth=args.depth, heads=args.heads, image=args.image,
             classes=args.classes, seed=0, analog_once=not args.sj_analog_per_step)
  return {**cfg, **size}


# ----------------------------------------------------------------------------------------------------------
# One size, both frameworks: the paper-size model and the cost curves.


def _time_rounds(jobs: dict, out: dict, rounds: int) -> None:
  """Warm-up, then `rounds` rounds of every job, the framework that goes first alternating."""
  for k, fn in jobs.items():
    if k[0] != "sj":  # SpikingJelly's memory measurement ran two steps already
      fn()
  for r in range(rounds):
    for k in sorted(jobs, key=lambda k: (k[0] == "sj") == (r % 2 == 0)):
      t = jobs[k]()
      out[k[0]]["times"][k[1]]["wall"] += t["wall"]
      out[k[0]]["times"][k[1]]["cpu"] += t["cpu"]


def time_point(args, T: int, size: dict, *, rounds: int, variants=("fast",), what=("train",), log=print,
               sequential: bool = False) -> dict:
  """dtvit's `variants` and SpikingJelly (a fresh worker: its memory is measured first) at one model size,
  timed in `rounds` alternating rounds after a warm-up. Returns {side: {"times": {what: {"wall", "cpu"}},
  "memory": {what: {...}}}} with sides 'dtvit' (variant 'fast'), 'dtvit[<variant>]' and 'sj'.

  sequential: time dtvit's rounds first and free its arrays, then start SpikingJelly and time its rounds, so
  that the two never hold memory at once (for sizes where both do not fit; the rounds no longer alternate)."""
  out, jobs = {}, {}
  for v in variants:
    side = "dtvit" if v == "fast" else f"dtvit[{v}]"
    whats = what if v == "fast" else ("train",)  # variants: the train step only
    d = make_dtvit(args, T, variant=v, with_infer="infer" in whats, **size)
    out[side] = {"memory": {w: d["memory"][w] for w in whats}, "compile_s": d["compile_s"]}
    for w in whats:
      jobs[(side, w)] = lambda f=d[w]: time_jax(f)
    log(f"  {side} T={T} {size}: compiled in {d['compile_s']:.0f}s, train peak "
        f"{d['memory']['train'].get('peak', 0) / MB:.0f} MB")
  for side in out:
    out[side]["times"] = {w: {"wall": [], "cpu": []} for w in what}
  if sequential:
    _time_rounds(jobs, out, rounds)
    jobs, d = {}, None  # drops the last references to dtvit's state: its buffers are freed
    gc.collect()
    log(f"  dtvit T={T} {size}: timed; freed before SpikingJelly starts")
  worker = None
  if not args.no_sj:
    worker = Worker(args.torch_python, args.device)
    worker(cmd="build", key="point", **model_cfg(args, T, **size))
    out["sj"] = {"memory": {w: worker(cmd="memory", key="point", T=T, what=w) for w in what}}
    for w in what:
      jobs[("sj", w)] = lambda w=w: worker(cmd="time", key="point", T=T, what=w, n=1)
    log(f"  sj T={T} {size}: train peak {out['sj']['memory']['train']['peak_bytes'] / MB:.0f} MB")
    out["sj"]["times"] = {w: {"wall": [], "cpu": []} for w in what}
  try:
    _time_rounds(jobs, out, rounds)
  finally:
    if worker is not None:
      worker.close()
  return out


def peak_mb(side: dict, what: str = "train") -> float:
  m = side["memory"][what]
  return (m["peak"] if "peak" in m else m["peak_bytes"]) / MB


def point_row(res: dict, what: str = "train", base: str = "dtvit") -> dict:
  """Medians, best rounds and their dtvit/SJ ratios for one `time_point` result."""
  d, sj = res[base]["times"][what], res.get("sj", {}).get("times", {}).get(what)
  row = {f"{base}_s": med(d["wall"]), f"{base}_cpu_s": med(d["cpu"]), f"{base}_min_s": min(d["wall"]),
         f"{base}_peak_MB": peak_mb(res[base], what)}
  if sj:
    row.update(sj_s=med(sj["wall"]), sj_cpu_s=med(sj["cpu"]), sj_min_s=min(sj["wall"]),
               sj_peak_MB=peak_mb(res["sj"], what))
    row.update(ratio=row[f"{base}_s"] / row["sj_s"], cpu_ratio=row[f"{base}_cpu_s"] / row["sj_cpu_s"],
               min_ratio=row[f"{base}_min_s"] / row["sj_min_s"], mem_ratio=row[f"{base}_peak_MB"] / row["sj_peak_MB"])
  return row


# ----------------------------------------------------------------------------------------------------------
# The LIF equivalence check.


def lif_check(worker, *, T=8, n=2000, seed=0) -> dict:
  """Same currents through dtvit's and SpikingJelly's Spikformer LIF (tau 2, hard reset, detached reset,
  sigmoid surrogate 4): the spikes must be identical and the input gradients equal to float32 rounding."""
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(T, n)) * 1.5 + 0.5).astype(np.float32)
  g = rng.normal(size=(T, n)).astype(np.float32)
  out = {}
  for vth in (1.0, 0.5):
    ref = worker(cmd="lif", x=x.tolist(), g=g.tolist(), threshold=vth)
    spec = neuron_spec.NeuronSpec.resolve("spikingjelly_lif", surrogate="sigmoid")
    for fast in (True, False):
      f = lambda x_: neurons.multistep(x_, spec, threshold=vth, fused=fast)
      s, vjp = jax.vjp(f, jnp.asarray(x))
      (dx,) = vjp(jnp.asarray(g))
      s_sj, dx_sj = np.asarray(ref["spikes"], np.float32), np.asarray(ref["grad"], np.float32)
      out[f"vth={vth} {'fast' if fast else 'ref'}"] = {
          "spikes_equal": bool(np.array_equal(np.asarray(s), s_sj)),
          "spike_rate": float(s_sj.mean()),
          "grad_max_abs_diff": float(np.max(np.abs(np.asarray(dx) - dx_sj))),
      }
  # At Vth = 1 the gradients must agree too. At Vth = 0.5 (the attention neuron) they differ by design: dtvit's
  # surrogate acts on U/Vth - 1 (slope alpha/Vth, height 1/Vth), SpikingJelly's on U - Vth.
  out["pass"] = all(v["spikes_equal"] and (v["grad_max_abs_diff"] < 1e-5 or not k.startswith("vth=1.0"))
                    for k, v in out.items())
  return out


# ----------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
  cpu = platform.processor()
  with contextlib.suppress(OSError):
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
  mem = ""
  with contextlib.suppress(OSError, StopIteration):
    mem = f"{int(next(l.split()[1] for l in open('/proc/meminfo') if l.startswith('MemTotal'))) / 2**20:.0f} GiB"
  from importlib import metadata
  return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": metadata.version("jaxlib"), "flax": metadata.version("flax"),
          "optax": metadata.version("optax"), "jax_devices": [str(d) for d in jax.devices()],
          "load_average_start": os.getloadavg()}


def med(xs):
  return float(np.median(xs)) if xs else float("nan")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="T in {1, 4}, 2 rounds")
  p.add_argument("--steps", default=None, help="comma-separated T values (default 1,2,4,8)")
  p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--image", type=int, default=32)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--variants", default=None,
                 help="extra dtvit variants timed at the two largest T: 'ref' (reference ops), "
                      "'remat:blocks', 'bf16', 'pool-after', 'normalized', 'xla-default', 'fixed-T', 'xla-lif' "
                      "(default 'fixed-T,xla-lif,remat:blocks,normalized,xla-default'; none with --quick)")
  p.add_argument("--device", default="cpu", help="torch device for SpikingJelly: cpu | cuda")
  p.add_argument("--torch-python", default=str(DEFAULT_TORCH_PY))
  p.add_argument("--name", default=None, help="results/<name>.json (default: cpu or gpu, with -quick)")
  p.add_argument("--out-dir", default=str(HERE / "results"))
  p.add_argument("--no-readme", action="store_true")
  p.add_argument("--readme", default=str(HERE / "README.md"))
  p.add_argument("--no-sj", action="store_true", help="dtvit only (no torch venv needed)")
  p.add_argument("--render", default=None, help="re-render a results JSON into the README and exit")
  p.add_argument("--paper-steps", default=None,
                 help="T values at which the paper's CIFAR model (Spikformer-4-384, batch 64, 12 heads) is timed "
                      "(default 4; none with --quick)")
  p.add_argument("--paper-rounds", type=int, default=3)
  p.add_argument("--paper-sequential", action="store_true",
                 help="time the paper model's dtvit rounds first and free them before SpikingJelly starts (for "
                      "T where both do not fit in memory at once; the rounds then do not alternate)")
  p.add_argument("--sj-analog-per-step", action="store_true",
                 help="SpikingJelly's own first stage (its analog conv + BN run on T copies of the image); by "
                      "default it runs once per image, as in dtvit")
  p.add_argument("--curves", action="store_true",
                 help="the cost curves instead (curves.py): time and peak memory vs T, batch and width")
  p.add_argument("--curve-sweeps", default="T,batch,width")
  p.add_argument("--curve-rounds", type=int, default=2)
  p.add_argument("--compile-cache", default=None,
                 help="a JAX persistent compilation cache directory (shared by the main run and --curves: the "
                      "same programs compile once; timings are unaffected)")
  args = p.parse_args(argv)
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
  if args.curves:
    import curves
    return curves.run(args, argv if argv is not None else sys.argv[1:])
  if args.render:
    res = json.loads(Path(args.render).read_text())
    name = Path(args.render).stem
    res["summary"] = summarize(res, res["steps"], res["variants"], sorted(res["steps"])[-2:])
    Path(args.render).write_text(json.dumps(res, indent=1))
    table = render(res, name)
    print(table)
    if not args.no_readme:
      write_readme(Path(args.readme), name, table)
    return res
  steps = [int(t) for t in (args.steps or ("1,4" if args.quick else "1,2,4,8")).split(",")]
  rounds = args.rounds or (2 if args.quick else 5)
  default_variants = "" if args.quick else "fixed-T,xla-lif,remat:blocks,normalized,xla-default"
  variants = [v for v in (args.variants if args.variants is not None else default_variants).split(",") if v]
  variant_steps = sorted(steps)[-2:]
  name = args.name or ("gpu" if args.device.startswith("cuda") else "cpu") + ("-quick" if args.quick else "")
  command = " ".join([".venv/bin/python", "experiments/benchmarks/benchmark.py"]
                     + (argv if argv is not None else sys.argv[1:]))
  t_start = time.perf_counter()
  log = lambda *a: print(f"[{time.perf_counter() - t_start:6.0f}s]", *a, flush=True)

  result = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(), "config": {**{k: getattr(args, k) for k in
                                                     ("batch", "dim", "depth", "heads", "image", "classes",
                                                      "device")},
                                                  "sj_analog_once": not args.sj_analog_per_step,
                                                  "paper": PAPER},
            "steps": steps, "rounds": rounds, "variants": variants, "paper_rounds": args.paper_rounds,
            "paper_sequential": args.paper_sequential}
  log("machine", result["machine"])

  worker = None
  if not args.no_sj:
    worker = Worker(args.torch_python, args.device)
    result["machine"]["spikingjelly"] = worker(cmd="info")
    log("peer", result["machine"]["spikingjelly"])
    result["lif_check"] = lif_check(worker)
    log("LIF check", result["lif_check"])

  # Build everything first (compiles are not timed), then time in alternating rounds.
  jobs = {}  # key -> callable returning {"wall": [...], "cpu": [...]}
  mem = {}
  compile_s = {}
  for T in steps:
    d = make_dtvit(args, T)
    compile_s[f"dtvit T={T}"] = d["compile_s"]
    mem[f"dtvit T={T}"] = d["memory"]
    jobs[("dtvit", T, "train")] = (lambda f=d["train"]: time_jax(f))
    jobs[("dtvit", T, "infer")] = (lambda f=d["infer"]: time_jax(f))
    log(f"dtvit T={T}: compiled in {d['compile_s']:.0f}s, train peak {d['memory']['train'].get('peak', 0) / MB:.0f} MB")
    if T in variant_steps:
      for v in variants:
        dv = make_dtvit(args, T, variant=v, with_infer=False)  # variants are timed on the train step only
        compile_s[f"dtvit[{v}] T={T}"] = dv["compile_s"]
        mem[f"dtvit[{v}] T={T}"] = dv["memory"]
        jobs[(f"dtvit[{v}]", T, "train")] = (lambda f=dv["train"]: time_jax(f))
        log(f"dtvit[{v}] T={T}: compiled in {dv['compile_s']:.0f}s, "
            f"train peak {dv['memory']['train'].get('peak', 0) / MB:.0f} MB")
    if worker is not None:
      worker(cmd="build", **model_cfg(args, T))
      for what in ("train", "infer"):
        jobs[("sj", T, what)] = (lambda T=T, what=what: worker(cmd="time", T=T, what=what, n=1))
  ann = make_dtvit(args, 1, phase="ann")
  mem["dtvit ANN"] = ann["memory"]
  jobs[("dtvit-ann", 1, "train")] = (lambda f=ann["train"]: time_jax(f))
  jobs[("dtvit-ann", 1, "infer")] = (lambda f=ann["infer"]: time_jax(f))

  # SpikingJelly's memory, each T in a fresh worker so earlier steps' allocator caches do not hide the peak.
  if worker is not None:
    for T in steps:
      w = Worker(args.torch_python, args.device)
      try:
        w(cmd="build", **model_cfg(args, T))
        mem[f"sj T={T}"] = {what: w(cmd="memory", T=T, what=what) for what in ("train", "infer")}
      finally:
        w.close()
      log(f"SpikingJelly T={T}: train peak {mem[f'sj T={T}']['train']['peak_bytes'] / MB:.0f} MB")

  log(f"warm-up of {len(jobs)} jobs")
  for fn in jobs.values():
    fn()
  times = {k: {"wall": [], "cpu": []} for k in jobs}
  for r in range(rounds):
    # Alternate which framework goes first in each (T, what) pair.
    for T in steps:
      for what in ("train", "infer"):
        keys = [k for k in jobs if k[1] == T and k[2] == what and k[0] != "dtvit-ann"]
        keys.sort(key=lambda k: (k[0] == "sj") == (r % 2 == 0))
        for k in keys:
          out = jobs[k]()
          times[k]["wall"] += out["wall"]
          times[k]["cpu"] += out["cpu"]
    for k in jobs:
      if k[0] == "dtvit-ann":
        out = jobs[k]()
        times[k]["wall"] += out["wall"]
        times[k]["cpu"] += out["cpu"]
    log(f"round {r + 1}/{rounds} done; load average {os.getloadavg()[0]:.1f}")
  if worker is not None:
    worker.close()
  paper_steps = [int(t) for t in (args.paper_steps or ("" if args.quick else "4")).split(",") if t]
  result["paper"] = {}
  for T in paper_steps:
    log(f"paper model T={T}: {PAPER}, {args.paper_rounds} rounds")
    result["paper"][str(T)] = time_point(args, T, PAPER, rounds=args.paper_rounds, what=("train", "infer"),
                                         variants=("fast", "fixed-T") if "fixed-T" in variants else ("fast",),
                                         log=log, sequential=args.paper_sequential)
    log(f"paper model T={T} done; load average {os.getloadavg()[0]:.1f}")

  result["times"] = {f"{k[0]} T={k[1]} {k[2]}": v for k, v in times.items()}
  result["memory"] = mem
  result["compile_s"] = compile_s
  result["machine"]["load_average_end"] = os.getloadavg()
  result["wall_s"] = time.perf_counter() - t_start
  result["summary"] = summarize(result, steps, variants, variant_steps)
  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
  table = render(result, name)
  print(table)
  if not args.no_readme:
    write_readme(Path(args.readme), name, table)
  log(f"wrote {out_dir / (name + '.json')}")
  return result


def summarize(res, steps, variants, variant_steps) -> dict:
  t = res["times"]
  m = res["memory"]
  g = lambda key, kind="wall": med(t[key][kind]) if key in t else float("nan")
  rows = []
  ann_train, ann_infer = g("dtvit-ann T=1 train"), g("dtvit-ann T=1 infer")
  ann_train_cpu = g("dtvit-ann T=1 train", "cpu")
  for T in steps:
    row = {"T": T}
    for what in ("train", "infer"):
      row[f"dtvit_{what}_s"] = g(f"dtvit T={T} {what}")
      row[f"dtvit_{what}_cpu_s"] = g(f"dtvit T={T} {what}", "cpu")
      row[f"sj_{what}_s"] = g(f"sj T={T} {what}")
      row[f"sj_{what}_cpu_s"] = g(f"sj T={T} {what}", "cpu")
      row[f"{what}_ratio"] = row[f"dtvit_{what}_s"] / row[f"sj_{what}_s"]
      # Best round of each side: what each does on a quiet machine (the load hits SpikingJelly harder).
      row[f"dtvit_{what}_min_s"] = min(t.get(f"dtvit T={T} {what}", {"wall": [float("nan")]})["wall"])
      row[f"sj_{what}_min_s"] = min(t.get(f"sj T={T} {what}", {"wall": [float("nan")]})["wall"])
      row[f"{what}_min_ratio"] = row[f"dtvit_{what}_min_s"] / row[f"sj_{what}_min_s"]
      row[f"{what}_cpu_ratio"] = row[f"dtvit_{what}_cpu_s"] / row[f"sj_{what}_cpu_s"]
    row["snn_over_T_ann"] = row["dtvit_train_s"] / (T * ann_train)
    row["snn_over_T_ann_min"] = row["dtvit_train_min_s"] / (T * min(t["dtvit-ann T=1 train"]["wall"]))
    row["snn_over_T_ann_cpu"] = row["dtvit_train_cpu_s"] / (T * ann_train_cpu)
    row["dtvit_train_peak_MB"] = m[f"dtvit T={T}"]["train"]["peak"] / MB
    row["dtvit_train_temp_MB"] = m[f"dtvit T={T}"]["train"]["temp"] / MB
    row["dtvit_infer_peak_MB"] = m[f"dtvit T={T}"]["infer"]["peak"] / MB
    sj = m.get(f"sj T={T}")
    row["sj_train_peak_MB"] = sj["train"]["peak_bytes"] / MB if sj else float("nan")
    row["sj_infer_peak_MB"] = sj["infer"]["peak_bytes"] / MB if sj else float("nan")
    row["train_mem_ratio"] = row["dtvit_train_peak_MB"] / row["sj_train_peak_MB"]
    rows.append(row)
  var_rows = []
  for T in variant_steps:
    base_t, base_c = g(f"dtvit T={T} train"), g(f"dtvit T={T} train", "cpu")
    base_m = m[f"dtvit T={T}"]["train"]["peak"]
    for v in variants:
      key = f"dtvit[{v}] T={T}"
      if key not in m:
        continue
      sj_t = t.get(f"sj T={T} train", {"wall": [float("nan")]})["wall"]
      var_rows.append({"variant": v, "T": T, "train_s": g(f"{key} train"), "train_cpu_s": g(f"{key} train", "cpu"),
                       "vs_sj": g(f"{key} train") / med(sj_t), "vs_sj_cpu": g(f"{key} train", "cpu") / g(
                           f"sj T={T} train", "cpu"), "vs_sj_min": min(t[f"{key} train"]["wall"]) / min(sj_t),
                       "time_vs_default": g(f"{key} train") / base_t,
                       "cpu_vs_default": g(f"{key} train", "cpu") / base_c,
                       "peak_MB": m[key]["train"]["peak"] / MB, "peak_vs_default": m[key]["train"]["peak"] / base_m})
  paper = [{"T": int(T), "train": point_row(pr, "train"), "infer": point_row(pr, "infer"),
            **({"fixed-T": point_row(pr, "train", base="dtvit[fixed-T]")} if "dtvit[fixed-T]" in pr else {})}
           for T, pr in res.get("paper", {}).items()]
  return {"rows": rows, "variants": var_rows, "ann_train_s": ann_train, "ann_infer_s": ann_infer,
          "ann_train_cpu_s": ann_train_cpu, "paper": paper}


def render(res, name) -> str:
  s = res["summary"]
  mi = res["machine"]
  sj = mi.get("spikingjelly", {})
  lines = [f"### {name}: {res['date']}", "",
           f"Command: `{res['command']}` ({res['wall_s'] / 60:.1f} min). Machine: {mi['cpu']}, {mi['cores']} cores, "
           f"{mi['memory']}; load average {mi['load_average_start'][0]:.1f} at start, "
           f"{mi['load_average_end'][0]:.1f} at end (shared machine). JAX devices: {', '.join(mi['jax_devices'])}.",
           f"Versions: Python {mi['python']}, jax {mi['jax']}, jaxlib {mi['jaxlib']}, flax {mi['flax']}, "
           f"optax {mi['optax']}; torch {sj.get('torch', '-')} ({sj.get('threads', '-')} threads, "
           f"{sj.get('device_name', '-')}), spikingjelly {sj.get('spikingjelly', '-')}.",
           f"Model: Spikformer depth {res['config']['depth']}, dim {res['config']['dim']}, "
           f"{res['config']['heads']} heads, {res['config']['image']}x{res['config']['image']} input, batch "
           f"{res['config']['batch']}, float32. Medians of {res['rounds']} alternating rounds.", ""]
  if "lif_check" in res:
    lc = res["lif_check"]
    d = {k: v for k, v in lc.items() if isinstance(v, dict)}
    g1 = max(v["grad_max_abs_diff"] for k, v in d.items() if k.startswith("vth=1.0"))
    g05 = max(v["grad_max_abs_diff"] for k, v in d.items() if k.startswith("vth=0.5"))
    lines += [f"LIF check (one LIF layer, the same currents [8, 2000], dtvit fast and reference paths vs "
              f"SpikingJelly's LIFNode): spikes identical at Vth 1 and 0.5: "
              f"{all(v['spikes_equal'] for v in d.values())}; max |dL/dx| difference {g1:.1e} at Vth 1; "
              f"{g05:.2f} at Vth 0.5, where dtvit's surrogate acts on U/Vth - 1 and SpikingJelly's on U - Vth; "
              f"{'PASS' if lc['pass'] else 'FAIL'}.", ""]
  lines += ["dtvit / SpikingJelly ratios: median wall time, median process CPU time, and best round of each side "
            "(min wall; the fairest on a shared machine). SNN/(T x ANN twin): the same three.", "",
            "| T | train s dtvit / SJ (median) | train ratio: median, CPU, best | infer s dtvit / SJ (median) | "
            "infer ratio: median, CPU, best | SNN/(T x ANN): median, CPU, best | train peak MB dtvit (XLA temp) | "
            "train peak MB SJ | mem ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
  for r in s["rows"]:
    lines.append(f"| {r['T']} | {r['dtvit_train_s']:.2f} / {r['sj_train_s']:.2f} | {r['train_ratio']:.2f}, "
                 f"{r['train_cpu_ratio']:.2f}, **{r['train_min_ratio']:.2f}** | {r['dtvit_infer_s']:.3f} / "
                 f"{r['sj_infer_s']:.3f} | {r['infer_ratio']:.2f}, {r['infer_cpu_ratio']:.2f}, "
                 f"**{r['infer_min_ratio']:.2f}** | {r['snn_over_T_ann']:.2f}, {r['snn_over_T_ann_cpu']:.2f}, "
                 f"**{r['snn_over_T_ann_min']:.2f}** | {r['dtvit_train_peak_MB']:.0f} "
                 f"({r['dtvit_train_temp_MB']:.0f}) | "
                 f"{r['sj_train_peak_MB']:.0f} | **{r['train_mem_ratio']:.2f}** |")
  lines += ["", f"dtvit ANN twin (phase='ann'): train step {s['ann_train_s']:.3f} s "
                f"(CPU {s['ann_train_cpu_s']:.3f} s), "
            f"inference {s['ann_infer_s']:.3f} s."]
  if s["variants"]:
    lines += ["", "| dtvit variant | T | train s | time vs default (wall, CPU) | train vs SJ: median, CPU, best | "
              "train peak MB | peak vs default |",
              "|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for v in s["variants"]:
      lines.append(f"| {v['variant']} | {v['T']} | {v['train_s']:.2f} | {v['time_vs_default']:.2f}, "
                   f"{v['cpu_vs_default']:.2f} | {v.get('vs_sj', nan):.2f}, {v.get('vs_sj_cpu', nan):.2f}, "
                   f"**{v.get('vs_sj_min', nan):.2f}** | {v['peak_MB']:.0f} | {v['peak_vs_default']:.2f} |")
  if s.get("paper"):
    pp = res["config"].get("paper", PAPER)
    lines += ["", f"The paper's CIFAR model: Spikformer-{pp['depth']}-{pp['dim']} ({pp['heads']} heads), batch "
              f"{pp['batch']}, 32x32 input, float32; medians of {res.get('paper_rounds', 3)} "
              + ("rounds, dtvit's all first and freed before SpikingJelly's (`--paper-sequential`)."
                 if res.get("paper_sequential") else "alternating rounds."), "",
              "| T | train s dtvit / SJ (median) | train ratio: median, CPU, best | infer s dtvit / SJ (median) | "
              "infer ratio: median, CPU, best | train peak MB dtvit / SJ | mem ratio |",
              "|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in s["paper"]:
      a, b = r["train"], r["infer"]
      lines.append(f"| {r['T']} | {a['dtvit_s']:.2f} / {a.get('sj_s', nan):.2f} | {a.get('ratio', nan):.2f}, "
                   f"{a.get('cpu_ratio', nan):.2f}, **{a.get('min_ratio', nan):.2f}** | {b['dtvit_s']:.3f} / "
                   f"{b.get('sj_s', nan):.3f} | {b.get('ratio', nan):.2f}, {b.get('cpu_ratio', nan):.2f}, "
                   f"**{b.get('min_ratio', nan):.2f}** | {a['dtvit_peak_MB']:.0f} / {a.get('sj_peak_MB', nan):.0f} | "
                   f"**{a.get('mem_ratio', nan):.2f}** |")
      if "fixed-T" in r:
        f = r["fixed-T"]
        lines.append(f"| {r['T']}, fixed-T | {f['dtvit[fixed-T]_s']:.2f} / {f.get('sj_s', nan):.2f} | "
                     f"{f.get('ratio', nan):.2f}, {f.get('cpu_ratio', nan):.2f}, **{f.get('min_ratio', nan):.2f}** | "
                     f"- | - | {f['dtvit[fixed-T]_peak_MB']:.0f} / {f.get('sj_peak_MB', nan):.0f} | "
                     f"**{f.get('mem_ratio', nan):.2f}** |")
  return "\n".join(lines)


def write_readme(path: Path, name: str, table: str) -> None:
  begin, end = f"<!-- BEGIN RESULTS {name} -->", f"<!-- END RESULTS {name} -->"
  text = path.read_text() if path.exists() else ""
  block = f"{begin}\n{table}\n{end}"
  if begin in text and end in text:
    text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  path.write_text(text)


if __name__ == "__main__":
  main()
