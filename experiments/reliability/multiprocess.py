"""How close do 2 processes x 4 CPU devices (jax.distributed, Gloo) train to 1 process x 8 devices, and does a
2-process run resume exactly after a SIGTERM that reaches one process only?

  .venv/bin/python -m experiments.reliability.multiprocess               # ANN phase, 12 steps
  .venv/bin/python -m experiments.reliability.multiprocess --phase=snn

Runs the real CLI three ways on the tiny quickstart ViT, same config and seed:
  one    1 process, 8 devices;
  two    2 processes, 4 devices each, `--coordinator_address=localhost:PORT --num_processes=2 --process_id=i`;
  two_r  the same, SIGTERM to process 1 after step 4, then both rerun.
Prints the per-step training losses, each checkpoint's largest parameter difference relative to the leaf's
largest |value|, and whether two_r equals two bitwise.
"""
import argparse
import json
import os
import re
import signal
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dtvit import events  # noqa: E402
from experiments.reliability import kill_resume as kr  # noqa: E402
from tests import reliability_test as rt  # noqa: E402


def two_processes(workdir, flags, **kwargs):
  port = rt._free_port()
  return [rt._Cli(workdir, *flags, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}", devices=4, **kwargs) for i in range(2)]


def finish_all(clis):
  results = [cli.finish(timeout=900) for cli in clis]
  for rc, _, err in results:
    assert rc == 0, err[-4000:]
  return results


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--phase", default="ann", choices=["ann", "snn"])
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--every", type=int, default=3)
  args = parser.parse_args()
  flags = kr.phase_flags(args.phase, args.steps, args.every)
  root = tempfile.mkdtemp(prefix="multiprocess_")
  print(f"workdirs under {root}; config: tiny quickstart ViT, {' '.join(flags)}")
  one, two, two_r = (os.path.join(root, n) for n in ("one", "two", "two_r"))
  rt._run_cli(one, *flags)
  results = finish_all(two_processes(two, flags))
  print("process 1 log:", next(l for l in results[1][2].splitlines() if "devices:" in l)[-60:])

  clis = two_processes(two_r, flags, step_delay=0.3)
  clis[1].wait_for_step(4)
  clis[1].proc.send_signal(signal.SIGTERM)
  stopped = [cli.finish(timeout=900) for cli in clis]
  saved = [re.search(r"checkpoint saved at step (\d+)", err).group(1) for _, _, err in stopped]
  print(f"two_r: SIGTERM to process 1 only -> exit statuses {[rc for rc, _, _ in stopped]}, checkpoint saved at "
        f"step {saved} (process 0, 1)")
  finish_all(two_processes(two_r, flags))

  losses = {n: dict(events.read_scalars(os.path.join(w, args.phase))["loss"]) for n, w in (("one", one),
                                                                                           ("two", two))}
  print("\n| step | loss, 1 process x 8 | loss, 2 processes x 4 | abs diff |\n| --- | --- | --- | --- |")
  for s in sorted(losses["one"]):
    a, b = losses["one"][s], losses["two"][s]
    print(f"| {s} | {a:.7f} | {b:.7f} | {abs(a - b):.1e} |")

  print("\n| step | largest param difference / leaf's max abs value (leaf) | same without embedding/patch/bias "
        "| two_r == two, every state leaf bitwise |\n| --- | --- | --- | --- |")
  for s in kr.checkpoints(one, args.phase)[0]:
    a = rt._flat(kr.state(two, args.phase, s)["params"])
    b = rt._flat(kr.state(one, args.phase, s)["params"])
    rel = {k: float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-12)) for k in b}
    worst = max(rel, key=rel.get)
    rest = max(v for k, v in rel.items() if k != "['embedding']['patch']['bias']")
    exact = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(kr.state(two_r, args.phase, s)),
                                                     jax.tree.leaves(kr.state(two, args.phase, s))))
    print(f"| {s} | {rel[worst]:.1e} ({worst}) | {rest:.1e} | {exact} |")
  accs = {n: kr.summary(w, args.phase)["test_accuracy"] for n, w in (("one", one), ("two", two), ("two_r", two_r))}
  print(f"\ntest accuracy: {json.dumps(accs)}")
  print(f"summary two_r == two (up to times): {kr.summary(two_r, args.phase) == kr.summary(two, args.phase)}")


if __name__ == "__main__":
  main()
