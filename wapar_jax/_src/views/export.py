"""A Plan as logical-axis rules: flax `logical_axis_rules` and a MaxText-style mesh-and-rules YAML.

Codebases such as MaxText and t5x annotate every parameter dim with a logical name ("embed",
"mlp", ...) and map names to mesh axes with a list of rules. A plan's dimension groups are such
logical axes, found in the program; exporting them lets a plan replace hand-written rules.

A rule maps a name to one split, but a plan splits one group differently from leaf to leaf:
FSDP keeps small tensors whole and splits the largest free dim of each leaf, ZeRO-1 splits the
optimizer state of replicated parameters. So a dim's logical name is its group's name and the
split it has there: the split that covers the most elements keeps the plain name ("embed"),
each other split gets a name of its own ("embed_data", "embed_unsplit"), and a group that
occurs twice in one leaf gives its second occurrence another base name ("embed_2"), since flax
refuses a name twice in one array. The cost is more names (at most one per group, occurrence and
split); the gain is one rule per name, so `flax.linen.logical_to_mesh_axes(names, rules)` gives
back every parameter, optimizer-state and batch spec exactly, and so do MaxText's rules (that
function, then size-1 mesh axes dropped). Nothing is left for per-parameter overrides;
`rules_reproduce` counts what the rules give back.

Example:
  >>> plan.logical_axis_rules()  # an FSDP plan of a small GPT
  [('batch', 'data'), ('embed', None), ('embed_data', 'data'), ..., ('mlp_unsplit', None), ...]
  >>> names = plan.param_logical_axes()  # shaped like the parameters
  >>> print(plan.to_maxtext_yaml())
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import yaml
from jax.sharding import PartitionSpec as P

from wapar_jax._src.plan_details import BATCH, LAYERS
from wapar_jax._src.search.candidate import GATHERING
from wapar_jax._src.tree import nest, path_keys, path_str
from wapar_jax.errors import InvalidArgumentError

# The plan's mesh axes under MaxText's names, in the plan's mesh order.
_MAXTEXT_AXES = {
  "stage": "stage",
  "data": "data",
  "context": "context",
  "expert": "expert",
  "fsdp": "fsdp",
  "model": "tensor",
}
# A pipeline whose stages keep their weights split over the data axis: MaxText's pipeline
# shards stage weights over its fsdp axis (which splits the batch too), so that is the data
# axis's name there.
_PIPELINE_FSDP_AXES = {**_MAXTEXT_AXES, "data": "fsdp"}
# MaxText's name of each axis's parallelism (`ici_<name>_parallelism`): its own, but the stage
# axis's is `pipeline`.
_PARALLELISM_KEYS = {a: "pipeline" if a == "stage" else a for a in _MAXTEXT_AXES.values()}
# Which specs a name set covers: the parameters, their optimizer state, the batch.
_KINDS = ("params", "opt_state", "batch")

Entry = str | tuple[str, ...] | None


def _details(plan):
  if plan.details is None:
    raise InvalidArgumentError(
      "this plan has no dimension groups (it was read from a version-1 plan file): plan again "
      "to export rules. Got plan.details = None."
    )
  return plan.details


@dataclasses.dataclass(frozen=True)
class _Names:
  """Each leaf's logical dim names (by kind, then leaf path) and the one rule of each name."""

  dims: dict[str, dict[tuple, tuple[str | None, ...]]]
  rules: tuple[tuple[str, Entry], ...]


def _entry(e) -> Entry:
  """A spec entry with 1-tuples as their axis and () as None, so equal splits compare equal."""
  if isinstance(e, tuple):
    return None if not e else e[0] if len(e) == 1 else e
  return e


def _entries(spec, rank: int) -> tuple[Entry, ...]:
  entries = [_entry(e) for e in tuple(spec)] + [None] * (rank - len(spec))
  return tuple(entries[:rank])


def _leaf_specs(plan, kind: str):
  details = _details(plan)
  if kind == "batch":
    return [(leaf, plan.flat_batch_specs.get(leaf.path, P())) for leaf in details.batch]
  flat = plan.flat_param_specs if kind == "params" else plan.flat_opt_specs
  return [(leaf, flat.get(leaf.path, P())) for leaf in details.params]


def _unique(name: str, taken: set[str]) -> str:
  out, k = name, 2
  while out in taken:
    out, k = f"{name}_{k}", k + 1
  taken.add(out)
  return out


def _names(plan) -> _Names:
  """One logical name per (group, occurrence in its leaf, split): see the module docstring."""
  details = _details(plan)
  splits: dict[tuple, dict[Entry, int]] = {}  # (group, occurrence) -> split -> elements
  keyed: dict[str, dict[tuple, list]] = {}
  for kind in ("batch", "params", "opt_state"):  # the batch first: its rule leads the list
    keyed[kind] = {}
    for leaf, spec in _leaf_specs(plan, kind):
      seen: dict[str, int] = {}
      keys = []
      for group, entry in zip(leaf.dims, _entries(spec, len(leaf.dims))):
        k = seen.get(group, 0) if group is not None else 0
        if group is not None:
          seen[group] = k + 1
        covered = splits.setdefault((group, k), {})
        covered[entry] = covered.get(entry, 0) + math.prod(leaf.shape)
        keys.append(((group, k), entry))
      keyed[kind][leaf.path] = keys
  taken = {g.name for g in details.groups} | {BATCH, LAYERS} | {g for g, _ in splits if g}
  name_of: dict[tuple, str | None] = {}
  rules = []
  for (group, k), covered in splits.items():
    # Dims of no group are not split by the plan's rules; one that is gets a name of its own.
    plain = None if group is None else max(covered, key=covered.get)
    base = "unnamed" if group is None else group if k == 0 else _unique(f"{group}_{k + 1}", taken)
    for entry in sorted(covered, key=lambda e: e != plain):  # the plain name's rule first
      if group is None and entry is None:
        name = None
      elif entry == plain:
        name = base
      else:
        axes = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        name = _unique(f"{base}_{'_'.join(axes) or 'unsplit'}", taken)
      name_of[((group, k), entry)] = name
      if name is not None:
        rules.append((name, entry))
  dims = {
    kind: {path: tuple(name_of[key] for key in keys) for path, keys in leaves.items()}
    for kind, leaves in keyed.items()
  }
  return _Names(dims, tuple(rules))


def logical_axis_rules(plan) -> list[tuple[str, Entry]]:
  """Flax-style `(logical name, mesh axis or tuple of axes or None)` rules, one per name: they give
  back every parameter, optimizer-state and batch spec of the plan from `param_logical_axes`.

  Names are the plan's dimension groups (`plan.details.groups`), "batch" for the batch dim and
  "layers" for a scanned layer dim, each with one more name per other split of it
  ("embed_data", "embed_unsplit"; see the module docstring).
  """
  return list(_names(plan).rules)


def param_logical_axes(plan, optimizer_state: bool = False):
  """Per parameter leaf, the tuple of logical names of its dims (None: never split), as a tree
  shaped like the parameters (nested dicts for a plan loaded from JSON).

  With `optimizer_state=True`, the names of each parameter's optimizer-state leaves: they differ
  where the state is split and the parameter is not (ZeRO-1). Flax has no rules of its own for
  optimizer state: give its leaves these names' specs, e.g. with `optax.tree_map_params`.
  """
  flat = _names(plan).dims["opt_state" if optimizer_state else "params"]
  if plan._abstract_params is not None:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(plan._abstract_params)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_keys(p)] for p, _ in leaves])
  return nest(flat)


def rules_reproduce(plan, rules=None, kind: str = "params") -> tuple[int, int, list[str]]:
  """(specs reproduced, leaves, paths that differ) when `rules` (default: the plan's) are applied
  through `flax.linen.logical_to_mesh_axes` to the logical names of `kind`: "params",
  "opt_state" (each parameter's optimizer-state spec) or "batch"."""
  if kind not in _KINDS:
    raise InvalidArgumentError(f"kind must be one of {_KINDS}. Got {kind!r}.")
  names = _names(plan)
  rules = list(names.rules) if rules is None else rules
  differ = []
  leaves = _leaf_specs(plan, kind)
  for leaf, want in leaves:
    axes = names.dims[kind][leaf.path]
    got = nn.logical_to_mesh_axes(axes, rules)
    if _entries(got, len(axes)) != _entries(want, len(axes)):
      differ.append(path_str(leaf.path))
  return len(leaves) - len(differ), len(leaves), differ


def to_maxtext_yaml(plan) -> str:
  """The plan in MaxText's config style (cf. configs/custom_mesh_and_rule/pure-fsdp.yml).

  mesh_axes, data_sharding and the `dcn_*` / `ici_*` parallelism of every axis MaxText knows the
  plan's by (explicit, so that none of MaxText's -1 defaults fills in); logical_axis_rules use
  this plan's logical names, so the model's parameters must carry them (`param_logical_axes`).
  MaxText has no rules for optimizer state: a ZeRO-1 plan sets `shard_optimizer_over_data`,
  MaxText's ZeRO-1, which picks the split dims itself (the plan's are the rules applied to
  `param_logical_axes(optimizer_state=True)`). Comments record the mesh sizes, how many specs
  the rules reproduce, and where each group occurs.
  """
  details = _details(plan)
  names = _names(plan)
  counts = {kind: rules_reproduce(plan, kind=kind)[:2] for kind in _KINDS}
  axes_named = _axes_named(plan)
  rename = lambda a: axes_named.get(a, a)  # noqa: E731
  axes = [rename(a) for a in plan.mesh_shape]
  batch_axes = [rename(a) for a in _flat(dict(names.rules).get(BATCH))]
  zero1 = plan.chosen.storage == "zero1"
  header = [
    f"wapar_jax plan: {plan.strategy} on {plan.num_devices} of {plan.devices_offered} "
    f"{plan.profile} devices, objective {plan.objective}",
    "mesh shape: " + ", ".join(f"{a}={n}" for a, n in plan.mesh_shape.items()),
    "through flax.linen.logical_to_mesh_axes these rules reproduce {} of {} parameter specs,\n"
    "  {} of {} optimizer-state specs and {} of {} batch specs".format(
      *(n for k in _KINDS for n in counts[k])
    ),
    "parameters must carry the plan's logical names (plan.param_logical_axes()): a group\n"
    "  split differently across leaves has one name per split",
    "optimizer state: "
    + (
      "split over data where the parameters are replicated (ZeRO-1); MaxText's\n"
      "  shard_optimizer_over_data picks its own split dims, the plan's are these rules on\n"
      "  plan.param_logical_axes(optimizer_state=True)"
      if zero1
      else "split as its parameter"
    ),
    "logical axes:",
  ] + [f"  {g.name}: size {g.size}, in {', '.join(g.where[:3])}" for g in details.groups]
  body = {
    "mesh_axes": _Flow(axes),
    "data_sharding": _Flow([_Flow(batch_axes)]),  # [[]]: the batch is replicated (TP only)
    **_parallelism(plan, axes_named),
    **_pipeline_keys(plan),
    **({"shard_optimizer_over_data": True} if zero1 else {}),
    "logical_axis_rules": [
      _Flow([n, _Flow([rename(x) for x in _flat(a)])]) for n, a in names.rules
    ],
  }
  text = yaml.dump(body, Dumper=_Dumper, sort_keys=False, width=100)
  return "".join(f"# {line}\n" for entry in header for line in entry.split("\n")) + text


def _stage_fsdp(plan) -> bool:
  return plan.pipeline is not None and plan.chosen.storage in GATHERING


def _axes_named(plan) -> dict[str, str]:
  return _PIPELINE_FSDP_AXES if _stage_fsdp(plan) else _MAXTEXT_AXES


def _pipeline_keys(plan) -> dict[str, int]:
  """MaxText's pipeline settings of a pipeline plan (its layers per stage follow from them)."""
  if plan.pipeline is None:
    return {}
  keys = {
    "num_pipeline_microbatches": plan.pipeline.microbatches,
    "num_pipeline_repeats": plan.pipeline.repeats,
  }
  if _stage_fsdp(plan):
    keys["pipeline_fsdp_ag_once"] = plan.pipeline.gather_once
  return keys


def _flat(entry) -> list[str]:
  if entry is None:
    return []
  return list(entry) if isinstance(entry, tuple) else [entry]


def _parallelism(plan, axes_named) -> dict[str, int]:
  """MaxText's `dcn_*` (across nodes / slices) and `ici_*` (inside) sizes of every axis it knows
  the plan's by (1 where the plan has none), laid out as the plan's mesh is: the axes the search
  found crossing nodes take the nodes, outermost first."""
  sizes = {axes_named[a]: n for a, n in plan.mesh_shape.items()}
  shape = {a: sizes.get(a, 1) for a in _PARALLELISM_KEYS}
  crossing = {axes_named[a] for a in plan.chosen.cross_node_axes}
  nodes = plan.stats.get("nodes", 1) if plan.stats else 1
  dcn = dict.fromkeys(shape, 1)
  left = int(nodes)
  for a in shape:
    if a in crossing:
      dcn[a] = math.gcd(shape[a], left)
      left //= dcn[a]
  out = {f"dcn_{_PARALLELISM_KEYS[a]}_parallelism": dcn[a] for a in shape}
  out.update({f"ici_{_PARALLELISM_KEYS[a]}_parallelism": shape[a] // dcn[a] for a in shape})
  return out


class _Flow(list):
  """A list written on one line, as MaxText's configs write mesh axes and rules."""


class _Dumper(yaml.SafeDumper):
  pass


_Dumper.add_representer(
  _Flow, lambda dumper, v: dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)
