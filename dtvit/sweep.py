"""Sweeps: one config file, many runs, one table.

  python -m dtvit.sweep --config=configs/quickstart.py:tiny --root=workdirs/sweep \
      --grid snn.time_cost=0.05,0.15 --grid model.mask.semantics=skip,filter
  python -m dtvit.sweep --config=experiments/cifar10_cpu/config.py --root=experiments/cifar10_cpu/runs

A point of a sweep is a dict of dotted config overrides (`{"snn.time_cost": 0.05, "model.num_steps": 4}`). A
config file may define its points next to `get_config`, as data (the spirit of big_vision's `get_hyper`):

  from dtvit import sweep
  def get_sweep(arg):
    return sweep.product(sweep.axis("snn.time_cost", [0.01, 0.03]),
                         sweep.axis("model.mask.semantics", ["skip", "filter"]))

`axis`, `product`, `zipped` and `chain` build lists of points; a generator of dicts works too. `--grid key=v1,v2`
adds an axis from the command line (several `--grid` flags: their product, and the product with the file's
points). Values from the command line are converted to the type of their config field.

Each point runs in its own workdir `<root>/<name>`, named by its values in order
(`snn.time_cost=0.05,model.mask.semantics=skip`; characters outside `[A-Za-z0-9._+-]` %-escaped, so
`parse_name` gives the values back), or by its `_name` (`named`) where a sweep has names already. A string
value may say `{root}` for the sweep's root: `"snn.init_from": "{root}/ann/ann/checkpoints"` starts a point from
another point's checkpoint, and the sweep runs that other point first. `<workdir>/sweep_point.json` records
the point's overrides (what `dtvit.report` labels the run with).

A point whose summary.json is complete is skipped (after checking that its recorded config has the point's
values); any other resumes from its last checkpoint. `--parallel N` runs N points at once, each in its own
process (`python -m dtvit.sweep ... --only=NAME`, output in `<root>/<name>.log`); otherwise they run one after
another in this process. Every attempt's wall time goes to `<root>/timings.json`. At the end (and with
`--table_only`): `<root>/sweep.csv`, `sweep.md` and `sweep.json` (one row per point: its swept values, its state,
accuracy, time steps, energy; `read_table` gives them back) and `sweep.png` (accuracy vs simulated steps, one
series per value of the other swept keys).
"""

from __future__ import annotations

import argparse
import ast
import csv
import difflib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import traceback
import urllib.parse
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from dtvit import analysis

NAME_KEY = "_name"
ROOT = "{root}"
RECORD = analysis.SWEEP_RECORD
TABLE_KEYS = ("accuracy", "accuracy_all_steps", "ann_accuracy", "T_max", "T_avg", "T_sim", "T_avg_op", "T_sim_op",
              "energy_ratio", "steps", "train_time_s", "cpu_time_s", "wall_time_s")
_SAFE = "._-+"
_MAX_NAME = 200

# ------------------------------------------------------------------------------------------------------------
# Building sweeps: lists of points (dicts of dotted overrides).


def axis(key: str, values: Iterable[Any]) -> list[dict]:
  """One point per value: axis("snn.time_cost", [0.01, 0.03]) -> [{"snn.time_cost": 0.01}, {...: 0.03}]."""
  values = list(values)
  if not isinstance(key, str) or not key:
    raise ValueError(f"dtvit.sweep: an axis needs a dotted config key, got {key!r}.")
  if not values:
    raise ValueError(f"dtvit.sweep: the axis {key!r} has no values; give at least one.")
  return [{key: v} for v in values]


def _merge(parts: Sequence[Mapping[str, Any]]) -> dict:
  out: dict[str, Any] = {}
  for part in parts:
    for key, value in part.items():
      if key in out and key != NAME_KEY:
        raise ValueError(f"dtvit.sweep: {key!r} is swept twice in one point; combine its values in one axis.")
      out[key] = value
  return out


def product(*sweeps: Iterable[Mapping[str, Any]]) -> list[dict]:
  """Every combination, the last sweep varying fastest: product(axis(a, [1, 2]), axis(b, [3, 4])) -> 4 points."""
  return [_merge(parts) for parts in itertools.product(*(list(s) for s in sweeps))]


def zipped(*sweeps: Iterable[Mapping[str, Any]]) -> list[dict]:
  """The i-th points of each sweep together: zipped(axis(a, [1, 2]), axis(b, [3, 4])) -> {a:1,b:3}, {a:2,b:4}."""
  lists = [list(s) for s in sweeps]
  if len({len(s) for s in lists}) > 1:
    raise ValueError(f"dtvit.sweep: zipped sweeps must have the same length, got {[len(s) for s in lists]}.")
  return [_merge(parts) for parts in zip(*lists)]


def chain(*sweeps: Iterable[Mapping[str, Any]]) -> list[dict]:
  """The points of each sweep in turn (e.g. a baseline run first, then a grid)."""
  return [dict(p) for s in sweeps for p in s]


def named(name: str, point: Mapping[str, Any]) -> dict:
  """The point with the workdir name `name` instead of one made from its values."""
  return {NAME_KEY: name, **point}


# ------------------------------------------------------------------------------------------------------------
# Names: a point's workdir.


def format_value(value: Any) -> str:
  """A value as the command line writes it: 0.03, True, skip, (True, False)."""
  return repr(value) if isinstance(value, (tuple, list)) else str(value)


def point_name(point: Mapping[str, Any]) -> str:
  """The point's workdir name: its `_name`, else `key=value,...` in its order, %-escaped."""
  if NAME_KEY in point:
    name = str(point[NAME_KEY])
  else:
    name = ",".join(f"{urllib.parse.quote(k, safe=_SAFE)}={urllib.parse.quote(format_value(v), safe=_SAFE)}"
                    for k, v in point.items())
  if not name or name in (".", "..") or "/" in name or len(name) > _MAX_NAME:
    raise ValueError(f"dtvit.sweep: {name[:80]!r} cannot name a workdir (empty, a path, or over {_MAX_NAME} "
                     f"characters); give the point a short name with sweep.named(NAME, point).")
  return name


def parse_name(name: str) -> dict[str, str]:
  """The values of a workdir named by `point_name` (as strings): 'a.b=0.1,c=x' -> {'a.b': '0.1', 'c': 'x'}."""
  out = {}
  for part in name.split(","):
    key, sep, value = part.partition("=")
    if not sep or not key:
      raise ValueError(f"dtvit.sweep: {name!r} is not a name made of key=value parts.")
    out[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
  return out


def overrides(point: Mapping[str, Any]) -> dict:
  """The point's config overrides (without its name)."""
  return {k: v for k, v in point.items() if k != NAME_KEY}


# ------------------------------------------------------------------------------------------------------------
# Config overrides.


def _flat_keys(d: Mapping[str, Any], prefix: str = "") -> list[str]:
  keys = []
  for k, v in d.items():
    keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [f"{prefix}{k}"]
  return keys


def _unknown_key(config, key: str) -> ValueError:
  near = difflib.get_close_matches(key, _flat_keys(config.to_dict()), n=1)
  hint = f" Did you mean {near[0]!r}?" if near else " See the config file for its keys."
  return ValueError(f"dtvit.sweep: unknown config key {key!r}.{hint}")


def _parse_string(text: str, field_type: type, key: str) -> Any:
  if field_type is bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0"):
      raise ValueError(f"dtvit.sweep: {key}={text!r}: not a bool; write True or False.")
    return lowered in ("true", "1")
  if field_type in (int, float):
    try:
      return field_type(text)
    except ValueError:
      raise ValueError(f"dtvit.sweep: {key}={text!r}: not a {field_type.__name__} (the type of {key}).") from None
  if field_type in (tuple, list):
    try:
      return tuple(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError):
      raise ValueError(f"dtvit.sweep: {key}={text!r}: not a tuple; write e.g. '(True, False)'.") from None
  return text


def set_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config[key] = value for a dotted key; a string is read as the field's type, a list as a tuple."""
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      raise _unknown_key(config, key)
    node = node[p]
  if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
    raise _unknown_key(config, key)
  field_type = node.get_type(leaf)
  if isinstance(value, str) and field_type is not str:
    value = _parse_string(value, field_type, key)
  elif isinstance(value, list) and field_type is tuple:
    value = tuple(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ValueError(f"dtvit.sweep: {key}={value!r}: {e}") from None


def resolve(value: Any, root: str) -> Any:
  """`{root}` in a string value -> the sweep's root."""
  return value.replace(ROOT, os.path.abspath(root)) if isinstance(value, str) else value


def load_config_module(spec: str):
  """(module, arg) of 'path/to/file.py:arg'."""
  path, _, arg = spec.partition(".py:") if ".py:" in spec else (spec, "", "")
  path = path if path.endswith(".py") else path + ".py"
  if not os.path.isfile(path):
    raise ValueError(f"dtvit.sweep: config file {path} not found; pass --config=path/to/file.py[:arg].")
  module_spec = importlib.util.spec_from_file_location(f"dtvit_sweep_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, arg


def point_config(module, arg: str, point: Mapping[str, Any], root: str) -> ml_collections.ConfigDict:
  """The config of one point: get_config(arg) with the point's overrides, locked."""
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in overrides(point).items():
    set_override(config, key, resolve(value, root))
  config.lock()
  return config


# ------------------------------------------------------------------------------------------------------------
# Expanding a sweep.


def parse_grid(text: str) -> list[dict]:
  """'--grid key=v1,v2' -> axis(key, ['v1', 'v2'])."""
  key, sep, values = text.partition("=")
  parts = [v for v in values.split(",") if v]
  if not sep or not key or not parts:
    raise ValueError(f"dtvit.sweep: --grid {text!r}: write --grid key=value1,value2 (a dotted config key).")
  return axis(key, parts)


def expand(module, arg: str, grids: Sequence[str] = ()) -> list[dict]:
  """The points: the file's `get_sweep(arg)` (if any) times the product of the --grid axes."""
  parts = []
  if hasattr(module, "get_sweep"):
    parts.append(list(module.get_sweep(arg)))
  parts += [parse_grid(g) for g in grids]
  if not parts:
    raise ValueError(f"dtvit.sweep: {module.__file__} defines no get_sweep(arg) and no --grid was given; add "
                     "--grid key=v1,v2 or define get_sweep in the config file.")
  points = product(*parts)
  names = [point_name(p) for p in points]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f"dtvit.sweep: several points share the workdir name(s) {twice}; make their values differ.")
  return points


# ------------------------------------------------------------------------------------------------------------
# State of a point.


def _read_json(path: str, default=None):
  """`workdir.read_json`: a damaged record stops with one line naming it. The sweep's own tables (in the root)
  are rewritten by any rerun, so their fix is to delete them."""
  from dtvit import workdir as workdir_lib  # pylint: disable=g-import-not-at-top  # jax only when needed
  in_root = os.path.basename(path) in ("timings.json", "sweep.json")
  return workdir_lib.read_json(path, default, fix=("delete it (python -m dtvit.sweep writes it anew)"
                                                   if in_root else None))


def _write_json(path: str, obj) -> None:
  from dtvit import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.write_json(path, obj, default=str)


def state(workdir: str) -> str:
  """'done' (summary.json with every phase it lists), 'started' (its config.json, no complete summary: running,
  or stopped and resumable) or 'pending'."""
  summary = _read_json(os.path.join(workdir, "summary.json"))
  if summary and "wall_time_s" in summary and all(p in summary for p in summary.get("phases", ())):
    return "done"
  return "started" if os.path.isfile(os.path.join(workdir, "config.json")) else "pending"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
  return out


def check_finished(workdir: str, point: Mapping[str, Any], config) -> None:
  """A finished point's recorded config must have the point's values (else the root holds another sweep)."""
  saved = flatten(_read_json(os.path.join(workdir, "config.json"), {}))
  wanted = flatten(config.to_dict())
  normal = lambda x: json.loads(json.dumps(x, default=str))
  for key, value in overrides(point).items():
    if isinstance(value, str) and ROOT in value:
      continue   # a path under the root, which may have moved
    if key in saved and normal(saved[key]) != normal(wanted[key]):
      raise ValueError(f"dtvit.sweep: {workdir} holds a finished run with {key}={saved[key]!r}, but the point "
                       f"asks {wanted[key]!r}: this root holds another sweep; pass another --root.")


def write_record(workdir: str, point: Mapping[str, Any], spec: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, RECORD), {"name": point_name(point), "named": NAME_KEY in point,
                                               "config": spec, "overrides": overrides(point)})


def dependencies(points: Sequence[Mapping[str, Any]], root: str) -> dict[str, set[str]]:
  """For each point, the other points whose workdir one of its values points into (run those first)."""
  dirs = {point_name(p): os.path.join(os.path.abspath(root), point_name(p)) for p in points}
  out = {}
  for p in points:
    values = [resolve(v, root) for v in overrides(p).values() if isinstance(v, str) and ROOT in v]
    out[point_name(p)] = {n for n, d in dirs.items() if n != point_name(p)
                          and any(v == d or v.startswith(d + os.sep) for v in values)}
  return out


# ------------------------------------------------------------------------------------------------------------
# Running.


class _Done:
  """A finished attempt (in-process runs), shaped like a Popen."""

  def __init__(self, returncode: int):
    self.returncode = returncode

  def poll(self) -> int:
    return self.returncode


def _run_here(config, workdir: str) -> _Done:
  from dtvit import train  # pylint: disable=g-import-not-at-top  # jax only when training
  try:
    train.run(config, workdir)
  except train.Preempted:
    raise
  except Exception:  # pylint: disable=broad-except  # one failed point must not stop the others
    traceback.print_exc()
    return _Done(1)
  return _Done(0)


def _run_child(argv: Sequence[str], root: str, name: str) -> subprocess.Popen:
  log = open(os.path.join(root, f"{name}.log"), "a")  # pylint: disable=consider-using-with  # the child owns it
  log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} dtvit.sweep point {name}\n")
  log.flush()
  cmd = [sys.executable, "-m", "dtvit.sweep", *argv, f"--only={name}", "--parallel=1", "--child"]
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _add_timing(root: str, name: str, start: float, returncode: int) -> None:
  path = os.path.join(root, "timings.json")
  timings = _read_json(path, {})
  timings.setdefault(name, []).append({"start": start, "seconds": round(time.time() - start, 1),
                                       "returncode": returncode})
  _write_json(path, timings)


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


def swept_keys(points: Sequence[Mapping[str, Any]]) -> list[str]:
  """Every overridden key, in the order the points first name them."""
  return list(dict.fromkeys(k for p in points for k in overrides(p)))


def _point_row(root: str, point: Mapping[str, Any], config, keys: Sequence[str], run_row: dict,
               timings: Mapping[str, list]) -> dict:
  name = point_name(point)
  workdir = os.path.join(root, name)
  flat = flatten(config.to_dict())
  row = {"name": name}
  for key in keys:   # a {root} path as written; a key the point does not set: the config's value
    value = point.get(key)
    row[key] = value if isinstance(value, str) and ROOT in value else flat.get(key)
  row["state"] = state(workdir)
  row.update({k: run_row.get(k) for k in TABLE_KEYS if k in run_row})
  summary = _read_json(os.path.join(workdir, "summary.json"), {}) if row["state"] == "done" else {}
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


def table(root: str, points: Sequence[Mapping[str, Any]], configs: Sequence) -> list[dict]:
  """One row per point: name, the swept values, state, phase, TABLE_KEYS (from each run's summary.json via
  `analysis.run_rows`, and `<root>/timings.json`), workdir."""
  keys = swept_keys(points)
  run_rows = analysis.run_rows([os.path.join(root, point_name(p)) for p in points])
  timings = _read_json(os.path.join(root, "timings.json"), {})
  return [_point_row(root, p, c, keys, r, timings) for p, c, r in zip(points, configs, run_rows)]


def _cell(value: Any) -> str:
  if value is None:
    return "–"
  return format(value, ".4g") if isinstance(value, float) else format_value(value)


def write_table(root: str, rows: Sequence[dict], keys: Sequence[str]) -> dict[str, str]:
  """sweep.csv, sweep.md and sweep.json in root; returns their paths."""
  columns = ["name", *keys, "state", "phase", *TABLE_KEYS]
  paths = {ext: os.path.join(root, f"sweep.{ext}") for ext in ("csv", "md", "json")}
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows([{k: "" if r.get(k) is None else r[k] for k in columns} for r in rows])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r.get(k)) for k in columns) + " |" for r in rows]
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  _write_json(paths["json"], {"keys": list(keys), "columns": columns, "rows": list(rows)})
  return paths


def read_table(root: str) -> dict:
  """`<root>/sweep.json`: {'keys': swept keys, 'columns', 'rows': one dict per point}."""
  path = os.path.join(root, "sweep.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dtvit.sweep: {path} not found; write it with python -m dtvit.sweep "
                            f"--config=FILE.py[:arg] --root={root} --table_only.")
  return _read_json(path)


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
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# The command line.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m dtvit.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  p.add_argument("--root", required=True, help="Directory of the sweep: one workdir per point.")
  p.add_argument("--grid", action="append", default=[], help="key=v1,v2 (repeat: their product).")
  p.add_argument("--parallel", type=int, default=1, help="Points at once, each in its own process.")
  p.add_argument("--only", action="append", default=[], help="Run only this point (repeat for several).")
  p.add_argument("--list", action="store_true", help="List the points and their state; run nothing.")
  p.add_argument("--table_only", action="store_true", help="Only write the table and the plot.")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)   # one point for --parallel
  return p


def _prepare(a) -> tuple[list[dict], list, list[str]]:
  """The points, their configs (every one built now: a bad key fails before any training) and names."""
  if a.parallel < 1:
    raise ValueError(f"dtvit.sweep: --parallel={a.parallel}; give 1 or more.")
  module, arg = load_config_module(a.config)
  points = expand(module, arg, a.grid)
  configs = [point_config(module, arg, p, a.root) for p in points]
  names = [point_name(p) for p in points]
  unknown = [n for n in a.only if n not in names]
  if unknown:
    raise ValueError(f"dtvit.sweep: --only {unknown}: no such point; the points are: {', '.join(names)}.")
  return points, configs, names


def _run(a, points, configs, names) -> dict:
  root = a.root
  os.makedirs(root, exist_ok=True)
  states = {}
  for point, config, name in zip(points, configs, names):
    states[name] = state(os.path.join(root, name))
    if states[name] == "done":
      check_finished(os.path.join(root, name), point, config)
  todo = [n for n in names if states[n] != "done" and (not a.only or n in a.only)]
  for point, name in zip(points, names):
    if not a.child and (states[name] == "done" or name in todo):
      write_record(os.path.join(root, name), point, a.config)
  skipped = [n for n in names if states[n] == "done" and (not a.only or n in a.only)]
  if skipped:
    print(f"[sweep] finished, skipped: {', '.join(skipped)}", flush=True)
  by_name = dict(zip(names, configs))
  argv = [f"--config={a.config}", f"--root={root}", *[f"--grid={g}" for g in a.grid]]
  if a.parallel > 1:
    launch = lambda n: _run_child(argv, root, n)
  else:
    launch = lambda n: _run_here(by_name[n], os.path.join(root, n))
  return run_points(todo, dependencies(points, root), states, launch, root=root, parallel=a.parallel,
                    timings=not a.child)


def main(argv: Sequence[str] | None = None) -> int:
  a = _parser().parse_args(argv)
  try:
    points, configs, names = _prepare(a)
    if a.list:
      for name in names:
        print(f"{state(os.path.join(a.root, name)):8s} {name}")
      return 0
    states = {} if a.table_only else _run(a, points, configs, names)
  except ValueError as e:
    print(e, file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ != "Preempted":
      raise
    print(f"[sweep] preempted: {e}; rerun the same command to resume.", file=sys.stderr)
    return 143
  if not a.child:
    try:
      rows = table(a.root, points, configs)
    except ValueError as e:  # a damaged record
      print(e, file=sys.stderr)
      return 2
    paths = write_table(a.root, rows, swept_keys(points))
    plot(rows, swept_keys(points), os.path.join(a.root, "sweep.png"))
    print(open(paths["md"]).read() + f"[sweep] table: {paths['csv']}, {paths['md']}; plot: "
          f"{os.path.join(a.root, 'sweep.png')}", flush=True)
  bad = sorted(n for n, s in states.items() if s in ("failed", "blocked"))
  if bad:
    print(f"[sweep] not finished: {', '.join(bad)}; rerun the same command to resume.", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
