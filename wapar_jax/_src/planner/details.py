"""The Plan's details from the search: logical-axis names of the dimension groups, leaf dims.

There is no name metadata in a jaxpr: a group's name comes from where it occurs in the
parameter tree (the model width occurs in most parameters, "embed"; mlp_in / mlp_out give
"mlp"; attention projections "heads").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from wapar_jax._src.fit_check import describe_tree
from wapar_jax._src.plan_details import BATCH, LAYERS, DimGroup, PlanDetails
from wapar_jax._src.planner.hotspots import hotspots, memory_terms
from wapar_jax._src.tree import path_str

# Leaf names that say nothing about the axis; the module above them does.
_LEAF_NAMES = {"kernel", "bias", "scale", "embedding", "weight", "w", "b", "value", "params"}
# Modules whose non-model-width dims are attention heads, whatever the layer calls them.
_ATTENTION = re.compile(r"^(q|k|v|qkv|query|key|value|attn.*|attention.*|.*_proj|o|out)$")


def _module_of(path: str) -> str:
  """The innermost module of a leaf path, without layer numbers: block_3/mlp_in/kernel -> mlp_in."""
  parts = [p for p in path.split("/") if p]
  if len(parts) > 1 and parts[-1] == "value":  # nnx.Variable's payload
    parts = parts[:-1]
  if len(parts) > 1 and parts[-1] in _LEAF_NAMES:
    parts = parts[:-1]
  parts = [p for p in parts if not p.isdigit()]
  return parts[-1] if parts else path


def _group_name(occurrences: list[tuple[str, int, tuple]], share: float, taken: set[str]) -> str:
  """A readable logical-axis name from where a group occurs; there is no name metadata.

  The model width occurs in most parameters ("embed"); a dim shared by modules with a common
  prefix takes it (mlp_in / mlp_out -> "mlp"); attention projections give "heads"; an
  embedding's rows take the table's name ("wte"); otherwise the first module and the dim's role.
  """
  modules = sorted({_module_of(p) for p, _, _ in occurrences})
  first_path, first_dim, first_shape = occurrences[0]
  words = [m.split("_") for m in modules]
  prefix = []
  for parts in zip(*words):
    if len(set(parts)) != 1:
      break
    prefix.append(parts[0])
  if share >= 0.5 and len(modules) >= 3 and "embed" not in taken:
    name = "embed"
  elif (
    len(modules) > 1
    and prefix
    and not all(re.fullmatch(r"_?\d*", m[len("_".join(prefix)) :]) for m in modules)
  ):  # not Dense_0, Dense_1
    name = "_".join(prefix)
  elif len(modules) > 1 and all(_ATTENTION.match(m) for m in modules):
    name = "heads"
  elif first_path.split("/")[-1] in ("embedding", "embedding/value") or "embedding" in first_path:
    name = _module_of(first_path) if first_dim == 0 else f"{_module_of(first_path)}_{first_dim}"
  else:
    role = (
      "out"
      if first_dim == len(first_shape) - 1
      else "in"
      if first_dim == len(first_shape) - 2
      else f"d{first_dim}"
    )
    name = f"{_module_of(first_path)}_{role}"
  name = re.sub(r"[^A-Za-z0-9_]", "_", name).lower() or "axis"
  base, k = name, 2
  while name in taken or name in (BATCH, LAYERS):
    name, k = f"{base}_{k}", k + 1
  taken.add(name)
  return name


def build(
  space,
  chosen,
  profile,
  abstract_params,
  abstract_batch,
  param_specs: Sequence[Any],
  batch_axes: Sequence[int] | None = None,
) -> PlanDetails:
  """PlanDetails of `chosen`, a candidate of `space` priced with `profile`.

  `param_specs` are the chosen PartitionSpecs in the flattened order of `abstract_params`;
  `abstract_batch` is the batch as the user gives it, its batch dims `batch_axes` (default 0).
  """
  p_leaves, b_leaves = describe_tree(abstract_params), describe_tree(abstract_batch)
  param_paths = [path_str(leaf.path) for leaf in p_leaves]
  traced = space.traced
  class_group = {cl: g.index for g in space.groups for cl in g.classes}
  occurrences: dict[int, list] = {}
  leaves_with: dict[int, int] = {}
  for v, path in zip(traced.param_vars, param_paths):
    seen = set()
    for d, cl in enumerate(traced.var_classes[v]):
      if cl in class_group:
        occurrences.setdefault(class_group[cl], []).append((path, d, traced.var_shape[v]))
        seen.add(class_group[cl])
    for g in seen:
      leaves_with[g] = leaves_with.get(g, 0) + 1
  n_leaves = max(len(traced.param_vars), 1)
  # Name the groups in order of bytes, so the biggest axes get the plain names.
  taken: set[str] = set()
  names: dict[int, str] = {}
  for g in sorted(occurrences, key=lambda g: -space.groups[g].param_bytes):
    occ = sorted(occurrences[g], key=lambda o: (_natural(o[0]), o[1]))
    share = leaves_with[g] / n_leaves if n_leaves > 3 else 0.0
    names[g] = _group_name(occ, share, taken)

  def dim_name(cl):
    if cl in space.batch_classes:
      return BATCH
    if cl in traced.loop_classes:
      return LAYERS
    return names.get(class_group.get(cl))

  params = []
  axis_use: dict[int, dict[str, int]] = {}
  for v, leaf, spec in zip(traced.param_vars, p_leaves, param_specs):
    cls = traced.var_classes[v]
    for d, entry in enumerate(tuple(spec) + (None,) * (len(cls) - len(spec))):
      if entry is not None and cls[d] in class_group:
        for axis in entry if isinstance(entry, tuple) else (entry,):
          use = axis_use.setdefault(class_group[cls[d]], {})
          use[axis] = use.get(axis, 0) + 1
    params.append(dataclasses.replace(leaf, dims=tuple(dim_name(c) for c in cls)))
  axes = [0] * len(b_leaves) if batch_axes is None else batch_axes
  batch = [
    dataclasses.replace(leaf, dims=tuple(BATCH if d == a else None for d in range(len(leaf.shape))))
    for leaf, a in zip(b_leaves, axes)
  ]
  groups = []
  for g in sorted(names):
    occ = sorted(occurrences[g], key=lambda o: (_natural(o[0]), o[1]))
    use = axis_use.get(g, {})
    groups.append(
      DimGroup(
        names[g],
        space.groups[g].size,
        tuple(sorted(use, key=lambda a: -use[a])),
        float(space.groups[g].param_bytes),
        tuple(f"{p}[{d}]" for p, d, _ in occ[:6]),
      )
    )
  hot, compute_bound, memory_bound = hotspots(space, chosen, profile)
  return PlanDetails(
    tuple(groups),
    tuple(params),
    tuple(batch),
    hot,
    memory_terms(space, chosen),
    compute_bound,
    memory_bound,
    tuple(traced.unknown_primitives),
    _experts(space),
  )


def _experts(space) -> tuple[int, ...]:
  e = space.experts
  return (e.size, e.capacity, e.tokens, e.top_k) if e.classes else ()


def _natural(path: str):
  """Sort key that puts block_2 before block_10."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]
