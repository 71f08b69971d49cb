"""Preemption: SIGTERM (a scheduler taking the machine back) and SIGINT (Ctrl-C) become a flag that the training
loop reads after each step, so it checkpoints the current step and raises `Preempted` instead of dying mid-step.
"""

from __future__ import annotations

import os
import signal


class Preempted(Exception):
  """Raised after SIGTERM (preemption) or SIGINT (Ctrl-C) once the current state is checkpointed; `signum` says
  which (`dtvit.main` exits with 128 + signum: 143 or 130)."""
  signum = signal.SIGTERM


class SignalFlag:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the loop checks after each step, so either
  checkpoints the current step and raises `Preempted` (its `signum` and message name the signal). A second
  Ctrl-C stops at once with KeyboardInterrupt, without that checkpoint."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.raised = False
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.raised = True
    self.signum = self.signum or signum
    if signum == signal.SIGINT:  # os.write: logging may hold its lock in the interrupted frame
      os.write(2, b"\nCtrl-C: checkpointing after this step, then stopping (Ctrl-C again: stop now, unsaved)\n")

  def __exit__(self, exc_type, exc, tb):
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    if isinstance(exc, Preempted) and self.signum is not None:
      exc.signum = self.signum
      name = signal.Signals(self.signum).name
      if name != "SIGTERM":
        exc.args = (str(exc).replace("SIGTERM", name, 1),)

