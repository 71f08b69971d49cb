"""One run per workdir (`dtvit.workdir_lock`): a second launch stops at once with one line naming the holder,
writes nothing, and a lock left by a killed run blocks nothing. The slow test races real `python -m dtvit.main`
processes on the tiny config."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from dtvit import train
from dtvit import workdir as workdir_lib
from dtvit import workdir_lock
from tests import launchers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_held_workdir_refuses_a_second_lock_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  first = workdir_lock.lock_for(workdir)
  first.acquire()
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError) as e:
      workdir_lock.lock_for(workdir).acquire()
    message = str(e.value)
    assert "\n" not in message and f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "--workdir" in message  # what to do
  finally:
    first.release()
  second = workdir_lock.lock_for(workdir)
  second.acquire()  # free again once released
  second.release()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
  workdir = str(tmp_path / "run")
  script = ("import os, signal\nfrom dtvit import workdir_lock\n"
            f"workdir_lock.lock_for({workdir!r}).acquire()\nos.kill(os.getpid(), signal.SIGKILL)\n")
  proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert proc.returncode == -signal.SIGKILL
  with open(os.path.join(workdir, workdir_lock.LOCK_FILENAME)) as f:
    assert json.load(f)["pid"] != os.getpid()  # the killed process's record is still there...
  lock = workdir_lock.lock_for(workdir)
  lock.acquire()  # ...and blocks nothing: the kernel dropped the flock with the process
  with open(os.path.join(workdir, workdir_lock.LOCK_FILENAME)) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()


def test_a_launch_refused_before_writing_leaves_no_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="refused"):
    with workdir_lock.hold(workdir):
      assert os.path.isfile(os.path.join(workdir, workdir_lock.LOCK_FILENAME))
      raise ValueError("refused")
  assert not os.path.exists(workdir)


def test_training_into_a_held_workdir_stops_before_reading_or_writing(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{damaged")  # a launch that read it would fail on it instead
  held = workdir_lock.lock_for(workdir)
  held.acquire()
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
      train.run(tiny_config(**{"phases": "ann", "ann.train_steps": 2}), workdir)
    assert sorted(os.listdir(workdir)) == [".lock", "config.json"]
  finally:
    held.release()


def test_overwrite_moves_the_run_aside_but_keeps_the_held_lock(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lock.hold(workdir):
    lock_inode = os.stat(os.path.join(workdir, workdir_lock.LOCK_FILENAME)).st_ino
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write('{"phases": "ann"')  # truncated
    launch = workdir_lib.plan_launch(workdir, {"phases": "ann"}, overwrite=True)
    workdir_lib.record_launch(launch)
    aside = glob.glob(str(tmp_path / "run.old-*"))
    assert len(aside) == 1 and os.listdir(aside[0]) == ["config.json"]
    assert os.stat(os.path.join(workdir, workdir_lock.LOCK_FILENAME)).st_ino == lock_inode
    with pytest.raises(workdir_lock.WorkdirBusyError):  # still held: no launch can slip in
      workdir_lock.lock_for(workdir).acquire()


# ------------------------------------------------------------------------------------------------------------
# Real processes.

CLI_CONFIG = ["--config=configs/quickstart.py:tiny", "--config.model.arch=vit", "--config.model.variant=tiny",
              "--config.model.patch_size=2", "--config.eval_fixed_steps=False", "--config.phases=ann",
              "--config.ann.train_steps=10", "--config.ann.checkpoint_every=2", "--config.ann.log_every=1"]



def _launch(workdir, step_delay):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TEST_STEP_DELAY=str(step_delay))
  return subprocess.Popen([sys.executable, "-c", launchers.SLOW_MAIN, *CLI_CONFIG, f"--workdir={workdir}"], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _refused(proc, holder, timeout=120):
  """Asserts `proc` stopped with status 1 and one error line naming `holder` (a Popen), no traceback."""
  _, err = proc.communicate(timeout=timeout)
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1 and len(errors) == 1, err[-3000:]
  assert re.search(rf"is in use by another run \(pid {holder.pid} on host {re.escape(socket.gethostname())}, "
                   rf"started [^)]+\); wait for it to end", errors[0]), errors
  assert "Traceback" not in err


def _history(workdir):
  with open(os.path.join(workdir, "config_history.json")) as f:
    return json.load(f)


def _leftovers(workdir):
  return glob.glob(os.path.join(workdir, "**", "*.orbax-checkpoint-tmp*"), recursive=True)


@pytest.mark.slow
def test_two_launches_on_one_workdir_together_and_staggered_then_a_rerun_after_sigkill(tmp_path):
  workdir = str(tmp_path / "run")
  # Started together: exactly one takes the workdir, the other stops at once.
  a, b = _launch(workdir, 0.5), _launch(workdir, 0.5)
  deadline = time.time() + 240
  while a.poll() is None and b.poll() is None:
    assert time.time() < deadline
    time.sleep(0.1)
  loser, first = (a, b) if a.poll() is not None else (b, a)
  assert first.poll() is None, "the holder must still be training when the other stops"
  _refused(loser, first)
  # Staggered: a third launch while the holder is mid-training (its log shows a step).
  deadline, seen = time.time() + 240, []
  for line in first.stderr:
    seen.append(line)
    if re.search(r"\] \[2\] accuracy=", line):
      break
    assert time.time() < deadline, "".join(seen[-30:])
  started = time.time()
  c = _launch(workdir, 0.0)
  _refused(c, first)
  assert first.poll() is None and time.time() - started < 120  # it did not wait for the holder
  assert len(_history(workdir)) == 1  # neither refused launch recorded anything
  # The holder is killed (no chance to clean up) once a checkpoint is committed (saves are asynchronous: under
  # load the step-2 save may still be in flight); a rerun resumes past its lock and finishes.
  ckpt, deadline = os.path.join(workdir, "ann", "checkpoints"), time.time() + 120
  while not any(n.isdigit() for n in (os.listdir(ckpt) if os.path.isdir(ckpt) else [])):
    assert first.poll() is None and time.time() < deadline, "no checkpoint committed"
    time.sleep(0.05)
  first.send_signal(signal.SIGKILL)
  first.wait(timeout=60)
  rerun = _launch(workdir, 0.0)
  _, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err[-4000:]
  history = _history(workdir)
  assert len(history) == 2 and history[1]["resumed_from"].get("ann", 0) >= 2
  assert os.path.isfile(os.path.join(workdir, "summary.json")) and not _leftovers(workdir)
