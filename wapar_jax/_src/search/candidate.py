"""A point of the search and how candidates are named and ranked.

A candidate is a data degree dp, a model degree tp, the groups of dimension classes split on the
model axis, where parameters / optimizer state are stored along the data axis, and a pipeline's
stages (1: none); with its predicted figures per device and step. Hybrid sharding ("hsdp")
stores the state split over the data axis's devices inside a node only, as a mesh axis of its
own (MaxText's data x fsdp x tensor).
"""

from __future__ import annotations

import dataclasses

STRATEGIES = ("auto", "dp", "zero1", "fsdp", "hsdp", "tp", "dp_tp", "pp", "ep", "cp")
STORAGES = ("replicated", "zero1", "fsdp", "hsdp")
# Storages that keep parameters split and gather each layer's weights where it runs.
GATHERING = frozenset({"fsdp", "hsdp"})
OBJECTIVES = ("time", "energy")
# plan(sequence_parallel=) by name (the command line's --sequence-parallel): never, on every
# plan with a model axis, searched.
SEQUENCE_PARALLEL = {"off": False, "on": True, "searched": None}
DATA, FSDP, MODEL, STAGE, EXPERT = "data", "fsdp", "model", "stage", "expert"
CONTEXT = "context"
# Fraction of device memory a plan leaves free: fragmentation and runtime buffers (~10%), and
# the memory model's error (benchmarks/results/memory_levers.md).
DEFAULT_MEMORY_HEADROOM = 0.15


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One point of the search with its predicted figures (per device, per step)."""

  devices: int
  data: int
  model: int
  model_groups: tuple[int, ...]
  storage: str
  strategy: str
  step_time: float
  compute_time: float
  comm_time: float
  flops: float
  comm_bytes: float
  peak_memory: float
  energy: float
  fits: bool
  # Per-device memory by term (bytes); peak_memory is their sum.
  param_memory: float = 0.0
  opt_state_memory: float = 0.0
  activation_memory: float = 0.0
  # How the step is run: rematerialisation policy and gradient-accumulation micro-batches.
  remat: str = "none"
  microbatches: int = 1
  # Mesh axes whose collectives cross nodes (laid out as create_hybrid_device_mesh does).
  cross_node_axes: tuple[str, ...] = ()
  # Under "hsdp": the data axis's devices inside one node, which split the state (the fsdp axis).
  fsdp: int = 1
  # A pipeline: the layers split into `stages` (the outermost mesh axis) x `repeats` chunks,
  # the batch into `stage_microbatches` micro-batches flowing through them.
  stages: int = 1
  repeats: int = 1
  stage_microbatches: int = 1
  # Megatron-style sequence parallelism: the activations outside the tensor-parallel regions
  # split on the sequence over the model axis (only with model > 1).
  sequence_parallel: bool = False
  # Expert parallelism: the `expert` of the data axis's devices (inside them) split the experts
  # of every mixture-of-experts layer; tokens reach their experts by all-to-all.
  expert: int = 1
  # Context parallelism: the `context` of the data axis's devices (inside them) split every
  # activation on its sequence; attention gathers the keys and values over them.
  context: int = 1
  # The part of comm_time not hidden behind independent compute (`cost.overlap`), reported
  # beside step_time (`step_seconds`). None where it was not modelled (a plan written before
  # the overlap model): then all of comm_time is exposed.
  exposed_comm_time: float | None = None

  @property
  def exposed_comm(self) -> float:
    """Seconds of communication on the critical path (all of it where not modelled)."""
    return self.comm_time if self.exposed_comm_time is None else self.exposed_comm_time

  @property
  def mesh_shape(self) -> dict[str, int]:
    return mesh_shape(self.data, self.model, self.fsdp, self.stages, self.expert, self.context)

  @property
  def bubble(self) -> float:
    """The idle fraction of a pipeline step (0 without one)."""
    s, rm = self.stages, self.repeats * self.stage_microbatches
    return (s - 1) / (rm + s - 1)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["model_groups"] = list(self.model_groups)
    d["cross_node_axes"] = list(self.cross_node_axes)
    d["mesh_shape"] = self.mesh_shape
    return d


def mesh_shape(
  dp: int, tp: int, fsdp: int = 1, stages: int = 1, expert: int = 1, context: int = 1
) -> dict[str, int]:
  """Axes of size 1 are dropped, except that one device still has a (data=1) mesh. The fsdp
  axis takes `fsdp` of the dp data-parallel devices, between data and model, and so does the
  expert axis (inside a node first: its all-to-alls have no two-level algorithm); a pipeline's
  stage axis is outermost (across nodes first: stages send only activations). With an expert
  axis the data axis stays, of size 1 too: the batch's devices are (data, expert) in every
  spec, and a weight stored over them is told from the experts' own split by it. The context
  axis sits where the expert axis does, and keeps the data axis so too."""
  shape = {
    STAGE: stages,
    DATA: dp // fsdp // expert // context,
    CONTEXT: context,
    EXPERT: expert,
    FSDP: fsdp,
    MODEL: tp,
  }
  kept = {k: v for k, v in shape.items() if v > 1 or (k == DATA and expert * context > 1)}
  return kept or {DATA: 1}


def strategy_label(
  dp: int,
  tp: int,
  storage: str,
  stages: int = 1,
  sequence_parallel: bool = False,
  expert: int = 1,
  context: int = 1,
) -> str:
  if expert > 1:
    return "ep" if storage == "replicated" else f"ep+{storage}"
  if context > 1:
    return "cp" if storage == "replicated" else f"cp+{storage}"
  if stages > 1:
    inner = strategy_label(dp, tp, storage, sequence_parallel=sequence_parallel)
    return "pp" if dp * tp == 1 else f"{inner}+pp"
  if sequence_parallel:
    return f"{strategy_label(dp, tp, storage)}+sp"
  if dp * tp == 1:
    return "single"
  if tp == 1:
    return {"replicated": "dp", "zero1": "zero1", "fsdp": "fsdp", "hsdp": "hsdp"}[storage]
  if dp == 1:
    return "tp"
  return "dp_tp" if storage == "replicated" else f"dp_tp+{storage}"


def step_seconds(compute_time: float, comm_time: float, exposed_comm_time: float) -> float:
  """The step time the search ranks by: compute plus every collective. The overlap model's
  exposed part is reported beside it, not ranked by: on 8 of the suite's cases run fresh with
  overlap on both sides it ranked worse than the sum (mean Kendall tau 0.73 against 0.83,
  benchmarks/results/overlap.md), and it is not yet calibrated on a GPU."""
  del exposed_comm_time
  return compute_time + comm_time


def rank_value(objective: str):
  """The figure the objective minimises."""
  return (lambda c: c.step_time) if objective == "time" else (lambda c: c.energy)


def rank_key(objective: str):
  """Fitting first, then the objective; within 0.01%: fewer devices, then less memory."""
  value = rank_value(objective)
  return lambda c: (not c.fits, float(f"{value(c):.4g}"), c.devices, c.peak_memory, c.model)
