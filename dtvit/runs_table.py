"""The table of runs: one row per workdir from its records (accuracy, time steps, energy), named by what differs
between the runs (a sweep's records, else their paths); for `dtvit.report`, `dtvit.sweep`'s table and notebooks."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from dtvit import config_lib
from dtvit import loader
from dtvit import masks as masks_lib
from dtvit import storage
from dtvit import workdir as workdir_lib

SWEEP_RECORD = "sweep_point.json"   # dtvit.sweep's record of a point's overrides, in its workdir
_ROW_KEYS = ("phase", "masks", "semantics", "T_max", "T_avg", "T_avg_op", "T_sim", "T_sim_op", "accuracy",
             "accuracy_all_steps", "ann_accuracy", "snn_energy_uj", "ann_energy_uj", "energy_ratio")


def run_rows(workdirs: Sequence[str]) -> list[dict]:
  """One row per workdir from its summary.json and config.json (None where a value is missing):
  name, workdir, phase, masks ('learned' | 'fixed T'), semantics, T_max, T_avg, T_avg_op, T_sim, T_sim_op,
  accuracy, accuracy_all_steps, ann_accuracy, snn_energy_uj, ann_energy_uj, energy_ratio, note.
  T_sim (the mean of the masked modules' simulated steps) is T_max for a fixed-T run; for a learned run whose
  summary predates it, that of its masks under 'filter' (the only semantics then; granularity 'module'), else
  None."""
  rows = []
  for name, wd in zip(run_names(workdirs), workdirs):
    row = {"name": name, "workdir": storage.abspath(wd), **{k: None for k in _ROW_KEYS}, "note": ""}
    rows.append(row)
    try:
      config = loader.read_config(wd)
    except FileNotFoundError as e:
      row["note"] = str(e)
      continue
    row["masks"] = "learned" if config.model.mask.enabled else "fixed T"
    if config.model.mask.enabled:
      row["semantics"] = config.model.mask.get("semantics", "filter")  # configs before the option: 'filter'
    row["T_max"] = int(config.model.max_time_steps)
    summary = loader.read_summary(wd)
    if summary is None:
      row["note"] = "no summary.json (run unfinished?)"
      continue
    _fill_row(row, summary, config)
  return rows


def _add_note(row: dict, note: str) -> None:
  row["note"] = (row["note"] + "; " if row["note"] else "") + note


def _fill_row(row: dict, summary: Mapping[str, Any], config) -> None:
  """The row's accuracies, time steps and energy from a run's summary.json."""
  if "ann" in summary and "test_accuracy" in summary["ann"]:
    row["ann_accuracy"] = summary["ann"]["test_accuracy"]
  else:
    source = init_from_workdir(config)
    ann_summary = (loader.read_summary(source) or {}).get("ann", {}) if source else {}
    if "test_accuracy" in ann_summary:
      row["ann_accuracy"] = ann_summary["test_accuracy"]
      _add_note(row, f"ANN: the run it started from ({source})")
  phase = _snn_phase(summary)
  if phase is None:
    row["note"] = "no SNN phase in summary.json"
    return
  s = summary[phase]
  row.update(phase=phase, T_max=s.get("T_max", row["T_max"]), T_avg=s.get("average_time_steps"),
             T_avg_op=s.get("op_weighted_time_steps"), T_sim=s.get("average_simulated_steps"),
             T_sim_op=s.get("op_weighted_simulated_steps"), accuracy=s.get("test_accuracy"),
             accuracy_all_steps=s.get("test_accuracy_fixed_T"))
  if not config.model.mask.enabled:  # every step of every module is simulated
    row["T_sim"] = row["T_sim"] if row["T_sim"] is not None else float(row["T_max"])
    row["T_sim_op"] = row["T_sim_op"] if row["T_sim_op"] is not None else float(row["T_max"])
  elif row["T_sim"] is None and s.get("masks") and config.model.mask.get("granularity", "module") == "module":
    # A summary from before simulated steps were reported ('filter' runs): the simulated steps of its masks.
    row["T_sim"] = _filter_simulated_steps(s["masks"])
    _add_note(row, "T_sim from its masks ('filter')")
  totals = (s.get("energy") or {}).get("totals") or {}
  if totals:
    row.update(snn_energy_uj=totals["snn_energy_j"] * 1e6, ann_energy_uj=totals["ann_energy_j"] * 1e6,
               energy_ratio=totals.get("energy_ratio"))


def _filter_simulated_steps(module_masks: Mapping[str, Sequence[int]]) -> float:
  """The mean simulated steps of modules under 'filter' (each feeds the output; granularity 'module')."""
  counts = masks_lib.step_counts({m: np.asarray(v, np.float32) for m, v in module_masks.items()},
                                 {m: (masks_lib.OUTPUT,) for m in module_masks}, "filter")
  return masks_lib.average_steps(counts, "simulated_steps")


def _snn_phase(summary: Mapping[str, Any]) -> str | None:
  for p in ("finetune", "snn"):
    if p in summary and "test_accuracy" in summary[p]:
      return p
  return None


def init_from_workdir(config) -> str | None:
  """The workdir whose ANN phase the SNN phase started from (`snn.init_from` = <workdir>/ann/checkpoints)."""
  init_from = config.get("snn", {}).get("init_from") or ""
  path = storage.abspath(init_from.rstrip(os.sep)) if init_from else ""
  if path and storage.basename(path) == "checkpoints" and storage.basename(storage.dirname(path)) == "ann":
    return storage.dirname(storage.dirname(path))
  return None


def expand_sweeps(workdirs: Sequence[str]) -> list[str]:
  """The workdirs with each sweep root (a folder without its own config.json whose subfolders hold dtvit.sweep
  records) replaced by its points, in name order; other workdirs unchanged."""
  out = []
  for w in workdirs:
    points = [] if storage.isfile(storage.join(w, "config.json")) or not storage.isdir(w) else sorted(
        storage.join(w, d) for d in storage.listdir(w) if storage.isfile(storage.join(w, d, SWEEP_RECORD)))
    out.extend(points or [w])
  return out


def run_names(workdirs: Sequence[str]) -> list[str]:
  """Short names of runs. Points of one sweep (each with dtvit.sweep's record): their swept values that differ
  among these runs ('snn.time_cost=0.03, model.max_time_steps=4'), or the name a point was given; other runs: their
  paths relative to the common parent (the base name of a single run)."""
  paths = [storage.abspath(w).rstrip(os.sep) for w in workdirs]
  if len(paths) == 1:
    return [storage.basename(paths[0])]
  labels = _sweep_labels(paths)
  if labels is not None:
    return labels
  root = common_path(paths)
  names = [_relpath(p, root) if p != root else storage.basename(p) for p in paths]
  return names if len(set(names)) == len(names) else paths


def _split_url(path: str) -> tuple[str, str]:
  scheme, sep, rest = path.partition("://")
  return (scheme + sep, "/" + rest) if sep else ("", path)


def common_path(paths: Sequence[str]) -> str:
  """`os.path.commonpath` of absolute paths, or of URLs on one storage ('gs://b/x/1', 'gs://b/x/2' -> 'gs://b/x');
  paths on different storages: ''."""
  parts = [_split_url(p) for p in paths]
  if len({s for s, _ in parts}) > 1:
    return ""
  return parts[0][0] + os.path.commonpath([r for _, r in parts]).lstrip("/" if parts[0][0] else "")


def _relpath(path: str, root: str) -> str:
  return os.path.relpath(_split_url(path)[1], _split_url(root)[1]) if root else path


def _sweep_labels(paths: Sequence[str]) -> list[str] | None:
  """Labels from dtvit.sweep's records, or None unless every run has one and the labels are distinct."""
  records = []
  for p in paths:
    record = storage.join(p, SWEEP_RECORD)
    if not storage.isfile(record):
      return None
    r = workdir_lib.read_json(record, expect=dict)
    records.append({**r, "overrides": dict(config_lib.renamed(k, v) for k, v in r["overrides"].items())})
  keys = list(dict.fromkeys(k for r in records for k in r["overrides"]))
  varying = [k for k in keys if len({config_lib.format_value(r["overrides"].get(k)) for r in records}) > 1]
  labels = [r["name"] if r.get("named") else
            ", ".join(f"{k}={config_lib.format_value(r['overrides'][k])}" for k in varying if k in r["overrides"])
            or r["name"] for r in records]
  return labels if len(set(labels)) == len(labels) else None
