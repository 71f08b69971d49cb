"""Sweeps: one config file, many runs, one table.

  python -m dtvit.sweep --config=configs/quickstart.py:tiny --root=workdirs/sweep \
      --grid snn.time_cost=0.05,0.15 --grid model.mask.semantics=skip,filter
  python -m dtvit.sweep --config=experiments/cifar10_cpu/config.py --root=experiments/cifar10_cpu/runs

A point of a sweep is a dict of dotted config overrides (`{"snn.time_cost": 0.05, "model.max_time_steps": 4}`). A
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
`parse_name` gives the values back), or by its `_name` (`named`) where a sweep has names already. Values are
read as `--config.key=value` is by `dtvit.main` (`config_lib.override`: ml_collections' config_flags). A string
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

This module holds the format (building points, their names and configs) and the command line; the runner
(scheduler, subprocesses, table and plot) is `dtvit.sweep_runner`.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
import urllib.parse
from typing import Any, Iterable, Mapping, Sequence

from absl import flags
import ml_collections

from dtvit import runs_table
from dtvit import cli
from dtvit import config_lib
from dtvit import storage
from dtvit import sweep_runner
from dtvit import workdir as workdir_lib

NAME_KEY = "_name"
ROOT = "{root}"
RECORD = runs_table.SWEEP_RECORD
_SAFE = "._-+"
_MAX_NAME = 200
# The one dict flattener and the runner's names that sweep scripts and tests read through this module.
flatten = config_lib.flatten
state, write_table, read_table = sweep_runner.state, sweep_runner.write_table, sweep_runner.read_table

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


def point_name(point: Mapping[str, Any]) -> str:
  """The point's workdir name: its `_name`, else `key=value,...` in its order, %-escaped."""
  if NAME_KEY in point:
    name = str(point[NAME_KEY])
  else:
    name = ",".join(f"{urllib.parse.quote(k, safe=_SAFE)}={urllib.parse.quote(config_lib.format_value(v), safe=_SAFE)}"
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
# Configs.


def resolve(value: Any, root: str) -> Any:
  """`{root}` in a string value -> the sweep's root."""
  return value.replace(ROOT, storage.abspath(root)) if isinstance(value, str) else value


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
  """The config of one point: get_config(arg) with the point's overrides (`config_lib.override`), locked."""
  config = module.get_config(arg) if arg else module.get_config()
  try:
    return config_lib.override(config, {k: resolve(v, root) for k, v in overrides(point).items()})
  except ValueError as e:
    raise ValueError(f"dtvit.sweep: {e}") from None


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


def dependencies(points: Sequence[Mapping[str, Any]], root: str) -> dict[str, set[str]]:
  """For each point, the other points whose workdir one of its values points into (run those first)."""
  dirs = {point_name(p): storage.join(storage.abspath(root), point_name(p)) for p in points}
  out = {}
  for p in points:
    values = [resolve(v, root) for v in overrides(p).values() if isinstance(v, str) and ROOT in v]
    out[point_name(p)] = {n for n, d in dirs.items() if n != point_name(p)
                          and any(v == d or v.startswith(d + "/") for v in values)}
  return out


def swept_keys(points: Sequence[Mapping[str, Any]]) -> list[str]:
  """Every overridden key, in the order the points first name them."""
  return list(dict.fromkeys(k for p in points for k in overrides(p)))


def check_finished(workdir: str, point: Mapping[str, Any], config) -> None:
  """A finished point's recorded config must have the point's values (else the root holds another sweep)."""
  saved = flatten(workdir_lib.read_config(workdir) or {})
  wanted = flatten(config.to_dict())
  normal = lambda x: json.loads(json.dumps(x, default=str))
  for key, value in overrides(point).items():
    if isinstance(value, str) and ROOT in value:
      continue   # a path under the root, which may have moved
    if key in saved and normal(saved[key]) != normal(wanted[key]):
      raise ValueError(f"dtvit.sweep: {workdir} holds a finished run with {key}={saved[key]!r}, but the point "
                       f"asks {wanted[key]!r}: this root holds another sweep; pass another --root.")


def write_record(workdir: str, point: Mapping[str, Any], spec: str) -> None:
  storage.makedirs(workdir)
  workdir_lib.write_json(storage.join(workdir, RECORD), {"name": point_name(point), "named": NAME_KEY in point,
                                                         "config": spec, "overrides": overrides(point)}, default=str)



def table(root: str, points: Sequence[Mapping[str, Any]], configs: Sequence) -> list[dict]:
  """`sweep_runner.table_rows` of the points: a {root} path as written; a key the point does not set: the config's
  value."""
  keys = swept_keys(points)
  swept = []
  for point, config in zip(points, configs):
    flat = flatten(config.to_dict())
    swept.append({k: point[k] if isinstance(point.get(k), str) and ROOT in point[k] else flat.get(k) for k in keys})
  return sweep_runner.table_rows(root, [point_name(p) for p in points], swept)


# ------------------------------------------------------------------------------------------------------------
# The command line.


def _define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string("config", None, "path/to/config.py[:arg]", flag_values=values)
  flags.DEFINE_string("root", None, "Directory of the sweep: one workdir per point.", flag_values=values)
  flags.DEFINE_multi_string("grid", [], "key=v1,v2 (repeat: their product).", flag_values=values)
  flags.DEFINE_integer("parallel", 1, "Points at once, each in its own process.", flag_values=values)
  flags.DEFINE_multi_string("only", [], "Run only this point (repeat for several).", flag_values=values)
  flags.DEFINE_bool("list", False, "List the points and their state; run nothing.", flag_values=values)
  flags.DEFINE_bool("table_only", False, "Only write the table and the plot.", flag_values=values)
  flags.DEFINE_bool("child", False, "Internal: one point of a --parallel sweep, started by it.", flag_values=values)
  flags.mark_flags_as_required(["config", "root"], flag_values=values)


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
  storage.makedirs(root)
  states = {}
  for point, config, name in zip(points, configs, names):
    states[name] = sweep_runner.state(storage.join(root, name))
    if states[name] == "done":
      check_finished(storage.join(root, name), point, config)
  todo = [n for n in names if states[n] != "done" and (not a.only or n in a.only)]
  for point, name in zip(points, names):
    if not a.child and (states[name] == "done" or name in todo):
      write_record(storage.join(root, name), point, a.config)
  skipped = [n for n in names if states[n] == "done" and (not a.only or n in a.only)]
  if skipped:
    print(f"[sweep] finished, skipped: {', '.join(skipped)}", flush=True)
  by_name = dict(zip(names, configs))
  argv = [f"--config={a.config}", f"--root={root}", *[f"--grid={g}" for g in a.grid]]
  if a.parallel > 1:
    launch = lambda n: sweep_runner.run_child(argv, root, n)
  else:
    launch = lambda n: sweep_runner.run_here(by_name[n], storage.join(root, n))
  return sweep_runner.run_points(todo, dependencies(points, root), states, launch, root=root,
                                 parallel=a.parallel, timings=not a.child)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m dtvit.sweep` with `argv` (without the program; None: sys.argv[1:]); returns the exit status."""
  a, _ = cli.parse("dtvit.sweep", _define_flags, argv, doc=__doc__)
  try:
    storage.check(a.root, "--root")  # gs:// without gcsfs: one line naming the install extra, nothing written
    points, configs, names = _prepare(a)
    if a.list:
      for name in names:
        print(f"{sweep_runner.state(storage.join(a.root, name)):8s} {name}")
      return 0
    states = {} if a.table_only else _run(a, points, configs, names)
  except ValueError as e:
    print(e, file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  except Exception as e:
    if type(e).__name__ != "Preempted":
      raise
    print(f"[sweep] preempted: {str(e).rstrip('.')}.", file=sys.stderr)
    return 143
  if not a.child:
    try:
      rows = table(a.root, points, configs)
    except ValueError as e:  # a damaged record
      print(e, file=sys.stderr)
      return 2
    paths = sweep_runner.write_table(a.root, rows, swept_keys(points))
    sweep_runner.plot(rows, swept_keys(points), storage.join(a.root, "sweep.png"))
    print(storage.read_bytes(paths["md"]).decode() + f"[sweep] table: {paths['csv']}, {paths['md']}; plot: "
          f"{storage.join(a.root, 'sweep.png')}", flush=True)
  bad = sorted(n for n, s in states.items() if s in ("failed", "blocked"))
  if bad:
    print(f"[sweep] not finished: {', '.join(bad)}; rerun the same command to resume.", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
