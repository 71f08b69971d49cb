"""A trained run as a serialised JAX function plus its weights, usable without dtvit's models or configs.

  python -m dtvit.export --workdir=workdirs/quickstart --out=exported/quickstart [--phase=snn]
      [--batch_size=0] [--platforms=cpu,cuda]

writes to --out:
  model.jaxexport  `jax.export` serialisation of fn(weights, images [B, H, W, C] float32) -> logits [B, K]: the
                   phase's evaluation model; for the SNN, the skipped-step inference function
                   (`inference.scheduled_model` of the learned hard masks: masked (module, step) pairs are not
                   computed). B is symbolic (any batch size) unless --batch_size fixes it.
  weights.npz      the weights, arrays 'w0000', 'w0001', ... in the order fn takes them (export.json lists
                   each one's name in the parameter tree).
  data_spec.json   what an image must be (`dtvit.data.spec`): size, mean/std, class names.
  export.json      phase, schedule {module: steps run}, batch size (null = any), platforms, weight names, jax
                   version.

Loading needs jax and numpy only: `dtvit.export.load(DIR)` (this module imports neither the models nor the
configs), or without dtvit at all:

  import json, numpy as np, jax
  exp = jax.export.deserialize(bytearray(open(f"{DIR}/model.jaxexport", "rb").read()))
  w = np.load(f"{DIR}/weights.npz"); weights = [w[f"w{i:04d}"] for i in range(len(w.files))]
  spec = json.load(open(f"{DIR}/data_spec.json"))
  logits = exp.call(weights, (images01 - np.float32(spec["mean"])) / np.float32(spec["std"]))  # [B, S, S, C]

The exported program runs on the platforms it was exported for (default: the one exporting) and needs a jax
that can read its serialisation version (jax keeps reading versions for at least 6 months).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable

import numpy as np

MODEL_FILE, WEIGHTS_FILE, SPEC_FILE, META_FILE = "model.jaxexport", "weights.npz", "data_spec.json", "export.json"


def _key(i: int) -> str:
  return f"w{i:04d}"


def _inference_model(run):
  """The model the export runs and its schedule {module: steps run} ({} for the ANN twin). Its neurons
  run the pure-JAX recurrence (`kernels='xla'`, the same spikes bitwise): the CPU kernel is a custom call
  that only a process with dtvit's kernel registered could run, and jax.export keeps none."""
  from dtvit import inference
  model = run.model.clone(kernels="xla") if run.model.kernels == "fused" else run.model
  if not run.is_snn:
    return model, {}
  schedule = inference.make_schedule(model, run.variables["params"])
  return inference.scheduled_model(model, schedule), {k: list(v) for k, v in schedule.items()}


def export_run(workdir: str, out: str, *, phase: str | None = None, batch_size: int = 0,
               platforms: tuple[str, ...] | None = None, allow_unfinished: bool = False) -> dict:
  """Exports the run's `phase` (default: its latest) into `out` (its four files overwritten); returns the
  metadata written to export.json. batch_size 0: a symbolic batch dimension. An unfinished run is refused
  unless `allow_unfinished` (`dtvit.load`)."""
  from dtvit import loader
  run = loader.load(workdir, phase, allow_unfinished=allow_unfinished)
  print(f"dtvit.export: {run.source}", file=sys.stderr)
  return export_loaded(run, out, batch_size=batch_size, platforms=platforms)


def export_loaded(run, out: str, *, batch_size: int = 0, platforms: tuple[str, ...] | None = None) -> dict:
  """`export_run` of a `dtvit.load` result (its model and variables as they are)."""
  import io
  import jax
  from dtvit import models
  from dtvit import storage
  from dtvit import workdir as workdir_lib
  model, schedule = _inference_model(run)
  named, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(run.variables))
  leaves = [np.asarray(x) for _, x in named]

  def fn(weights, images):
    return models.apply_model(model, jax.tree.unflatten(treedef, weights), images, with_aux=False)

  batch = jax.export.symbolic_shape("b")[0] if batch_size == 0 else batch_size
  specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
           jax.ShapeDtypeStruct((batch, *run.info.image_shape), np.float32))
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
  meta = {"workdir": run.workdir, "phase": run.phase, "step": run.step, "finished": run.finished,
          "schedule": schedule, "num_steps": run.max_time_steps, "batch_size": batch_size or None,
          "image_shape": list(run.info.image_shape), "num_classes": run.info.num_classes,
          "platforms": list(exported.platforms),
          "weights": [jax.tree_util.keystr(path) for path, _ in named], "jax_version": jax.__version__}
  storage.makedirs(out)
  storage.write_bytes(storage.join(out, MODEL_FILE), exported.serialize())
  weights = io.BytesIO()
  np.savez(weights, **{_key(i): x for i, x in enumerate(leaves)})
  storage.write_bytes(storage.join(out, WEIGHTS_FILE), weights.getvalue())
  for name, content in ((SPEC_FILE, run.data_spec), (META_FILE, meta)):  # export.json last: the export is whole
    workdir_lib.write_json(storage.join(out, name), content)
  return meta


@dataclasses.dataclass(frozen=True)
class Exported:
  """A loaded export: `logits = exported(images)` with images float32 [B, H, W, C] normalised as
  `spec` says ((pixels in [0, 1] - mean) / std, resized to image_shape)."""
  call: Callable[..., Any]
  weights: list
  spec: dict
  meta: dict

  @property
  def class_names(self) -> list[str]:
    return list(self.spec["class_names"])

  def __call__(self, images):
    return self.call(self.weights, np.asarray(images, np.float32))

  def normalise(self, images01):
    """(images in [0, 1] - mean) / std, float32; images already at the model's size."""
    return ((np.asarray(images01, np.float32) - np.float32(self.spec["mean"])) /
            np.float32(self.spec["std"])).astype(np.float32)


def load(directory: str) -> Exported:
  """An export written by `export_run`; needs jax and numpy, and no model code."""
  import io
  import jax
  from dtvit import storage
  from dtvit import workdir as workdir_lib
  storage.check(directory, "export")
  if not storage.isfile(storage.join(directory, META_FILE)):
    raise FileNotFoundError(f"{directory} holds no dtvit export ({META_FILE} missing); write one with "
                            "python -m dtvit.export --workdir=W --out=DIR.")
  exported = jax.export.deserialize(bytearray(storage.read_bytes(storage.join(directory, MODEL_FILE))))
  with np.load(io.BytesIO(storage.read_bytes(storage.join(directory, WEIGHTS_FILE)))) as w:
    weights = [w[_key(i)] for i in range(len(w.files))]
  spec, meta = (workdir_lib.read_json(storage.join(directory, name), expect=dict) for name in (SPEC_FILE, META_FILE))
  return Exported(call=exported.call, weights=weights, spec=spec, meta=meta)


def _define_flags(values) -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "a training run's --workdir", flag_values=values)
  flags.DEFINE_string("out", None, "the export's folder (an earlier export's files there are overwritten)",
                      flag_values=values)
  flags.DEFINE_enum("phase", None, ["ann", "snn", "finetune"], "default: the run's latest phase", flag_values=values)
  flags.DEFINE_integer("batch_size", 0, "0: any batch size (symbolic); else this one only", flag_values=values)
  flags.DEFINE_string("platforms", "", "comma-separated, e.g. cpu,cuda,tpu; default: this machine's",
                      flag_values=values)
  flags.DEFINE_bool("allow_unfinished", False, "export a run that has not finished (its latest checkpoint); "
                    "without it such a run is refused", flag_values=values)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=values)


def main(argv=None) -> None:
  """`python -m dtvit.export` with `argv` (without the program; None: sys.argv[1:])."""
  from dtvit import cli
  from dtvit import loader
  args, _ = cli.parse("dtvit.export", _define_flags, argv, doc="A trained run as a jax.export function plus "
                      "weights and data spec, loadable with jax and numpy only.")
  platforms = tuple(x for x in args.platforms.split(",") if x) or None
  from dtvit import storage
  with loader.user_errors("dtvit.export"):
    storage.makedirs(args.out)  # object storage: checks its package only; permissions show at the write
    if not storage.is_url(args.out) and not os.access(args.out, os.W_OK):
      raise PermissionError(f"--out={args.out} is not writable; choose another folder.")
    meta = export_run(args.workdir, args.out, phase=args.phase, batch_size=args.batch_size, platforms=platforms,
                      allow_unfinished=args.allow_unfinished)
  print(json.dumps({k: meta[k] for k in ("phase", "step", "schedule", "batch_size", "platforms")}))
  print(f"export: {storage.abspath(args.out)}")


if __name__ == "__main__":
  main()
