"""A Plan to and from the JSON object of its plan file: the versions read, the fields written.

The file holds data only (mesh, specs by leaf path, figures, details); `plan_file` checks what a
file holds before any of it becomes a Plan.
"""

from __future__ import annotations

import dataclasses
import json

from jax.sharding import PartitionSpec as P

from wapar_jax._src import plan_file
from wapar_jax._src.emit import pipeline as pipeline_lib
from wapar_jax._src.plan_details import PlanDetails, Prediction
from wapar_jax._src.search.candidate import Candidate
from wapar_jax._src.tree import nest
from wapar_jax.errors import CorruptPlanFileError

# 2: adds "details" (leaf shapes and dtypes, dimension groups, hot spots). 3: predictions under
# the rules of the profile's compiler only (the XLA:CPU figure is verify's). 4: adds "pipeline"
# (the stage layout) and the candidates' stages, repeats and stage micro-batches. Older
# versions are read too. 5: adds "model_state_specs" (a model's state the step carries) and
# "batch_axes" (batch dims other than dim 0).
PLAN_FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)


def _spec_to_json(spec: P) -> list:
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def _spec_from_json(entries: list) -> P:
  return P(*(tuple(e) if isinstance(e, list) else e for e in entries))


def to_data(plan) -> dict:
  """The plan as the JSON object a plan file holds."""

  def flat(specs):
    return [{"path": list(k), "spec": _spec_to_json(s)} for k, s in specs.items()]

  data = {
    "format": "wapar_jax.plan",
    "version": PLAN_FORMAT_VERSION,
    "mesh_shape": dict(plan.mesh_shape),
    "strategy": plan.strategy,
    "objective": plan.objective,
    "profile": plan.profile,
    "devices_offered": plan.devices_offered,
    "model_split": list(plan.model_split),
    "predicted": dataclasses.asdict(plan.predicted),
    "chosen": plan.chosen.to_dict(),
    "candidates": [c.to_dict() for c in plan.candidates],
    "stats": dict(plan.stats),
    "memory_decision": plan.memory_decision,
    "param_specs": flat(plan.flat_param_specs),
    "opt_state_param_specs": flat(plan.flat_opt_specs),
    "batch_specs": flat(plan.flat_batch_specs),
  }
  if plan.pipeline is not None:
    data["pipeline"] = plan.pipeline.to_dict()
  if plan.flat_model_state_specs is not None:
    data["model_state_specs"] = flat(plan.flat_model_state_specs)
  if plan.flat_batch_axes:
    data["batch_axes"] = [{"path": list(k), "axis": a} for k, a in plan.flat_batch_axes.items()]
  if plan.details is not None:
    data["details"] = plan.details.to_dict()
  return data


def fields(text: str) -> dict:
  """The fields of the Plan a plan file's text holds, every one checked for form and sense
  (`plan_file.checked`); fields this version does not know are ignored with a warning."""
  try:
    data = json.loads(text)
  except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python reads
    raise CorruptPlanFileError(
      f"a plan file must be JSON written by Plan.to_json. Got {type(e).__name__}: {e}"
    ) from e
  if not isinstance(data, dict) or data.get("format") != "wapar_jax.plan":
    raise CorruptPlanFileError(
      'this is not a wapar_jax plan (no "format": "wapar_jax.plan"). '
      f"Got keys {sorted(data)[:8] if isinstance(data, dict) else type(data).__name__}."
    )
  version = data.get("version")
  if isinstance(version, bool) or version not in READABLE_VERSIONS:
    raise CorruptPlanFileError(
      f"plan file version {version!r} is not supported by this wapar_jax "
      f"(reads versions {READABLE_VERSIONS}); plan again. Got {version!r}."
    )
  data = plan_file.checked(data)

  def flat(entries):
    return {tuple(e["path"]): _spec_from_json(e["spec"]) for e in entries}

  def candidate(d):
    d = {k: v for k, v in d.items() if k != "mesh_shape"}  # derived from data, model, fsdp
    d["model_groups"] = tuple(d["model_groups"])
    d["cross_node_axes"] = tuple(d.get("cross_node_axes", ()))
    return Candidate(**d)

  params, opt, batch = (
    flat(data[k]) for k in ("param_specs", "opt_state_param_specs", "batch_specs")
  )
  state = flat(data["model_state_specs"]) if "model_state_specs" in data else None
  return dict(
    mesh_shape=dict(data["mesh_shape"]),
    param_specs=nest(params),
    batch_specs=nest(batch),
    opt_state_param_specs=nest(opt),
    predicted=Prediction.from_dict(data["predicted"]),
    candidates=tuple(candidate(c) for c in data["candidates"]),
    chosen=candidate(data["chosen"]),
    strategy=data["strategy"],
    objective=data["objective"],
    profile=data["profile"],
    devices_offered=data["devices_offered"],
    model_split=tuple(data["model_split"]),
    stats=dict(data["stats"]),
    memory_decision=data.get("memory_decision", ""),
    flat_param_specs=params,
    flat_opt_specs=opt,
    flat_batch_specs=batch,
    details=(PlanDetails.from_dict(data["details"]) if "details" in data else None),
    pipeline=(pipeline_lib.StageLayout.from_dict(data["pipeline"]) if "pipeline" in data else None),
    model_state_specs=None if state is None else nest(state),
    flat_model_state_specs=state,
    flat_batch_axes=(
      {tuple(e["path"]): e["axis"] for e in data["batch_axes"]} if "batch_axes" in data else None
    ),
  )
