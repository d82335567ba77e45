"""What verification reports: each compiled collective, the figures per device, their errors.

`Verification` holds a plan's predicted figures beside the compiled ones, and turns them into
relative errors, a text table and a JSON-ready dict (read back by `from_dict`, which is how a
child process hands its result over).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from wapar_jax._src.cost.collectives import hierarchical_collective_traffic
from wapar_jax._src.fmt import human_bytes, human_seconds, percent
from wapar_jax._src.fmt import table as text_table


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the compiled module.

  Attributes:
    kind: "all-reduce", "all-gather", "reduce-scatter", "all-to-all" or "collective-permute"
      (async -start/-done pairs are one collective).
    name: the HLO instruction name; op_name: the jax source op it came from, if XLA kept it.
    nbytes: per-device bytes of the full (unsplit) buffer, as `cost.collective_traffic` takes
      it: the result of an all-reduce / all-gather / all-to-all / permute, the operand of a
      reduce-scatter.
    group_size: devices per replica group; num_groups: how many groups.
    axes: the plan's mesh axes the groups span (empty if the group is one device).
    crosses_nodes: a group holds devices of more than one node; nodes: how many it spans.
      Priced as the planner does: one ring on `intra_node` inside a node, two-level
      (in node, then across nodes on `inter_node`) once a group spans nodes.
    count: executions per step (product of the trip counts of the loops around it).
    sent_bytes: bytes each device sends per step (ring formula x count).
    time: seconds per step on the profile's link (alpha-beta x count).
    reduction_flops: FLOPs XLA's cost analysis books for the sums of an all-reduce or
      reduce-scatter (one per element of the full buffer, x count); the planner's FLOPs leave
      them out, so they explain part of a FLOPs gap on many devices.
    scattered_bytes: of an all-reduce's buffer, the bytes of which each device reads only its
      own 1/n dynamic slice (directly, or through elementwise ops): a reduce-scatter would do.
      XLA's GPU and TPU pipelines rewrite the direct form into one (ReduceScatterCreator); the
      CPU pipeline verified here does not.
    computation, depth: where it runs, and how many collectives lie on the longest data path
      before it there (itself included). Two collectives of one computation at the same depth
      do not depend on each other, so a combiner may merge them.
    buffers: per-device bytes of each buffer of a tuple collective (they sum to nbytes), so
      one that XLA:CPU merged whole can be priced in the launches GPU XLA's combiner leaves.
  """

  kind: str
  name: str
  nbytes: float
  group_size: int
  num_groups: int
  axes: tuple[str, ...]
  crosses_nodes: bool
  count: float
  sent_bytes: float
  time: float
  shape: str = ""
  op_name: str = ""
  reduction_flops: float = 0.0
  scattered_bytes: float = 0.0
  nodes: int = 1
  computation: str = ""
  depth: int = 0
  buffers: tuple[float, ...] = ()

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["axes"] = list(self.axes)
    return d


@dataclasses.dataclass(frozen=True)
class Figures:
  """Per-device, per-step figures, predicted or compiled.

  `compute_time` is a roofline over kernels: the planner's over jaxpr equations when predicted,
  over the compiled module's kernels (fusions, dots, copies) when compiled, on the same profile.
  `step_time` as the search ranks (`search.candidate.step_seconds`: compute + comm);
  `exposed_comm_time` the collectives not hidden behind independent compute, by the plan's
  graph when predicted and by the compiled module's dataflow when compiled
  (`verify.overlap`). None where not known (figures written before the overlap model).
  """

  flops: float
  comm_bytes: float
  comm_time: float
  peak_memory: float
  compute_time: float = 0.0
  step_time: float = 0.0
  exposed_comm_time: float | None = None


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
  """`compiled.memory_analysis()` in bytes per device; peak = argument + output - alias + temp."""

  argument: float
  output: float
  alias: float
  temp: float

  @property
  def peak(self) -> float:
    return self.argument + self.output - self.alias + self.temp


FIGURES = ("flops", "comm_bytes", "comm_time", "compute_time", "step_time", "peak_memory")


def relative_error(predicted: float, compiled: float) -> float | None:
  """(predicted - compiled) / compiled; 0 when both are 0, None when only compiled is 0."""
  if compiled == 0:
    return 0.0 if predicted == 0 else None
  return (predicted - compiled) / abs(compiled)


@dataclasses.dataclass(frozen=True)
class Verification:
  """A plan's predicted figures next to what XLA compiled for its mesh.

  Attributes:
    mesh_shape, strategy, profile: the plan verified and the profile its collectives are
      priced with.
    predicted: the plan's figures; compiled: the compiled module's, priced the same way.
      `compiled.flops` is XLA's count corrected for loop trip counts (see `xla_flops`).
    xla_flops: `cost_analysis()["flops"]` as XLA reports it: each loop body counted once.
    loop_flops_added: dot / convolution FLOPs of loop bodies' remaining iterations, added to
      `xla_flops` to give `compiled.flops` (0 for a step without loops).
    memory: the parts of the compiled peak memory.
    collectives: every collective instruction, in program order.
    compile_seconds: lowering + compiling; verify_seconds: all of verify, child start included.
    child_process: whether the compile ran in a child process.
    comm_time_as_emitted: the compiled collectives priced one launch per instruction as
      XLA:CPU emitted them; `compiled.comm_time` prices them as GPU / TPU XLA would combine
      them (see `target_comm_time`).
    notes: anything that limits the comparison (unknown trip counts, missing analyses).
    compiler: "xla:cpu" (virtual CPU devices) or "xla:gpu" (mock GPU devices).
    planned_dtype: the plan's bf16 / f16 floats ("" for a float32 plan).
    twin_dtype, twin_memory, twin_predicted_peak, twin_compile_seconds: a low-precision plan
      compiled on CPU devices is also compiled as its float32 twin (the same program with
      every bf16 / f16 value float32, `twin.float32_twin`): XLA:CPU computes bf16 in float32
      and keeps float32 temporaries, so the bf16 compile's memory says nothing of the plan's.
      `twin_predicted_peak` is the plan's candidate priced for the twin under XLA:CPU's rules
      (0 when it could not be priced); `twin_dtype` is "" where no twin was compiled.
    async_collectives, overlapped_collectives: on GPU XLA, the collectives scheduled as async
      start / done pairs, and how many of them have kernels scheduled between the two.
  """

  mesh_shape: Mapping[str, int]
  strategy: str
  profile: str
  predicted: Figures
  compiled: Figures
  xla_flops: float
  loop_flops_added: float
  memory: MemoryBreakdown
  collectives: tuple[Collective, ...]
  compile_seconds: float
  verify_seconds: float
  child_process: bool
  notes: tuple[str, ...] = ()
  comm_time_as_emitted: float = 0.0
  compiler: str = "xla:cpu"
  planned_dtype: str = ""
  twin_dtype: str = ""
  twin_memory: MemoryBreakdown | None = None
  twin_predicted_peak: float = 0.0
  twin_compile_seconds: float = 0.0
  async_collectives: int = 0
  overlapped_collectives: int = 0

  @property
  def twin_peak_memory(self) -> float:
    """The float32 twin's compiled peak per device (0 without a twin)."""
    return self.twin_memory.peak if self.twin_memory is not None else 0.0

  @property
  def twin_peak_error(self) -> float | None:
    """(twin predicted - twin compiled) / twin compiled; None without a priced twin."""
    if not self.twin_dtype or not self.twin_predicted_peak:
      return None
    return relative_error(self.twin_predicted_peak, self.twin_peak_memory)

  @property
  def comm_bytes_scattered(self) -> float:
    """Compiled bytes sent with sliced-only all-reduces counted as the reduce-scatters that
    XLA's GPU / TPU pipelines make of them: the figure to hold a GPU prediction against."""

    def sent(kind, c):
      return sum(
        hierarchical_collective_traffic(
          kind, c.scattered_bytes, max(c.group_size // c.nodes, 1), c.nodes
        )
      )

    saved = sum(
      (sent("all-reduce", c) - sent("reduce-scatter", c)) * c.count
      for c in self.collectives
      if c.scattered_bytes
    )
    return self.compiled.comm_bytes - float(saved)

  @property
  def reduction_flops(self) -> float:
    """FLOPs of `compiled.flops` that are the sums inside all-reduces / reduce-scatters."""
    return sum(c.reduction_flops for c in self.collectives)

  @property
  def errors(self) -> dict[str, float | None]:
    """Relative error of each figure: (predicted - compiled) / compiled."""
    return {
      f: relative_error(getattr(self.predicted, f), getattr(self.compiled, f)) for f in FIGURES
    }

  def collective_summary(self) -> list[dict]:
    """Collectives grouped by (kind, axes, group size): instructions, executions, bytes, time."""
    rows: dict[tuple, dict] = {}
    for c in self.collectives:
      key = (c.kind, c.axes, c.group_size, c.crosses_nodes)
      row = rows.setdefault(
        key,
        {
          "kind": c.kind,
          "axes": list(c.axes),
          "group_size": c.group_size,
          "crosses_nodes": c.crosses_nodes,
          "instructions": 0,
          "executions": 0.0,
          "nbytes": 0.0,
          "sent_bytes": 0.0,
          "time": 0.0,
        },
      )
      row["instructions"] += 1
      row["executions"] += c.count
      row["nbytes"] += c.nbytes * c.count
      row["sent_bytes"] += c.sent_bytes
      row["time"] += c.time
    return sorted(rows.values(), key=lambda r: -r["sent_bytes"])

  def table(self) -> str:
    """Prediction and compiled truth side by side, then the collectives, as text."""
    fmt = {
      "flops": lambda x: f"{x:.4g}",
      "comm_bytes": human_bytes,
      "comm_time": human_seconds,
      "compute_time": human_seconds,
      "step_time": human_seconds,
      "peak_memory": human_bytes,
    }
    names = {
      "flops": "FLOPs",
      "comm_bytes": "communicated",
      "comm_time": "comm time",
      "compute_time": "compute time",
      "step_time": "step time",
      "peak_memory": "peak memory",
    }
    errs = self.errors
    rows = [
      [
        names[f],
        fmt[f](getattr(self.predicted, f)),
        fmt[f](getattr(self.compiled, f)),
        "see twin" if f == "peak_memory" and self.twin_dtype else percent(errs[f]),
      ]
      for f in FIGURES
    ]
    if self.twin_dtype:
      predicted = self.twin_predicted_peak
      rows.append(
        [
          f"peak memory, {self.twin_dtype} twin",
          human_bytes(predicted) if predicted else "-",
          human_bytes(self.twin_peak_memory),
          percent(self.twin_peak_error),
        ]
      )
    where = "child process" if self.child_process else "this process"
    on = {"xla:cpu": "CPU", "xla:gpu": "mock GPU"}.get(self.compiler, self.compiler)
    lines = [
      f"verify: mesh {dict(self.mesh_shape)}, strategy {self.strategy}, priced on "
      f"{self.profile}; compiled by {self.compiler} on {on} devices in "
      f"{self.compile_seconds:.2f} s ({where}), verify {self.verify_seconds:.2f} s",
      "",
      "per device, per step:",
      text_table(["figure", "predicted", "compiled", "error"], rows),
      "",
    ]
    if self.twin_dtype:
      short = {"bfloat16": "bf16", "float16": "f16"}.get(self.planned_dtype, self.planned_dtype)
      lines.append(
        f"{short} compiled on XLA:CPU computes in f32 and keeps f32 temporaries: memory "
        f"checked through the {self.twin_dtype} twin (the same step with every {short} value "
        f"{self.twin_dtype}, compiled in {self.twin_compile_seconds:.2f} s, predicted under "
        f"XLA:CPU's rules); the other figures are the {short} compile's."
      )
      upcast = sum(1 for c in self.collectives if "f32[" in c.shape)
      if upcast:
        # XLA:CPU normalises bf16 reductions to f32 as it does dots: the bytes are not a GPU's.
        lines.append(
          f"XLA:CPU also communicates in f32: {upcast} of {len(self.collectives)} collectives "
          f"carry f32 buffers, up to 2x the bytes a {short} step sends on a GPU; their number "
          "and groups stand."
        )
    if self.compiler == "xla:gpu":
      lines.append(
        f"GPU XLA scheduled {self.async_collectives} collective(s) as async start / done "
        f"pairs; {self.overlapped_collectives} of them with kernels between start and done."
      )
    if self.comm_time_as_emitted:
      lines.append(
        f"comm time prices the compiled collectives as GPU / TPU XLA combines them (30 MiB "
        f"launches, reduce-scatter where only a slice is read); one launch per instruction as "
        f"XLA:CPU emitted them: {human_seconds(self.comm_time_as_emitted)}."
      )
    if self.loop_flops_added:
      lines.append(
        f"XLA counts each loop body once: {self.xla_flops:.4g} FLOPs reported, "
        f"+{self.loop_flops_added:.4g} for the remaining loop iterations."
      )
    if self.comm_bytes_scattered != self.compiled.comm_bytes:
      lines.append(
        f"{human_bytes(self.compiled.comm_bytes - self.comm_bytes_scattered)} of the bytes "
        "sent are all-reduces used only as each device's slice, which XLA on GPU / TPU emits "
        f"as reduce-scatters: as such, {human_bytes(self.comm_bytes_scattered)} sent "
        f"({percent(relative_error(self.predicted.comm_bytes, self.comm_bytes_scattered))})."
      )
    if self.reduction_flops:
      lines.append(
        f"of the compiled FLOPs, {self.reduction_flops:.4g} are the sums inside "
        "all-reduce / reduce-scatter, which the prediction leaves out."
      )
    m = self.memory
    lines.append(
      f"compiled memory: arguments {human_bytes(m.argument)} + outputs "
      f"{human_bytes(m.output)} - aliased {human_bytes(m.alias)} + temporaries "
      f"{human_bytes(m.temp)}"
    )
    if self.twin_memory is not None:
      t = self.twin_memory
      lines.append(
        f"{self.twin_dtype} twin compiled memory: arguments {human_bytes(t.argument)} + "
        f"outputs {human_bytes(t.output)} - aliased {human_bytes(t.alias)} + temporaries "
        f"{human_bytes(t.temp)}"
      )
    summary = self.collective_summary()
    if summary:
      crows = [
        [
          r["kind"],
          ",".join(r["axes"]) or "-",
          str(r["group_size"]),
          "inter" if r["crosses_nodes"] else "intra",
          str(r["instructions"]),
          f"{r['executions']:.0f}",
          human_bytes(r["nbytes"]),
          human_bytes(r["sent_bytes"]),
          human_seconds(r["time"]),
        ]
        for r in summary
      ]
      lines += [
        "",
        "collectives in the compiled module:",
        text_table(["kind", "axes", "n", "link", "ops", "runs", "buffer", "sent", "time"], crows),
      ]
    else:
      lines += ["", "collectives in the compiled module: none"]
    lines += [f"note: {n}" for n in self.notes]
    return "\n".join(lines)

  def to_dict(self) -> dict:
    """JSON-ready form; `from_dict` reads it back."""
    return {
      "mesh_shape": dict(self.mesh_shape),
      "strategy": self.strategy,
      "profile": self.profile,
      "predicted": dataclasses.asdict(self.predicted),
      "compiled": dataclasses.asdict(self.compiled),
      "errors": self.errors,
      "xla_flops": self.xla_flops,
      "reduction_flops": self.reduction_flops,
      "comm_bytes_scattered": self.comm_bytes_scattered,
      "comm_bytes_scattered_error": relative_error(
        self.predicted.comm_bytes, self.comm_bytes_scattered
      ),
      "loop_flops_added": self.loop_flops_added,
      "memory": dict(dataclasses.asdict(self.memory), peak=self.memory.peak),
      "collectives": [c.to_dict() for c in self.collectives],
      "collective_summary": self.collective_summary(),
      "compile_seconds": self.compile_seconds,
      "verify_seconds": self.verify_seconds,
      "child_process": self.child_process,
      "notes": list(self.notes),
      "comm_time_as_emitted": self.comm_time_as_emitted,
      "compiler": self.compiler,
      "planned_dtype": self.planned_dtype,
      "twin_dtype": self.twin_dtype,
      "twin_memory": None
      if self.twin_memory is None
      else dict(dataclasses.asdict(self.twin_memory), peak=self.twin_memory.peak),
      "twin_predicted_peak": self.twin_predicted_peak,
      "twin_peak_memory": self.twin_peak_memory,
      "twin_peak_error": self.twin_peak_error,
      "twin_compile_seconds": self.twin_compile_seconds,
      "async_collectives": self.async_collectives,
      "overlapped_collectives": self.overlapped_collectives,
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Verification:
    """Reads `to_dict`'s form back; fields added since a dict was written take defaults."""
    memory = {k: v for k, v in d["memory"].items() if k != "peak"}
    twin = d.get("twin_memory")
    return cls(
      mesh_shape=dict(d["mesh_shape"]),
      strategy=d["strategy"],
      profile=d["profile"],
      predicted=Figures(**d["predicted"]),
      compiled=Figures(**d["compiled"]),
      xla_flops=d["xla_flops"],
      loop_flops_added=d["loop_flops_added"],
      memory=MemoryBreakdown(**memory),
      collectives=tuple(
        Collective(**dict(c, axes=tuple(c["axes"]), buffers=tuple(c.get("buffers", ()))))
        for c in d["collectives"]
      ),
      compile_seconds=d["compile_seconds"],
      verify_seconds=d["verify_seconds"],
      child_process=d["child_process"],
      notes=tuple(d.get("notes", ())),
      comm_time_as_emitted=d.get("comm_time_as_emitted", 0.0),
      compiler=d.get("compiler", "xla:cpu"),
      planned_dtype=d.get("planned_dtype", ""),
      twin_dtype=d.get("twin_dtype", ""),
      twin_memory=None
      if twin is None
      else MemoryBreakdown(**{k: v for k, v in twin.items() if k != "peak"}),
      twin_predicted_peak=d.get("twin_predicted_peak", 0.0),
      twin_compile_seconds=d.get("twin_compile_seconds", 0.0),
      async_collectives=d.get("async_collectives", 0),
      overlapped_collectives=d.get("overlapped_collectives", 0),
    )
