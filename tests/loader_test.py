"""dtvit.load on a tiny trained run: the restored model reproduces the run's own test results; clear errors;
the example notebook executes against the run."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dtvit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  return tiny_run


@pytest.fixture(scope="module")
def snn(run_dir):
  return dtvit.load(run_dir)


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _accuracy(loaded):
  correct = count = 0.0
  for batch in loaded.batches():
    correct += float(((loaded.predict(batch["image"]) == batch["label"]) * batch["mask"]).sum())
    count += float(batch["mask"].sum())
  return correct / count


def test_latest_phase_reproduces_the_runs_snn_results(run_dir, snn):
  run = snn
  summary = _summary(run_dir)
  assert run.phase == "snn" and run.is_snn and run.model.mask.hard
  assert run.summary == summary["snn"]
  assert run.config.model.max_time_steps == 3 and run.max_time_steps == 3
  assert run.steps_per_module == summary["snn"]["per_module_time_steps"]
  assert {k: v.astype(int).tolist() for k, v in run.masks.items()} == summary["snn"]["masks"]
  assert run.average_time_steps == pytest.approx(summary["snn"]["average_time_steps"])
  # Every step count comes from `run.step_counts` (models.step_counts), as the training's summary does.
  assert run.simulated_steps_per_module == summary["snn"]["per_module_simulated_steps"]
  assert run.average_simulated_steps == pytest.approx(summary["snn"]["average_simulated_steps"])
  assert {k: c["work"] for k, c in run.step_counts.items()} == {
      k: summary["snn"]["step_counts"][k]["work"] for k in run.masks}
  # The restored variables, hard masks and model give the training's own evaluation, image for image.
  assert _accuracy(run) == pytest.approx(summary["snn"]["test_accuracy"], abs=1e-9)
  assert _accuracy(run.variant(masks="off")) == pytest.approx(summary["snn"]["test_accuracy_fixed_T"], abs=1e-9)


def test_ann_phase_reproduces_the_runs_ann_accuracy(run_dir):
  ann = dtvit.load(run_dir, phase="ann")
  assert ann.phase == "ann" and not ann.is_snn
  assert ann.masks == {} and ann.steps_per_module == {} and ann.average_time_steps is None
  assert _accuracy(ann) == pytest.approx(_summary(run_dir)["ann"]["test_accuracy"], abs=1e-9)
  with pytest.raises(ValueError, match="needs the SNN"):
    ann.inference_fn()


@pytest.mark.slow
def test_call_apply_inference_fn_agree(run_dir, snn):
  run = dtvit.load(run_dir, phase="snn")
  assert run.model == snn.model and run.masks.keys() == snn.masks.keys()
  images = next(run.batches())["image"]
  B = images.shape[0]
  logits = np.asarray(run(images))
  assert logits.shape == (B, run.info.num_classes)
  out, aux = run.apply(images)
  np.testing.assert_allclose(np.asarray(out), logits, rtol=1e-6, atol=1e-6)
  for k, m in run.masks.items():
    np.testing.assert_array_equal(np.asarray(aux["masks"][k]), m)
  assert np.asarray(aux["step_logits"]).shape == (3, B, run.info.num_classes)
  assert set(aux["block_outputs"]) == {"blocks_0"}
  fast, schedule = run.inference_fn()
  np.testing.assert_allclose(np.asarray(fast(images)), logits, rtol=1e-5, atol=1e-5)
  # Under 'skip' (the default) each module runs exactly its active steps.
  assert run.model.mask.semantics == "skip"
  assert schedule == {k: tuple(int(t) for t in np.flatnonzero(m)) for k, m in run.masks.items()}
  np.testing.assert_array_equal(run.predict(images), logits.argmax(-1))
  # The ANN twin of the same variables is another function of the images.
  twin = run.variant(phase="ann")
  assert twin.model.phase == "ann" and twin.variables is run.variables
  assert np.asarray(twin(images)).shape == logits.shape


def test_wrong_image_shape_is_a_clear_error(snn):
  run = snn
  image = next(run.batches(batch_size=2))["image"][0]
  with pytest.raises(ValueError, match=r"images\[None\]"):
    run(image)
  with pytest.raises(ValueError, match="Expected images"):
    run(np.zeros((2, 4, 4, 1), np.float32))


def test_clear_errors(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    dtvit.load(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    dtvit.load(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="unknown phase"):
    dtvit.load(run_dir, phase="snnn")
  with pytest.raises(FileNotFoundError, match="no checkpoints of phase 'finetune'"):
    dtvit.load(run_dir, phase="finetune")
  # A phase whose checkpoint directory holds no finished step: named for that phase; None falls back.
  copy = tmp_path / "copy"
  shutil.copytree(run_dir, copy)
  shutil.rmtree(copy / "snn" / "checkpoints")
  (copy / "snn" / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    dtvit.load(str(copy), phase="snn")
  assert dtvit.load(str(copy)).phase == "ann"


def test_import_dtvit_stays_light():
  code = ("import sys, dtvit; assert callable(dtvit.load); "
          "print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_notebook_executes_against_a_run(run_dir):
  import nbclient  # requirements-dev.txt
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1, "the notebook needs one cell tagged 'parameters'"
  assert 'WORKDIR = "workdirs/quickstart"' in params[0].source
  params[0].source = params[0].source.replace('"workdirs/quickstart"', repr(run_dir))
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute(env={**os.environ, "PYTHONPATH": ROOT})
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")
  summary = _summary(run_dir)
  for module, steps in summary["snn"]["per_module_time_steps"].items():
    assert f"{module}: {steps:g} of 3 steps" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) >= 4  # the classified images and the report's plots


def test_preprocess_is_the_pipelines_normalisation_and_the_spec_is_stored(run_dir, snn, tmp_path):
  from dtvit.data import sources, spec
  run = snn
  raw = sources.digits_arrays()[2]                                   # the test split's raw [0, 1] images
  batch = next(run.batches())
  n = int(batch["mask"].sum())
  np.testing.assert_array_equal(run.preprocess(raw[:n]), batch["image"][:n])
  # uint8 images ([0, 255]) and single [h, w] images give the same input up to the uint8 rounding.
  uint8 = np.round(raw[:4] * 255).astype(np.uint8)
  np.testing.assert_allclose(run.preprocess(uint8), batch["image"][:4], atol=0.6 / 255 / run.data_spec["std"][0])
  np.testing.assert_array_equal(run.preprocess(raw[0, :, :, 0]), run.preprocess(raw[:1]))
  # Any size is resized to the model's, as the pipeline resizes.
  assert run.preprocess([np.zeros((16, 12, 1), np.uint8)]).shape == (1, 8, 8, 1)
  with pytest.raises(ValueError, match=r"takes \[H, W, 1\] images"):
    run.preprocess(np.zeros((1, 8, 8, 3), np.float32))
  assert run.class_names == [str(i) for i in range(10)]
  # Training wrote the spec; a workdir from before the file existed recomputes the same one from its config.
  with open(os.path.join(run_dir, "data_spec.json")) as f:
    stored = json.load(f)
  assert stored == run.data_spec and stored["image_shape"] == [8, 8, 1]
  copy = tmp_path / "old_run"
  shutil.copytree(run_dir, copy)
  os.remove(copy / "data_spec.json")
  assert spec.read_spec(str(copy), run.config.data) == stored
