"""Does a run killed at random moments, then rerun with the same command, end bitwise where an uninterrupted run ends?

  .venv/bin/python -m experiments.reliability.kill_resume --trials=8       # SNN phase, 24 steps (recorded)
  .venv/bin/python -m experiments.reliability.kill_resume --phase=ann --trials=3

Runs the real CLI (tests/reliability_test.py's launcher: it can only slow steps down) on
the tiny quickstart ViT on 8 CPU devices, each step slowed by --step_delay so that kills spread over training:
  reference  one uninterrupted run, fresh compile;
  again      a second uninterrupted run (another process; it fills the persistent compilation cache that all
             later launches use);
  random     per trial, two launches each SIGKILLed at a random moment (a quarter at U(0, 6 s) after the start:
             start-up, compile, anything; the rest at a uniform time within the remaining training after the
             first logged step: steps and asynchronous checkpoint writes), then a launch that runs to the end;
  mid-write  SIGKILL once a chosen checkpoint is committed; then the next checkpoint left on disk as a kill
             between its last file write and Orbax's commit rename leaves it (`leave_unfinished_write`); rerun
             to the end;
  sigterm    SIGTERM after a logged step: exit status 143, a checkpoint at that step; rerun to the end.
Each workdir must then hold the reference's checkpoints (every leaf of the state, bitwise) and its summary (up to
times).
"""
import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests import reliability_test as rt  # noqa: E402


def phase_flags(phase, steps, every):
  return [f"--config.phases={phase}", f"--config.{phase}.train_steps={steps}",
          f"--config.{phase}.checkpoint_every={every}", f"--config.{phase}.log_every=1",
          f"--config.{phase}.max_to_keep=100"]


def checkpoints(workdir, phase):
  d = os.path.join(workdir, phase, "checkpoints")
  names = os.listdir(d) if os.path.isdir(d) else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "tmp" in n)


def state(workdir, phase, step):
  path = os.path.join(workdir, phase, "checkpoints", str(step), "state")
  import orbax.checkpoint as ocp
  ckptr = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ckptr.metadata(path).item_metadata.tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def summary(workdir, phase):
  with open(os.path.join(workdir, "summary.json")) as f:
    s = json.load(f)[phase]
  return {k: v for k, v in s.items() if not k.endswith("time_s")}


def compare(workdir, reference, phase):
  """(checkpoint steps equal?, every state leaf bitwise equal?, summary equal?)"""
  steps, ref_steps = checkpoints(workdir, phase)[0], checkpoints(reference, phase)[0]
  common = [s for s in ref_steps if s in steps]
  leaves_equal = all(
      all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state(workdir, phase, s)),
                                               jax.tree.leaves(state(reference, phase, s))))
      for s in common)
  return set(ref_steps) <= set(steps), leaves_equal, summary(workdir, phase) == summary(reference, phase)


def last_logged(lines):
  steps = [int(m.group(1)) for m in (re.search(r"\] \[(\d+)\] accuracy=", l) for l in lines) if m]
  return max(steps, default=0)


def kill_at(cli, seconds, sig=signal.SIGKILL):
  """Sends `sig` `seconds` after launch (or reports that the run ended first); returns the log lines."""
  deadline = time.time() + seconds
  while time.time() < deadline and cli.proc.poll() is None:
    time.sleep(0.01)
  ended = cli.proc.poll() is not None
  if not ended:
    cli.proc.send_signal(sig)
  rc, _, err = cli.finish()
  return ended, rc, err.splitlines()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--phase", default="snn", choices=["ann", "snn"])
  parser.add_argument("--steps", type=int, default=24)
  parser.add_argument("--every", type=int, default=4)
  parser.add_argument("--trials", type=int, default=8)
  parser.add_argument("--step_delay", type=float, default=0.25, help="seconds added per step (spreads the kills)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  flags = phase_flags(args.phase, args.steps, args.every)
  root = tempfile.mkdtemp(prefix="kill_resume_")
  cache = os.path.join(root, "jax_cache")
  print(f"workdirs under {root}; config: tiny quickstart ViT, {' '.join(flags)}")

  reference = os.path.join(root, "reference")
  rt._run_cli(reference, *flags, step_delay=args.step_delay)
  print(f"reference: uninterrupted, fresh compile, checkpoints {checkpoints(reference, args.phase)[0]}")
  rows = []
  # A second uninterrupted run, in another process, fills the persistent compilation cache.
  workdir = os.path.join(root, "again")
  rt._run_cli(workdir, *flags, step_delay=args.step_delay, cache=cache)
  rows.append(("again", "none", "-", compare(workdir, reference, args.phase)))

  def launch(workdir, kill=True):
    """One launch, SIGKILLed at a random moment unless `kill` is False: a quarter of the time at U(0, 6 s)
    after the start (start-up, compile, anything), else at U(0, remaining training time) after its first
    logged step. Returns a description."""
    cli = rt._Cli(workdir, *flags, step_delay=args.step_delay, cache=cache)
    at, first = None, None
    if kill and rng.random() < 0.25:
      at = rng.uniform(0, 6)
    elif kill:
      for line in cli.proc.stderr:  # until the first logged step, or the end (a run resumed at its last step)
        cli.lines.append(line)
        if m := re.search(r"\] \[(\d+)\] accuracy=", line):
          first = int(m.group(1))
          at = rng.uniform(0, (args.steps - first) * args.step_delay * 1.2)
          break
    ended, rc, lines = kill_at(cli, float("inf") if at is None else at)
    text = "\n".join(lines)
    resumed = re.search(rf"{args.phase}: resumed from step (\d+)", text)
    start = f"from step {resumed.group(1)}" if resumed else "from scratch"
    if ended:
      assert rc == 0, text[-3000:]
      return f"{start}, ran to the end"
    done, tmp = checkpoints(workdir, args.phase)
    when = f"{at:.1f} s after launch" if first is None else f"{at:.2f} s after step {first} was logged"
    return (f"{start}, SIGKILL {when} (last logged step {last_logged(lines)}, checkpoints {done}"
            f"{', unfinished ' + str(tmp) if tmp else ''})")

  for trial in range(args.trials):
    workdir = os.path.join(root, f"random{trial}")
    events = [launch(workdir) for _ in range(2)]
    rows.append((f"random {trial}", " -> ".join(events), launch(workdir, kill=False),
                 compare(workdir, reference, args.phase)))

  for trial in range(2):
    workdir = os.path.join(root, f"midwrite{trial}")
    ckpt_dir = os.path.join(workdir, args.phase, "checkpoints")
    committed = args.every * rng.randint(1, args.steps // args.every - 1)
    cli = rt._Cli(workdir, *flags, step_delay=args.step_delay, cache=cache)
    while committed not in checkpoints(workdir, args.phase)[0]:  # kill once this step is committed
      assert cli.proc.poll() is None, cli.finish()[2][-3000:]
      time.sleep(0.005)
    cli.proc.send_signal(signal.SIGKILL)
    cli.finish()
    before = checkpoints(workdir, args.phase)[0]
    tmp = rt.leave_unfinished_write(ckpt_dir, os.path.join(reference, args.phase, "checkpoints"),
                                    max(before) + args.every)
    rows.append((f"mid-write {trial}", f"SIGKILL once step {committed} is committed (checkpoints {before}) -> "
                 f"{tmp} left fully written but not renamed (what a kill before Orbax's commit leaves)",
                 launch(workdir, kill=False), compare(workdir, reference, args.phase)))

  workdir = os.path.join(root, "sigterm")
  cli = rt._Cli(workdir, *flags, step_delay=args.step_delay * 3, cache=cache)
  cli.wait_for_step(args.steps // 3)
  cli.proc.send_signal(signal.SIGTERM)
  rc, _, err = cli.finish()
  saved = re.search(r"checkpoint saved at step (\d+)", err)
  rows.append(("sigterm", f"SIGTERM after step {args.steps // 3} is logged: exit status {rc}, checkpoint at step "
               f"{saved.group(1) if saved else '-'}, checkpoints {checkpoints(workdir, args.phase)[0]}",
               launch(workdir, kill=False), compare(workdir, reference, args.phase)))

  print("\n| trial | interrupted launches | last launch | reference checkpoints present | every state leaf "
        "bitwise equal | summary equal |\n| --- | --- | --- | --- | --- | --- |")
  for name, events, rerun, (present, equal, same_summary) in rows:
    print(f"| {name} | {events} | {rerun} | {present} | {equal} | {same_summary} |")
  ok = all(all(r[3]) for r in rows)
  # A kill drawn after a launch's last step lands on a finished run: count the kills that landed.
  landed = sum(e.count("SIGKILL") for name, e, _, _ in rows if name.startswith("random"))
  print(f"\nrandom kills that landed: {landed} of {2 * args.trials} drawn (the tests' schedule, "
        f"tests/reliability_test.py, kills at logged steps so that every kill lands)")
  print(f"all trials exact: {ok}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
