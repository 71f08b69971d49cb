"""Configs as data: dotted keys, the one dict flattener, "did you mean" for a key that names nothing, and
overrides parsed by `ml_collections.config_flags`.

`dtvit.main` reads `--config.key=value` with `config_flags.DEFINE_config_file`; `override` runs a sweep point's
values through the same parser (`DEFINE_config_dict`), so a value means the same whether it comes from the command
line, from `--grid` or from a config file's `get_sweep`.

`RENAMED` is the one list of config names that changed since runs were recorded; `upgrade` applies it to every
saved config dtvit reads (`dtvit.load`, a resume's `workdir.plan_launch`, a sweep's finished points), so old
workdirs and records keep loading, and an old key written on the command line gets one line naming the new one.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from absl import flags
import ml_collections
from ml_collections import config_flags


# {old dotted key: new dotted key}, and {'key=old value': 'key=new value'} for a renamed value of a string key.
# Each rename keeps the key's section (only its last part or its value changes).
RENAMED = {
    "model.num_steps": "model.max_time_steps",    # T_max, the simulated time steps
    "ann.num_steps": "ann.train_steps",           # a phase's optimizer steps
    "snn.num_steps": "snn.train_steps",
    "finetune.num_steps": "finetune.train_steps",
    "model.neuron.neuron=spikformer": "model.neuron.neuron=spikingjelly_lif",   # the neuron kind, not the model
    "data.augment.randaugment_op_set=spikformer": "data.augment.randaugment_op_set=spikformer_official",
}


def renamed(key: str, value: Any = None) -> tuple[str, Any]:
  """(key, value) under today's names (`RENAMED`)."""
  key = RENAMED.get(key, key)
  if isinstance(value, str):
    value = RENAMED.get(f"{key}={value}", f"{key}={value}").partition("=")[2]
  return key, value


def upgrade(tree: Any, prefix: str = "") -> Any:
  """A saved config (a nested dict, as config.json holds it) under today's names: a copy with `RENAMED` applied.
  A config already under today's names comes back equal."""
  if not isinstance(tree, Mapping):
    return renamed(prefix, tree)[1] if prefix else tree
  out = {}
  for k, v in tree.items():
    key = renamed(f"{prefix}.{k}" if prefix else str(k))[0]
    out[key.rpartition(".")[2]] = upgrade(v, key)
  return out


def check_renamed_values(config: Mapping[str, Any]) -> None:
  """ValueError in one line when `config` (a nested dict) sets a value `RENAMED` has renamed."""
  flat = flatten(config)
  for old, new in RENAMED.items():
    key, sep, value = old.partition("=")
    if sep and flat.get(key) == value:
      raise ValueError(f"{key}={value!r} was renamed: it is now {new.partition('=')[2]!r}.")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A nested dict -> {'a.b.c': leaf}; an empty dict is a leaf."""
  if isinstance(tree, Mapping) and tree:
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def all_keys(tree: Mapping[str, Any]) -> set[str]:
  """Every dotted key of a nested dict, inner nodes included."""
  return {".".join(parts[:i]) for parts in (k.split(".") for k in flatten(tree)) for i in range(1, len(parts) + 1)}


def format_value(value: Any) -> str:
  """A value as the command line writes it: 0.03, True, skip, (True, False)."""
  return repr(value) if isinstance(value, (tuple, list)) else str(value)


def explain_unknown_key(keys: set[str], key: str, *, flag: str = "--config.") -> str:
  """Why `key` names no field of a config with `keys` (`all_keys`): where it lives instead, or the closest field
  at its level. `flag` is how the message writes a key ('--config.' on the command line)."""
  if key in RENAMED:
    return f"{flag}{key} was renamed: it is now {flag}{RENAMED[key]}."
  elsewhere = sorted(k for k in keys if k.endswith("." + key))
  if elsewhere:
    return (f"{flag}{key}: the config has no top-level {key!r}; it is a key of a section: did you mean "
            f"{' or '.join(flag + k for k in elsewhere)}?")
  parts = key.split(".")
  depth = next(i for i in range(len(parts)) if ".".join(parts[:i + 1]) not in keys)
  parent = ".".join(parts[:depth])
  siblings = sorted(k.rsplit(".", 1)[-1] for k in keys if k.count(".") == depth and k.startswith(parent))
  close = difflib.get_close_matches(parts[depth], siblings, n=1)
  where = f"config.{parent}" if parent else "the config"
  hint = (f'did you mean "{close[0]}" ({flag}{".".join([*parts[:depth], close[0], *parts[depth + 1:]])})?'
          if close else f"its keys are: {', '.join(siblings)}.")
  return f"{flag}{key}: {where} has no key {parts[depth]!r}; {hint}"


def override(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`config` with `overrides` ({dotted key: value}) applied and locked, each value read as
  `--config.<key>=<value>` is (a non-string written as `format_value` writes it). A key that names no leaf or a
  value its field cannot take raises ValueError in one line."""
  keys = all_keys(config.to_dict())
  leaves = set(flatten(config.to_dict()))
  for key in overrides:
    if key not in leaves:
      raise ValueError(explain_unknown_key(keys, key, flag="") if key not in keys
                       else f"{key} is a section of the config, not a value; set its keys (e.g. {key}.<name>).")
  argv = ["override", *(f"--config.{k}={v if isinstance(v, str) else format_value(v)}" for k, v in
                        overrides.items())]
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", config, "", flag_values=values, lock_config=True, sys_argv=argv)
  try:
    values(argv)
  except flags.Error as e:
    raise ValueError(" ".join(str(e).split()).removeprefix("flag ")) from None
  return values.config
