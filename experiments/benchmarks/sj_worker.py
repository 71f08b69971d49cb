"""SpikingJelly side of the benchmark: a worker that runs in the PyTorch venv and answers JSON lines.

Started by benchmark.py as `<torch venv>/bin/python sj_worker.py [--device cpu|cuda]`; it reads one JSON command
per line on stdin and writes one JSON reply per line on stdout (everything else it prints goes to stderr).

Commands:
  {"cmd": "info"} -> versions, threads, device.
  {"cmd": "build", "T": 4, "batch": 32, "dim": 128, "depth": 2, "heads": 4, "image": 32, "classes": 10,
   "seed": 0, "analog_once": true} -> builds SpikingJelly's Spikformer, AdamW and a fixed batch; keeps one per
   T (or under "key", which "time" and "memory" then name). With analog_once (the default) the first conv + BN
   runs once per image and is broadcast over T, as in dtvit (`_OnceOverTime`); false: SpikingJelly's own model,
   which runs it on T copies of the image.
  {"cmd": "time", "T": 4, "what": "train" | "infer", "n": 1} -> {"wall": [s...], "cpu": [s...]}.
  {"cmd": "memory", "T": 4, "what": "train" | "infer"} -> peak memory of one step (CPU: peak RSS minus the RSS
   before the step, after one warm-up step and malloc_trim; CUDA: max_memory_allocated minus allocated before).
  {"cmd": "profile", "T": 4, "what": "train", "n": 2} -> torch.profiler's per-op self times of n steps:
   {"ops": [[name, self_us, calls], ...], "wall_s": ...} (op times on the calling thread; intra-op threads are
   inside them).
  {"cmd": "lif", "x": [[...]], "g": [[...]], "threshold": 1.0} -> spikes and dL/dx of a multi-step LIFNode.
  {"cmd": "exit"}
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from spikingjelly.activation_based import functional, neuron, surrogate
from spikingjelly.activation_based.model.spikformer import Spikformer

_MODELS: dict = {}


def _reply(obj) -> None:
  sys.__stdout__.write(json.dumps(obj) + "\n")
  sys.__stdout__.flush()


def _sync(device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def _rss_kb(field: str = "VmRSS") -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


class _OnceOverTime(torch.nn.Module):
  """Runs a stateless module on step 0 of a sequence whose T steps are equal and broadcasts the result over
  T (a view): the analog first conv + BN computed once per image, as dtvit computes it, instead of T times
  on T copies of the image. The same values (batch-norm statistics over T equal copies are those of one copy)
  up to float summation order; the gradient sums over T, as dtvit's does."""

  def __init__(self, inner):
    super().__init__()
    self.inner = inner

  def forward(self, x_seq):
    y = self.inner(x_seq[:1])
    return y.expand(x_seq.shape[0], *y.shape[1:])


def build(cfg, device):
  torch.manual_seed(cfg.get("seed", 0))
  T = cfg["T"]
  model = Spikformer(T=T, in_channels=3, img_size_h=cfg["image"], img_size_w=cfg["image"], patch_size=4,
                     num_classes=cfg["classes"], embed_dims=cfg["dim"], num_heads=cfg["heads"],
                     mlp_ratio=cfg.get("mlp_ratio", 4.0), depths=cfg["depth"]).to(device)
  if cfg.get("analog_once", True):
    first = model.patch_embed.stages[0]
    first.conv_bn = _OnceOverTime(first.conv_bn)
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.06)
  x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], device=device)
  y = torch.arange(cfg["batch"], device=device) % cfg["classes"]

  def train_step():
    model.train()
    opt.zero_grad(set_to_none=True)
    logits = model(x).mean(0)  # [T, B, K] -> time average, as dtvit's head
    loss = F.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    functional.reset_net(model)
    return loss

  def infer_step():
    model.eval()
    with torch.inference_mode():
      logits = model(x).mean(0)
    functional.reset_net(model)
    return logits

  key = cfg.get("key", T)
  _MODELS[key] = {"train": train_step, "infer": infer_step, "params": sum(p.numel() for p in model.parameters())}
  return {"params": _MODELS[key]["params"]}


def time_it(T, what, n, device):
  fn = _MODELS[T][what]
  wall, cpu = [], []
  for _ in range(n):
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return {"wall": wall, "cpu": cpu}


def memory(T, what, device):
  fn = _MODELS[T][what]
  fn()  # warm-up: creates the optimizer state and the allocator's steady state
  _sync(device)
  if device.type == "cuda":
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(device)
    return {"peak_bytes": int(torch.cuda.max_memory_allocated() - before), "method": "cuda max_memory_allocated"}
  _trim()
  before = _rss_kb("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
    f.write("5")
  fn()
  peak = _rss_kb("VmHWM")
  return {"peak_bytes": int((peak - before) * 1024), "method": "peak RSS (VmHWM) - RSS before, after malloc_trim"}


def profile(T, what, n, device):
  from torch.profiler import ProfilerActivity, profile as torch_profile
  fn = _MODELS[T][what]
  fn()
  _sync(device)
  acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
  t0 = time.perf_counter()
  with torch_profile(activities=acts) as prof:
    for _ in range(n):
      fn()
    _sync(device)
  wall = time.perf_counter() - t0
  ops = [[e.key, float(e.self_cpu_time_total), int(e.count)] for e in prof.key_averages()]
  return {"ops": sorted(ops, key=lambda o: -o[1]), "wall_s": wall, "n": n}


def lif(cmd, device):
  x = torch.tensor(cmd["x"], dtype=torch.float32, device=device, requires_grad=True)
  g = torch.tensor(cmd["g"], dtype=torch.float32, device=device)
  node = neuron.LIFNode(tau=2.0, v_threshold=cmd.get("threshold", 1.0), v_reset=0.0, detach_reset=True,
                        surrogate_function=surrogate.Sigmoid(alpha=4.0), step_mode="m").to(device)
  s = node(x)
  s.backward(g)
  return {"spikes": s.detach().cpu().tolist(), "grad": x.grad.cpu().tolist()}


def info(device):
  from importlib import metadata
  return {"torch": torch.__version__, "spikingjelly": metadata.version("spikingjelly"),
          "threads": torch.get_num_threads(), "device": str(device),
          "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
          "python": sys.version.split()[0]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--device", default="cpu")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  device = torch.device(args.device)
  sys.stdout = sys.stderr  # keep the JSON channel clean of library prints
  for line in sys.stdin:
    cmd = json.loads(line)
    try:
      c = cmd["cmd"]
      if c == "exit":
        _reply({"ok": True})
        return
      if c == "info":
        out = info(device)
      elif c == "build":
        out = build(cmd, device)
      elif c == "time":
        out = time_it(cmd.get("key", cmd["T"]), cmd["what"], cmd.get("n", 1), device)
      elif c == "memory":
        out = memory(cmd.get("key", cmd["T"]), cmd["what"], device)
      elif c == "profile":
        out = profile(cmd.get("key", cmd["T"]), cmd["what"], cmd.get("n", 2), device)
      elif c == "lif":
        out = lif(cmd, device)
      else:
        raise ValueError(f"unknown command {c!r}")
      _reply({"ok": True, **out})
    except Exception as e:  # reported to the parent, which raises
      _reply({"ok": False, "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
  main()
