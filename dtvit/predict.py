"""The classes a trained run sees in image files, with their probabilities.

  python -m dtvit.predict --workdir=workdirs/quickstart digit.png other.png [--top=3] [--phase=ann] [--json]

prints one line per image, `path: name (probability), ...`, best first; a file that cannot be read as an image
gets one `error:` line on stderr and the others their predictions (exit status 1 if any failed). Which phase and
step of the run answer goes to stderr; an unfinished run is refused unless --allow_unfinished. Each file is read
as grey or RGB to match the run's data, then preprocessed as in training (`Loaded.preprocess`: resized to the
model's size, normalised with the run's mean and std from `<workdir>/data_spec.json`). The probabilities are the
softmax of the model's logits: for the SNN, its time-averaged output with the learned (hard) masks.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np


def softmax(logits_BK) -> np.ndarray:
  """float64 softmax over the last axis."""
  z = np.asarray(logits_BK, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def predict_files(run, paths: Sequence[str], *, top: int = 3, batch_size: int = 0) -> list[dict]:
  """[{'path', 'classes': [(name, probability), ...] best first, `top` of them}] for image files, in their
  order, with `run` a `dtvit.load` result; batches of `batch_size` (default the run's eval_batch_size). A file
  that cannot be read or preprocessed as an image gets {'path', 'error': why} instead, and the others go on."""
  from dtvit.data import spec
  if not paths:
    raise ValueError("predict: no image files given.")
  names, channels = run.class_names, run.info.image_shape[-1]
  top = max(1, min(top, len(names)))
  batch_size = batch_size or run.config.eval_batch_size
  rows, images = [], {}
  for i, path in enumerate(paths):
    try:
      images[i] = run.preprocess([spec.read_image(path, channels)])[0]
      rows.append({"path": path})
    except (OSError, ValueError) as e:  # not an image, unreadable, missing
      rows.append({"path": path, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"})
  good = list(images)
  for i in range(0, len(good), batch_size):
    chunk = good[i:i + batch_size]
    probs_BK = softmax(run(np.stack([images[j] for j in chunk])))
    for j, p_K in zip(chunk, probs_BK):
      best = np.argsort(-p_K, kind="stable")[:top]
      rows[j]["classes"] = [(names[k], float(p_K[k])) for k in best]
  return rows


def _define_flags(values) -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "a training run's --workdir", flag_values=values)
  flags.DEFINE_enum("phase", None, ["ann", "snn", "finetune"], "default: the run's latest phase", flag_values=values)
  flags.DEFINE_integer("top", 3, "how many classes to print per image", flag_values=values)
  flags.DEFINE_bool("json", False, "print JSON lines instead of text", flag_values=values)
  flags.DEFINE_bool("allow_unfinished", False, "use a run that has not finished (its latest checkpoint); without it "
                    "such a run is refused", flag_values=values)
  flags.mark_flag_as_required("workdir", flag_values=values)


def main(argv=None) -> None:
  """`python -m dtvit.predict --workdir=W IMG...` with `argv` (without the program; None: sys.argv[1:])."""
  from dtvit import cli
  args, images = cli.parse("dtvit.predict", _define_flags, argv, positional="IMG...",
                           doc="Class names and probabilities of image files (any size; grey or colour) under a "
                           "trained run.")
  if not images:
    print("error: dtvit.predict: give one or more image files after the flags.", file=sys.stderr)
    sys.exit(cli.USAGE_EXIT_STATUS)
  from dtvit import loader
  with loader.user_errors("dtvit.predict"):
    run = loader.load(args.workdir, args.phase, allow_unfinished=args.allow_unfinished)
    print(f"dtvit.predict: {run.source}", file=sys.stderr)
    rows = predict_files(run, images, top=args.top)
  for row in rows:
    if "error" in row:
      print(f"error: dtvit.predict: {row['path']}: {row['error']}", file=sys.stderr)
    elif args.json:
      print(json.dumps(row))
    else:
      print(f"{row['path']}: " + ", ".join(f"{name} ({prob:.3f})" for name, prob in row["classes"]))
  failed = sum("error" in row for row in rows)
  if failed:
    print(f"dtvit.predict: {failed} of {len(rows)} files failed (above); the others have their predictions.",
          file=sys.stderr)
    sys.exit(loader.USER_ERROR_EXIT_STATUS)


if __name__ == "__main__":
  main()
