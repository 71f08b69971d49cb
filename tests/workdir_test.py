"""The workdir's JSON records (`dtvit.workdir`): a damaged one (empty, truncated, garbled, not text) stops every
reader with one line naming the file and the fix; `--overwrite` moves such a run aside without reading it; records
are written durably (the file flushed to disk before the rename, the folder after)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from dtvit import runs_table
from dtvit import loader
from dtvit import sweep
from dtvit import workdir as workdir_lib
from dtvit.data import spec as spec_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAMAGED = {"empty": b"", "truncated": b'{"phases": "ann", "ann": {"num_st', "garbled": b'{"phases": "ann"]}\x00',
           "not text": b"\xff\xfe\x00\x81", "not a dict": b'["phases"]'}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_damaged_record_names_the_file_and_the_fix(tmp_path, damage):
  path = tmp_path / "config.json"
  path.write_bytes(DAMAGED[damage])
  with pytest.raises(workdir_lib.DamagedRecordError) as e:
    workdir_lib.read_json(str(path), expect=dict)
  message = str(e.value)
  assert isinstance(e.value, ValueError) and "\n" not in message
  assert f"workdir {tmp_path}: config.json is damaged" in message and "--overwrite" in message
  if damage == "empty":
    assert "(empty)" in message


def _damaged_run(tmp_path, name="config.json", content=DAMAGED["truncated"]):
  workdir = tmp_path / "run"
  workdir.mkdir(exist_ok=True)
  (workdir / "config.json").write_text(json.dumps({"phases": "ann", "ann": {"train_steps": 4}}))
  (workdir / name).write_bytes(content)
  return str(workdir)


@pytest.mark.parametrize("name", ["config.json", "summary.json", "config_history.json"])
def test_a_launch_into_a_damaged_run_stops_naming_the_file(tmp_path, name):
  workdir = _damaged_run(tmp_path, name)
  config = {"phases": "ann", "ann": {"train_steps": 4}}
  with pytest.raises(workdir_lib.DamagedRecordError, match=rf"{name} is damaged .*--overwrite"):
    launch = workdir_lib.plan_launch(workdir, config)
    workdir_lib.finished_summary(launch)
    workdir_lib.record_launch(launch)


def test_overwrite_moves_a_damaged_run_aside_unread(tmp_path):
  workdir = _damaged_run(tmp_path)
  launch = workdir_lib.plan_launch(workdir, {"phases": "ann"}, overwrite=True)
  assert launch.earlier and launch.overwrite
  workdir_lib.record_launch(launch)
  aside, = glob.glob(str(tmp_path / "run.old-*"))
  with open(os.path.join(aside, "config.json"), "rb") as f:
    assert f.read() == DAMAGED["truncated"]  # kept as it was, for a post-mortem
  assert workdir_lib.read_json(os.path.join(workdir, "config.json")) == {"phases": "ann"}
  history = workdir_lib.read_json(os.path.join(workdir, "config_history.json"))
  assert len(history) == 1 and history[0]["moved_aside"] == aside


def test_the_readers_after_training_name_the_damaged_file(tmp_path):
  """dtvit.load (evaluate, predict, export), the data spec, the report's sweep labels and dtvit.sweep."""
  workdir = _damaged_run(tmp_path)
  with pytest.raises(ValueError, match=r"config.json is damaged"):
    loader.load(workdir)
  for name, read in [("summary.json", lambda: loader.read_summary(workdir)),
                     ("data_spec.json", lambda: spec_lib.read_spec(workdir)),
                     (sweep.RECORD, lambda: runs_table.run_names([workdir, workdir + "2"]))]:
    _damaged_run(tmp_path, name, DAMAGED["garbled"])
    os.makedirs(workdir + "2", exist_ok=True)
    with open(os.path.join(workdir + "2", sweep.RECORD), "w") as f:
      json.dump({"name": "b", "overrides": {}}, f)
    with pytest.raises(workdir_lib.DamagedRecordError, match=rf"{name} is damaged"):
      read()
  with pytest.raises(workdir_lib.DamagedRecordError, match=r"summary.json is damaged"):
    sweep.state(workdir)


@pytest.mark.slow
def test_the_command_line_on_a_damaged_config_gives_one_line_and_overwrite_gets_out(tmp_path):
  workdir = _damaged_run(tmp_path, content=DAMAGED["empty"])
  cmd = [sys.executable, "-m", "dtvit.main", "--config=configs/quickstart.py:tiny", "--config.phases=ann",
         "--config.model.arch=vit", "--config.model.variant=tiny", "--config.model.patch_size=2",
         "--config.eval_fixed_steps=False", "--config.ann.train_steps=2", f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert errors == [f"error: DamagedRecordError: workdir {workdir}: config.json is damaged (empty); move the "
                    f"workdir aside, or rerun training there with --overwrite (which moves the run aside without "
                    f"reading it)."]
  proc = subprocess.run(cmd + ["--overwrite"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert workdir_lib.read_json(os.path.join(workdir, "summary.json"))["ann"]["steps"] == 2
  assert len(glob.glob(str(tmp_path / "run.old-*" / "config.json"))) == 1


def test_records_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
  """A crash after the rename must not leave an empty file: the data is fsynced first, the folder after."""
  events = []
  fsync, replace = os.fsync, os.replace

  def recording_fsync(fd):
    events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    fsync(fd)

  def recording_replace(src, dst):
    events.append(("replace", str(dst)))
    replace(src, dst)

  monkeypatch.setattr(os, "fsync", recording_fsync)
  monkeypatch.setattr(os, "replace", recording_replace)
  path = str(tmp_path / "summary.json")
  workdir_lib.write_json(path, {"a": 1})
  assert events == [("fsync", path + ".tmp"), ("replace", path), ("fsync", str(tmp_path))]
  assert workdir_lib.read_json(path) == {"a": 1} and not os.path.exists(path + ".tmp")
