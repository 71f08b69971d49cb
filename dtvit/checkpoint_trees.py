"""Checkpoint trees without Orbax: does a saved tree fit the target (naming the first difference), which leaves
start fresh, and the leaf-path edits around a partial restore.

`dtvit.checkpointing` (all of dtvit's Orbax code) reads the saved trees' metadata and asks this module; the
trees here are plain pytrees and leaf paths 'a/b/c'.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class CheckpointMismatch(ValueError):
  """The checkpoint is readable but holds another tree than the one asked for (code or config changed)."""


def _key_str(key: Any) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_paths(tree: Any) -> dict[str, Any]:
  """{'params/Dense_0/kernel': leaf, ...}. Namedtuple fields, dict keys and list indices all become path parts,
  so a live optax state and Orbax's saved metadata (which stores namedtuples as dicts) give the same paths."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(_key_str(k) for k in path): leaf for path, leaf in leaves}


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...] | None, np.dtype | None]:
  shape = getattr(leaf, 'shape', None)
  dtype = getattr(leaf, 'dtype', None)
  if isinstance(leaf, (int, float, bool)):  # Python scalars carry no dtype worth comparing.
    return (), None
  return (tuple(shape) if shape is not None else None), (np.dtype(dtype) if dtype is not None else None)


def _kind(dtype: np.dtype) -> str:
  for kind in (jnp.bool_, jnp.integer, jnp.floating, jnp.complexfloating):
    if jnp.issubdtype(dtype, kind):
      return kind.__name__
  return str(dtype)


def check_compatible(saved_tree: Any, abstract_tree: Any, *, prefix: str, source: str, fix: str) -> None:
  """Raises ValueError naming the first key path or leaf where the checkpoint differs from what is expected."""
  saved = flat_paths(saved_tree)
  wanted = flat_paths(abstract_tree)
  join = lambda p: f'{prefix}/{p}' if prefix and p else (prefix or p)  # noqa: E731
  missing = [p for p in wanted if p not in saved]
  extra = [p for p in saved if p not in wanted]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f'the checkpoint lacks {join(missing[0])!r} ({len(missing)} missing in all)')
    if extra:
      parts.append(f'the checkpoint has {join(extra[0])!r} which the target lacks ({len(extra)} extra in all)')
    raise CheckpointMismatch(f'Tree structure mismatch between {source} and the target: {"; ".join(parts)}. '
                             f'{fix}')
  for path, want in wanted.items():
    want_shape, want_dtype = _shape_dtype(want)
    found_shape, found_dtype = _shape_dtype(saved[path])
    if want_shape is not None and found_shape is not None and want_shape != found_shape:
      raise CheckpointMismatch(f'Shape mismatch at {join(path)!r}: expected {want_shape}, found {found_shape} '
                               f'in {source}. {fix}')
    # Orbax casts on restore (f32 -> bf16, int64 -> int32 are fine); a float/int/bool swap is a real mismatch.
    if want_dtype is not None and found_dtype is not None and _kind(want_dtype) != _kind(found_dtype):
      raise CheckpointMismatch(f'Dtype mismatch at {join(path)!r}: expected {want_dtype}, found {found_dtype} '
                               f'in {source}. {fix}')


def leaves_to_reinit(saved_tree: dict, abstract_variables: dict, fresh, reinit_on_mismatch) -> dict[str, Any]:
  """{leaf path: fresh value} for the leaves `reinit_on_mismatch` accepts whose saved shape differs (or that
  the checkpoint lacks)."""
  if reinit_on_mismatch is None:
    return {}
  if fresh is None:
    raise ValueError('restore_variables: reinit_on_mismatch needs `fresh` values.')
  saved_flat = flat_paths({k: saved_tree[k] for k in abstract_variables if k in saved_tree})
  paths = [p for p, leaf in flat_paths(abstract_variables).items()
           if reinit_on_mismatch(p) and (p not in saved_flat
                                         or _shape_dtype(saved_flat[p])[0] != _shape_dtype(leaf)[0])]
  if not paths:
    return {}
  fresh_flat = flat_paths(fresh() if callable(fresh) else fresh)
  return {p: fresh_flat[p] for p in paths}


def set_leaves(tree: dict, values: dict[str, Any]) -> dict:
  """`tree` with the 'a/b/c' leaf paths of `values` set (parents created as needed)."""
  for path, value in values.items():
    node = tree
    *parents, leaf = path.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def drop_paths(tree: dict, paths: dict) -> dict:
  """A copy of a nested dict without the given 'a/b/c' leaf paths."""
  out = {}
  for k, v in tree.items():
    if k in paths:
      continue
    if isinstance(v, dict):
      v = drop_paths(v, {p[len(k) + 1:]: None for p in paths if p.startswith(k + '/')})
      if not v:  # a subtree left empty would read as a leaf
        continue
    out[k] = v
  return out


def with_default_sharding(abstract: Any) -> Any:
  # A ShapeDtypeStruct without sharding would have Orbax guess one; put it on this process's first device.
  device = jax.local_devices()[0]

  def fill(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
    return x

  return jax.tree.map(fill, abstract)
