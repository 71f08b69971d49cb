"""How much does dtvit's training loop cost on top of its jitted train step? (issue 13, item 3)

  .venv/bin/python experiments/benchmarks/loop_overhead.py               # ~1-2 min on 2 CPU cores
  .venv/bin/python experiments/benchmarks/loop_overhead.py --steps=400 --rounds=3

In one run, alternating, `--rounds` times:
- loop: `python -m dtvit.main` on the quickstart's tiny SNN phase (a fresh workdir each round), steps/s read
  from its TensorBoard `steps_per_s` (each log interval's steps over its seconds; the first interval starts
  after the first, compiling, step), summed over the intervals as total steps / total seconds;
- step: the same config's jitted train step (`steps.make_train_step`, same shardings and donation) in a tight
  loop on one batch already on the device, timed from the second step to a `block_until_ready` after the last;
- step+data: the same tight loop fed by its input pipeline (`train.train_feed`), to separate what the data
  pipeline costs from what the loop itself adds.
Each for both `data.placement`s: 'host' (grain's threads decode and augment on the same CPU cores; the step is
fed normalised images) and 'device' (the train split resident on the device; the host sends record indices and
the step itself gathers, crops and normalises, so its "jitted step alone" includes that work).
Prints them, their ratio (loop / step; 1 = no overhead) per round and the median ratio, and the CPU model.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import jax

from configs import quickstart
from dtvit import compilation, data, energy, events, models, optim, sharding, steps, train
from dtvit import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dtvit.main runs here


def _overrides(num_steps: int, batch_size: int, placement: str) -> list[str]:
  return [f"--config.data.placement={placement}", "--config.phases=snn", f"--config.snn.train_steps={num_steps}",
          f"--config.snn.batch_size={batch_size}",
          f"--config.snn.log_every={num_steps // 4}", f"--config.snn.checkpoint_every={num_steps}",
          "--config.eval_fixed_steps=False", "--config.eval_batch_size=360", "--config.mesh.num_devices=1"]


def _config(num_steps: int, batch_size: int, placement: str):
  c = quickstart.get_config("tiny")
  for flag in _overrides(num_steps, batch_size, placement):
    key, value = flag[len("--config."):].split("=")
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
  return c


def loop_steps_per_s(num_steps: int, batch_size: int, placement: str) -> float:
  workdir = tempfile.mkdtemp(prefix="dtvit_loop_")
  try:
    subprocess.run([sys.executable, "-m", "dtvit.main", "--config=configs/quickstart.py:tiny",
                    f"--workdir={workdir}", *_overrides(num_steps, batch_size, placement)],
                   cwd=ROOT, check=True, capture_output=True)
    steps_N, rate_N = events.read_curves(os.path.join(workdir, "snn"), ("steps_per_s",))["steps_per_s"]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  interval_N = np.diff(np.concatenate([[1], steps_N]))  # the first interval starts after step 1
  return float(interval_N.sum() / (interval_N / rate_N).sum())


def step_steps_per_s(config, num_steps: int, *, with_data: bool = False) -> float:
  pc = config.snn
  info = data.get_info(config.data)
  mesh = sharding.make_mesh(config.mesh.num_devices)
  model = models.phase_model(config.model, info.num_classes, "snn")
  tx, _ = optim.make_optimizer(pc.optimizer, train_steps=pc.train_steps, trainable=("weights", "neuron", "scores"))
  op_weights = energy.module_op_weights(model, counts=energy.op_counts(model, info.image_shape))
  state = state_lib.create_state(model, tx, jax.random.key(0), info.image_shape, mesh)
  state_sharding = sharding.state_shardings(mesh, state)
  # The step dtvit.main runs: with data.placement='device' it gathers, crops and normalises the resident records.
  batches, table = train.train_feed(config, pc, info, mesh, 0)
  step = steps.make_train_step(model, tx, pc, phase="snn", op_weights=op_weights,
                               augment_fn=train.make_augment_fn(config, info))
  batch_sharding = sharding.batch_sharded(mesh)
  if table is not None:
    batch_sharding = {"index": batch_sharding, **{k: sharding.replicated(mesh) for k in table}}
  step_fn = compilation.jit(step, in_shardings=(state_sharding, batch_sharding),
                            out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))

  memo = {}

  def next_batch():  # as the loop: a resident index chunk that serves several steps is sent once
    local = next(batches)
    if memo.get("local") is not local:
      memo.update(local=local, batch={**sharding.global_batch(mesh, {k: v for k, v in local.items() if k in (
          "image", "label", "target", "index")}), **(table or {})})
    return memo["batch"]

  batch = next_batch()
  state, out = step_fn(state, batch)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(num_steps - 1):
    state, out = step_fn(state, next_batch() if with_data else batch)
  jax.block_until_ready((state, out))
  return (num_steps - 1) / (time.perf_counter() - t0)


def _cpu_model() -> str:
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "unknown")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--placements", default="host,device", help="data.placement values to measure")
  args = parser.parse_args()
  print(f"CPU: {_cpu_model()}; jax {jax.__version__}, {jax.devices()[0].platform}; quickstart:tiny SNN, "
        f"batch {args.batch_size}, {args.steps} steps; load average {os.getloadavg()[0]:.1f}")
  ratios = {p: [] for p in args.placements.split(",")}
  for r in range(args.rounds):
    for placement in ratios if r % 2 == 0 else list(ratios)[::-1]:
      config = _config(args.steps, args.batch_size, placement)
      timed = [("loop", lambda: loop_steps_per_s(args.steps, args.batch_size, placement)),
               ("step", lambda: step_steps_per_s(config, args.steps)),
               ("step+data", lambda: step_steps_per_s(config, args.steps, with_data=True))]
      if r % 2:
        timed.reverse()
      rates = {name: fn() for name, fn in timed}
      ratios[placement].append(rates["loop"] / rates["step"])
      print(f"round {r}, data.placement={placement}: dtvit.main {rates['loop']:.1f} steps/s, jitted step alone "
            f"{rates['step']:.1f} steps/s, ratio {ratios[placement][-1]:.3f}; jitted step fed by its input "
            f"pipeline {rates['step+data']:.1f} steps/s, dtvit.main / that {rates['loop'] / rates['step+data']:.3f}",
            flush=True)
  for placement, values in ratios.items():
    print(f"data.placement={placement}: median ratio (dtvit.main / jitted step) {np.median(values):.3f}")
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
