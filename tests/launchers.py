"""Command lines the tests start in subprocesses (imported by the test modules as `tests.launchers`)."""

import textwrap

# `python -m dtvit.main` with each train step slowed by $TEST_STEP_DELAY seconds, so that a run is still training
# when a test acts on it (a second launch, a kill); no value changes.
SLOW_MAIN = textwrap.dedent("""
    import os, runpy, sys, time
    from dtvit import sharding
    _global_batch = sharding.global_batch
    def slow_global_batch(mesh, local):
      time.sleep(float(os.environ["TEST_STEP_DELAY"]))
      return _global_batch(mesh, local)
    sharding.global_batch = slow_global_batch
    sys.argv[0] = "dtvit.main"
    runpy.run_module("dtvit.main", run_name="__main__", alter_sys=True)
""")
