"""Runs the strong CIFAR-10 sweep one point at a time, each SNN run followed by its per-sample exit evaluation.

  python -m experiments.cifar10_strong.run [--root=experiments/cifar10_strong/runs] [--only=NAME ...]

For every point of `config.py`'s `get_sweep` in order: `python -m dtvit.sweep --only=<name>` (skipped when
finished; resumed from its last checkpoint when started), its output appended to `<root>/<name>.log`. After each
finished SNN run: `python -m dtvit.evaluate --workdir=<root>/<name> --early_exit=confidence,entropy` (skipped
when `<name>/early_exit/early_exit.json` exists), which needs the run's final checkpoint. SNN checkpoints stay out
of git, so the exit evaluation follows the run at once, on the machine that trained it; its wall and CPU time
go to `<root>/exit_costs.json`.

SIGTERM or SIGINT is passed on to the running point, which checkpoints at its current step; rerun the same
command to resume. The first point that fails stops the runner (exit 1): its log says why.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import time

from dtvit import sweep
from dtvit import sweep_runner
from dtvit import workdir as workdir_lib
from experiments.cifar10_strong import config as recipe

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "config.py")
ROOT = os.path.join(HERE, "runs")
EXIT_CRITERIA = "confidence,entropy"
EXIT_COSTS = "exit_costs.json"

_child: subprocess.Popen | None = None
_stopping = False


def _forward(signum, frame):
  """SIGTERM is passed on to the running child; SIGINT from a terminal reaches it directly (same group)."""
  del frame
  global _stopping
  _stopping = True
  if signum == signal.SIGTERM and _child is not None and _child.poll() is None:
    _child.send_signal(signum)


def _call(cmd: list[str], log_path: str) -> int:
  """Runs `cmd` with its output appended to `log_path`; the signals this process gets are passed on to it."""
  global _child
  with open(log_path, "a") as log:
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd[2:])}\n")
    log.flush()
    _child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    code = _child.wait()
  _child = None
  return code


def _children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _record_exit_cost(root: str, name: str, wall_s: float, cpu_s: float) -> None:
  """`<root>/exit_costs.json`: the wall and CPU seconds of each run's exit evaluation (all thresholds)."""
  path = os.path.join(root, EXIT_COSTS)
  costs = workdir_lib.read_json(path, {}, fix="delete it (the runner writes it anew)")
  costs[name] = {"wall_time_s": round(wall_s, 1), "cpu_time_s": round(cpu_s, 1)}
  workdir_lib.write_json(path, costs)


def exit_done(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, "early_exit", "early_exit.json"))


def points(config_arg: str = "") -> list[str]:
  return [sweep.point_name(p) for p in recipe.get_sweep(config_arg)]


def run(root: str, only: list[str], config_arg: str = "") -> int:
  names = points(config_arg)
  unknown = [n for n in only if n not in names]
  if unknown:
    print(f"cifar10_strong.run: --only {unknown}: no such point; the points are: {', '.join(names)}.",
          file=sys.stderr)
    return 2
  rel = os.path.relpath(CONFIG)   # recorded in sweep_point.json: no machine path where the repo is the cwd
  config = CONFIG if rel.startswith("..") else rel
  spec = config + (f":{config_arg}" if config_arg else "")
  os.makedirs(root, exist_ok=True)
  for name in names:
    if only and name not in only:
      continue
    workdir = os.path.join(root, name)
    if sweep_runner.state(workdir) != "done":
      print(f"[run] {name}: training (log: {os.path.join(root, name)}.log)", flush=True)
      start = time.time()
      code = _call([sys.executable, "-m", "dtvit.sweep", f"--config={spec}", f"--root={root}", f"--only={name}"],
                   os.path.join(root, f"{name}.log"))
      print(f"[run] {name}: exit {code} after {time.time() - start:.0f} s", flush=True)
      if _stopping or code != 0 or sweep_runner.state(workdir) != "done":
        return 143 if _stopping else 1
    if name != "ann" and not exit_done(workdir):
      print(f"[run] {name}: per-sample exit ({EXIT_CRITERIA})", flush=True)
      start, cpu = time.time(), _children_cpu()
      code = _call([sys.executable, "-m", "dtvit.evaluate", f"--workdir={workdir}",
                    f"--early_exit={EXIT_CRITERIA}"], os.path.join(root, f"{name}.exit.log"))
      if _stopping or code != 0:
        return 143 if _stopping else 1
      _record_exit_cost(root, name, time.time() - start, _children_cpu() - cpu)
  print("[run] every point is trained and evaluated", flush=True)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default=ROOT, help="the sweep's root (default: experiments/cifar10_strong/runs)")
  p.add_argument("--only", action="append", default=[], help="run only this point (repeat for several)")
  p.add_argument("--config_arg", default="", help="config.py's argument (tests: 'smoke,digits')")
  a = p.parse_args(argv)
  signal.signal(signal.SIGTERM, _forward)
  signal.signal(signal.SIGINT, _forward)
  return run(os.path.abspath(a.root), a.only, a.config_arg)


if __name__ == "__main__":
  sys.exit(main())
