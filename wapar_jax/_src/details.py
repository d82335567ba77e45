"""What a Plan keeps about its model besides the specs: leaves, dimension groups, hot spots.

Built once by the planner from the search space and the chosen candidate, so that a plan (also
one loaded from JSON, with no model at hand) can explain itself, export logical-axis rules and
check that it is applied to the model it was made for.

Example:
  >>> plan = wapar_jax.plan(loss_fn, params, batch, optimizer=optax.adamw(1e-3), devices=8)
  >>> [g.name for g in plan.details.groups]
  ['embed', 'heads', 'mlp', 'wpe', 'wte']
  >>> plan.details.hotspots[0].source
  'model.py:42 (Block.__call__)'
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from wapar_jax._src import search as search_lib
from wapar_jax.errors import PlanMismatchError

# Equations kept on a plan, costliest first (after merging repeats of one source line).
TOP_HOTSPOTS = 20
BATCH, LAYERS = "batch", "layers"
# Leaf names that say nothing about the axis; the module above them does.
_LEAF_NAMES = {"kernel", "bias", "scale", "embedding", "weight", "w", "b", "value", "params"}
# Modules whose non-model-width dims are attention heads, whatever the layer calls them.
_ATTENTION = re.compile(r"^(q|k|v|qkv|query|key|value|attn.*|attention.*|.*_proj|o|out)$")


@dataclasses.dataclass(frozen=True)
class DimGroup:
  """A logical axis found in the program: isomorphic dimension classes decided together.

  Attributes:
    name: a readable name derived from the parameters it occurs in ("embed", "mlp", ...).
    size: the dimension's size (what a mesh axis must divide).
    mesh_axes: the mesh axes it is split on in this plan, most used first; () = replicated.
    param_bytes: bytes of all parameters it occurs in.
    where: "path[dim]" of (the first few of) its occurrences.
  """
  name: str
  size: int
  mesh_axes: tuple[str, ...]
  param_bytes: float
  where: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One parameter or batch leaf as planned: path, shape, dtype, logical name of each dim."""
  path: tuple
  shape: tuple[int, ...]
  dtype: str
  dims: tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class Hotspot:
  """Equations of one source line, primitive and shape, with their predicted cost per device.

  `seconds` is the roofline time on one device of the chosen plan, all `count` equations and
  loop iterations together; `flops` likewise. `bound` says which roofline term limits it.
  """
  primitive: str
  source: str
  shapes: str
  count: int
  flops: float
  seconds: float
  bound: str  # "compute" or "memory"


@dataclasses.dataclass(frozen=True)
class PlanDetails:
  """Everything a Plan keeps to explain, export and check itself; plain data, JSON-able.

  Attributes:
    groups: dimension groups (logical axes) of the parameters.
    params / batch: per leaf, its path, shape, dtype and logical dim names.
    hotspots: the costliest equations of the chosen plan, costliest first.
    memory: per-device peak memory by term: "parameters", "optimizer state", "batch",
      "activations" (temporaries, and FSDP's gathered weights).
    compute_bound_seconds / memory_bound_seconds: the compute time split by roofline term.
    unknown_primitives: primitives the planner had no sharding rule for (costed conservatively).
  """
  groups: tuple[DimGroup, ...]
  params: tuple[Leaf, ...]
  batch: tuple[Leaf, ...]
  hotspots: tuple[Hotspot, ...]
  memory: tuple[tuple[str, float], ...]
  compute_bound_seconds: float
  memory_bound_seconds: float
  unknown_primitives: tuple[str, ...] = ()

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for leaf in d["params"] + d["batch"]:
      leaf["path"] = list(leaf["path"])
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "PlanDetails":
    def leaf(x):
      return Leaf(tuple(x["path"]), tuple(x["shape"]), str(x["dtype"]), tuple(x["dims"]))

    return cls(
        groups=tuple(DimGroup(g["name"], int(g["size"]), tuple(g["mesh_axes"]),
                              float(g["param_bytes"]), tuple(g["where"])) for g in d["groups"]),
        params=tuple(leaf(x) for x in d["params"]), batch=tuple(leaf(x) for x in d["batch"]),
        hotspots=tuple(Hotspot(**h) for h in d["hotspots"]),
        memory=tuple((str(k), float(v)) for k, v in d["memory"]),
        compute_bound_seconds=float(d["compute_bound_seconds"]),
        memory_bound_seconds=float(d["memory_bound_seconds"]),
        unknown_primitives=tuple(d.get("unknown_primitives", ())))

  def group(self, name: str) -> DimGroup:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(name)


# --- building ------------------------------------------------------------------------------

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
  elif len(modules) > 1 and prefix and not all(
      re.fullmatch(r"_?\d*", m[len("_".join(prefix)):]) for m in modules):  # not Dense_0, Dense_1
    name = "_".join(prefix)
  elif len(modules) > 1 and all(_ATTENTION.match(m) for m in modules):
    name = "heads"
  elif first_path.split("/")[-1] in ("embedding", "embedding/value") or "embedding" in first_path:
    name = _module_of(first_path) if first_dim == 0 else f"{_module_of(first_path)}_{first_dim}"
  else:
    role = ("out" if first_dim == len(first_shape) - 1 else
            "in" if first_dim == len(first_shape) - 2 else f"d{first_dim}")
    name = f"{_module_of(first_path)}_{role}"
  name = re.sub(r"[^A-Za-z0-9_]", "_", name).lower() or "axis"
  base, k = name, 2
  while name in taken or name in (BATCH, LAYERS):
    name, k = f"{base}_{k}", k + 1
  taken.add(name)
  return name


def build(space, chosen, profile, abstract_params, abstract_batch,
          param_specs: Sequence[Any]) -> PlanDetails:
  """PlanDetails of `chosen`, a candidate of `space` priced with `profile`.

  `param_specs` are the chosen PartitionSpecs in the flattened order of `abstract_params`.
  """
  from wapar_jax._src.emit import path_str
  p_leaves, b_leaves = describe_tree(abstract_params), describe_tree(abstract_batch)
  param_paths = [path_str(l.path) for l in p_leaves]
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
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
          use = axis_use.setdefault(class_group[cls[d]], {})
          use[axis] = use.get(axis, 0) + 1
    params.append(dataclasses.replace(leaf, dims=tuple(dim_name(c) for c in cls)))
  batch = [dataclasses.replace(leaf, dims=tuple(BATCH if d == 0 else None
                                                for d in range(len(leaf.shape))))
           for leaf in b_leaves]
  groups = []
  for g in sorted(names):
    occ = sorted(occurrences[g], key=lambda o: (_natural(o[0]), o[1]))
    use = axis_use.get(g, {})
    groups.append(DimGroup(names[g], space.groups[g].size,
                           tuple(sorted(use, key=lambda a: -use[a])),
                           float(space.groups[g].param_bytes),
                           tuple(f"{p}[{d}]" for p, d, _ in occ[:6])))
  hot, compute_bound, memory_bound = _hotspots(space, chosen, profile)
  return PlanDetails(tuple(groups), tuple(params), tuple(batch), hot,
                     _memory_terms(space, chosen), compute_bound, memory_bound,
                     tuple(traced.unknown_primitives))


def _natural(path: str):
  """Sort key that puts block_2 before block_10."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def op_divisors(space, c) -> np.ndarray:
  """How many ways the chosen candidate splits each equation's work (as search._price does)."""
  mask = np.zeros(len(space.groups), dtype=bool)
  mask[list(c.model_groups)] = True
  on_model = space.op_group[:, mask].any(axis=1) if mask.any() else np.zeros(len(space.op_group), bool)
  data_div = np.array(search_lib.data_divisors(c.data, c.storage), dtype=float)
  return data_div[space.op_data_cat] * np.where(on_model, c.model, 1)


def _hotspots(space, c, profile) -> tuple[tuple[Hotspot, ...], float, float]:
  traced = space.traced
  flop_seconds, memory_seconds = search_lib.op_roofline(space, profile)
  seconds = np.maximum(flop_seconds, memory_seconds)
  div = op_divisors(space, c)
  per_device = seconds / div
  compute_bound = float(per_device[flop_seconds >= seconds].sum())
  merged: dict[tuple, list] = {}
  for op in traced.ops:
    i = op.index
    if per_device[i] <= 0:
      continue
    key = (op.primitive, op.source, _shapes(op))
    entry = merged.setdefault(key, [0, 0.0, 0.0, 0.0])
    entry[0] += 1
    entry[1] += space.costs.flops[i] / div[i]
    entry[2] += per_device[i]
    entry[3] += flop_seconds[i] / div[i]
  top = sorted(merged.items(), key=lambda kv: -kv[1][2])[:TOP_HOTSPOTS]
  hot = tuple(Hotspot(prim, src, shapes, int(n), float(f), float(s),
                      "compute" if fs >= 0.999 * s else "memory")
              for (prim, src, shapes), (n, f, s, fs) in top)
  return hot, compute_bound, float(per_device.sum()) - compute_bound


def _shapes(op) -> str:
  def one(v):
    aval = v.aval
    dtype = getattr(aval, "dtype", None)
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int32": "i32"}.get(
        str(dtype), str(dtype))
    return f"{short}[{','.join(map(str, getattr(aval, 'shape', ())))}]"

  return f"{', '.join(one(v) for v in op.eqn.invars)} -> {', '.join(one(v) for v in op.eqn.outvars)}"


def _memory_terms(space, c) -> tuple[tuple[str, float], ...]:
  """Per-device peak memory by term, from the terms the search priced."""
  batch = space.batch_bytes / c.data
  activations = max(c.activation_memory - batch, 0.0)
  return (("parameters", c.param_memory), ("optimizer state", c.opt_state_memory),
          ("batch", batch), ("activations", activations))


# --- checking a model against a plan -------------------------------------------------------

def describe_tree(tree) -> list[Leaf]:
  """Path, shape and dtype of every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  import jax
  from wapar_jax._src import emit
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(int(d) for d in getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", None)
    out.append(Leaf(emit.path_keys(path), shape, str(dtype) if dtype is not None else
                    type(x).__name__, ()))
  return out


def differences(planned: Sequence[Leaf], actual: Sequence[Leaf], *, check_batch_dim: bool = True
                ) -> list[str]:
  """Lines naming each leaf that is missing, extra, or differs in shape or dtype."""
  from wapar_jax._src.emit import path_str
  want = {l.path: l for l in planned}
  got = {l.path: l for l in actual}
  lines = []
  for p in want:
    if p not in got:
      lines.append(f"missing: {path_str(p)} {list(want[p].shape)} {want[p].dtype} (planned, "
                   "not in the tree)")
  for p in got:
    if p not in want:
      lines.append(f"extra: {path_str(p)} {list(got[p].shape)} {got[p].dtype} (in the tree, "
                   "no spec in the plan)")
  for p in want:
    if p in got:
      a, b = want[p], got[p]
      shape_a, shape_b = a.shape, b.shape
      if not check_batch_dim and shape_a and shape_b:
        shape_a, shape_b = shape_a[1:], shape_b[1:]
      if shape_a != shape_b:
        lines.append(f"shape: {path_str(p)} planned {list(a.shape)}, got {list(b.shape)}")
      if a.dtype != b.dtype:
        lines.append(f"dtype: {path_str(p)} planned {a.dtype}, got {b.dtype}")
  return lines


def check_fits(details: PlanDetails, params=None, batch=None) -> None:
  """Raises PlanMismatchError naming every leaf of params / batch that differs from the plan."""
  lines = []
  if params is not None:
    lines += ["params " + s for s in differences(details.params, describe_tree(params))]
  if batch is not None:
    # A different global batch size is allowed (it must still divide the data axis).
    lines += ["batch " + s for s in differences(details.batch, describe_tree(batch),
                                                check_batch_dim=False)]
  if lines:
    kinds = ("missing", "extra", "shape", "dtype")
    by_kind = {k: [s for s in lines if s.split(" ", 2)[1] == k + ":"] for k in kinds}
    counts = (f"{len(by_kind['missing'])} planned leaves missing from the tree, "
              f"{len(by_kind['extra'])} extra leaves with no spec in the plan, "
              f"{len(by_kind['shape'])} with another shape, {len(by_kind['dtype'])} with another "
              "dtype")
    shown = []
    for k in kinds:  # a few of each kind, so one long list does not hide the others
      shown += by_kind[k][:6] + ([f"... {len(by_kind[k]) - 6} more {k}"] if len(by_kind[k]) > 6 else [])
    raise PlanMismatchError(
        "the plan was made for another model: plan again for this one (wapar_jax.plan), or "
        f"apply the plan to the model it was made for. {counts}:\n  " + "\n  ".join(shown) +
        f"\nGot {len(lines)} differing leaves.")
