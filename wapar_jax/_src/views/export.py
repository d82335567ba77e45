"""A Plan as logical-axis rules: flax `logical_axis_rules` and a MaxText-style mesh-and-rules YAML.

Codebases such as MaxText and t5x annotate every parameter dim with a logical name ("embed",
"mlp", ...) and map names to mesh axes with a list of rules. A plan's dimension groups are such
logical axes, found in the program; exporting them lets a plan replace hand-written rules.

Rules follow flax's semantics (`flax.linen.logical_to_mesh_axes`): for each dim, the first rule
of its name whose mesh axis the tensor does not use yet wins. Per-leaf choices a rule list cannot
express (FSDP keeps small tensors replicated, or splits the largest free dim of each) are
approximated; `rules_reproduce` says how many parameter specs the rules give back exactly.

Example:
  >>> plan.logical_axis_rules()
  [('batch', 'data'), ('mlp', 'model'), ('heads', 'model'), ('embed', None), ...]
  >>> print(plan.to_maxtext_yaml())
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import yaml
from jax.sharding import PartitionSpec as P

from wapar_jax._src.tree import nest, path_keys, path_str
from wapar_jax.errors import InvalidArgumentError

# Tensor-parallel rules first: they win over FSDP fallbacks.
_AXIS_ORDER = ("model", "fsdp", "data")
# The plan's mesh axes under MaxText's names (its `ici_<name>_parallelism` keys).
_MAXTEXT_AXES = {"data": "data", "fsdp": "fsdp", "model": "tensor", "stage": "stage"}
# MaxText names the stage axis's parallelism `pipeline`.
_PARALLELISM_KEYS = {**_MAXTEXT_AXES, "stage": "pipeline"}


def _details(plan):
  if plan.details is None:
    raise InvalidArgumentError(
      "this plan has no dimension groups (it was read from a version-1 plan file): plan again "
      "to export rules. Got plan.details = None."
    )
  return plan.details


def logical_axis_rules(plan) -> list[tuple[str, str | None]]:
  """Flax-style `(logical name, mesh axis or None)` rules that reproduce the plan's specs.

  Names are the plan's dimension groups (`plan.details.groups`), plus "batch" for the batch dim
  and "layers" for a scanned layer dim. A name may appear twice (e.g. split on "model" where it
  can, else on "data"), as flax allows.
  """
  details = _details(plan)
  counts: dict[tuple[str, str], int] = {}
  for leaf in details.params:
    spec = plan.flat_param_specs.get(leaf.path, P())
    for name, entry in zip(leaf.dims, tuple(spec) + (None,) * len(leaf.dims)):
      if name is None or entry is None:
        continue
      for axis in entry if isinstance(entry, tuple) else (entry,):
        counts[(name, axis)] = counts.get((name, axis), 0) + 1
  batch = {tuple(s)[0] if len(tuple(s)) else None for s in plan.flat_batch_specs.values()}
  rules: list[tuple[str, str | tuple[str, ...] | None]] = [("batch", max(batch, key=bool))]
  ordered = sorted(
    counts,
    key=lambda na: (
      _AXIS_ORDER.index(na[1]) if na[1] in _AXIS_ORDER else len(_AXIS_ORDER),
      -counts[na],
      na[0],
    ),
  )
  rules += ordered
  named = {n for n, _ in rules}
  for g in details.groups:
    if g.name not in named:
      rules.append((g.name, None))
  if any("layers" in leaf.dims for leaf in details.params):
    rules.append(("layers", None))
  return rules


def param_logical_axes(plan):
  """Per parameter leaf, the tuple of logical names of its dims (None: no group), as a tree
  shaped like the parameters (nested dicts for a plan loaded from JSON)."""
  details = _details(plan)
  flat = {leaf.path: tuple(leaf.dims) for leaf in details.params}
  if plan._abstract_params is not None:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(plan._abstract_params)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_keys(p)] for p, _ in leaves])
  return nest(flat)


def rules_reproduce(plan, rules=None) -> tuple[int, int, list[str]]:
  """(specs reproduced, parameters, paths that differ) when the rules are applied to the
  plan's logical axes: how faithfully the exported rules stand for the plan."""
  details = _details(plan)
  rules = logical_axis_rules(plan) if rules is None else rules
  differ = []
  for leaf in details.params:
    want = plan.flat_param_specs.get(leaf.path, P())
    got = nn.logical_to_mesh_axes(leaf.dims, rules)
    if _norm(got, len(leaf.dims)) != _norm(want, len(leaf.dims)):
      differ.append(path_str(leaf.path))
  return len(details.params) - len(differ), len(details.params), differ


def _norm(spec, rank):
  entries = list(spec) + [None] * (rank - len(spec))
  return tuple(entries[:rank])


def to_maxtext_yaml(plan) -> str:
  """The plan in MaxText's config style (cf. configs/custom_mesh_and_rule/pure-fsdp.yml).

  mesh_axes and data_sharding name the plan's mesh; logical_axis_rules use this plan's logical
  names, so the model's parameters must carry them (see `param_logical_axes`). Comments record
  the mesh sizes, where each name occurs, and how many specs the rules reproduce.
  """
  details = _details(plan)
  rules = logical_axis_rules(plan)
  ok, total, _ = rules_reproduce(plan, rules)
  rename = lambda a: _MAXTEXT_AXES.get(a, a)  # noqa: E731
  axes = [rename(a) for a in plan.mesh_shape]
  batch_axes = [rename(a) for a in _flat(rules[0][1])]
  header = [
    f"wapar_jax plan: {plan.strategy} on {plan.num_devices} of {plan.devices_offered} "
    f"{plan.profile} devices, objective {plan.objective}",
    "mesh shape: " + ", ".join(f"{a}={n}" for a, n in plan.mesh_shape.items()),
    f"these rules reproduce {ok} of {total} parameter specs of the plan",
    "logical axes:",
  ] + [f"  {g.name}: size {g.size}, in {', '.join(g.where[:3])}" for g in details.groups]
  body = {
    "mesh_axes": _Flow(axes),
    "data_sharding": _Flow([_Flow(batch_axes or axes[:1])]),
    **_parallelism(plan),
    **_pipeline_keys(plan),
    "logical_axis_rules": [_Flow([n, _Flow([rename(x) for x in _flat(a)])]) for n, a in rules],
  }
  text = yaml.dump(body, Dumper=_Dumper, sort_keys=False, width=100)
  return "".join(f"# {line}\n" for line in header) + text


def _pipeline_keys(plan) -> dict[str, int]:
  """MaxText's pipeline settings of a pipeline plan (its layers per stage follow from them)."""
  if plan.pipeline is None:
    return {}
  return {
    "num_pipeline_microbatches": plan.pipeline.microbatches,
    "num_pipeline_repeats": plan.pipeline.repeats,
  }


def _flat(entry) -> list[str]:
  if entry is None:
    return []
  return list(entry) if isinstance(entry, tuple) else [entry]


def _parallelism(plan) -> dict[str, int]:
  """MaxText's `dcn_*` (across nodes / slices) and `ici_*` (inside) sizes of each mesh axis, laid
  out as the plan's mesh is: the axes the search found crossing nodes take the nodes, outermost
  first."""
  shape = dict(plan.mesh_shape)
  nodes = plan.stats.get("nodes", 1) if plan.stats else 1
  crossing = [a for a in shape if a in plan.chosen.cross_node_axes]
  dcn = dict.fromkeys(shape, 1)
  left = int(nodes)
  for a in crossing:
    dcn[a] = math.gcd(shape[a], left)
    left //= dcn[a]
  out = {}
  for a in shape:
    out[f"dcn_{_PARALLELISM_KEYS.get(a, a)}_parallelism"] = dcn[a]
  for a in shape:
    out[f"ici_{_PARALLELISM_KEYS.get(a, a)}_parallelism"] = shape[a] // dcn[a]
  return out


class _Flow(list):
  """A list written on one line, as MaxText's configs write mesh axes and rules."""


class _Dumper(yaml.SafeDumper):
  pass


_Dumper.add_representer(
  _Flow, lambda dumper, v: dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)
