r"""Records SpikingJelly 2.0's Spikformer once: the golden fixture tests/spikformer_golden_test.py checks dtvit with.

Run (one command, from the repository root; creates the torch venv first if it is missing):
  bash experiments/benchmarks/setup_torch_venv.sh && \
    experiments/benchmarks/.venv-torch/bin/python experiments/benchmarks/make_golden.py

Writes tests/data/spikformer_sj_golden.npz (and spikformer_sj_golden.json beside it: versions, settings and the
array index, the same JSON as the npz's `meta_json`). Runs on the CPU, single-threaded, float32, deterministic:
running it again with the same torch and SpikingJelly gives the same file contents.

The model is `spikingjelly.activation_based.model.spikformer.Spikformer` with its own defaults for everything but
the sizes (LIFNode tau 2, v_threshold 1 and 0.5 for the attention neuron, hard reset to 0 detached, sigmoid
surrogate alpha 4 on U - Vth, membranes starting at 0; its stem pools the batch-norm output before the neuron;
patch_size 4: 32x32 images, the last two stem stages pooled, 8x8 tokens). Before recording:
- every batch norm's affine weight and bias are drawn at random (gamma ~ U[0.5, 1.5], beta ~ N(0.4, 0.3^2)), so
  a swapped or missed mapping shows and every layer spikes (rates 1-67% per step after the first; the
  attention neuron's 1-9%);
- the running statistics are those of one train-mode pass over a separate calibration batch (momentum None:
  the cumulative average of one batch is that batch's statistics, torch's unbiased variance), so eval mode
  has spikes at every layer.

What the npz holds (torch layouts; the test maps them to dtvit's tree):
  w/<state_dict key>      every parameter and buffer of the model (conv weights [O, I, kh, kw], Conv1d
                          [O, I, 1], Linear [K, C], BN weight/bias/running_mean/running_var; the fused Q/K/V
                          conv and its BN have 3*dim output channels in the order Q, K, V)
  images                  [B, 3, H, W] (NCHW) input images
  cotangent               [B, K] fixed random; the scalar loss is sum(logits * cotangent)
  {eval,train}/logits     [B, K]: the model's [T, B, K] output averaged over time (as dtvit's head)
  {eval,train}/input_grad [B, 3, H, W]: d loss / d images
  {eval,train}/spikes/<neuron>  [T] int64: number of spikes per step (summed over batch and neurons); the fused
                          qkv_lif is split into its Q, K and V thirds (<...>.qkv_lif.q / .k / .v)
  spike_sizes/<neuron>    number of neurons per step (batch included): rate = spikes / size
  meta_json               versions, sizes, settings, seed (a JSON string)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.model.spikformer import Spikformer

ROOT = Path(__file__).resolve().parents[2]
BN_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
DEFAULT_OUT = ROOT / "tests" / "data" / "spikformer_sj_golden.npz"

SETTINGS = dict(T=4, batch=4, image=32, in_channels=3, patch_size=4, dim=64, heads=4, mlp_ratio=4.0, depth=2,
                classes=10, seed=0)


def build(s):
  torch.manual_seed(s["seed"])
  model = Spikformer(T=s["T"], in_channels=s["in_channels"], img_size_h=s["image"], img_size_w=s["image"],
                     patch_size=s["patch_size"], num_classes=s["classes"], embed_dims=s["dim"],
                     num_heads=s["heads"], mlp_ratio=s["mlp_ratio"], depths=s["depth"])
  gen = torch.Generator().manual_seed(s["seed"] + 1)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, BN_TYPES):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
        m.bias.copy_(0.4 + 0.3 * torch.randn(m.bias.shape, generator=gen))
  return model


def calibrate(model, images):
  """Running statistics := those of one train-mode pass over `images` (cumulative average of one batch)."""
  bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
  for m in bns:
    m.reset_running_stats()
    m.momentum = None
  model.train()
  with torch.no_grad():
    model(images)
  functional.reset_net(model)
  for m in bns:
    m.momentum = 0.1  # back to torch's default (SpikingJelly's Spikformer uses it)


def neurons_of(model):
  return [(name, m) for name, m in model.named_modules() if isinstance(m, neuron.BaseNode)]


def record(model, images, cotangent, train: bool, T: int):
  """Logits, input gradient and per-step spike counts of one pass (train: batch statistics; the running
  statistics it updates are restored afterwards, so the eval pass sees the calibrated ones)."""
  saved = {k: v.clone() for k, v in model.state_dict().items()}
  spikes, sizes, hooks = {}, {}, []

  def hook(name):
    def fn(_, __, out):
      out = out.detach()
      assert out.shape[0] == T, (name, out.shape)
      if name.endswith("qkv_lif"):  # [T, B, 3*C, L]: split into its Q, K, V thirds
        for part, chunk in zip("qkv", out.chunk(3, dim=2)):
          spikes[f"{name}.{part}"] = chunk.reshape(T, -1).sum(1).to(torch.int64).numpy()
          sizes[f"{name}.{part}"] = chunk[0].numel()
      else:
        spikes[name] = out.reshape(T, -1).sum(1).to(torch.int64).numpy()
        sizes[name] = out[0].numel()
      assert torch.all((out == 0) | (out == 1)), name
    return fn

  for name, m in neurons_of(model):
    hooks.append(m.register_forward_hook(hook(name)))
  model.train(train)
  x = images.clone().requires_grad_(True)
  logits = model(x).mean(0)  # [T, B, K] -> [B, K]
  (logits * cotangent).sum().backward()
  functional.reset_net(model)
  for h in hooks:
    h.remove()
  model.zero_grad(set_to_none=True)
  model.load_state_dict(saved)
  model.eval()
  return logits.detach().numpy(), x.grad.numpy(), spikes, sizes


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  s = SETTINGS
  model = build(s)
  gen = torch.Generator().manual_seed(s["seed"] + 2)
  shape = (s["batch"], s["in_channels"], s["image"], s["image"])
  calib = torch.randn(shape, generator=gen)
  images = torch.randn(shape, generator=gen)
  cotangent = torch.randn((s["batch"], s["classes"]), generator=gen)
  calibrate(model, calib)

  arrays = {f"w/{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}
  arrays["images"] = images.numpy()
  arrays["cotangent"] = cotangent.numpy()
  summary = {}
  for mode in ("eval", "train"):
    logits, grad, spikes, sizes = record(model, images, cotangent, mode == "train", s["T"])
    arrays[f"{mode}/logits"] = logits
    arrays[f"{mode}/input_grad"] = grad
    for k, v in spikes.items():
      arrays[f"{mode}/spikes/{k}"] = v
    for k, v in sizes.items():
      arrays[f"spike_sizes/{k}"] = np.asarray(v, np.int64)
    summary[mode] = {k: [round(float(c) / sizes[k], 4) for c in v] for k, v in spikes.items()}

  lif = neurons_of(model)[0][1]
  meta = {
      "what": "SpikingJelly 2.0 Spikformer golden outputs for tests/spikformer_golden_test.py",
      "command": "bash experiments/benchmarks/setup_torch_venv.sh && "
                 "experiments/benchmarks/.venv-torch/bin/python experiments/benchmarks/make_golden.py",
      "versions": {"torch": torch.__version__, "spikingjelly": metadata.version("spikingjelly"),
                   "numpy": np.__version__, "python": platform.python_version()},
      "settings": s,
      "neuron": {"class": type(lif).__name__, "tau": float(lif.tau), "v_threshold": float(lif.v_threshold),
                 "attn_v_threshold": float(model.blocks[0].attn.attn_lif.v_threshold),
                 "v_reset": float(lif.v_reset), "detach_reset": bool(lif.detach_reset),
                 "decay_input": bool(lif.decay_input), "surrogate": repr(lif.surrogate_function),
                 "step_mode": lif.step_mode},
      "batch_norm": "affine weight ~ U[0.5, 1.5], bias ~ 0.4 + 0.3 N(0, 1); running stats of one train-mode pass over "
                    "a separate calibration batch (unbiased variance), momentum 0.1 afterwards",
      "loss": "sum(logits.mean over T * cotangent)",
      "spike_rates": summary,
  }
  arrays["meta_json"] = np.asarray(json.dumps(meta))
  args.out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
  total = sum(v.nbytes for v in arrays.values())
  print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB on disk, {total / 1e3:.0f} kB of arrays, "
        f"{len(arrays)} arrays)", file=sys.stderr)
  for mode in ("eval", "train"):
    rates = [r for v in summary[mode].values() for r in v]
    print(f"{mode}: logits {arrays[f'{mode}/logits'][0, :4]}..., spike rates per layer-step in "
          f"[{min(rates):.3f}, {max(rates):.3f}]", file=sys.stderr)


if __name__ == "__main__":
  main()
