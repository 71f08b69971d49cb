"""The sweep runner: each point's state, the scheduler (in this process or one subprocess per point), the
attempts' wall times, and the table and plot of a sweep root.

It knows points only by their workdir names (`dtvit.sweep` makes them): `run_points` runs names, `rows`
tabulates them. Files in the root: `timings.json` (every attempt's wall time), `sweep.csv`, `sweep.md`,
`sweep.json` (`read_table`) and `sweep.png`.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Mapping, Sequence

from dtvit import runs_table
from dtvit import config_lib
from dtvit import storage
from dtvit import workdir as workdir_lib

TABLE_KEYS = ("accuracy", "accuracy_all_steps", "ann_accuracy", "T_max", "T_avg", "T_sim", "T_avg_op", "T_sim_op",
              "energy_ratio", "steps", "train_time_s", "cpu_time_s", "wall_time_s")
# How to fix a damaged file of the root (`workdir.read_json`): any rerun writes it anew.
_ROOT_FIX = "delete it (python -m dtvit.sweep writes it anew)"


def state(workdir: str) -> str:
  """'done' (summary.json with every phase it lists), 'started' (its config.json, no complete summary: running,
  or stopped and resumable) or 'pending'."""
  summary = workdir_lib.read_json(storage.join(workdir, "summary.json"))
  if summary and "wall_time_s" in summary and all(p in summary for p in summary.get("phases", ())):
    return "done"
  return "started" if storage.isfile(storage.join(workdir, "config.json")) else "pending"


# ------------------------------------------------------------------------------------------------------------
# Running.


class _Done:
  """A finished attempt (in-process runs), shaped like a Popen."""

  def __init__(self, returncode: int):
    self.returncode = returncode

  def poll(self) -> int:
    return self.returncode


def run_here(config, workdir: str) -> _Done:
  from dtvit import train  # jax only when training
  try:
    train.run(config, workdir)
  except train.Preempted:
    raise
  except Exception:  # one failed point must not stop the others
    traceback.print_exc()
    return _Done(1)
  return _Done(0)


class _Child:
  """A point's subprocess whose log goes to a local temporary file, appended to `<root>/<name>.log` on object
  storage when the process ends (objects cannot be appended to: the log is uploaded whole)."""

  def __init__(self, proc: subprocess.Popen, local: str, remote: str):
    self.proc, self.local, self.remote = proc, local, remote

  def poll(self) -> int | None:
    code = self.proc.poll()
    if code is not None and self.local is not None:
      with open(self.local, "rb") as f:
        new = f.read()
      old = storage.read_bytes(self.remote) if storage.exists(self.remote) else b""
      storage.write_bytes(self.remote, old + new)
      os.unlink(self.local)
      self.local = None
    return code

  @property
  def returncode(self) -> int | None:
    return self.proc.returncode


def run_child(argv: Sequence[str], root: str, name: str):
  """Starts `python -m dtvit.sweep ... --only=NAME --child`, its output appended to `<root>/<name>.log`."""
  remote = storage.join(root, f"{name}.log")
  local = None
  if storage.is_url(root):
    fd, local = tempfile.mkstemp(prefix="dtvit-sweep-", suffix=".log")
    os.close(fd)
  log = open(local or remote, "a")  # the child owns it
  log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} dtvit.sweep point {name}\n")
  log.flush()
  cmd = [sys.executable, "-m", "dtvit.sweep", *argv, f"--only={name}", "--parallel=1", "--child"]
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
  log.close()  # the child has its own copy
  return _Child(proc, local, remote) if local else proc


def _add_timing(root: str, name: str, start: float, returncode: int) -> None:
  path = storage.join(root, "timings.json")
  timings = workdir_lib.read_json(path, {}, fix=_ROOT_FIX)
  timings.setdefault(name, []).append({"start": start, "seconds": round(time.time() - start, 1),
                                       "returncode": returncode})
  workdir_lib.write_json(path, timings, default=str)


def _ready(name: str, deps: Mapping[str, set], states: Mapping[str, str], queued: set) -> bool | None:
  """True when every dependency is done; None when one failed or will not run; else False (wait)."""
  if any(states[d] != "done" and d not in queued for d in deps[name]):
    return None
  return all(states[d] == "done" for d in deps[name])


def run_points(todo: Sequence[str], deps: Mapping[str, set], states: dict, launch, *, root: str,
               parallel: int = 1, timings: bool = True) -> dict:
  """Runs the names in `todo` (dependencies first), at most `parallel` at once; `launch(name)` returns an
  object with poll() (None while running) and returncode. `states` maps every point to its state and is
  updated: 'done' | 'failed' | 'blocked' (a point it starts from failed or is not run)."""
  waiting, running = list(todo), {}
  while waiting or running:
    started = False
    for name in list(waiting):
      ready = _ready(name, deps, states, set(waiting) | set(running))
      if ready is None:
        states[name] = "blocked"
        waiting.remove(name)
        print(f"[sweep] {name}: not run: it starts from {sorted(deps[name])}, not done", flush=True)
      elif ready and len(running) < parallel:
        waiting.remove(name)
        started = True
        print(f"[sweep] {name}: running", flush=True)
        running[name] = (time.time(), launch(name))
    for name, (start, proc) in list(running.items()):
      if proc.poll() is not None:
        del running[name]
        if timings:
          _add_timing(root, name, start, proc.returncode)
        states[name] = "done" if proc.returncode == 0 else "failed"
        started = True   # progress: a waiting point may be ready now
        print(f"[sweep] {name}: {states[name]} ({(time.time() - start) / 60:.1f} min)", flush=True)
    if running:
      time.sleep(0.5)
    elif waiting and not started:   # each waits for another: a cycle
      for name in waiting:
        states[name] = "blocked"
      print(f"[sweep] not run, they start from each other: {waiting}", flush=True)
      waiting = []
  return states


# ------------------------------------------------------------------------------------------------------------
# The table and the plot.


def _row(root: str, name: str, swept: Mapping[str, Any], run_row: dict, timings: Mapping[str, list]) -> dict:
  workdir = storage.join(root, name)
  row = {"name": name, **swept, "state": state(workdir)}
  row.update({k: run_row.get(k) for k in TABLE_KEYS if k in run_row})
  summary = workdir_lib.read_json(storage.join(workdir, "summary.json"), {}) if row["state"] == "done" else {}
  phase = run_row.get("phase") or ("ann" if "ann" in summary else None)
  if phase == "ann":   # an ANN-only run: its accuracy is the ANN's
    row["accuracy"] = (summary.get("ann") or {}).get("test_accuracy")
  phase_summary = summary.get(phase) or {}
  row.update(phase=phase, steps=phase_summary.get("steps"), train_time_s=phase_summary.get("train_time_s"),
             cpu_time_s=phase_summary.get("cpu_time_s"))
  attempts = timings.get(name, [])
  row["wall_time_s"] = round(sum(a["seconds"] for a in attempts), 1) if attempts else None
  row["workdir"] = workdir
  return row


def table_rows(root: str, names: Sequence[str], swept: Sequence[Mapping[str, Any]]) -> list[dict]:
  """One row per point (its workdir name, its swept values): name, the swept values, state, phase, TABLE_KEYS
  (from each run's summary.json via `runs_table.run_rows`, and `<root>/timings.json`), workdir."""
  run_rows = runs_table.run_rows([storage.join(root, n) for n in names])
  timings = workdir_lib.read_json(storage.join(root, "timings.json"), {}, fix=_ROOT_FIX)
  return [_row(root, n, s, r, timings) for n, s, r in zip(names, swept, run_rows)]


def _cell(value: Any) -> str:
  if value is None:
    return "–"
  return format(value, ".4g") if isinstance(value, float) else config_lib.format_value(value)


def write_table(root: str, rows: Sequence[dict], keys: Sequence[str]) -> dict[str, str]:
  """sweep.csv, sweep.md and sweep.json in root; returns their paths."""
  columns = ["name", *keys, "state", "phase", *TABLE_KEYS]
  paths = {ext: storage.join(root, f"sweep.{ext}") for ext in ("csv", "md", "json")}
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, columns, extrasaction="ignore")
  writer.writeheader()
  writer.writerows([{k: "" if r.get(k) is None else r[k] for k in columns} for r in rows])
  storage.write_text(paths["csv"], text.getvalue())
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r.get(k)) for k in columns) + " |" for r in rows]
  storage.write_text(paths["md"], "\n".join(lines) + "\n")
  workdir_lib.write_json(paths["json"], {"keys": list(keys), "columns": columns, "rows": list(rows)}, default=str)
  return paths


def read_table(root: str) -> dict:
  """`<root>/sweep.json`: {'keys': swept keys, 'columns', 'rows': one dict per point}."""
  path = storage.join(root, "sweep.json")
  if not storage.isfile(path):
    raise FileNotFoundError(f"dtvit.sweep: {path} not found; write it with python -m dtvit.sweep "
                            f"--config=FILE.py[:arg] --root={root} --table_only.")
  return workdir_lib.read_json(path, fix=_ROOT_FIX)


_MAX_SERIES = 6


def _series(rows: Sequence[dict], keys: Sequence[str]) -> tuple[str | None, dict[str, list[dict]]]:
  """(the key points are annotated with, the finished SNN rows by series). The keys that vary among those
  rows: the first annotates, the others make the series; with more than _MAX_SERIES series, one series of
  points annotated with their names."""
  done = [r for r in rows if r.get("accuracy") is not None and r.get("T_sim") is not None]
  varying = [k for k in keys if len({_cell(r.get(k)) for r in done}) > 1]
  groups: dict[str, list[dict]] = {}
  for r in done:
    groups.setdefault(", ".join(f"{k}={_cell(r.get(k))}" for k in varying[1:]) or "runs", []).append(r)
  if len(groups) > _MAX_SERIES:
    return None, {"runs": done}
  return (varying[0] if varying else None), groups


def plot(rows: Sequence[dict], keys: Sequence[str], path: str) -> None:
  """Accuracy vs simulated steps: one line per value of the other swept keys, each point annotated with the
  first swept key's value (see `_series`); ANN-only runs as dashed lines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  key, groups = _series(rows, keys)
  for label, group in groups.items():
    group = sorted(group, key=lambda r: r["T_sim"])
    line, = ax.plot([r["T_sim"] for r in group], [100 * r["accuracy"] for r in group], "o-" if key else "o",
                    label=label)
    for r in group:
      ax.annotate(_cell(r.get(key)) if key else r["name"], (r["T_sim"], 100 * r["accuracy"]),
                  textcoords="offset points", xytext=(4, -10), fontsize=7, color=line.get_color())
  for r in rows:
    if r.get("phase") == "ann" and r.get("accuracy") is not None:
      ax.axhline(100 * r["accuracy"], ls="--", color="0.4", lw=1, label=f"{r['name']} (ANN)")
  ax.set_xlabel("simulated time steps per masked module (T_sim)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"points annotated with {key}" if key else "points annotated with their names", fontsize=9)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.tight_layout()
  with storage.local_copy(path, ".png") as png:
    fig.savefig(png, dpi=110)
  plt.close(fig)

