"""Test set-up: 8 fake CPU devices for the sharding tests; a shared persistent compilation cache.

Many tests compile the same tiny programs (and the CLI tests start subprocesses that compile them again);
XLA:CPU compiles dominate the suite's time, so compiled programs are cached on disk for the whole run. The
cache key covers the program, the flags and the jax version, so a stale entry is never used.
"""
import os
import tempfile

# As `make test` sets them: 8 fake CPU devices; XLA's backend (LLVM) optimisations skipped (half the compile time).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dtvit-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# gcsfs would spend ~60 s probing each bucket's type over gRPC (zonal / hierarchical buckets), which the local GCS
# emulator (`gcs_emulator`) does not serve; read when gcsfs is imported, so set before any test imports it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fcntl
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest


def _tiny_config(**overrides):
  """The quickstart recipe at its tiny size on a ViT (compiles faster than the SPS stem on CPU; the code paths
  are the same), with dotted overrides: tiny_config(**{"ann.train_steps": 4})."""
  from configs import quickstart  # after the XLA flags above
  c = quickstart.get_config("tiny")
  c.model.arch = "vit"
  c.model.variant = "tiny"
  c.model.patch_size = 2
  c.eval_fixed_steps = False
  return _set_dotted(c, overrides)


def _set_dotted(config, dotted: dict):
  """Sets {"a.b.c": value} keys in a nested dict or ConfigDict, in place; returns it."""
  for k, v in dotted.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


@pytest.fixture(scope="session")
def set_dotted():
  """set_dotted(config, {"a.b": value}) -> config with those keys set (in place; dicts or ConfigDicts)."""
  return _set_dotted


def _inf_at(at_step: int):
  """A `train.run` batch hook that puts an inf into the first image of train step `at_step` (from 0)."""
  def hook(phase, step, local):
    del phase
    if step == at_step:
      local = dict(local, image=local["image"].copy())
      local["image"][0, 0, 0, 0] = np.inf
    return local
  return hook


@pytest.fixture(scope="session")
def inject_inf():
  """inject_inf(at_step) -> a `train.run` batch hook making train step `at_step` (from 0) non-finite."""
  return _inf_at


@pytest.fixture(scope="session")
def tiny_config():
  """A factory of tiny configs: tiny_config(**{"phases": "ann", "ann.train_steps": 4})."""
  return _tiny_config


def _image_folder(root, size, num_classes, per_class=1):
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c in range(num_classes):
      d = os.path.join(root, split, f"class{c:03d}")
      os.makedirs(d)
      for i in range(per_class):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(os.path.join(d, f"{i}.png"))
  return root


@pytest.fixture(scope="session")
def image_folder():
  """A factory of image-folder datasets (train/ and test/, one folder per class of random PNGs):
  image_folder(root, size, num_classes, per_class=1) -> root."""
  return _image_folder


def _saved_state(checkpoints: str, step: int) -> dict:
  """The whole train state saved at `step` in a phase's checkpoint folder, as numpy (params, batch_stats,
  opt_state, step), whatever devices and processes wrote it."""
  import jax  # after the XLA flags above
  import orbax.checkpoint as ocp
  path = os.path.join(checkpoints, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


@pytest.fixture(scope="session")
def saved_state():
  """saved_state(checkpoint folder, step) -> the saved train state as numpy."""
  return _saved_state


def assert_same_tree(a, b) -> None:
  """Every leaf of two pytrees bitwise equal."""
  import jax
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="session")
def same_tree():
  """same_tree(a, b): asserts that every leaf of two pytrees is bitwise equal."""
  return assert_same_tree


def tiny_run_config():
  """ViT tiny (1 block, T_max = 3), ANN -> SNN with a time-step cost that switches some steps off; every step
  also evaluated with masks off."""
  return _tiny_config(**{"ann.train_steps": 16, "ann.optimizer.lr": 5e-3, "snn.train_steps": 6, "snn.time_cost": 0.15,
                         "snn.optimizer.score_lr": 0.3, "model.mask.score_init": 0.1, "eval_fixed_steps": True,
                         "mesh.num_devices": 1})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
  """The workdir of one trained tiny run (`tiny_run_config`) per test session.

  Under pytest-xdist every worker has its own basetemp below one session directory: the run goes there, made by
  whichever worker comes first while the others wait on a file lock (the pattern pytest-xdist documents for
  session fixtures)."""
  from dtvit import train
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  workdir = root / "dtvit_tiny_run"
  with open(root / "dtvit_tiny_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "summary.json").exists():
      train.run(tiny_run_config(), str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def unfinished_run(tiny_run, tmp_path_factory):
  """The tiny run as it was before its SNN phase started: the ANN finished, no summary.json."""
  workdir = tmp_path_factory.mktemp("unfinished") / "run"
  shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("snn", "summary.json"))
  return str(workdir)


# The GCS emulator's media downloads lack the `x-goog-generation` header that GCS sends with every object read
# (https://cloud.google.com/storage/docs/xml-api/reference-headers#xgooggeneration); TensorStore needs it to read
# back the OCDBT manifest that Orbax writes ("Malformed StorageGeneration" without it). The server below is the
# emulator with that header added, nothing else changed. (The emulator also ignores `ifGenerationMatch`
# preconditions: see `dtvit.workdir_lock.ObjectLock`.)
_EMULATOR = """
import sys
from gcp_storage_emulator.handlers import objects
_download = objects.download
def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the handler answered 404
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])
objects.download = download  # before the server module builds its handler table
from gcp_storage_emulator.__main__ import main
main(sys.argv[1:])
"""
GCS_BUCKET = "dtvit-test"


@pytest.fixture(scope="session")
def gcs_emulator():
  """A GCS-compatible server (`gcp-storage-emulator`, in memory) on a free localhost port for the test session,
  with bucket GCS_BUCKET; sets STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (TensorStore, which
  Orbax writes arrays through) in os.environ, so subprocesses use it too. Yields 'gs://<bucket>'."""
  pytest.importorskip("gcsfs")
  pytest.importorskip("gcp_storage_emulator")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-c", _EMULATOR, "start", "--host=127.0.0.1", f"--port={port}",
                           "--in-memory", f"--default-bucket={GCS_BUCKET}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      break
    except OSError:
      assert proc.poll() is None and time.time() < deadline, "the GCS emulator did not start"
      time.sleep(0.1)
  url = f"http://127.0.0.1:{port}"
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
  try:
    yield f"gs://{GCS_BUCKET}"
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
