"""Rewrites run records under experiments/ so that they hold no path of the machine they ran on.

  python -m experiments.records experiments/cifar10_cpu/runs experiments/cifar10_strong

Runs record where they ran: a sweep's table the workdirs it was given, a run trained by an older dtvit its absolute
workdir in summary.json and its twin's absolute path in config.json. Before such records are committed this
rewrites, in every JSON file under the given folders:
- config.json's paths of `workdir.PATH_KEYS` beside the workdir as '{workdir}/..' (what today's dtvit writes);
- summary.json's "workdir" as the workdir's name (what today's dtvit writes);
- any other absolute path inside the repository (or inside another checkout of it: a path through a folder named
  `experiments`) as a path relative to the repository root.
Nothing else in a record changes; files already clean are left untouched.
"""

from __future__ import annotations

import json
import os
import sys

from dtvit import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _relative(value: str) -> str:
  if not os.path.isabs(value):
    return value
  if value == ROOT or value.startswith(ROOT + os.sep):
    return os.path.relpath(value, ROOT)
  marker = f"{os.sep}experiments{os.sep}"
  return value[value.index(marker) + 1:] if marker in value else value


def _walk(tree):
  if isinstance(tree, dict):
    return {k: _walk(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_walk(v) for v in tree]
  if isinstance(tree, str):
    return " ".join(_relative(w) for w in tree.split(" ")) if os.sep in tree else tree
  return tree


def clean(path: str) -> bool:
  """Rewrites one record; True when it changed."""
  with open(path) as f:
    record = json.load(f)
  name, folder = os.path.basename(path), os.path.dirname(os.path.abspath(path))
  new = record
  if name == workdir_lib.CONFIG_FILENAME and isinstance(record, dict):
    new = workdir_lib.relative_paths(record, folder)
  if name == workdir_lib.SUMMARY_FILENAME and isinstance(record, dict) and "workdir" in record:
    new = {**new, "workdir": os.path.basename(folder)}
  new = _walk(new)
  if new == record:
    return False
  workdir_lib.write_json(path, new, sort_keys=name == workdir_lib.CONFIG_FILENAME)
  return True


def main(argv=None) -> int:
  folders = (argv if argv is not None else sys.argv[1:]) or [os.path.join(ROOT, "experiments")]
  changed = 0
  for folder in folders:
    for d, _, names in os.walk(folder):
      if f"{os.sep}checkpoints" in d:
        continue
      for n in names:
        if n.endswith(".json") and clean(os.path.join(d, n)):
          changed += 1
          print(f"rewritten: {os.path.join(d, n)}")
  print(f"{changed} record(s) rewritten")
  return 0


if __name__ == "__main__":
  sys.exit(main())
