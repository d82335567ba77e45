"""What a Plan keeps about its model besides the specs: leaves, dimension groups, hot spots.

Built once by the planner (`planner.details`) from the search space and the chosen candidate,
so that a plan (also one loaded from JSON, with no model at hand) can explain itself, export
logical-axis rules and check that it is applied to the model it was made for.

Example:
  >>> plan = wapar_jax.plan(loss_fn, params, batch, optimizer=optax.adamw(1e-3), devices=8)
  >>> [g.name for g in plan.details.groups]
  ['embed', 'heads', 'mlp', 'wpe', 'wte']
  >>> plan.details.hotspots[0].source
  'model.py:42 (Block.__call__)'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Logical names of the batch dim and of a scanned layer dim.
BATCH, LAYERS = "batch", "layers"


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
    experts: the mixture-of-experts routing read from the program (`trace.experts`): experts
      per layer E, slots per expert and routing group C, tokens per group T and experts per
      token k (T, k: 0 where not found); () without one.
  """

  groups: tuple[DimGroup, ...]
  params: tuple[Leaf, ...]
  batch: tuple[Leaf, ...]
  hotspots: tuple[Hotspot, ...]
  memory: tuple[tuple[str, float], ...]
  compute_bound_seconds: float
  memory_bound_seconds: float
  unknown_primitives: tuple[str, ...] = ()
  experts: tuple[int, ...] = ()

  @property
  def batch_size(self) -> int:
    """Rows of the batch: the size of the first batch leaf's dim named "batch"."""
    if not self.batch or not self.batch[0].shape:
      return 1
    leaf = self.batch[0]
    return leaf.shape[leaf.dims.index(BATCH) if BATCH in leaf.dims else 0]

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for leaf in d["params"] + d["batch"]:
      leaf["path"] = list(leaf["path"])
    return d

  @classmethod
  def from_dict(cls, d: dict) -> PlanDetails:
    def leaf(x):
      return Leaf(tuple(x["path"]), tuple(x["shape"]), str(x["dtype"]), tuple(x["dims"]))

    return cls(
      groups=tuple(
        DimGroup(
          g["name"],
          int(g["size"]),
          tuple(g["mesh_axes"]),
          float(g["param_bytes"]),
          tuple(g["where"]),
        )
        for g in d["groups"]
      ),
      params=tuple(leaf(x) for x in d["params"]),
      batch=tuple(leaf(x) for x in d["batch"]),
      hotspots=tuple(Hotspot(**h) for h in d["hotspots"]),
      memory=tuple((str(k), float(v)) for k, v in d["memory"]),
      compute_bound_seconds=float(d["compute_bound_seconds"]),
      memory_bound_seconds=float(d["memory_bound_seconds"]),
      unknown_primitives=tuple(d.get("unknown_primitives", ())),
      experts=tuple(int(n) for n in d.get("experts", ())),
    )

  def group(self, name: str) -> DimGroup:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(name)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """Predicted cost of one train step, per device (energy: all used devices together)."""

  step_time: float  # seconds
  compute_time: float  # seconds
  comm_time: float  # seconds
  flops: float  # FLOPs per device
  comm_bytes: float  # bytes sent per device
  peak_memory: float  # bytes per device
  energy: float  # joules per step, all used devices
  memory_budget: float  # bytes per device the plan had to fit in
  # seconds of comm_time not hidden behind compute: step_time = compute_time + this (None in a
  # plan written before the overlap model, whose step_time is compute_time + comm_time)
  exposed_comm_time: float | None = None

  @property
  def exposed_comm(self) -> float:
    """Seconds of communication on the critical path (all of it where not modelled)."""
    return self.comm_time if self.exposed_comm_time is None else self.exposed_comm_time

  @classmethod
  def of(cls, c, memory_budget: float) -> Prediction:
    """The figures of a search `Candidate`."""
    return cls(
      c.step_time,
      c.compute_time,
      c.comm_time,
      c.flops,
      c.comm_bytes,
      c.peak_memory,
      c.energy,
      memory_budget,
      c.exposed_comm_time,
    )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Prediction:
    """Reads the known fields; others (from other versions) are left out, and a figure added
    since the file was written takes its default."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: None if d[k] is None else float(d[k]) for k in known if k in d}
    return cls(**values)
