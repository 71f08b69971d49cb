"""dtvit.sweep: building sweeps, workdir names, overrides and their errors, the scheduler, finished and
unfinished points, the table, and the report's labels."""

import json
import os
import textwrap

import pytest

from dtvit import runs_table
from dtvit import sweep
from dtvit import sweep_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


def test_axis_product_zipped_chain():
  a, b = sweep.axis("snn.time_cost", [0.01, 0.03]), sweep.axis("model.mask.semantics", ["skip", "filter"])
  assert sweep.product(a, b) == [
      {"snn.time_cost": 0.01, "model.mask.semantics": "skip"},
      {"snn.time_cost": 0.01, "model.mask.semantics": "filter"},
      {"snn.time_cost": 0.03, "model.mask.semantics": "skip"},
      {"snn.time_cost": 0.03, "model.mask.semantics": "filter"}]
  assert sweep.zipped(a, b) == [{"snn.time_cost": 0.01, "model.mask.semantics": "skip"},
                                {"snn.time_cost": 0.03, "model.mask.semantics": "filter"}]
  base = sweep.named("base", {"phases": "ann"})
  assert sweep.chain([base], a) == [base, {"snn.time_cost": 0.01}, {"snn.time_cost": 0.03}]
  # A generator works as well as a list.
  assert sweep.product((p for p in a), sweep.axis("seed", [0])) == [{"snn.time_cost": 0.01, "seed": 0},
                                                                    {"snn.time_cost": 0.03, "seed": 0}]


@pytest.mark.parametrize("build,match", [
    (lambda: sweep.axis("seed", []), "has no values"),
    (lambda: sweep.product(sweep.axis("seed", [0]), sweep.axis("seed", [1])), "'seed' is swept twice"),
    (lambda: sweep.zipped(sweep.axis("seed", [0, 1]), sweep.axis("snn.time_cost", [0.1])), "same length"),
    (lambda: sweep.parse_grid("snn.time_cost"), "--grid key=value1,value2"),
    (lambda: sweep.parse_grid("snn.time_cost="), "--grid key=value1,value2"),
    (lambda: sweep.point_name({"x": "y" * 300}), "over 200 characters"),
])
def test_building_errors(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def _quickstart():
  return sweep.load_config_module(QUICKSTART + ":tiny")


@pytest.mark.parametrize("grid,match", [
    ("snn.time_cst=0.1", r'snn.time_cst: config.snn has no key .time_cst.; did you mean "time_cost"'),
    ("time_cost=0.1", "no top-level 'time_cost'; it is a key of a section: did you mean ann.time_cost"),
    ("snn=0.1", "snn is a section of the config, not a value"),
    ("ann.num_steps=5", "ann.num_steps was renamed: it is now ann.train_steps"),
    ("snn.time_cost=abc", "--config.snn.time_cost=abc: could not convert string to float"),
    ("model.mask.enabled=maybe", "--config.model.mask.enabled=maybe: .*Non-boolean argument"),
    ("model.max_time_steps=2.5", r"--config.model.max_time_steps=2.5: invalid literal for int\(\)"),
])
def test_bad_grid_values_fail_before_training(grid, match):
  module, arg = _quickstart()
  with pytest.raises(ValueError, match=match):
    for point in sweep.expand(module, arg, [grid]):
      sweep.point_config(module, arg, point, "/tmp/root")


def test_expand_grid_and_file(tmp_path):
  module, arg = _quickstart()
  points = sweep.expand(module, arg, ["snn.time_cost=0.05,0.15", "model.mask.semantics=skip,filter"])
  assert [sweep.point_name(p) for p in points] == [
      "snn.time_cost=0.05,model.mask.semantics=skip", "snn.time_cost=0.05,model.mask.semantics=filter",
      "snn.time_cost=0.15,model.mask.semantics=skip", "snn.time_cost=0.15,model.mask.semantics=filter"]
  config = sweep.point_config(module, arg, points[3], str(tmp_path))
  assert (config.snn.time_cost, config.model.mask.semantics) == (0.15, "filter")
  with pytest.raises(ValueError, match="defines no get_sweep"):
    sweep.expand(module, arg, [])
  # A file's get_sweep times the --grid axes; its names must differ.
  path = tmp_path / "with_sweep.py"
  path.write_text(textwrap.dedent(f"""
      import importlib.util
      from dtvit import sweep
      _spec = importlib.util.spec_from_file_location("qs", {QUICKSTART!r})
      qs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(qs)
      get_config = qs.get_config
      def get_sweep(arg):
        return sweep.zipped(sweep.axis("model.max_time_steps", [2, 3]), sweep.axis("snn.time_cost", [0.1, 0.2]))
      """))
  module2, arg2 = sweep.load_config_module(f"{path}:tiny")
  names = [sweep.point_name(p) for p in sweep.expand(module2, arg2, ["seed=0,1"])]
  assert names == ["model.max_time_steps=2,snn.time_cost=0.1,seed=0", "model.max_time_steps=2,snn.time_cost=0.1,seed=1",
                   "model.max_time_steps=3,snn.time_cost=0.2,seed=0", "model.max_time_steps=3,snn.time_cost=0.2,seed=1"]
  with pytest.raises(ValueError, match="share the workdir name"):
    sweep.expand(module2, arg2, ["seed=0,0"])
  with pytest.raises(ValueError, match="config file .*missing.py not found"):
    sweep.load_config_module(str(tmp_path / "missing.py"))


def test_names_round_trip(tmp_path):
  """name -> values -> config gives the config of the point itself, also for values that need escaping."""
  module, arg = _quickstart()
  point = {"snn.time_cost": 0.03, "model.max_time_steps": 4, "model.mask.enabled": False,
           "model.stem_pools": (True, False, False, True), "data.name": "a/b,c=d e"}
  name = sweep.point_name(point)
  assert "/" not in name and name.startswith("snn.time_cost=0.03,model.max_time_steps=4,model.mask.enabled=False,")
  values = sweep.parse_name(name)
  assert values == {"snn.time_cost": "0.03", "model.max_time_steps": "4", "model.mask.enabled": "False",
                    "model.stem_pools": "(True, False, False, True)", "data.name": "a/b,c=d e"}
  direct = sweep.point_config(module, arg, point, str(tmp_path))
  from_name = sweep.point_config(module, arg, values, str(tmp_path))
  assert from_name.to_dict() == direct.to_dict()
  assert direct.model.stem_pools == (True, False, False, True) and direct.model.max_time_steps == 4
  assert sweep.point_name(sweep.named("ann", {"phases": "ann"})) == "ann"
  with pytest.raises(ValueError, match="not a name made of key=value"):
    sweep.parse_name("ann")


class _Proc:
  """A launched point that finishes after `polls` polls with `code`."""

  def __init__(self, log, name, code, polls=1):
    self.log, self.name, self.code, self.polls, self.returncode = log, name, code, polls, None

  def poll(self):
    self.polls -= 1
    if self.polls <= 0:
      self.returncode = self.code
      self.log.append(("end", self.name))
    return self.returncode


def test_scheduler_runs_dependencies_first_and_at_most_n_at_once(tmp_path, monkeypatch):
  monkeypatch.setattr(sweep_runner.time, "sleep", lambda s: None)
  root = str(tmp_path)
  points = [sweep.named("a", {"seed": 0}), sweep.named("b", {"snn.init_from": "{root}/a/ann/checkpoints"}),
            sweep.named("c", {"snn.init_from": "{root}/b/ann/checkpoints"}), sweep.named("d", {"seed": 3}),
            sweep.named("e", {"seed": 4}), sweep.named("f", {"snn.init_from": "{root}/e/ann/checkpoints"})]
  deps = sweep.dependencies(points, root)
  assert deps == {"a": set(), "b": {"a"}, "c": {"b"}, "d": set(), "e": set(), "f": {"e"}}
  log, running = [], []

  def launch(name):
    running.append(name)
    log.append(("start", name))
    return _Proc(log, name, 1 if name == "e" else 0, polls=2)

  states = {n: "pending" for n in "abcdef"}
  sweep_runner.run_points(list("abcdef"), deps, states, launch, root=root, parallel=2)
  assert states == {"a": "done", "b": "done", "c": "done", "d": "done", "e": "failed", "f": "blocked"}
  order = [n for what, n in log if what == "start"]
  assert log.index(("start", "b")) > log.index(("end", "a")) and "f" not in order
  assert log.index(("start", "c")) > log.index(("end", "b"))
  live, most = set(), 0
  for what, n in log:
    live = live | {n} if what == "start" else live - {n}
    most = max(most, len(live))
  assert most == 2
  timings = json.load(open(os.path.join(root, "timings.json")))
  assert {n: [t["returncode"] for t in v] for n, v in timings.items()} == {"a": [0], "b": [0], "c": [0], "d": [0],
                                                                         "e": [1]}
  # A point whose dependency is not done and not run, or a cycle, is blocked, not waited for forever.
  states = {"a": "pending", "b": "pending"}
  sweep_runner.run_points(["b"], {"a": set(), "b": {"a"}}, states, launch, root=root)
  assert states["b"] == "blocked"
  states = {"x": "pending", "y": "pending"}
  sweep_runner.run_points(["x", "y"], {"x": {"y"}, "y": {"x"}}, states, launch, root=root)
  assert states == {"x": "blocked", "y": "blocked"}


def _fake_run(root, name, config, summary, record=None):
  wd = os.path.join(root, name)
  os.makedirs(wd, exist_ok=True)
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(config, f)
  if summary is not None:
    with open(os.path.join(wd, "summary.json"), "w") as f:
      json.dump(summary, f)
  if record is not None:
    with open(os.path.join(wd, runs_table.SWEEP_RECORD), "w") as f:
      json.dump(record, f)
  return wd


def test_state_and_finished_point_of_another_sweep(tmp_path):
  module, arg = _quickstart()
  point = {"snn.time_cost": 0.05}
  config = sweep.point_config(module, arg, point, str(tmp_path))
  wd = _fake_run(str(tmp_path), "p", config.to_dict(), {"phases": ["ann", "snn"], "ann": {}})
  assert sweep.state(wd) == "started"   # a summary without every phase and the wall time is not complete
  _fake_run(str(tmp_path), "p", config.to_dict(), {"phases": ["ann", "snn"], "ann": {}, "snn": {},
                                                   "wall_time_s": 1.0})
  assert sweep.state(wd) == "done" and sweep.state(str(tmp_path / "q")) == "pending"
  sweep.check_finished(wd, point, config)
  other = sweep.point_config(module, arg, {"snn.time_cost": 0.2}, str(tmp_path))
  with pytest.raises(ValueError, match="holds a finished run with snn.time_cost=0.05, but the point asks 0.2"):
    sweep.check_finished(wd, {"snn.time_cost": 0.2}, other)


def test_report_labels_runs_by_their_swept_values(tmp_path):
  root = str(tmp_path)
  rec = lambda name, o, named=False: {"name": name, "named": named, "config": "c.py", "overrides": o}
  a = _fake_run(root, "snn.time_cost=0.01,seed=0", {}, None, rec("x", {"snn.time_cost": 0.01, "seed": 0}))
  b = _fake_run(root, "snn.time_cost=0.03,seed=0", {}, None, rec("y", {"snn.time_cost": 0.03, "seed": 0}))
  c = _fake_run(root, "twin", {}, None, rec("twin", {"phases": "ann"}, named=True))
  assert runs_table.run_names([a, b]) == ["snn.time_cost=0.01", "snn.time_cost=0.03"]   # seed is the same
  assert runs_table.run_names([a, b, c]) == ["snn.time_cost=0.01, seed=0", "snn.time_cost=0.03, seed=0", "twin"]
  plain = _fake_run(root, "other/run", {}, None)
  assert runs_table.run_names([a, plain]) == ["snn.time_cost=0.01,seed=0", "other/run"]   # not all from a sweep


TINY = """
import importlib.util
from dtvit import sweep
_spec = importlib.util.spec_from_file_location("qs", {quickstart!r})
qs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(qs)

def get_config(arg=""):
  c = qs.get_config("tiny")
  c.model.arch, c.model.variant, c.model.patch_size = "vit", "tiny", 2
  c.model.max_time_steps = 2
  c.eval_fixed_steps = False
  c.ann.train_steps, c.snn.train_steps = 4, 3
  c.ann.checkpoint_every = c.snn.checkpoint_every = 2
  c.mesh.num_devices = 1
  return c

def get_sweep(arg):
  return sweep.axis("snn.time_cost", [0.0, 0.2])
"""


@pytest.mark.slow
def test_tiny_sweep_trains_skips_resumes_and_tabulates(tmp_path, capsys):
  """Two points on digits: one interrupted beforehand (resumed in its workdir), one fresh; a rerun skips
  both; the table's values are the runs' summaries."""
  from dtvit import train
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY.format(quickstart=QUICKSTART))
  root = str(tmp_path / "sweep")
  argv = [f"--config={config_file}", f"--root={root}"]
  module, arg = sweep.load_config_module(str(config_file))
  first = sweep.expand(module, arg)[0]
  wd0 = os.path.join(root, "snn.time_cost=0.0")
  train.run(sweep.point_config(module, arg, first, root), wd0, stop_at_step=2)
  assert sweep.state(wd0) == "started"
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert "[sweep] snn.time_cost=0.0: running" in out and "[sweep] snn.time_cost=0.2: running" in out
  assert not [d for d in os.listdir(root) if ".old-" in d]   # resumed in place, nothing moved aside
  table = sweep.read_table(root)
  assert table["keys"] == ["snn.time_cost"]
  for row in table["rows"]:
    summary = json.load(open(os.path.join(root, row["name"], "summary.json")))["snn"]
    assert row["state"] == "done" and row["phase"] == "snn"
    assert row["accuracy"] == summary["test_accuracy"] and row["T_sim"] == summary["average_simulated_steps"]
    assert row["T_avg"] == summary["average_time_steps"] and row["steps"] == 3
    assert row["energy_ratio"] == summary["energy"]["totals"]["energy_ratio"]
    record = json.load(open(os.path.join(root, row["name"], runs_table.SWEEP_RECORD)))
    assert record["overrides"] == {"snn.time_cost": row["snn.time_cost"]}
  assert [r["snn.time_cost"] for r in table["rows"]] == [0.0, 0.2]
  header = open(os.path.join(root, "sweep.csv")).readline().strip().split(",")
  assert header[:4] == ["name", "snn.time_cost", "state", "phase"] and "accuracy" in header
  assert "| snn.time_cost=0.2 | 0.2 | done | snn |" in open(os.path.join(root, "sweep.md")).read()
  assert os.path.getsize(os.path.join(root, "sweep.png")) > 5_000
  # A rerun trains nothing: no new attempt, the summaries untouched.
  mtimes = [os.path.getmtime(os.path.join(root, r["name"], "summary.json")) for r in table["rows"]]
  assert sweep.main(argv) == 0
  assert "finished, skipped: snn.time_cost=0.0, snn.time_cost=0.2" in capsys.readouterr().out
  timings = json.load(open(os.path.join(root, "timings.json")))
  assert {k: len(v) for k, v in timings.items()} == {"snn.time_cost=0.0": 1, "snn.time_cost=0.2": 1}
  assert mtimes == [os.path.getmtime(os.path.join(root, r["name"], "summary.json")) for r in table["rows"]]
  # The report labels the two runs by their swept value.
  assert runs_table.run_names([os.path.join(root, r["name"]) for r in table["rows"]]) == [
      "snn.time_cost=0.0", "snn.time_cost=0.2"]


def test_command_line_errors_are_one_line(tmp_path, capsys):
  assert sweep.main([f"--config={QUICKSTART}:tiny", f"--root={tmp_path}", "--grid=snn.time_cst=1"]) == 2
  assert capsys.readouterr().err.strip() == ("dtvit.sweep: snn.time_cst: config.snn has no key 'time_cst'; did you "
                                             'mean "time_cost" (snn.time_cost)?')
  assert sweep.main([f"--config={QUICKSTART}:tiny", f"--root={tmp_path}", "--grid=seed=1", "--only=seed=2"]) == 2
  assert "no such point; the points are: seed=1" in capsys.readouterr().err
