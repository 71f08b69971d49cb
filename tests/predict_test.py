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
  assert ann["phase"] == "ann" and ann["count"] == 100
  assert set(ann) == {"phase", "step", "finished", "data", "count", "accuracy"}


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


# ------------------------------------------------------------------------------------------------------------
# After training: user errors in one line, an unfinished run refused unless asked, the phase and step said.


def _cli(capsys, main, argv):
  """(exit status, stdout, stderr lines) of a command's main(argv) run in this process."""
  status = 0
  try:
    main(argv)
  except SystemExit as e:
    status = e.code
  out, err = capsys.readouterr()
  return status, out, [l for l in err.splitlines() if l.strip()]


def _commands(workdir, tmp_path):
  image = str(tmp_path / "seven.png")
  Image.fromarray(np.full((8, 8), 128, np.uint8)).save(image)
  from dtvit import export
  return {"evaluate": (evaluate.main, ["--workdir", workdir, "--examples=8"]),
          "predict": (predict.main, ["--workdir", workdir, image]),
          "export": (export.main, ["--workdir", workdir, "--out", str(tmp_path / "export")])}


@pytest.mark.slow
def test_an_unfinished_run_is_refused_unless_asked_and_then_named_with_its_step(unfinished_run, tmp_path, capsys,
                                                                                caplog):
  with pytest.raises(dtvit.loader.UnfinishedRunError, match=r"unfinished \(ann at step 16 of 16, snn not started\)"):
    dtvit.load(unfinished_run)
  run = dtvit.load(unfinished_run, allow_unfinished=True)
  assert (run.phase, run.step, run.finished) == ("ann", 16, False)
  assert "using phase 'ann' at step 16 of 16 (UNFINISHED run" in caplog.text
  for name, (main, argv) in _commands(unfinished_run, tmp_path).items():
    status, out, err = _cli(capsys, main, argv)
    assert status == 1 and out == "" and len(err) == 1, (name, err)
    assert err[0].startswith(f"error: dtvit.{name}: UnfinishedRunError: dtvit.load: the run in {unfinished_run} is "
                             f"unfinished (ann at step 16 of 16, snn not started)"), err
    assert "--allow_unfinished" in err[0]
    status, out, err = _cli(capsys, main, argv + ["--allow_unfinished"])
    assert status == 0, (name, err)
    assert f"dtvit.{name}: phase 'ann' at step 16 of 16 (UNFINISHED run {unfinished_run})" in err, err
  meta = json.load(open(tmp_path / "export" / "export.json"))
  assert (meta["phase"], meta["step"], meta["finished"]) == ("ann", 16, False)


@pytest.mark.slow
def test_the_commands_say_which_phase_and_step_they_use(tiny_run, tmp_path, capsys):
  for name, (main, argv) in _commands(tiny_run, tmp_path).items():
    status, out, err = _cli(capsys, main, argv)
    assert status == 0, (name, err)
    assert f"dtvit.{name}: phase 'snn' at step 6 of 6 (finished run {tiny_run})" in err, err
  status, out, _ = _cli(capsys, evaluate.main, ["--workdir", tiny_run, "--examples=8"])
  headline = json.loads(out)
  assert (headline["phase"], headline["step"], headline["finished"]) == ("snn", 6, True)


def test_user_errors_after_training_are_one_line_with_status_1(tiny_run, tmp_path, capsys):
  import shutil
  (tmp_path / "empty").mkdir()
  damaged = tmp_path / "damaged"
  shutil.copytree(tiny_run, damaged)
  (damaged / "summary.json").write_text('{"phases": ["ann", "snn"], "ann": {"ste')
  (tmp_path / "a_file").write_text("")
  cases = [(str(tmp_path / "nowhere"), "FileNotFoundError: dtvit.load: workdir", "does not exist"),
           (str(tmp_path / "empty"), "FileNotFoundError: dtvit.load:", "has no config.json"),
           (str(damaged), f"DamagedRecordError: workdir {damaged}: summary.json is damaged", "--overwrite")]
  for workdir, start, part in cases:
    for name, (main, argv) in _commands(workdir, tmp_path).items():
      status, out, err = _cli(capsys, main, argv)
      assert status == 1 and out == "" and len(err) == 1, (name, workdir, err)
      assert err[0].startswith(f"error: dtvit.{name}: {start}") and part in err[0], err
  # An output folder that cannot be written: said before any work.
  from dtvit import export
  for main, argv in [(export.main, ["--workdir", tiny_run, "--out", str(tmp_path / "a_file" / "export")]),
                     (evaluate.main, ["--workdir", tiny_run, "--out", str(tmp_path / "a_file" / "x.json")])]:
    status, out, err = _cli(capsys, main, argv)
    assert status == 1 and out == "" and len(err) == 1 and "a_file" in err[0], err
    assert err[0].startswith("error: dtvit.") and ("NotADirectoryError" in err[0] or "FileNotFoundError" in err[0])


@pytest.mark.slow
def test_predict_reports_each_bad_file_and_predicts_the_others(tiny_run, digit_folder, tmp_path, capsys):
  good = sorted(os.path.join(digit_folder, "7", f) for f in os.listdir(os.path.join(digit_folder, "7")))[:2]
  text = tmp_path / "notes.txt"
  text.write_text("not an image")
  missing = str(tmp_path / "missing.png")
  paths = [good[0], str(text), missing, good[1]]
  status, out, err = _cli(capsys, predict.main, ["--workdir", tiny_run, "--top=1", *paths])
  assert status == 1
  assert [line.split(":")[0] for line in out.splitlines()] == [good[0], good[1]]  # both valid images answered
  expected = [r["classes"] for r in predict.predict_files(dtvit.load(tiny_run), [good[0], good[1]], top=1)]
  assert [f"{n} ({p:.3f})" for (n, p), in expected] == [line.split(": ")[1] for line in out.splitlines()]
  errors = [line for line in err if line.startswith("error:")]
  assert len(errors) == 2 and errors[0].startswith(f"error: dtvit.predict: {text}: ") and missing in errors[1]
  assert "2 of 4 files failed" in err[-1]
