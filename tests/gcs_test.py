"""Workdirs, sweep roots and exports on object storage (`gs://`), end to end, against a real GCS-compatible server
(`gcs_emulator` in conftest.py: gcp-storage-emulator on localhost): a tiny two-phase run killed with SIGKILL and
resumed bitwise, then evaluate, predict, export and report reading the bucket; a sweep rooted in the bucket;
the workdir lock between two processes; and never a local folder named `gs:`."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

from dtvit import storage
from dtvit import workdir as workdir_lib
from dtvit import workdir_lock
from dtvit.data import sources
from tests import launchers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEASE_S = 3.0  # the lock's lease in these tests: a killed run's lock is stale after it

pytestmark = pytest.mark.slow


def _no_local_gs_folder():
  for folder in (os.getcwd(), ROOT, tempfile.gettempdir()):
    assert not os.path.exists(os.path.join(folder, "gs:")), f"a local folder named gs: in {folder}"


@pytest.fixture(autouse=True)
def _nothing_local_named_gs():
  _no_local_gs_folder()
  yield
  _no_local_gs_folder()


def _env(**extra):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", DTVIT_LOCK_LEASE_S=str(LEASE_S), **extra)


# The tiny ViT of conftest's `tiny_config` through the command line, both phases, checkpoints every 4 steps.
CLI_CONFIG = ["--config=configs/quickstart.py:tiny", "--config.model.arch=vit", "--config.model.variant=tiny",
              "--config.model.patch_size=2", "--config.eval_fixed_steps=False", "--config.mesh.num_devices=1",
              "--config.ann.train_steps=8", "--config.snn.train_steps=8", "--config.ann.checkpoint_every=4",
              "--config.snn.checkpoint_every=4"]



def _main(workdir, step_delay=0.0, **popen):
  return subprocess.Popen([sys.executable, "-c", launchers.SLOW_MAIN, *CLI_CONFIG, f"--workdir={workdir}"], cwd=ROOT,
                          env=_env(TEST_STEP_DELAY=str(step_delay)), text=True, **popen)


def _final_state(workdir, phase, saved_state):
  steps = workdir_lib.committed_steps(workdir_lib.checkpoint_dir(workdir, phase))
  return saved_state(workdir_lib.checkpoint_dir(workdir, phase), max(steps))


@pytest.fixture(scope="module")
def bucket_run(gcs_emulator, tmp_path_factory):
  """(a run in the bucket that was SIGKILLed mid-run and resumed, the same run uninterrupted on local disk)."""
  workdir, reference = f"{gcs_emulator}/run", str(tmp_path_factory.mktemp("local") / "run")
  first = _main(workdir, step_delay=0.3, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  local = _main(reference, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # meanwhile, on the other core
  deadline = time.time() + 240
  while not workdir_lib.committed_steps(workdir_lib.checkpoint_dir(workdir, "ann")):
    assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.wait(timeout=60)
  assert storage.exists(f"{workdir}/.lock")  # a killed run cannot release its lock...
  assert local.wait(timeout=300) == 0, local.stderr.read()[-3000:]
  time.sleep(LEASE_S)  # ...which blocks its rerun only until its lease runs out
  rerun = _main(workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  out, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err[-4000:]
  assert "taking it over" in err and f"summary: {workdir}/summary.json" in out
  return workdir, reference


def test_a_run_killed_in_the_bucket_resumes_bitwise(bucket_run, saved_state, same_tree):
  workdir, reference = bucket_run
  history = workdir_lib.read_json(f"{workdir}/config_history.json")
  assert len(history) == 2 and history[1]["resumed_from"].get("ann", 0) >= 4
  for phase in ("ann", "snn"):
    same_tree(_final_state(workdir, phase, saved_state), _final_state(reference, phase, saved_state))
  summary, local = (workdir_lib.read_json(f"{w}/summary.json") for w in (workdir, reference))
  assert summary["workdir"] == "run" and summary["snn"]["test_accuracy"] == local["snn"]["test_accuracy"]
  names = storage.listdir(workdir)
  assert {"config.json", "data_spec.json", "summary.json", "ann", "snn"} <= set(names) and ".lock" not in names
  assert storage.glob(f"{workdir}/snn", "events.out.tfevents.*")  # TensorBoard events, uploaded


def test_evaluate_predict_export_and_report_read_the_bucket(bucket_run, gcs_emulator, tmp_path, capsys):
  from PIL import Image
  import dtvit
  from dtvit import evaluate, export, predict, report
  workdir, reference = bucket_run
  run = dtvit.load(workdir)
  assert run.workdir == workdir and run.phase == "snn" and run.step == 8
  evaluate.main([f"--workdir={workdir}", f"--out={gcs_emulator}/eval.json"])
  got = json.loads(capsys.readouterr().out)
  assert got["accuracy"] == workdir_lib.read_json(f"{reference}/summary.json")["snn"]["test_accuracy"]
  assert workdir_lib.read_json(f"{gcs_emulator}/eval.json")["accuracy"] == got["accuracy"]
  image = str(tmp_path / "digit.png")
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(image)
  predict.main([f"--workdir={workdir}", "--json", image])
  row = json.loads(capsys.readouterr().out)
  assert row["path"] == image and len(row["classes"]) == 3
  out = f"{gcs_emulator}/export"
  export.main([f"--workdir={workdir}", f"--out={out}"])
  exported = export.load(out)
  x = run.preprocess(np.full((2, 8, 8, 1), 200, np.uint8))
  np.testing.assert_allclose(np.asarray(exported(x)), np.asarray(run(x)), rtol=1e-5, atol=1e-5)
  result = report.write_report([workdir], num_batches=1, early_exit_batches=1)
  assert result["report"] == f"{workdir}/report/report.md" and result["plots"]
  assert {"report.md", "report.json", *(f"{p}.png" for p in result["plots"])} <= set(
      storage.listdir(f"{workdir}/report"))
  assert storage.read_bytes(f"{workdir}/report/training_curves.png")[:4] == b"\x89PNG"


def test_a_sweep_rooted_in_the_bucket(gcs_emulator, capsys):
  from dtvit import sweep
  root = f"{gcs_emulator}/sweep"
  argv = ["--config=configs/quickstart.py:tiny", f"--root={root}", "--grid=phases=ann", "--grid=ann.train_steps=2",
          "--grid=model.arch=vit", "--grid=model.variant=tiny", "--grid=model.patch_size=2",
          "--grid=mesh.num_devices=1", "--grid=ann.batch_size=8,16"]
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    assert sweep.main(argv) == 0
    assert sweep.main(argv) == 0  # a rerun skips the finished points
  finally:
    os.chdir(cwd)
  assert "finished, skipped" in capsys.readouterr().out
  table = sweep.read_table(root)
  assert [r["state"] for r in table["rows"]] == ["done", "done"] and table["keys"][-1] == "ann.batch_size"
  names = storage.listdir(root)
  assert {"sweep.csv", "sweep.md", "sweep.json", "sweep.png", "timings.json"} <= set(names)
  assert all(r["workdir"].startswith(root + "/") for r in table["rows"])
  assert storage.isfile(f"{table['rows'][0]['workdir']}/sweep_point.json")


_HOLDER = textwrap.dedent("""
    import sys, time
    from dtvit import workdir_lock
    workdir_lock.lock_for(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_the_workdir_lock_between_two_processes(gcs_emulator):
  workdir = f"{gcs_emulator}/locked"
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], env=_env(), stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    time.sleep(LEASE_S * 1.5)  # the holder's heartbeat keeps it held past its lease
    other = subprocess.run([sys.executable, "-c", "import sys; from dtvit import workdir_lock\n"
                            "workdir_lock.lock_for(sys.argv[1]).acquire()", workdir],
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and f"WorkdirBusyError: workdir {workdir} is in use by another run " \
        f"(pid {holder.pid} on host" in other.stderr
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  lock = workdir_lock.ObjectLock(workdir, lease_s=LEASE_S)
  with pytest.raises(workdir_lock.WorkdirBusyError):  # killed, but its last heartbeat is within the lease
    lock.acquire()
  time.sleep(LEASE_S)
  lock.acquire()  # stale now: taken over
  assert json.loads(storage.read_bytes(f"{workdir}/.lock"))["pid"] == os.getpid()
  lock.release()
  assert not storage.exists(f"{workdir}/.lock")


def test_gs_without_gcsfs_is_one_line_naming_the_extra_and_writes_nothing(tmp_path):
  hide = "import sys, runpy; sys.modules['gcsfs'] = None; sys.argv[0] = 'dtvit.main'; " \
         "runpy.run_module('dtvit.main', run_name='__main__', alter_sys=True)"
  proc = subprocess.run([sys.executable, "-c", hide, f"--config={ROOT}/configs/quickstart.py:tiny",
                         "--workdir=gs://some-bucket/run"], cwd=tmp_path, env=_env(), capture_output=True,
                        text=True, timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1 and len(errors) == 1 and "pip install 'dtvit[gcs]'" in errors[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []


def test_a_data_dir_in_a_bucket_is_one_line_saying_to_stage_it():
  with pytest.raises(ValueError, match=r"read local files only .* copy the data to local disk first"):
    sources.resolve_path("gs://bkt/tensorflow_datasets", "data.data_dir")
