"""Configs as data: dotted keys, the one dict flattener, "did you mean" for a key that names nothing, and
overrides parsed by `ml_collections.config_flags`.

`dtvit.main` reads `--config.key=value` with `config_flags.DEFINE_config_file`; `override` runs a sweep point's
values through the same parser (`DEFINE_config_dict`), so a value means the same whether it comes from the command
line, from `--grid` or from a config file's `get_sweep`.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from absl import flags
import ml_collections
from ml_collections import config_flags


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
