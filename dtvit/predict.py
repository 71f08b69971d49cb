"""The classes a trained run sees in image files, with their probabilities.

  python -m dtvit.predict --workdir=workdirs/quickstart digit.png other.png [--top=3] [--phase=ann] [--json]

prints one line per image, `path: name (probability), ...`, best first. Each file is read as grey or RGB to
match the run's data, then preprocessed as in training (`Loaded.preprocess`: resized to the model's size,
normalised with the run's mean and std from `<workdir>/data_spec.json`). The probabilities are the softmax of
the model's logits: for the SNN, its time-averaged output with the learned (hard) masks.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import numpy as np


def softmax(logits_BK) -> np.ndarray:
  """float64 softmax over the last axis."""
  z = np.asarray(logits_BK, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def predict_files(run, paths: Sequence[str], *, top: int = 3, batch_size: int = 0) -> list[dict]:
  """[{'path', 'classes': [(name, probability), ...] best first, `top` of them}] for image files, with `run` a
  `dtvit.load` result; batches of `batch_size` (default the run's eval_batch_size)."""
  from dtvit.data import spec  # pylint: disable=g-import-not-at-top
  if not paths:
    raise ValueError("predict: no image files given.")
  names, channels = run.class_names, run.info.image_shape[-1]
  top = max(1, min(top, len(names)))
  batch_size = batch_size or run.config.eval_batch_size
  rows = []
  for i in range(0, len(paths), batch_size):
    chunk = list(paths[i:i + batch_size])
    probs_BK = softmax(run(run.preprocess([spec.read_image(p, channels) for p in chunk])))
    for path, p_K in zip(chunk, probs_BK):
      best = np.argsort(-p_K, kind="stable")[:top]
      rows.append({"path": path, "classes": [(names[k], float(p_K[k])) for k in best]})
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m dtvit.predict",
                              description="Class names and probabilities of image files under a trained run.")
  p.add_argument("--workdir", required=True, help="a training run's --workdir")
  p.add_argument("--phase", choices=("ann", "snn", "finetune"), help="default: the run's latest phase")
  p.add_argument("--top", type=int, default=3, help="how many classes to print per image")
  p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
  p.add_argument("images", nargs="+", metavar="IMG", help="image files (any size; grey or colour)")
  args = p.parse_args(argv)
  import dtvit  # pylint: disable=g-import-not-at-top
  for row in predict_files(dtvit.load(args.workdir, args.phase), args.images, top=args.top):
    if args.json:
      print(json.dumps(row))
    else:
      print(f"{row['path']}: " + ", ".join(f"{name} ({prob:.3f})" for name, prob in row["classes"]))


if __name__ == "__main__":
  main()
