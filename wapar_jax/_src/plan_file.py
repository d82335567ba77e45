"""A plan file's data checked for form and for sense before a Plan is built from it.

Plan files are edited by hand, copied between machines and read by other versions of wapar_jax.
`checked` walks the data with one small rule per field (the schema below is data), then checks
that the fields agree: the mesh holds the chosen candidate's devices, each candidate's devices
are its data x model degrees, every spec names the mesh's axes at most once each and is no longer
than its leaf's rank. Every failure is a CorruptPlanFileError naming the field; fields this
version does not know are dropped with one warning, so a newer wapar_jax's file still loads.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from wapar_jax._src.search.candidate import OBJECTIVES, STORAGES, Candidate, mesh_shape
from wapar_jax._src.step import REMAT_CHOICES
from wapar_jax._src.tree import path_str
from wapar_jax.errors import CorruptPlanFileError

# (value, where in the file, unknown field names found so far) -> the checked value.
Rule = Callable[[Any, str, list], Any]

# Fields older versions wrote that this one no longer reads: dropped without a warning.
# peak_memory_xla_cpu (versions 1 and 2, in predicted and candidates) is now verify's figure.
RETIRED = frozenset({"peak_memory_xla_cpu"})

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80  # a damaged file may hold anything, of any size or depth


def _refuse(where: str, must: str, value: Any):
  raise CorruptPlanFileError(
    f"the plan file's {where} must {must}; the file was edited or damaged. Fix that field, or "
    f"plan again and save a new file. Got {_REPR.repr(value)}."
  )


def _at(where: str, name: str) -> str:
  return f"{where}.{name}" if where else name


def _leaf(must: str, test: Callable[[Any], bool]) -> Rule:
  def rule(value, where, unknown):
    if not test(value):
      _refuse(where, must, value)
    return value

  return rule


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a count


def _is_real(v) -> bool:
  return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _one_of(choices) -> Rule:
  return _leaf(f"be one of {tuple(choices)}", lambda v: isinstance(v, str) and v in choices)


COUNT = _leaf("be a positive integer", lambda v: _is_int(v) and v >= 1)
INDEX = _leaf("be a non-negative integer", lambda v: _is_int(v) and v >= 0)
FIGURE = _leaf("be a finite number >= 0", lambda v: _is_real(v) and v >= 0)
FIGURE_OR_NULL = _leaf(
  "be a finite number >= 0 or null", lambda v: v is None or (_is_real(v) and v >= 0)
)
NUMBER = _leaf("be a finite number", _is_real)
TEXT = _leaf("be a string", lambda v: isinstance(v, str))
TEXT_OR_NULL = _leaf("be a string or null", lambda v: v is None or isinstance(v, str))
FLAG = _leaf("be true or false", lambda v: isinstance(v, bool))
KEY = _leaf("be a string or an integer (a pytree key)", lambda v: isinstance(v, str) or _is_int(v))
# One entry of a PartitionSpec: a dim replicated (null), split on one mesh axis or on several.
AXES = _leaf(
  "be null, a mesh axis name or a list of mesh axis names",
  lambda v: (
    v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(a, str) for a in v))
  ),
)


def list_of(rule: Rule, must: str = "be a list") -> Rule:
  def check(value, where, unknown):
    if not isinstance(value, list):
      _refuse(where, must, value)
    return [rule(v, f"{where}[{i}]", unknown) for i, v in enumerate(value)]

  return check


def pair(first: Rule, second: Rule) -> Rule:
  def check(value, where, unknown):
    if not (isinstance(value, list) and len(value) == 2):
      _refuse(where, "be a list of two items", value)
    return [first(value[0], f"{where}[0]", unknown), second(value[1], f"{where}[1]", unknown)]

  return check


def mapping(value_rule: Rule, must: str) -> Rule:
  """An object of any string keys, each value checked by `value_rule`."""

  def check(value, where, unknown):
    if not isinstance(value, dict):
      _refuse(where, must, value)
    return {k: value_rule(v, _at(where, k), unknown) for k, v in value.items()}

  return check


def record(rules: Mapping[str, Rule], optional=frozenset()) -> Rule:
  """An object of known fields; unknown ones are noted in `unknown` and dropped."""

  def check(value, where, unknown):
    if not isinstance(value, dict):
      _refuse(where, f"be an object with the fields {sorted(rules)}", value)
    for name in rules:
      if name not in value and name not in optional:
        raise CorruptPlanFileError(
          f"the plan file has no field {_at(where, name)}, which every plan has; the file was "
          f"edited or damaged. Plan again and save a new file. Got the fields {sorted(value)}."
        )
    unknown.extend(_at(where, k) for k in value if k not in rules and k not in RETIRED)
    return {k: rule(value[k], _at(where, k), unknown) for k, rule in rules.items() if k in value}

  return check


def _with_default(cls) -> frozenset:
  return frozenset(
    f.name
    for f in dataclasses.fields(cls)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
  )


CANDIDATE_RULES = {
  "devices": COUNT,
  "data": COUNT,
  "model": COUNT,
  "model_groups": list_of(INDEX),
  "storage": _one_of(STORAGES),
  "strategy": TEXT,
  "step_time": FIGURE,
  "compute_time": FIGURE,
  "comm_time": FIGURE,
  # Absent (or null) in files written before the overlap model: all of comm_time exposed.
  "exposed_comm_time": FIGURE_OR_NULL,
  "flops": FIGURE,
  "comm_bytes": FIGURE,
  "peak_memory": FIGURE,
  "energy": FIGURE,
  "fits": FLAG,
  "param_memory": FIGURE,
  "opt_state_memory": FIGURE,
  "activation_memory": FIGURE,
  "remat": _one_of(REMAT_CHOICES),
  "microbatches": COUNT,
  "cross_node_axes": list_of(TEXT),
  "fsdp": COUNT,
  "stages": COUNT,
  "repeats": COUNT,
  "stage_microbatches": COUNT,
  "sequence_parallel": FLAG,
  "expert": COUNT,
  "context": COUNT,
  "mesh_shape": mapping(COUNT, "be an object of mesh axis sizes"),  # derived, written for readers
}
_CANDIDATE = record(CANDIDATE_RULES, _with_default(Candidate) | {"mesh_shape"})
# Fields of `Prediction` (wapar_jax._src.plan), every one a per-step figure.
_FIGURES = (
  "step_time",
  "compute_time",
  "comm_time",
  "flops",
  "comm_bytes",
  "peak_memory",
  "energy",
)
PREDICTION_RULES = dict.fromkeys((*_FIGURES, "memory_budget"), FIGURE)
PREDICTION_RULES["exposed_comm_time"] = FIGURE_OR_NULL
LEAF_RULES = {
  "path": list_of(KEY),
  "shape": list_of(INDEX),
  "dtype": TEXT,
  "dims": list_of(TEXT_OR_NULL),
}
DETAILS_RULES = {
  "groups": list_of(
    record(
      {
        "name": TEXT,
        "size": COUNT,
        "mesh_axes": list_of(TEXT),
        "param_bytes": FIGURE,
        "where": list_of(TEXT),
      }
    )
  ),
  "params": list_of(record(LEAF_RULES)),
  "batch": list_of(record(LEAF_RULES)),
  "hotspots": list_of(
    record(
      {
        "primitive": TEXT,
        "source": TEXT,
        "shapes": TEXT,
        "count": COUNT,
        "flops": FIGURE,
        "seconds": FIGURE,
        "bound": TEXT,
      }
    )
  ),
  "memory": list_of(pair(TEXT, FIGURE)),
  "compute_bound_seconds": FIGURE,
  "memory_bound_seconds": FIGURE,
  "unknown_primitives": list_of(TEXT),
  "experts": list_of(COUNT),
}
_SPECS = list_of(
  record(
    {
      "path": list_of(KEY),
      # A string here would read as one axis per character: P("model") is P('m', 'o', ...).
      "spec": list_of(AXES, "be a list with one entry per dim (null, an axis name or a list)"),
    }
  )
)
PLAN_RULES = {
  "format": TEXT,
  "version": COUNT,
  "mesh_shape": mapping(COUNT, "be an object of mesh axis sizes, e.g. {'data': 8}"),
  "strategy": TEXT,
  "objective": _one_of(OBJECTIVES),
  "profile": TEXT,
  "devices_offered": COUNT,
  "model_split": list_of(TEXT),
  "predicted": record(PREDICTION_RULES, frozenset({"exposed_comm_time"})),
  "chosen": _CANDIDATE,
  "candidates": list_of(_CANDIDATE),
  "stats": mapping(NUMBER, "be an object of figures"),
  "memory_decision": TEXT,
  "param_specs": _SPECS,
  "opt_state_param_specs": _SPECS,
  "batch_specs": _SPECS,
  "model_state_specs": _SPECS,
  "batch_axes": list_of(record({"path": list_of(KEY), "axis": INDEX})),
  "details": record(DETAILS_RULES, frozenset({"unknown_primitives", "experts"})),
  "pipeline": record(
    {
      "layers": COUNT,
      "stacked": FLAG,
      "layer_params": list_of(list_of(INDEX)),
      "n_params": COUNT,
      "stages": COUNT,
      "repeats": COUNT,
      "microbatches": COUNT,
      "gather_once": FLAG,
    },
    # Written only where set (never by the search): a searched plan's file is as before.
    frozenset({"gather_once"}),
  ),
}
# Absent from version-1 files; "pipeline" only in a pipeline plan's, "model_state_specs" only in
# the plan of a model with state.
_OPTIONAL = frozenset({"memory_decision", "details", "pipeline", "model_state_specs", "batch_axes"})


def checked(data: dict) -> dict:
  """`data` with every field checked and unknown fields dropped (one warning names them).

  Raises:
    CorruptPlanFileError: naming the first field that is malformed or disagrees with another.
  """
  unknown: list[str] = []
  data = record(PLAN_RULES, _OPTIONAL)(data, "", unknown)
  _check_candidates(data)
  _check_specs(data)
  _check_pipeline(data)
  if unknown:
    shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
    warnings.warn(
      f"the plan file has fields this wapar_jax does not know, ignored: {shown}. A newer "
      "wapar_jax wrote it? Upgrade to use them.",
      stacklevel=4,
    )
  return data


def _check_candidates(data: dict) -> None:
  mesh, chosen = data["mesh_shape"], data["chosen"]
  everyone = [("chosen", chosen)] + [
    (f"candidates[{i}]", c) for i, c in enumerate(data["candidates"])
  ]
  for where, c in everyone:
    fsdp, stages, expert = c.get("fsdp", 1), c.get("stages", 1), c.get("expert", 1)
    context = c.get("context", 1)
    if c["devices"] != c["data"] * c["model"] * stages:
      staged = f" x {where}.stages" if stages > 1 else ""
      _refuse(
        f"{where}.devices",
        f"equal {where}.data x {where}.model{staged} = {c['data']} x {c['model']}"
        + (f" x {stages}" if stages > 1 else ""),
        c["devices"],
      )
    if c["data"] % fsdp:
      _refuse(f"{where}.fsdp", f"divide {where}.data = {c['data']}", fsdp)
    if c["data"] % expert:
      _refuse(f"{where}.expert", f"divide {where}.data = {c['data']}", expert)
    if c["data"] % (context * expert):
      _refuse(f"{where}.context", f"divide {where}.data / {where}.expert", context)
    if c["devices"] > data["devices_offered"]:
      _refuse(
        f"{where}.devices", f"be at most devices_offered = {data['devices_offered']}", c["devices"]
      )
    own_mesh = mesh_shape(c["data"], c["model"], fsdp, stages, expert, context)
    if "mesh_shape" in c and c["mesh_shape"] != own_mesh:
      _refuse(
        f"{where}.mesh_shape",
        f"be the mesh of its data, model, fsdp, stage, expert and context degrees, {own_mesh}",
        c["mesh_shape"],
      )
  if math.prod(mesh.values()) != chosen["devices"]:
    _refuse(
      "mesh_shape",
      f"have sizes whose product is the plan's device count, chosen.devices = "
      f"{chosen['devices']} (the product is {math.prod(mesh.values())})",
      mesh,
    )
  expected = mesh_shape(
    chosen["data"],
    chosen["model"],
    chosen.get("fsdp", 1),
    chosen.get("stages", 1),
    chosen.get("expert", 1),
    chosen.get("context", 1),
  )
  if mesh != expected:
    _refuse("mesh_shape", f"be the chosen candidate's mesh {expected}", mesh)
  if data["strategy"] != chosen["strategy"]:
    _refuse("strategy", f"be the chosen candidate's, {chosen['strategy']!r}", data["strategy"])


def _check_pipeline(data: dict) -> None:
  chosen, layout = data["chosen"], data.get("pipeline")
  if layout is None:
    if chosen.get("stages", 1) > 1:
      _refuse("pipeline", f"be present: chosen.stages = {chosen['stages']}", None)
    return
  for field in ("stages", "repeats"):
    if layout[field] != chosen.get(field, 1):
      _refuse(f"pipeline.{field}", f"equal chosen.{field} = {chosen.get(field, 1)}", layout[field])
  if layout["microbatches"] != chosen.get("stage_microbatches", 1):
    _refuse(
      "pipeline.microbatches",
      f"equal chosen.stage_microbatches = {chosen.get('stage_microbatches', 1)}",
      layout["microbatches"],
    )
  if layout["layers"] % (layout["stages"] * layout["repeats"]):
    _refuse("pipeline.layers", "split into stages x repeats equal chunks", layout["layers"])
  if layout["n_params"] != len(data["param_specs"]):
    _refuse(
      "pipeline.n_params",
      f"be the {len(data['param_specs'])} parameter specs' count",
      layout["n_params"],
    )
  per_layer = 1 if layout["stacked"] else layout["layers"]
  for i, leaves in enumerate(layout["layer_params"]):
    if len(leaves) != per_layer or any(k >= layout["n_params"] for k in leaves):
      _refuse(
        f"pipeline.layer_params[{i}]",
        f"list {per_layer} parameter leaf indices below pipeline.n_params",
        leaves,
      )


def _check_specs(data: dict) -> None:
  axes = tuple(data["mesh_shape"])
  details = data.get("details")
  shapes = {}
  if details is not None:
    shapes = {
      "param_specs": {tuple(x["path"]): x["shape"] for x in details["params"]},
      "batch_specs": {tuple(x["path"]): x["shape"] for x in details["batch"]},
    }
    shapes["opt_state_param_specs"] = shapes["param_specs"]
  paths: dict[str, set] = {}
  fields = ("param_specs", "opt_state_param_specs", "batch_specs", "model_state_specs")
  for field in (f for f in fields if f in data):
    paths[field] = set()
    for i, entry in enumerate(data[field]):
      where, path, spec = f"{field}[{i}]", tuple(entry["path"]), entry["spec"]
      named = [a for e in spec if e is not None for a in (e if isinstance(e, list) else [e])]
      if set(named) - set(axes):
        _refuse(f"{where}.spec", f"name only the mesh's axes {axes}", spec)
      if len(set(named)) < len(named):
        _refuse(f"{where}.spec", "name each mesh axis at most once", spec)
      if path in paths[field]:
        _refuse(f"{where}.path", f"be a leaf given once in {field}", entry["path"])
      paths[field].add(path)
      if field in shapes:
        if path not in shapes[field]:
          _refuse(f"{where}.path", "be a leaf the plan's details list", entry["path"])
        rank = len(shapes[field][path])
        if len(spec) > rank:
          _refuse(
            f"{where}.spec",
            f"have at most {rank} entries, the rank of {path_str(path)} {shapes[field][path]}",
            spec,
          )
  if paths["opt_state_param_specs"] != paths["param_specs"]:
    _refuse(
      "opt_state_param_specs",
      "list the same leaves as param_specs",
      sorted(map(path_str, paths["opt_state_param_specs"] ^ paths["param_specs"])),
    )
  for field in shapes:
    if len(paths[field]) != len(shapes[field]):
      missing = sorted(map(path_str, set(shapes[field]) - set(paths[field])))
      _refuse(field, "give a spec for every leaf the plan's details list", missing)
