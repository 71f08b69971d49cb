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
  from dtvit import recipes
  image_folder(str(tmp_path / "data" / "shapes"), 8, 3)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path / "data"))
  cfg = recipes.get_base_config().data
  cfg.name, cfg.archive, cfg.data_dir = "image_folder", "shapes", "prepared"
  info = sources.get_info(cfg)
  assert (info.num_train, info.num_test, info.num_classes) == (3, 3, 3)
  assert os.path.isdir(tmp_path / "data" / "prepared" / tfds_folder.FOLDER_BUILDER_NAME)
  assert os.listdir(elsewhere) == []
  from dtvit.data import spec
  assert spec.class_names(cfg) == ["class000", "class001", "class002"]


# Run from a folder holding a user's own `configs` package, first on the path: dtvit neither installs nor imports
# one (what recipes share is dtvit.recipes), and the repository's recipes load by path.
_INSTALLED = r"""
import os, sys
import dtvit, configs
from dtvit import sweep
from dtvit.data import sources
target, recipes_dir = sys.argv[1], sys.argv[2]
assert dtvit.__file__.startswith(target), dtvit.__file__
assert configs.MINE and not os.path.exists(os.path.join(target, "configs")), configs.__file__
assert sources.project_root() is None
quickstart, arg = sweep.load_config_module(os.path.join(recipes_dir, "quickstart.py") + ":tiny")
assert quickstart.get_config(arg).model.max_time_steps == 3
cifar10, _ = sweep.load_config_module(os.path.join(recipes_dir, "cifar10_spikformer.py"))
assert cifar10.get_config("tiny,local").data.archive == "../shared/data/cifar10-jpg.tar.gz"
from dtvit import cpu_kernels
assert str(cpu_kernels.SOURCE).startswith(target) and cpu_kernels.SOURCE.exists()  # the kernel's source ships
print("ok")
"""


def _with_own_configs(folder, path: list[str]) -> dict:
  """An environment whose PYTHONPATH starts with `folder`, holding a user's own `configs` package."""
  os.makedirs(folder / "configs", exist_ok=True)
  (folder / "configs" / "__init__.py").write_text("MINE = True\n")
  rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != ROOT]
  return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *path, *rest])}


def test_a_users_own_configs_package_is_unaffected(tmp_path):
  """dtvit imports no `configs`: a user's own package of that name (first on the path) neither breaks dtvit's
  command line nor is replaced."""
  env = _with_own_configs(tmp_path / "user", [ROOT])
  code = "import configs, dtvit.main, dtvit.train, dtvit.sweep; assert configs.MINE; print('ok')"
  run = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True)
  assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stderr[-3000:]
  run = subprocess.run([sys.executable, "-m", "dtvit.main", "--help"], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=120)
  assert "--workdir" in run.stdout and "Traceback" not in run.stderr, run.stderr[-3000:]  # absl: --help exits 1


@pytest.mark.slow
def test_pip_install_puts_dtvit_on_the_path_and_no_configs(tmp_path):
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
  env = _with_own_configs(tmp_path / "user", [str(target)])
  run = subprocess.run([sys.executable, "-c", _INSTALLED, str(target), os.path.join(ROOT, "configs")],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split() == ["ok"]
  with open(target / "dtvit-0.1.0.dist-info" / "METADATA") as f:
    requires = {line.split(":", 1)[1].strip().split("<")[0].split(">")[0] for line in f if line.startswith(
        "Requires-Dist:")}
  assert {"jax", "flax", "grain", "flatbuffers", "ml-collections"} <= requires
