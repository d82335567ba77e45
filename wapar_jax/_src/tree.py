"""Pytree leaves by path: the keys every stage uses to name parameter, state and batch leaves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from wapar_jax.errors import PlanMismatchError

PathKeys = tuple  # a leaf's path as plain str / int keys, stable across pytree containers


def path_keys(path) -> PathKeys:
  """A `tree_flatten_with_path` path as plain keys: dict keys, attribute names, indices."""
  keys = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        keys.append(getattr(entry, attr))
        break
    else:
      keys.append(str(entry))
  return tuple(k if isinstance(k, int) else str(k) for k in keys)


def path_str(keys: PathKeys) -> str:
  return "/".join(str(k) for k in keys)


def leaf_paths(tree) -> list[PathKeys]:
  return [path_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def abstract(tree: Any) -> Any:
  """Leaves as bare `ShapeDtypeStruct`s: no values, no device, no sharding.

  `jax.eval_shape` results carry a single-device sharding that fails to lower for a mesh.
  """
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), tree)


def specs_like(tree, flat_specs: Mapping[PathKeys, P], what: str):
  """A tree of PartitionSpecs shaped like `tree`, looked up by leaf path."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  missing = [path_str(path_keys(p)) for p, _ in leaves if path_keys(p) not in flat_specs]
  extra = set(flat_specs) - {path_keys(p) for p, _ in leaves}
  if missing or extra:
    first_extra = [path_str(k) for k in sorted(extra, key=str)[:5]]
    raise PlanMismatchError(
      f"the plan's {what} do not match the tree it is applied to: "
      f"{len(missing)} leaves have no spec (first: {missing[:5]}), "
      f"{len(extra)} specs have no leaf (first: {first_extra}). "
      "Plan again for this model, or pass the tree the plan was made for."
    )
  return jax.tree_util.tree_unflatten(treedef, [flat_specs[path_keys(p)] for p, _ in leaves])


# The key an `nnx.Variable` holds its array under in a flattened `nnx.State`.
NNX_PAYLOAD = "value"


def nnx_payload_paths(paths) -> bool:
  """Whether leaf paths are an NNX State's: every one a Variable's payload (".../value")."""
  paths = list(paths)
  return bool(paths) and all(len(k) > 1 and k[-1] == NNX_PAYLOAD for k in paths)


def nest(flat: Mapping[PathKeys, Any]) -> dict:
  """Nested dicts from leaf paths, for showing per-leaf values without the original tree.

  Paths of an NNX State lose their Variables' payload level, as `nnx.State.to_pure_dict()`
  drops it: a plan made from an NNX model and the same plan loaded from JSON nest alike.
  """
  if nnx_payload_paths(flat):
    flat = {keys[:-1]: value for keys, value in flat.items()}
  root: dict = {}
  for keys, value in flat.items():
    node = root
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1] if keys else ""] = value
  return root
