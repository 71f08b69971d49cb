"""Use after training: `python -m dtvit.evaluate` reproduces the run's own results on its splits and scores a
folder of class subfolders; `python -m dtvit.predict` names the classes of image files with probabilities."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import dtvit
from dtvit import evaluate
from dtvit import predict
from dtvit.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tiny_run):
  return dtvit.load(tiny_run)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
  """The 360 test digits as 8-bit PNGs in <root>/<digit>/."""
  root = tmp_path_factory.mktemp("digits_png")
  _, _, x, y = sources.digits_arrays()
  for i, (image, label) in enumerate(zip(x, y)):
    os.makedirs(root / str(label), exist_ok=True)
    Image.fromarray(np.round(image[..., 0] * 255).astype(np.uint8)).save(root / str(label) / f"{i:03d}.png")
  return str(root)


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_results(tiny_run):
  snn = _summary(tiny_run)["snn"]
  out = evaluate.evaluate_workdir(tiny_run)
  assert out["phase"] == "snn" and out["data"] == "test split" and out["count"] == 360
  assert out["accuracy"] == pytest.approx(snn["test_accuracy"], abs=1e-9)
  assert out["accuracy_fixed_T"] == pytest.approx(snn["test_accuracy_fixed_T"], abs=1e-9)
  for key in ("average_time_steps", "average_simulated_steps", "per_module_time_steps", "masks", "T_max"):
    assert out[key] == snn[key]
  assert out["energy"]["totals"] == pytest.approx(snn["energy"]["totals"], rel=1e-6)
  ann = evaluate.evaluate_workdir(tiny_run, phase="ann", split="train", examples=100)
  assert ann["phase"] == "ann" and ann["count"] == 100 and set(ann) == {"phase", "data", "count", "accuracy"}


@pytest.mark.slow
def test_evaluate_a_folder_of_class_subfolders(run, tiny_run, digit_folder, tmp_path, capsys):
  evaluate.main([f"--workdir={tiny_run}", f"--images={digit_folder}", f"--out={tmp_path / 'all.json'}"])
  printed = json.loads(capsys.readouterr().out)
  assert printed["data"] == digit_folder and printed["count"] == 360
  # The accuracy is that of the model on those files, labelled by their folders.
  files, labels = [], []
  for label in sorted(os.listdir(digit_folder)):
    for name in sorted(os.listdir(os.path.join(digit_folder, label))):
      files.append(np.asarray(Image.open(os.path.join(digit_folder, label, name)))[..., None])
      labels.append(int(label))
  expected = float(np.mean(run.predict(run.preprocess(files)) == np.asarray(labels)))
  assert printed["accuracy"] == pytest.approx(expected, abs=1e-9)
  # 8-bit files of the test split: within two images of the run's own test accuracy.
  assert abs(printed["accuracy"] - _summary(tiny_run)["snn"]["test_accuracy"]) <= 2 / 360 + 1e-9
  with open(tmp_path / "all.json") as f:
    assert "spike_rates" in json.load(f)


def test_evaluate_images_errors_name_the_fix(run, tmp_path):
  (tmp_path / "cat").mkdir()
  with pytest.raises(ValueError, match=r"Subfolder 'cat' .* not one of the run's classes \['0', '1'"):
    evaluate.FolderBatches(run, str(tmp_path), 8)
  with pytest.raises(FileNotFoundError, match="not a folder"):
    evaluate.FolderBatches(run, str(tmp_path / "nowhere"), 8)


def test_predict_names_classes_with_their_probabilities(run, digit_folder):
  paths = [os.path.join(digit_folder, d, sorted(os.listdir(os.path.join(digit_folder, d)))[0]) for d in "037"]
  rows = predict.predict_files(run, paths, top=3, batch_size=2)
  images = [np.asarray(Image.open(p))[..., None] for p in paths]
  probs = predict.softmax(np.asarray(run(run.preprocess(images))))
  assert [r["path"] for r in rows] == paths
  for row, p_K in zip(rows, probs):
    names = [name for name, _ in row["classes"]]
    assert names == [str(k) for k in np.argsort(-p_K, kind="stable")[:3]]
    np.testing.assert_allclose([p for _, p in row["classes"]], np.sort(p_K)[::-1][:3], rtol=1e-12)
  assert [r["classes"][0][0] for r in rows] == [run.class_names[k] for k in run.predict(run.preprocess(images))]


@pytest.mark.slow
def test_predict_command_line(run, tiny_run, digit_folder):
  paths = [os.path.join(digit_folder, "5", sorted(os.listdir(os.path.join(digit_folder, "5")))[0])]
  proc = subprocess.run([sys.executable, "-m", "dtvit.predict", f"--workdir={tiny_run}", "--top=2", *paths],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (name1, p1), (name2, p2) = predict.predict_files(run, paths, top=2)[0]["classes"]
  assert proc.stdout.strip().splitlines()[-1] == f"{paths[0]}: {name1} ({p1:.3f}), {name2} ({p2:.3f})"
