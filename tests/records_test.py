"""The committed records under experiments/ hold no path of the machine they ran on."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strings(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _strings(v)
  elif isinstance(tree, list):
    for v in tree:
      yield from _strings(v)
  elif isinstance(tree, str):
    yield tree


def test_no_committed_record_holds_an_absolute_path():
  files = subprocess.run(["git", "ls-files", "experiments"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
  records = [f for f in files if f.endswith(".json")]
  assert len(records) > 50  # the CIFAR-10 sweep's runs, the scan, the benchmarks
  found = {}
  for f in records:
    with open(os.path.join(ROOT, f)) as fh:
      bad = [s for s in _strings(json.load(fh)) if s.startswith(("/", "~")) or f"{os.sep}work{os.sep}" in s
             or ROOT in s]
    if bad:
      found[f] = bad[:3]
  assert not found, found
