"""dtvit as an installed package: `pip install .` puts dtvit and its recipes (`configs`) where Python finds
them from any folder, and data paths never depend on the current directory."""

import os
import shutil
import subprocess
import sys

import pytest

from dtvit.data import sources
from dtvit.data import tfds_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_relative_data_paths_resolve_against_the_checkout_not_the_current_directory(tmp_path, monkeypatch):
  monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
  monkeypatch.chdir(tmp_path)
  assert sources.project_root() == ROOT
  assert sources.resolve_path("data_dir") == os.path.join(ROOT, "data_dir")
  assert sources.resolve_path("../shared/data/x.tar.gz") == os.path.join(os.path.dirname(ROOT), "shared", "data",
                                                                           "x.tar.gz")
  assert sources.resolve_path("/abs/x") == "/abs/x" and sources.resolve_path("") == ""
  assert sources.resolve_path("~/x") == os.path.expanduser("~/x")
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path / "data"))
  assert sources.resolve_path("cifar.tar.gz") == str(tmp_path / "data" / "cifar.tar.gz")
  # An installed copy (no checkout) needs the variable or an absolute path.
  monkeypatch.delenv(sources.DATA_DIR_ENV)
  monkeypatch.setattr(sources, "project_root", lambda: None)
  with pytest.raises(ValueError, match=r"data.archive='x.tar' is relative .* set DTVIT_DATA_DIR="):
    sources.resolve_path("x.tar", "data.archive")


def test_an_image_folder_under_dtvit_data_dir_loads_from_another_directory(tmp_path, monkeypatch, image_folder):
  from configs import common  # pylint: disable=g-import-not-at-top
  image_folder(str(tmp_path / "data" / "shapes"), 8, 3)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path / "data"))
  cfg = common.get_base_config().data
  cfg.name, cfg.archive, cfg.data_dir = "image_folder", "shapes", "prepared"
  info = sources.get_info(cfg)
  assert (info.num_train, info.num_test, info.num_classes) == (3, 3, 3)
  assert os.path.isdir(tmp_path / "data" / "prepared" / tfds_folder.FOLDER_BUILDER_NAME)
  assert os.listdir(elsewhere) == []
  from dtvit.data import spec  # pylint: disable=g-import-not-at-top
  assert spec.class_names(cfg) == ["class000", "class001", "class002"]


_INSTALLED = r"""
import os, sys
import dtvit, configs
from configs import quickstart, cifar10_spikformer
from dtvit.data import sources
target = sys.argv[1]
assert dtvit.__file__.startswith(target) and configs.__file__.startswith(target), (dtvit.__file__, configs.__file__)
assert sources.project_root() is None
assert quickstart.get_config("tiny").model.num_steps == 3
assert cifar10_spikformer.get_config("tiny,local").data.archive == "../shared/data/cifar10-jpg.tar.gz"
from dtvit import cpu_kernels
assert str(cpu_kernels.SOURCE).startswith(target) and cpu_kernels.SOURCE.exists()  # the kernel's source ships
print("ok", os.path.dirname(configs.__file__))
"""


@pytest.mark.slow
def test_pip_install_puts_dtvit_and_its_recipes_on_the_path(tmp_path):
  """`pip install --target` of a copy of the tracked sources (the build writes build/ and *.egg-info beside
  them), offline: no dependencies, the venv's setuptools; then imports from another folder."""
  src, target = tmp_path / "src", tmp_path / "site"
  files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
  for f in files:
    if f.startswith(("dtvit/", "configs/")) or f in ("pyproject.toml", "requirements.txt", "README.md"):
      os.makedirs(os.path.dirname(src / f), exist_ok=True)
      shutil.copy(os.path.join(ROOT, f), src / f)
  pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], capture_output=True, text=True)
  assert pip.returncode == 0, pip.stderr[-3000:]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target)] + [
      p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != ROOT])}
  run = subprocess.run([sys.executable, "-c", _INSTALLED, str(target)], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split() == ["ok", str(target / "configs")]
  with open(target / "dtvit-0.1.0.dist-info" / "METADATA") as f:
    requires = {line.split(":", 1)[1].strip().split("<")[0].split(">")[0] for line in f if line.startswith(
        "Requires-Dist:")}
  assert {"jax", "flax", "grain", "flatbuffers", "ml-collections"} <= requires
