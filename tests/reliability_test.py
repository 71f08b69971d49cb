"""Reliability on the tiny config: exact resume after SIGKILL (also mid checkpoint write), SIGTERM and Ctrl-C, a
damaged latest checkpoint, non-finite steps (and following the printed advice), several processes over
jax.distributed, clear errors, run-to-run determinism.

The subprocess tests run the real CLI (`python -m dtvit.main`) through a launcher that can only slow it down:
each step by a sleep before the batch is sharded (so a kill lands at a chosen step); it changes no value, except
that TEST_INF_AT_STEP=k puts an inf into one pixel of the k-th batch (from 0) of the launch. A kill
mid checkpoint write is reproduced by leaving on disk what such a kill leaves (`leave_unfinished_write`: a fully
written step under Orbax's tmp name, never committed; tests/checkpointing_test.py kills a real save midway and
finds that state). Every result is compared with one uninterrupted in-process run (`reference`, compiled
afresh), bitwise. The CLI launches share a persistent compilation cache (the first compiles, the others load),
as a preemptible job would.
"""

import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time

import jax
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from dtvit import data
from dtvit import events
from dtvit import models
from dtvit import sharding
from dtvit import state as state_lib
from dtvit import steps
from dtvit import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 3
# The CLI spelling of `_config()`: both write the same config.json (checked below).
CLI_CONFIG = ["--config=configs/quickstart.py:tiny", "--config.model.arch=vit", "--config.model.variant=tiny",
              "--config.model.patch_size=2", "--config.eval_fixed_steps=False", "--config.phases=ann",
              f"--config.ann.train_steps={STEPS}", f"--config.ann.checkpoint_every={EVERY}",
              "--config.ann.log_every=1", "--config.ann.max_to_keep=10"]
TIME_KEYS = ("train_time_s", "cpu_time_s", "wall_time_s", "workdir")

_LAUNCHER = textwrap.dedent("""
    import os, runpy, sys, time
    step_delay = float(os.environ.get("TEST_STEP_DELAY", "0"))
    inf_at = int(os.environ.get("TEST_INF_AT_STEP", "-1"))
    inf_from = int(os.environ.get("TEST_INF_FROM_STEP", "-1"))
    if step_delay or inf_at >= 0 or inf_from >= 0:
      from dtvit import sharding
      _global_batch, calls = sharding.global_batch, [0]
      def slow_global_batch(mesh, local):
        time.sleep(step_delay)
        if (calls[0] == inf_at or 0 <= inf_from <= calls[0]) and "target" in local:  # a train batch
          local = dict(local, image=local["image"].copy())
          local["image"][0, 0, 0, 0] = float("inf")
        calls[0] += "target" in local
        return _global_batch(mesh, local)
      sharding.global_batch = slow_global_batch
    sys.argv[0] = "dtvit.main"
    runpy.run_module("dtvit.main", run_name="__main__", alter_sys=True)
""")


def _config(tiny_config, **overrides):
  return tiny_config(**{"phases": "ann", "ann.train_steps": STEPS, "ann.checkpoint_every": EVERY,
                        "ann.log_every": 1, "ann.max_to_keep": 10, **overrides})


def _ckpt_dir(workdir):
  return os.path.join(workdir, "ann", "checkpoints")


def _steps(workdir):
  names = os.listdir(_ckpt_dir(workdir)) if os.path.isdir(_ckpt_dir(workdir)) else []
  return sorted(int(n) for n in names if n.isdigit())






def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    s = json.load(f)
  for key in TIME_KEYS:
    s.pop(key, None)
    s["ann"].pop(key, None)
  return s


@pytest.fixture
def assert_matches_reference(saved_state, same_tree):
  """(workdir, reference, extra_steps=()): every checkpoint and the summary's metrics equal the uninterrupted
  run's, bitwise."""
  return lambda workdir, reference, extra_steps=(): _matches_reference(workdir, reference, extra_steps,
                                                                      saved_state, same_tree)


def _matches_reference(workdir, reference, extra_steps, saved_state, same_tree):
  with open(os.path.join(workdir, "config.json")) as f, open(os.path.join(reference, "config.json")) as g:
    assert json.load(f) == json.load(g)  # the CLI and the in-process run are the same experiment
  assert _steps(reference) == list(range(EVERY, STEPS + 1, EVERY))
  assert _steps(workdir) == sorted(_steps(reference) + list(extra_steps))
  for step in _steps(reference):
    same_tree(saved_state(_ckpt_dir(workdir), step), saved_state(_ckpt_dir(reference), step))
  assert _summary(workdir) == _summary(reference)


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.run(_config(tiny_config), workdir)
  return workdir


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A persistent compilation cache for the CLI launches, shared by the pytest-xdist workers (their temp dirs
  have one parent): after the first launch of a program, the others load it instead of compiling."""
  return tmp_path_factory.getbasetemp().parent / "reliability_jax_cache"


def _xla_flags(devices: int) -> str:
  """This process's XLA flags (e.g. the test suite's optimisation level: a CLI run must compile as the
  in-process reference does to end bitwise equal) with `devices` CPU devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


class _Cli:
  """`python -m dtvit.main` with CLI_CONFIG in a subprocess, stderr read line by line."""

  def __init__(self, workdir, *extra, step_delay=0.0, devices=8, cache=None, inf_at_step=-1, inf_from_step=-1,
               argv=None):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TEST_STEP_DELAY=str(step_delay),
               TEST_INF_AT_STEP=str(inf_at_step), TEST_INF_FROM_STEP=str(inf_from_step),
               XLA_FLAGS=_xla_flags(devices))
    if cache:  # a persistent compilation cache: a rerun loads what the first launch compiled (as users would)
      env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    argv = argv or [*CLI_CONFIG, f"--workdir={workdir}", *extra]  # argv: a whole command line instead
    self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *argv],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self.lines = []

  def wait_for_step(self, step, timeout=240):
    """Reads the log until the metrics line of `step`."""
    pattern = re.compile(rf"\] \[{step}\] accuracy=")
    deadline = time.time() + timeout
    for line in self.proc.stderr:
      self.lines.append(line)
      if pattern.search(line):
        return
      assert time.time() < deadline, "".join(self.lines[-30:])
    raise AssertionError(f"exited before step {step}:\n" + "".join(self.lines[-30:]))

  def finish(self, timeout=240):
    out, err = self.proc.communicate(timeout=timeout)
    self.lines.append(err)
    return self.proc.returncode, out, "".join(self.lines)


def leave_unfinished_write(ckpt_dir, finished_ckpt_dir, step):
  """Leaves in `ckpt_dir` what a kill between the last file write and the commit of `step` leaves: the step
  fully written (copied from `finished_ckpt_dir`, a run that finished it) under the tmp name Orbax 0.12 writes
  into, `<step>.orbax-checkpoint-tmp`, never renamed to `<step>`. Returns its name."""
  name = f"{step}.orbax-checkpoint-tmp"
  shutil.copytree(os.path.join(finished_ckpt_dir, str(step)), os.path.join(ckpt_dir, name))
  assert os.path.exists(os.path.join(ckpt_dir, name, "state", "manifest.ocdbt"))
  return name


def _run_cli(workdir, *extra, **kwargs):
  rc, out, err = _Cli(workdir, *extra, **kwargs).finish()
  assert rc == 0, err[-4000:]
  return out, err


# ------------------------------------------------------------------------------------------------------------
# 1. Exact resume after SIGKILL and SIGTERM.


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_is_bitwise_exact(reference, cache, tmp_path, assert_matches_reference):
  workdir = str(tmp_path / "run")
  # Killed between two checkpoints: after step 4 is logged and the (asynchronous) save of step 3 committed.
  cli = _Cli(workdir, step_delay=0.3, cache=cache)
  cli.wait_for_step(4)
  while not _steps(workdir):
    assert cli.proc.poll() is None, cli.finish()[2][-4000:]
    time.sleep(0.01)
  cli.proc.send_signal(signal.SIGKILL)
  assert cli.finish()[0] == -signal.SIGKILL
  done_first = _steps(workdir)
  assert done_first and max(done_first) < STEPS

  # Killed mid checkpoint write: every file of the next step is written, only Orbax's commit rename is pending.
  interrupted_step = max(done_first) + EVERY
  unfinished = leave_unfinished_write(_ckpt_dir(workdir), _ckpt_dir(reference), interrupted_step)
  assert _steps(workdir) == done_first and ".orbax-checkpoint-tmp" in unfinished

  # The rerun resumes from the last finished checkpoint, never the interrupted one, and drops the leftover.
  out, err = _run_cli(workdir, cache=cache)
  assert f"resumed from step {max(done_first)}" in err
  assert not [n for n in os.listdir(_ckpt_dir(workdir)) if ".orbax-checkpoint-tmp" in n]
  assert_matches_reference(workdir, reference)
  assert "summary:" in out


# Both phases, 8 steps each, a checkpoint every 2; the kills: each at a step the child has logged, in its phase.
BOTH_PHASES = ["--config.phases=ann,snn", "--config.ann.train_steps=8", "--config.ann.checkpoint_every=2",
               "--config.snn.train_steps=8", "--config.snn.checkpoint_every=2", "--config.snn.log_every=1",
               "--config.snn.max_to_keep=10"]
KILL_SCHEDULE = [("ann", 5), ("snn", 3), ("snn", 6)]


def _kill_at_logged_step(cli, phase, step):
  """Reads the child's log until it logs `step` of `phase`, then SIGKILLs it. Returns whether the kill landed:
  the child was still running at that step and died of the signal (not a run that ended first)."""
  current, pattern = None, re.compile(rf"\] \[{step}\] accuracy=")
  for line in cli.proc.stderr:
    cli.lines.append(line)
    if m := re.search(r"=== phase (\w+) ===", line):
      current = m.group(1)
    if current == phase and pattern.search(line):
      cli.proc.send_signal(signal.SIGKILL)
      break
  return cli.finish()[0] == -signal.SIGKILL


@pytest.mark.slow
def test_sigkills_at_logged_steps_in_both_phases_all_land_and_the_rerun_is_bitwise_exact(cache, tmp_path, saved_state,
                                                                                          same_tree):
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "run")
  _run_cli(reference, *BOTH_PHASES, cache=cache)
  landed = [(phase, step) for phase, step in KILL_SCHEDULE
            if _kill_at_logged_step(_Cli(workdir, *BOTH_PHASES, step_delay=0.1, cache=cache), phase, step)]
  assert landed == KILL_SCHEDULE  # every requested kill landed, in the phase asked
  _, err = _run_cli(workdir, *BOTH_PHASES, cache=cache)
  assert re.search(r"snn: resumed from step [246]\b", err)
  for phase in ("ann", "snn"):
    ckpt, ref = os.path.join(workdir, phase, "checkpoints"), os.path.join(reference, phase, "checkpoints")
    ref_steps = sorted(int(n) for n in os.listdir(ref) if n.isdigit())
    assert ref_steps == [2, 4, 6, 8] and set(ref_steps) <= {int(n) for n in os.listdir(ckpt) if n.isdigit()}
    for step in ref_steps:
      same_tree(saved_state(ckpt, step), saved_state(ref, step))
  summaries = [json.load(open(os.path.join(w, "summary.json"))) for w in (workdir, reference)]
  for s in summaries:
    for key in TIME_KEYS:
      s.pop(key, None)
      for phase in ("ann", "snn"):
        s[phase].pop(key, None)
  assert summaries[0] == summaries[1]


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_signal_checkpoints_the_current_step_and_rerun_is_bitwise_exact(reference, cache, tmp_path, signum, status,
                                                                        assert_matches_reference):
  workdir = str(tmp_path / "run")
  cli = _Cli(workdir, step_delay=0.3, cache=cache)
  cli.wait_for_step(4)
  cli.proc.send_signal(signum)
  rc, _, err = cli.finish()
  assert rc == status, err[-4000:]
  assert "Traceback" not in err
  saved = int(re.search(rf"stopped: {signum.name} during ann: checkpoint saved at step (\d+)", err).group(1))
  assert 4 <= saved < STEPS
  assert max(_steps(workdir)) == saved  # the step the signal arrived at, not the last periodic checkpoint
  _run_cli(workdir, cache=cache)
  assert_matches_reference(workdir, reference, extra_steps=[saved] if saved % EVERY else [])
  _assert_no_duplicate_steps(workdir)


def _assert_no_duplicate_steps(workdir):
  scalars = events.read_scalars(os.path.join(workdir, "ann"))
  assert [s for s, _ in scalars["loss"]] == list(range(1, STEPS + 1))
  for tag, points in scalars.items():
    steps_logged = [s for s, _ in points]
    assert len(steps_logged) == len(set(steps_logged)), (tag, steps_logged)


# ------------------------------------------------------------------------------------------------------------
# 1b. A damaged latest checkpoint.


def _truncate_arrays(step_dir):
  for d, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      if os.path.basename(d) == "d":  # the array data files of the OCDBT store
        os.truncate(os.path.join(d, f), os.path.getsize(os.path.join(d, f)) // 2)


def _delete_state_files(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate_arrays, _delete_state_files], ids=["truncated", "deleted"])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_before_it(
    tiny_config, reference, tmp_path, damage, caplog, assert_matches_reference):
  # A run stopped after step 9 (the reference's files up to there), whose step 9 was then damaged.
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  shutil.rmtree(os.path.join(_ckpt_dir(workdir), str(STEPS)))
  damage(os.path.join(_ckpt_dir(workdir), "9"))
  caplog.set_level("INFO")
  train.run(_config(tiny_config), workdir)
  lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(lines) == 1 and "\n" not in lines[0], lines
  assert lines[0].startswith(f"Checkpoint step 9 in {_ckpt_dir(workdir)} is unreadable (")
  assert "ann: resumed from step 6" in caplog.text
  assert os.listdir(os.path.join(_ckpt_dir(workdir), "corrupt")) == ["9"]  # kept aside, not deleted
  assert_matches_reference(workdir, reference)  # and steps 9 and 12 written again, bitwise as uninterrupted


# ------------------------------------------------------------------------------------------------------------
# 2. Non-finite values.


@pytest.mark.slow
def test_nonfinite_error_names_step_and_module_and_keeps_the_last_good_checkpoint(tiny_config, reference, tmp_path,
                                                                                  assert_matches_reference, inject_inf):
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteError,
                     match=r"ann: non-finite values at step 5: first non-finite module: 'embedding/patch', its "
                           r"output in the forward pass .*last good checkpoint \(step 3\) is kept"):
    train.run(_config(tiny_config), workdir, batch_hook=inject_inf(at_step=4))
  assert _steps(workdir) == [3]
  assert not [n for n in os.listdir(_ckpt_dir(workdir)) if "tmp" in n]
  # The kept checkpoint is the good one: resuming from it without the bad batch gives the reference run.
  train.run(_config(tiny_config), workdir)
  assert_matches_reference(workdir, reference)


@pytest.mark.slow
def test_nonfinite_skip_policy_leaves_the_state_unchanged_for_that_batch(tiny_config, tmp_path, caplog, saved_state,
                                                                         same_tree, inject_inf):
  config = _config(tiny_config, **{"ann.train_steps": 4, "ann.checkpoint_every": 1, "ann.nonfinite": "skip"})
  summary = train.run(config, str(tmp_path), batch_hook=inject_inf(at_step=1))
  assert "step 2 skipped (params unchanged), first non-finite module: 'embedding/patch'" in caplog.text
  s1, s2, s3 = (saved_state(_ckpt_dir(str(tmp_path)), k) for k in (1, 2, 3))
  assert (s1["step"], s2["step"], s3["step"]) == (1, 2, 3)  # the skipped batch is consumed
  for key in ("params", "batch_stats", "opt_state"):
    same_tree(s1[key], s2[key])
  assert not np.array_equal(s2["params"]["head"]["kernel"], s3["params"]["head"]["kernel"])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(s3))
  assert np.isfinite(summary["ann"]["train_loss_last"])


def _inf_at_steps(bad):
  """A `train.run` batch hook making each train step in `bad` (from 0) non-finite."""
  def hook(phase, step, local):
    del phase
    if step in bad:
      local = dict(local, image=local["image"].copy())
      local["image"][0, 0, 0, 0] = np.inf
    return local
  return hook


@pytest.mark.slow
def test_nonfinite_skips_report_once_per_run_compile_the_diagnosis_once_and_stop_after_the_limit(tiny_config,
                                                                                                 tmp_path, caplog):
  config = _config(tiny_config, **{"ann.nonfinite": "skip", "ann.max_consecutive_skips": 3})
  caplog.set_level("WARNING")
  # Step 2 alone, steps 5-6 in a row, then every step from 9 on (steps counted from 1).
  with jax.log_compiles(True), pytest.raises(train.NonFiniteError) as error:
    train.run(config, str(tmp_path), batch_hook=_inf_at_steps({1, 4, 5, *range(8, STEPS)}))
  message = str(error.value)
  assert error.value.skipping and message.startswith(
      "ann: 3 consecutive steps skipped (steps 9 to 11, ann.max_consecutive_skips=3): every batch goes non-finite")
  assert "at step 9: first non-finite module: 'embedding/patch'" in message
  assert "the last good checkpoint (step 9) is kept" in message and "nonfinite='skip' needs no" not in message
  skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() and r.name != "jax"]
  assert [m.split(",")[0].split(" (")[0] for m in skips] == [
      "ann: step 2 skipped", "ann: step 5 skipped", "ann: steps 5 to 6 skipped", "ann: step 9 skipped"], skips
  assert "(2 in a row, params unchanged); step 7 is finite again" in skips[2]
  compiles = [r for r in caplog.records if "Compiling jit(diagnose_step)" in r.getMessage()]
  assert len(compiles) == 1  # three diagnoses, one compilation
  assert _steps(str(tmp_path)) == [3, 6, 9]


@pytest.mark.slow
def test_diagnosis_names_batch_statistics_and_optimizer_state_that_the_step_flags(tiny_config):
  config = _config(tiny_config, **{"ann.batch_size": 8})
  info = data.get_info(config.data)
  model = models.phase_model(config.model, info.num_classes, "ann")
  mesh = sharding.make_mesh(-1)
  tx = optax.adam(1e-3)
  state = state_lib.create_state(model, tx, jax.random.key(0), info.image_shape, mesh)
  local = next(data.train_batches(config.data, global_batch_size=8, seed=0))
  batch = sharding.global_batch(mesh, {k: local[k] for k in ("image", "label", "target")})
  diagnose = steps.make_diagnosis(model, tx, config.ann, phase="ann", op_weights=None)
  step_fn = jax.jit(steps.make_train_step(model, tx, config.ann, phase="ann", op_weights=None))
  host = jax.device_get(state)

  # A running mean that overflowed: the forward pass (batch statistics), loss, gradients and update are finite.
  stats = jax.tree.map(np.array, host["batch_stats"])
  module = next(m for m in stats["embedding"] if m.endswith("bn"))
  stats["embedding"][module]["mean"][0] = np.inf
  bad_stats = dict(state, batch_stats=sharding.replicate(mesh, stats))
  assert not step_fn(bad_stats, batch)[1]["finite"]
  assert diagnose(bad_stats, batch, 0).startswith(
      f"first non-finite module: 'embedding/{module}', its batch statistics after the step")

  # Adam's second moment overflowed (huge gradients): the update is 0 there, the parameters stay finite.
  opt = jax.tree.map(np.array, host["opt_state"])
  opt[0].nu["head"]["kernel"][0, 0] = np.inf
  bad_opt = dict(state, opt_state=sharding.replicate(mesh, opt))
  new_state, metrics = step_fn(bad_opt, batch)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(new_state["params"]))
  assert not metrics["finite"]  # the step keeps the state it was given
  assert np.isinf(jax.device_get(new_state["opt_state"][0].nu["head"]["kernel"])[0, 0])
  assert diagnose(bad_opt, batch, 0).startswith(
      "first non-finite value: the optimizer state [0].nu['head']['kernel'] after the update")
  assert "not reproduced" in diagnose(state, batch, 0)


def _printed_commands(err):
  return [shlex.split(line.strip()) for line in err.splitlines() if line.startswith("  python -m dtvit.main ")]


@pytest.mark.slow
def test_the_nonfinite_advice_works_exactly_as_printed(tiny_config, cache, tmp_path):
  workdir = str(tmp_path / "run")
  rc, _, err = _Cli(workdir, cache=cache, inf_at_step=4).finish()
  assert rc == 1 and "Traceback" not in err, err[-4000:]
  assert "error: NonFiniteError: ann: non-finite values at step 5" in err
  lower, skip = _printed_commands(err)
  this_launch = ["python", "-m", "dtvit.main", *CLI_CONFIG, f"--workdir={workdir}"]
  lr = _config(tiny_config).ann.optimizer.lr
  assert lower == [*this_launch, f"--config.ann.optimizer.lr={lr / 10:.3g}", "--allow_changes=ann.optimizer.lr"]
  assert skip == [*this_launch, "--config.ann.nonfinite=skip"]
  failed = str(tmp_path / "failed")
  shutil.copytree(workdir, failed)
  for command, changed, allowed in [(lower, "ann.optimizer.lr", ["ann.optimizer.lr"]),
                                    (skip, "ann.nonfinite", [])]:
    shutil.rmtree(workdir)
    shutil.copytree(failed, workdir)
    rc, out, err = _Cli(workdir, cache=cache, argv=command[3:]).finish()  # the printed words after the module
    assert rc == 0, err[-4000:]
    assert "ann: resumed from step 3" in err and "summary:" in out
    last = json.load(open(os.path.join(workdir, "config_history.json")))[-1]
    assert list(last["changes"]) == [changed] and last["allowed"] == allowed and last["resumed_from"] == {"ann": 3}
    assert _summary(workdir)["ann"]["steps"] == STEPS


@pytest.mark.slow
def test_after_too_many_skips_the_advice_is_a_lower_learning_rate_and_following_it_finishes(tiny_config, cache,
                                                                                             tmp_path):
  workdir = str(tmp_path / "run")
  skip = ["--config.ann.nonfinite=skip", "--config.ann.max_consecutive_skips=3"]
  rc, _, err = _Cli(workdir, *skip, cache=cache, inf_from_step=4).finish()  # every batch from step 5 on
  assert rc == 1 and "Traceback" not in err, err[-4000:]
  assert "error: NonFiniteError: ann: 3 consecutive steps skipped (steps 5 to 7" in err
  assert len(re.findall(r"ann: step \d+ skipped", err)) == 1  # one warning for the run of skips
  lr = _config(tiny_config).ann.optimizer.lr
  this_launch = ["python", "-m", "dtvit.main", *CLI_CONFIG, f"--workdir={workdir}", *skip]
  lower, = _printed_commands(err)  # skipping more would not help: no 'nonfinite=skip' advice
  assert lower == [*this_launch, f"--config.ann.optimizer.lr={lr / 10:.3g}", "--allow_changes=ann.optimizer.lr"]
  rc, out, err = _Cli(workdir, cache=cache, argv=lower[3:]).finish()  # as printed, the data fine again
  assert rc == 0, err[-4000:]
  assert "ann: resumed from step 6" in err and "summary:" in out
  last = json.load(open(os.path.join(workdir, "config_history.json")))[-1]
  assert last["allowed"] == ["ann.optimizer.lr"] and last["resumed_from"] == {"ann": 6}
  assert json.load(open(os.path.join(workdir, "config.json")))["ann"]["optimizer"]["lr"] == pytest.approx(lr / 10)
  assert _summary(workdir)["ann"]["steps"] == STEPS


@pytest.mark.slow
def test_diagnosis_names_the_leaf_module_the_loss_or_the_update(tiny_config):
  config = _config(tiny_config, **{"ann.batch_size": 8})
  pc = config.ann
  info = data.get_info(config.data)
  model = models.phase_model(config.model, info.num_classes, "ann")
  mesh = sharding.make_mesh(-1)
  tx = optax.sgd(0.1)
  state = state_lib.create_state(model, tx, jax.random.key(0), info.image_shape, mesh)
  local = next(data.train_batches(config.data, global_batch_size=8, seed=0))
  batch = {k: local[k] for k in ("image", "label", "target")}
  diagnose = lambda s, b, t=tx: steps.diagnose_nonfinite(  # noqa: E731
      model, t, pc, s, sharding.global_batch(mesh, b), 0, phase="ann", op_weights=None)
  assert "not reproduced" in diagnose(state, batch)

  params = jax.tree.map(np.array, jax.device_get(state["params"]))
  params["blocks_0"]["attn"]["q"]["kernel"][0, 0] = np.nan
  broken = dict(state, params=sharding.replicate(mesh, params))
  assert diagnose(broken, batch).startswith("first non-finite module: 'blocks_0/attn/q', its output in the forward")

  bad_target = dict(batch, target=np.full_like(batch["target"], np.nan))
  assert diagnose(state, bad_target).startswith("first non-finite value: the loss")

  huge = optax.sgd(np.inf)  # an absurd learning rate: finite gradients, non-finite parameters
  assert re.match(r"first non-finite module: '[\w/]+', its parameters after the optimizer update",
                  diagnose(dict(state, opt_state=sharding.replicate(mesh, huge.init(params))), batch, huge))


# ------------------------------------------------------------------------------------------------------------
# 3. Several processes.


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(workdir, cache=None, step_delay=0.0):
  port = _free_port()
  return [_Cli(workdir, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
               devices=4, cache=cache, step_delay=step_delay) for i in range(2)]


def _flat(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_two_processes_stop_together_resume_and_match_one_process_with_8_devices(reference, cache, tmp_path,
                                                                                 saved_state):
  """2 processes x 4 CPU devices over jax.distributed (Gloo), one workdir; SIGTERM reaches only process 1.

  Both must checkpoint the same step and exit (else one would wait forever in the other's collective); the
  rerun resumes (a multi-process Orbax restore) and finishes. Compared with one process on 8 devices:

  Tolerance: the processes all-reduce through Gloo, which sums in another order than one process does, so
  values differ by float32 rounding; the ANN's clip(x / c, 0, 1) (and a spike threshold alike) turns a one-ulp
  change at its kink into a different gradient, and Adam grows these. Measured on this config: per-step losses
  equal to 5e-7 for 8 steps and to 1.2e-4 after; params within 2.1e-3 (step 3) and 3.1e-2 (step 12) of each
  leaf's largest |value|. Asserted: losses to rtol 1e-3 (a wrong data position or state would be far off),
  params to 1e-2 / 5e-2 of the leaf's scale, the test accuracy to 2 of 360 images. Left out:
  embedding/patch/bias, whose exact
  gradient is 0 (a BatchNorm follows the conv), so Adam moves it by rounding noise alone (it differs as much
  between 4 and 8 devices in one process).
  """
  workdir = str(tmp_path / "run")
  clis = _two_processes(workdir, cache=cache, step_delay=0.3)
  clis[1].wait_for_step(4)
  clis[1].proc.send_signal(signal.SIGTERM)
  results = [cli.finish(timeout=400) for cli in clis]
  assert [rc for rc, _, _ in results] == [143, 143], results[0][2][-3000:] + results[1][2][-3000:]
  saved = {int(re.search(r"checkpoint saved at step (\d+)", err).group(1)) for _, _, err in results}
  assert len(saved) == 1 and max(_steps(workdir)) == saved.pop() < STEPS

  results = [cli.finish(timeout=400) for cli in _two_processes(workdir, cache=cache)]
  for rc, _, err in results:
    assert rc == 0, err[-4000:]
  assert "process 1 of 2" in results[1][2]
  assert "summary:" in results[0][1] and "summary:" not in results[1][1]  # only process 0 reports
  summary, ref = _summary(workdir), _summary(reference)
  assert summary["processes"] == 2 and summary["devices"] == 8
  # The same predictions but for test images whose top two logits are within float32 rounding of each other:
  # at this tiny run's near-chance accuracy a few are (measured: 1 of 360 flips).
  assert abs(summary["ann"]["test_accuracy"] - ref["ann"]["test_accuracy"]) <= 2 / 360
  # Only process 0 writes metrics: one events file per launch, steps 1..12 once each.
  losses = [events.read_scalars(os.path.join(w, "ann"))["loss"] for w in (workdir, reference)]
  assert [s for s, _ in losses[0]] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([v for _, v in losses[0]], [v for _, v in losses[1]], rtol=1e-3)
  assert set(_steps(reference)) <= set(_steps(workdir))  # Orbax wrote each checkpoint from both processes
  for step, tolerance in ((EVERY, 1e-2), (STEPS, 5e-2)):
    got = _flat(saved_state(_ckpt_dir(workdir), step)["params"])
    want = _flat(saved_state(_ckpt_dir(reference), step)["params"])
    assert got.keys() == want.keys()
    for key in want:
      if key != "['embedding']['patch']['bias']":
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=tolerance * np.abs(want[key]).max(),
                                   err_msg=f"step {step} {key}")


# ------------------------------------------------------------------------------------------------------------
# 4. Clear errors (more in train_test.test_bad_input_errors, data_test, checkpointing_test).


def _parse_cli(*args):
  """Parses the flags as dtvit.main defines them (a locked config file flag)."""
  argv = ["main", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_mistyped_config_keys_and_values_are_errors(tiny_config):
  assert _parse_cli("--config=configs/quickstart.py:tiny", "--config.snn.time_cost=0.5").snn.time_cost == 0.5
  for bad, message in [("--config.snn.time_csot=0.1", 'Did you mean "time_cost" instead of "time_csot"'),
                       ("--config.modle.depth=2", 'Did you mean "model" instead of "modle"'),
                       ("--config.model.neuron.surogate=atan", 'Did you mean "surrogate" instead of "surogate"')]:
    with pytest.raises((AttributeError, KeyError), match=message):
      _parse_cli("--config=configs/quickstart.py:tiny", bad)
  with pytest.raises(flags.IllegalFlagValueError, match="--config.snn.train_steps=1.5: invalid literal for int"):
    _parse_cli("--config=configs/quickstart.py:tiny", "--config.snn.train_steps=1.5")
  with pytest.raises(flags.IllegalFlagValueError, match="Unknown quickstart argument 'tiyn'"):
    _parse_cli("--config=configs/quickstart.py:tiyn")
  config = _config(tiny_config)
  config.lock()
  with pytest.raises(AttributeError, match="time_csot"):
    config.snn.time_csot = 0.1


@pytest.mark.parametrize("key, value, message", [
    ("model.neuron.surrogate", "tanh", "Unknown surrogate 'tanh'"),
    ("model.mask.mode", "hard", "Unknown mask mode 'hard'"),
    ("model.mask.granularity", "head", "Unknown mask granularity 'head'"),
    ("ann.cost_kind", "l2", "ann.cost_kind='l2'; choose one of"),
    ("ann.nonfinite", "ignore", "ann.nonfinite='ignore'; choose one of"),
    ("phases", "ann,distill", "each phase must be one of"),
    ("eval_batch_size", 100, "eval_batch_size=100 is not divisible by the 8 devices"),
])
def test_invalid_values_are_named_before_anything_is_written(tiny_config, tmp_path, key, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    train.run(_config(tiny_config, **{key: value}), str(tmp_path / "run"), stop_at_step=0)
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_init_from_an_interrupted_write_says_so(tiny_config, reference, tmp_path):
  partial = tmp_path / "partial"
  partial.mkdir()
  leave_unfinished_write(str(partial), _ckpt_dir(reference), EVERY)
  with pytest.raises(FileNotFoundError, match=r"snn.init_from: .*partial holds no complete checkpoint: it holds "
                                              r"only unfinished writes \['3\.orbax-checkpoint-tmp'\]"):
    train.run(_config(tiny_config, **{"phases": "snn", "snn.init_from": str(partial)}), str(tmp_path / "run"))


def test_corrupt_image_in_a_local_archive_is_named(tiny_config, tmp_path):
  good = io.BytesIO()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good, "PNG")
  files = {"train/cat/0.png": good.getvalue(), "test/cat/0.png": good.getvalue(),
           "train/dog/7.jpg": b"\xff\xd8\xff\xe0 not really a jpeg"}
  archive = tmp_path / "cifar.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    for name, blob in files.items():
      member = tarfile.TarInfo(name)
      member.size = len(blob)
      tar.addfile(member, io.BytesIO(blob))
  config = _config(tiny_config, **{"data.name": "cifar10_local", "data.archive": str(archive),
                      "data.data_dir": str(tmp_path / "data_dir")})
  with pytest.raises(ValueError, match=r"Cannot decode image file 'train/dog/7\.jpg'"):
    train.run(config, str(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------------------
# 5. Determinism.


def test_data_order_depends_only_on_seed_step_and_process(tiny_config):
  config = _config(tiny_config)
  take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
  base = dict(global_batch_size=16, num_classes=10)
  a = take(data.train_batches(config.data, seed=3, start_step=5, process_index=1, process_count=2, **base), 2)
  config.data.num_threads, config.data.prefetch = 0, 1  # how batches are prepared does not matter
  b = take(data.train_batches(config.data, seed=3, start_step=6, process_index=1, process_count=2, **base), 1)
  whole = take(data.train_batches(config.data, seed=3, start_step=6, process_index=0, process_count=1, **base), 1)
  for k in ("image", "label", "target"):
    np.testing.assert_array_equal(a[1][k], b[0][k])
    np.testing.assert_array_equal(b[0][k], whole[0][k][8:])  # process 1 of 2 holds the second half
  other_seed = next(data.train_batches(config.data, seed=4, start_step=6, process_index=0, process_count=1,
                                       **base))
  assert not np.array_equal(other_seed["label"], whole[0]["label"])
