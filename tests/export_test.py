"""dtvit.export: a trained run's skipped-step inference function serialised with jax.export, loaded in a fresh
process that imports neither dtvit's models nor its configs, gives the model's logits."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import dtvit
from dtvit import export
from dtvit import inference
from dtvit import lif_fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh process from a folder outside the repository: the snippet of export.py's docstring (jax and
# numpy only, no dtvit), then dtvit.export.load; neither may import dtvit's models, flax or the configs.
_FRESH = r"""
import json, sys
import numpy as np, jax
DIR, IMAGES = sys.argv[1], sys.argv[2]
exp = jax.export.deserialize(bytearray(open(f"{DIR}/model.jaxexport", "rb").read()))
w = np.load(f"{DIR}/weights.npz"); weights = [w[f"w{i:04d}"] for i in range(len(w.files))]
images = np.load(IMAGES)
plain = np.asarray(exp.call(weights, images))
assert not any(m.startswith("dtvit") for m in sys.modules), "the snippet imported dtvit"
from dtvit import export
loaded = export.load(DIR)
via_load = np.asarray(loaded(images[:3]))
heavy = sorted(m for m in sys.modules if m.startswith(("dtvit.models", "flax", "configs", "orbax")))
np.save(IMAGES + ".out.npy", plain)
np.save(IMAGES + ".out3.npy", via_load)
print(json.dumps({"heavy": heavy, "classes": loaded.class_names}))
"""


def _with_scores(run, scores):
  """The run with its time-step scores replaced ({module: [T]}): masks that skip some steps of some modules."""
  params = jax.tree.map(lambda x: x, run.variables["params"])
  for module, s in scores.items():
    node = params
    for part in module.split("/"):
      node = node[part]
    node["time_mask"]["time_scores"] = np.asarray(s, np.float32)
  return dataclasses.replace(run, variables={**run.variables, "params": params})


@pytest.mark.slow
def test_export_loads_in_a_fresh_process_and_gives_the_models_logits(tiny_run, tmp_path, monkeypatch):
  # Inference on CPU would run dtvit's CPU neuron kernel at these 3 steps: the export must not contain it (a
  # fresh process without dtvit has no such custom call target).
  monkeypatch.setattr(lif_fused, "KERNEL_INFERENCE_MIN_STEPS", 1)
  run = _with_scores(dtvit.load(tiny_run), {"blocks_0/attn": [1, -1, 1], "blocks_0/mlp": [1, 1, -1]})
  out = str(tmp_path / "exported")
  meta = export.export_loaded(run, out)
  with open(os.path.join(out, export.MODEL_FILE), "rb") as f:
    assert "dtvit_lif" not in jax.export.deserialize(bytearray(f.read())).mlir_module()
  # The exported function runs the skipped-step schedule of these masks.
  schedule = inference.make_schedule(run.model, run.variables["params"])
  assert meta["schedule"] == {"blocks_0/attn": [0, 2], "blocks_0/mlp": [0, 1]}
  assert meta["schedule"] == {k: list(v) for k, v in schedule.items()}
  assert meta["batch_size"] is None and meta["platforms"] == ["cpu"]
  with open(os.path.join(out, "data_spec.json")) as f:
    assert json.load(f) == run.data_spec
  images = next(run.batches(batch_size=40))["image"][:7]  # 7: not the size of any batch seen so far
  expected = np.asarray(run(images))                      # the dense hard-masked model (all T_max steps)
  np.save(tmp_path / "images.npy", images)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", _FRESH, out, str(tmp_path / "images.npy")], cwd=str(tmp_path),
                        env={**env, "PYTHONPATH": os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])},
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report == {"heavy": [], "classes": [str(i) for i in range(10)]}
  np.testing.assert_allclose(np.load(tmp_path / "images.npy.out.npy"), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / "images.npy.out3.npy"), expected[:3], rtol=1e-5, atol=1e-5)
  # The masked steps matter here: with every step on the logits are others.
  assert not np.allclose(np.asarray(run.variant(masks="off")(images)), expected, atol=1e-4)


def test_export_load_errors_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m dtvit.export"):
    export.load(str(tmp_path))
