"""The training loop (dtvit/loop.py `train_loop`): it reads the steps' flags (finite, stop) in windows of
`sync_every` steps, never waiting for the device in between, and ends exactly where a loop that waits after
every step ends: the same states, the same non-finite errors and skips, the same SIGTERM checkpoint. Also what
it writes for a run you watch: periodic evaluation on the held-out split, steps/s, images/s, ETA and hparams in
TensorBoard.

The reference run logs and checkpoints every step, so each of its steps is a sync point (the flags are read
right after the step); the other runs log and checkpoint rarely and read the flags of all their steps after
the first in one window (sync_every 10 > 8 steps), so a bad step or a stop is found several steps late.
"""

import os
import signal

import numpy as np
import pytest

from dtvit import evaluate as evaluate_lib
from dtvit import loader
from dtvit import loop
from dtvit import events
from dtvit import sharding
from dtvit import train

STEPS = 8


def _config(tiny_config, **overrides):
  return tiny_config(**{"phases": "ann", "ann.train_steps": STEPS, "ann.log_every": 100, "ann.checkpoint_every": 100,
                        "ann.max_to_keep": 20, **overrides})


def _ckpt_dir(workdir):
  return os.path.join(workdir, "ann", "checkpoints")


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(_ckpt_dir(workdir)) if n.isdigit())






def _sigterm_at(at_step):
  def hook(phase, step, local):
    del phase
    if step == at_step:
      os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop's handler: a flag, read with this step
    return local
  return hook


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
  """Every step a sync point, every state checkpointed."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.run(_config(tiny_config, **{"ann.log_every": 1, "ann.checkpoint_every": 1}), workdir)
  return workdir


@pytest.mark.slow
def test_flags_read_in_windows_and_the_run_ends_as_the_waiting_loop_does(tiny_config, reference, tmp_path,
                                                                         monkeypatch, saved_state, same_tree):
  events = []
  stepper_call, settle = loop._Stepper.__call__, loop._settle
  def record_dispatch(self, state, batch, go, stop):
    events.append("dispatch")
    return stepper_call(self, state, batch, go, stop)
  def record_settle(ph, ckpt, stepper, state, pending, log):
    events.append(f"read {[p.step for p in pending]}")
    return settle(ph, ckpt, stepper, state, pending, log)
  monkeypatch.setattr(loop._Stepper, "__call__", record_dispatch)
  monkeypatch.setattr(loop, "_settle", record_settle)
  monkeypatch.setattr(sharding, "any_process", lambda flag: pytest.fail("a host-side stop agreement"))

  workdir = str(tmp_path)
  train.run(_config(tiny_config, **{"ann.log_every": 4, "ann.sync_every": 3}), workdir)
  # Flags are read in one transfer at every 3rd step (done = 3, 6) and at the sync points: the first step (for
  # the throughput), the log steps (done = 4, 8) and the end; the steps between are dispatched without waiting.
  assert events == ["dispatch", "read [0]", "dispatch", "dispatch", "read [1, 2]", "dispatch", "read [3]",
                    "dispatch", "dispatch", "read [4, 5]", "dispatch", "dispatch", "read [6, 7]"]
  assert _steps(workdir) == [STEPS]
  same_tree(saved_state(_ckpt_dir(workdir), STEPS), saved_state(_ckpt_dir(reference), STEPS))


@pytest.mark.slow
def test_nonfinite_read_late_names_its_step_and_keeps_the_last_good_checkpoint(tiny_config, reference, tmp_path,
                                                                               saved_state, same_tree, inject_inf):
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteError, match=r"ann: non-finite values at step 5: first non-finite module: "
                                                 r"'embedding/patch'.*last good checkpoint \(step 3\) is kept"):
    train.run(_config(tiny_config, **{"ann.checkpoint_every": 3}), workdir, batch_hook=inject_inf(at_step=4))
  assert _steps(workdir) == [3]
  same_tree(saved_state(_ckpt_dir(workdir), 3), saved_state(_ckpt_dir(reference), 3))


@pytest.mark.slow
def test_skip_read_late_gives_the_states_of_the_waiting_loop(tiny_config, tmp_path, caplog, saved_state, same_tree,
                                                              inject_inf):
  hook = inject_inf(at_step=1)
  waiting, late = str(tmp_path / "waiting"), str(tmp_path / "late")
  train.run(_config(tiny_config, **{"ann.nonfinite": "skip", "ann.log_every": 1, "ann.checkpoint_every": 1}),
            waiting, batch_hook=hook)
  caplog.clear()
  train.run(_config(tiny_config, **{"ann.nonfinite": "skip"}), late, batch_hook=hook)
  assert "ann: step 2 skipped (params unchanged), first non-finite module: 'embedding/patch'" in caplog.text
  same_tree(saved_state(_ckpt_dir(late), STEPS), saved_state(_ckpt_dir(waiting), STEPS))
  # The skipped batch changed nothing but the counter.
  s1, s2 = saved_state(_ckpt_dir(waiting), 1), saved_state(_ckpt_dir(waiting), 2)
  assert (s1["step"], s2["step"]) == (1, 2)
  same_tree(s1["params"], s2["params"])


@pytest.mark.slow
def test_sigterm_read_late_checkpoints_the_step_it_came_with(tiny_config, reference, tmp_path, saved_state, same_tree):
  workdir = str(tmp_path)
  with pytest.raises(train.Preempted, match="checkpoint saved at step 3;"):
    train.run(_config(tiny_config), workdir, batch_hook=_sigterm_at(2))  # arrives before step 2 (done 3)
  assert _steps(workdir) == [3]
  same_tree(saved_state(_ckpt_dir(workdir), 3), saved_state(_ckpt_dir(reference), 3))
  train.run(_config(tiny_config), workdir)  # and resumes to the reference's end
  same_tree(saved_state(_ckpt_dir(workdir), STEPS), saved_state(_ckpt_dir(reference), STEPS))


@pytest.mark.slow
def test_a_run_to_watch_periodic_val_accuracy_throughput_and_hparams(tiny_config, tmp_path):
  workdir = str(tmp_path)
  config = _config(tiny_config, **{"ann.log_every": 2, "ann.eval_every": 3, "data.val_examples": 100})
  train.run(config, workdir)
  curves = events.read_curves(os.path.join(workdir, "ann"))
  val_steps, val_acc = curves["val_accuracy"]
  np.testing.assert_array_equal(val_steps, [3, 6, 8])  # every 3 steps and at the end
  loaded = loader.load(workdir)
  mesh = sharding.make_mesh(-1)
  final = evaluate_lib.evaluate(loaded.model, sharding.replicate(mesh, loaded.variables), config, mesh, split="val")
  assert final["count"] == 100 and val_acc[-1] == pytest.approx(final["accuracy"])
  log_steps, steps_per_s = curves["steps_per_s"]
  np.testing.assert_array_equal(log_steps, [2, 4, 6, 8])  # step 2's interval: step 2 (after the compiling one)
  assert np.all(steps_per_s > 0)
  np.testing.assert_allclose(curves["images_per_s"][1], steps_per_s * config.ann.batch_size, rtol=1e-5)
  np.testing.assert_allclose(curves["eta_s"][1], (STEPS - log_steps) / steps_per_s, rtol=1e-5)
  hparams = [v for e in events.read_events(os.path.join(workdir, "ann")) for v in e.summary.value
             if v.tag == "_hparams_/session_start_info"]
  assert len(hparams) == 1


@pytest.mark.parametrize("overrides, message", [
    ({"ann.eval_every": 5}, r"ann.eval_every=5 evaluates the 'val' split, which is empty: set data.val_examples"),
    ({"ann.eval_every": -1}, r"ann.eval_every must be >= 0"),
    ({"data.periodic_eval_split": "train"}, r"data.periodic_eval_split='train'; choose 'val'"),
])
def test_periodic_eval_settings_are_checked_before_anything_is_written(tiny_config, tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.run(_config(tiny_config, **overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
