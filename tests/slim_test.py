"""`python -m dtvit.slim`: a trained run's weights as a weights-only checkpoint (no optimizer state), as a new
workdir (--out) or in place; every command after training and `init_from` read it as the full run, and a resume
from it stops with one line."""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

import dtvit
from dtvit import checkpointing
from dtvit import evaluate
from dtvit import loader
from dtvit import slim
from dtvit import train

pytestmark = pytest.mark.slow
PHASES = ("ann", "snn")


def _files(root):
  """{path relative to root: sha256 of its bytes} of every file under root."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _step(workdir, phase):
  steps = [int(n) for n in os.listdir(os.path.join(workdir, phase, "checkpoints")) if n.isdigit()]
  assert len(steps) == 1, steps
  return steps[0]


def _ckpt(workdir, phase):
  return os.path.join(workdir, phase, "checkpoints")


def _cli(capsys, argv):
  """(exit status, stdout, stderr) of `python -m dtvit.slim *argv`, in process."""
  try:
    slim.main(argv)
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def copied(tiny_run, tmp_path_factory):
  """(the tiny run's files before, the --out copy, the lines the command printed, its files after)."""
  before = _files(tiny_run)
  out = str(tmp_path_factory.mktemp("slim") / "copy")
  rows = slim.slim(tiny_run, out=out)
  return before, out, rows, _files(tiny_run)


@pytest.fixture(scope="module")
def in_place(tiny_run, tmp_path_factory):
  """A copy of the tiny run, slimmed in place by the command line."""
  workdir = str(tmp_path_factory.mktemp("in_place") / "run")
  shutil.copytree(tiny_run, workdir)
  slim.main([f"--workdir={workdir}", "--in_place"])
  return workdir


def test_out_leaves_the_run_untouched_and_keeps_only_the_weights(tiny_run, copied, saved_state):
  before, out, rows, after = copied
  assert after == before  # byte for byte, the lock included: --out only reads the run
  assert [r["phase"] for r in rows] == list(PHASES)
  for r in rows:
    phase, step = r["phase"], r["step"]
    assert step == _step(tiny_run, phase) == _step(out, phase)
    full, small = saved_state(_ckpt(tiny_run, phase), step), saved_state(_ckpt(out, phase), step)
    assert set(full) == {"params", "batch_stats", "opt_state", "step"} and set(small) == {"params", "batch_stats"}
    assert r["after_bytes"] < r["before_bytes"] / 2, r
    with open(os.path.join(_ckpt(out, phase), str(step), "meta", "metadata")) as f:
      meta = json.load(f)
    with open(os.path.join(_ckpt(tiny_run, phase), str(step), "meta", "metadata")) as f:
      original = json.load(f)
    assert meta == {**original, "weights_only": True, "dropped": ["opt_state", "step"]}
  # The records travel byte for byte; the lock, the event files and nothing else stay behind.
  copied_files = _files(out)
  records = {k: v for k, v in before.items() if "checkpoints" not in k.split(os.sep)}
  left = {k for k in records if k not in copied_files}
  assert left and all(os.path.basename(k).startswith("events.out.tfevents.") or k == ".lock" for k in left)
  assert {k: records[k] for k in records if k not in left} == {
      k: v for k, v in copied_files.items() if "checkpoints" not in k.split(os.sep)}
  assert {"config.json", "summary.json", "data_spec.json", "config_history.json"} <= set(copied_files)


def _same_run(a, b, same_tree):
  for phase in PHASES:
    x, y = dtvit.load(a, phase), dtvit.load(b, phase)
    assert (x.phase, x.step, x.finished) == (y.phase, y.step, y.finished) == (phase, x.step, True)
    same_tree(x.variables, y.variables)
    assert set(x.variables) == {"params", "batch_stats"}
    assert x.masks.keys() == y.masks.keys()
    for k in x.masks:
      np.testing.assert_array_equal(x.masks[k], y.masks[k])
  assert dtvit.load(b).phase == "snn"


def test_slim_copy_loads_and_evaluates_as_the_run(tiny_run, copied, same_tree):
  out = copied[1]
  _same_run(tiny_run, out, same_tree)
  for phase in PHASES:  # every figure: accuracy, time steps, energy (the whole result, key for key)
    full = evaluate.evaluate_workdir(tiny_run, phase=phase)
    assert evaluate.evaluate_workdir(out, phase=phase) == full
  with open(os.path.join(tiny_run, "summary.json")) as f:
    assert full["accuracy"] == pytest.approx(json.load(f)["snn"]["test_accuracy"])
  exits = [evaluate.early_exit_workdir(w, write=False) for w in (tiny_run, out)]
  assert exits[0]["rows"] == exits[1]["rows"] and exits[0]["no_exit"] == exits[1]["no_exit"]
  assert len(exits[0]["rows"]) == sum(len(v) for v in evaluate.EXIT_THRESHOLDS.values())


def test_in_place_keeps_the_weights_and_a_second_call_does_nothing(tiny_run, in_place, saved_state, same_tree,
                                                                    capsys):
  for phase in PHASES:
    assert sorted(os.listdir(os.path.join(in_place, phase))) == ["checkpoints"] + [
        n for n in os.listdir(os.path.join(tiny_run, phase)) if n.startswith("events.")]  # no tmp or old folder
    assert set(saved_state(_ckpt(in_place, phase), _step(in_place, phase))) == {"params", "batch_stats"}
  _same_run(tiny_run, in_place, same_tree)
  full = evaluate.evaluate_workdir(tiny_run)
  assert evaluate.evaluate_workdir(in_place) == full
  before = _files(in_place)
  capsys.readouterr()
  code, out, err = _cli(capsys, [f"--workdir={in_place}", "--in_place"])
  assert code == 0 and err == ""
  assert [line.split(":")[0] for line in out.splitlines()] == ["ann", "snn", "slim"]
  assert out.count("already weights-only") == 2
  assert {k: v for k, v in _files(in_place).items() if k != ".lock"} == {
      k: v for k, v in before.items() if k != ".lock"}


def test_in_place_finishes_or_undoes_an_interrupted_swap(tiny_run, tmp_path, same_tree):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run, workdir)
  # Stopped between the two renames: the full checkpoints aside, no checkpoints folder, a written slim one.
  ann = _ckpt(workdir, "ann")
  os.rename(ann, ann + slim.OLD_SUFFIX)
  os.makedirs(ann + slim.TMP_SUFFIX)
  # Stopped after the swap: the old folder still there beside the slim one.
  snn = _ckpt(workdir, "snn")
  shutil.copytree(snn, snn + slim.OLD_SUFFIX)
  shutil.rmtree(snn)
  for folder in (ann, snn):  # steps set aside as damaged (`Checkpointer.restore_latest`) are never deleted
    os.makedirs(os.path.join(folder + slim.OLD_SUFFIX, "corrupt", "3"))
    open(os.path.join(folder + slim.OLD_SUFFIX, "corrupt", "3", "x"), "w").close()
  slim.slim(tiny_run, out=str(tmp_path / "s"), phase="snn")
  shutil.copytree(_ckpt(str(tmp_path / "s"), "snn"), snn)
  rows = slim.slim(workdir, in_place=True)
  assert [(r["phase"], r["already_slim"]) for r in rows] == [("ann", False), ("snn", True)]
  for phase in PHASES:
    assert sorted(n for n in os.listdir(os.path.join(workdir, phase)) if n.startswith("checkpoints")) == [
        "checkpoints"]
    assert os.path.isfile(os.path.join(_ckpt(workdir, phase), "corrupt", "3", "x"))
  _same_run(tiny_run, workdir, same_tree)


def test_unfinished_run_in_place_is_refused_and_out_needs_allow_unfinished(unfinished_run, tmp_path, capsys):
  before = _files(unfinished_run)
  code, out, err = _cli(capsys, [f"--workdir={unfinished_run}", "--in_place"])
  assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert "unfinished" in err and "--out" in err
  target = str(tmp_path / "copy")
  code, out, err = _cli(capsys, [f"--workdir={unfinished_run}", f"--out={target}"])
  assert code == 1 and "--allow_unfinished" in err and len(err.strip().splitlines()) == 1
  assert not os.path.exists(target)
  assert _files(unfinished_run) == before
  code, out, err = _cli(capsys, [f"--workdir={unfinished_run}", f"--out={target}", "--allow_unfinished"])
  assert code == 0 and out.splitlines()[0].startswith("ann: step 16, checkpoints ")
  assert _files(unfinished_run) == before


def test_a_resume_from_a_weights_only_checkpoint_is_one_clear_error(tiny_run, unfinished_run, copied, tmp_path,
                                                                    saved_state):
  out = copied[1]
  config = loader.read_config(out)
  # A finished slim run is not trained again: its summary comes back, nothing changes.
  before = _files(out)
  assert train.run(config, out) == json.load(open(os.path.join(out, "summary.json")))
  # A longer SNN phase would resume from the checkpoints: refused before anything is written.
  longer = config.copy_and_resolve_references()
  longer.snn.train_steps += 2
  with pytest.raises(checkpointing.WeightsOnlyCheckpointError) as e:
    train.run(longer, out)
  message = str(e.value)
  assert f"{_ckpt(out, 'ann')}/16 is a weights-only checkpoint" in message and "init_from" in message
  assert "\n" not in message
  assert {k: v for k, v in _files(out).items() if k != ".lock"} == {
      k: v for k, v in before.items() if k != ".lock"}
  # An unfinished run copied with --allow_unfinished: rerunning its command stops the same way.
  half = str(tmp_path / "half")
  slim.slim(unfinished_run, out=half, allow_unfinished=True)
  with pytest.raises(checkpointing.WeightsOnlyCheckpointError, match="weights-only checkpoint"):
    train.run(loader.read_config(half), half)
  assert not os.path.exists(os.path.join(half, "snn"))
  # The restore itself says so too (whatever path reaches it), not a tree mismatch.
  full_state = saved_state(_ckpt(tiny_run, "ann"), _step(tiny_run, "ann"))
  with checkpointing.Checkpointer(_ckpt(half, "ann")) as ckpt:
    with pytest.raises(checkpointing.WeightsOnlyCheckpointError, match="cannot resume"):
      ckpt.restore_latest(jax.tree.map(np.asarray, full_state))


def test_init_from_the_slim_copy_starts_from_the_twins_weights(tiny_run, copied, same_tree):
  from dtvit import data, models, sharding, state
  out = copied[1]
  config = loader.read_config(out)
  info = data.get_info(config.data)
  model = models.phase_model(config.model, info.num_classes, "snn")
  mesh = sharding.make_mesh(1)
  starts = []
  for source in (tiny_run, out):
    config.snn.init_from = _ckpt(source, "ann")
    train._check_sources(config, ["snn"])
    starts.append(state.initial_variables(config, str(source), ["snn"], "snn", model, info, jax.random.key(0),
                                          mesh=mesh))
  same_tree(*starts)
  ann = dtvit.load(tiny_run, "ann").variables
  same_tree(starts[1]["params"], models.ann_to_snn(ann["params"], scale=config.snn.threshold_scale))


@pytest.mark.parametrize("argv,code,message", [
    (["--workdir={missing}", "--in_place"], 1, "does not exist"),
    (["--workdir={run}"], 2, "one of the two"),
    (["--workdir={run}", "--in_place", "--out={out}"], 2, "one of the two"),
    (["--workdir={run}", "--out={run}/inside"], 1, "lies in the run's workdir"),
    (["--workdir={run}", "--out={nonempty}"], 1, "not an empty folder"),
    (["--workdir=gs://bucket/run", "--in_place"], 1, "local folders only"),
])
def test_command_line_mistakes_are_one_line(tiny_run, tmp_path, capsys, argv, code, message):
  (tmp_path / "nonempty").mkdir()
  (tmp_path / "nonempty" / "x").write_text("")
  names = dict(missing=tmp_path / "missing", run=tiny_run, out=tmp_path / "out", nonempty=tmp_path / "nonempty")
  got, out, err = _cli(capsys, [a.format(**names) for a in argv])
  assert got == code and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert not os.path.exists(tmp_path / "out") and not os.path.exists(os.path.join(tiny_run, "inside"))
