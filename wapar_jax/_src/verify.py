"""Ground truth for a plan: compile its train step with XLA for the plan's mesh and compare.

XLA's SPMD partitioner is the same on CPU as on GPU, so the emitted step compiled for N virtual
CPU devices shows what the plan really costs per device: FLOPs (`cost_analysis`), memory
(`memory_analysis`) and every collective with its shape and replica groups (`as_text`). The
collectives are priced with the same ring alpha-beta formulas and device profile as the
planner, so prediction and compiled truth are compared figure by figure.

A process whose jax already runs with too few CPU devices compiles in a child process started
with `--xla_force_host_platform_device_count=N`. The child gets the plan as JSON and rebuilds
the workload from a built-in example's name, or from a cloudpickle of the user's functions.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np

from wapar_jax._src.cost.collectives import hierarchical_collective_time, hierarchical_collective_traffic
from wapar_jax.errors import (InvalidArgumentError, NotEnoughDevicesError,
                              VerificationFailedError)
from wapar_jax._src.files import write_text_atomic
from wapar_jax._src.profiles import DeviceProfile, load_profile

# A child compile of GPT-2 small takes ~10 s including jax start-up; this bounds a hung child.
DEFAULT_TIMEOUT_S = 300.0
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# XLA:CPU expands optimization barriers before its CSE pass, which merges a rematerialised
# forward pass back into the original one; GPU and TPU compile with the barriers in place.
# Keeping the pass off makes the CPU module rematerialise as the target does (same results).
TARGET_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}
# Opcodes as XLA prints them -> the kind used here (and, via _COST_KIND, by cost.py's formulas).
_OPCODES = {"all-reduce": "all-reduce", "all-gather": "all-gather",
            "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
            "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
            "collective-broadcast": "collective-permute"}
_COST_KIND = {"collective-permute": "permute"}
_DTYPE_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16,
               "u16": 16, "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64,
               "u64": 64, "f64": 64, "c64": 64, "c128": 128, "token": 0, "tf32": 32}


# --- results ------------------------------------------------------------------------------

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

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["axes"] = list(self.axes)
    return d


@dataclasses.dataclass(frozen=True)
class Figures:
  """Per-device, per-step figures, predicted or compiled.

  `compute_time` is a roofline over kernels: the planner's over jaxpr equations when predicted,
  over the compiled module's kernels (fusions, dots, copies) when compiled, on the same profile.
  `step_time` = compute_time + comm_time, as the planner adds them.
  """
  flops: float
  comm_bytes: float
  comm_time: float
  peak_memory: float
  compute_time: float = 0.0
  step_time: float = 0.0


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

  @property
  def comm_bytes_scattered(self) -> float:
    """Compiled bytes sent with sliced-only all-reduces counted as the reduce-scatters that
    XLA's GPU / TPU pipelines make of them: the figure to hold a GPU prediction against."""
    def sent(kind, c):
      return sum(hierarchical_collective_traffic(kind, c.scattered_bytes,
                                                 max(c.group_size // c.nodes, 1), c.nodes))

    saved = sum((sent("all-reduce", c) - sent("reduce-scatter", c)) * c.count
                for c in self.collectives if c.scattered_bytes)
    return self.compiled.comm_bytes - float(saved)

  @property
  def reduction_flops(self) -> float:
    """FLOPs of `compiled.flops` that are the sums inside all-reduces / reduce-scatters."""
    return sum(c.reduction_flops for c in self.collectives)

  @property
  def errors(self) -> dict[str, float | None]:
    """Relative error of each figure: (predicted - compiled) / compiled."""
    return {f: relative_error(getattr(self.predicted, f), getattr(self.compiled, f))
            for f in FIGURES}

  def collective_summary(self) -> list[dict]:
    """Collectives grouped by (kind, axes, group size): instructions, executions, bytes, time."""
    rows: dict[tuple, dict] = {}
    for c in self.collectives:
      key = (c.kind, c.axes, c.group_size, c.crosses_nodes)
      row = rows.setdefault(key, {"kind": c.kind, "axes": list(c.axes), "group_size": c.group_size,
                                  "crosses_nodes": c.crosses_nodes, "instructions": 0,
                                  "executions": 0.0, "nbytes": 0.0, "sent_bytes": 0.0,
                                  "time": 0.0})
      row["instructions"] += 1
      row["executions"] += c.count
      row["nbytes"] += c.nbytes * c.count
      row["sent_bytes"] += c.sent_bytes
      row["time"] += c.time
    return sorted(rows.values(), key=lambda r: -r["sent_bytes"])

  def table(self) -> str:
    """Prediction and compiled truth side by side, then the collectives, as text."""
    from wapar_jax._src.explain import human_bytes, human_seconds
    fmt = {"flops": lambda x: f"{x:.4g}", "comm_bytes": human_bytes,
           "comm_time": human_seconds, "compute_time": human_seconds,
           "step_time": human_seconds, "peak_memory": human_bytes}
    names = {"flops": "FLOPs", "comm_bytes": "communicated", "comm_time": "comm time",
             "compute_time": "compute time", "step_time": "step time",
             "peak_memory": "peak memory"}
    errs = self.errors
    rows = [[names[f], fmt[f](getattr(self.predicted, f)), fmt[f](getattr(self.compiled, f)),
             _pct(errs[f])] for f in FIGURES]
    where = "child process" if self.child_process else "this process"
    lines = [f"verify: mesh {dict(self.mesh_shape)}, strategy {self.strategy}, priced on "
             f"{self.profile}; compiled in {self.compile_seconds:.2f} s ({where}), "
             f"verify {self.verify_seconds:.2f} s",
             "", "per device, per step:",
             _table(["figure", "predicted", "compiled", "error"], rows), ""]
    if self.comm_time_as_emitted:
      lines.append(
          f"comm time prices the compiled collectives as GPU / TPU XLA combines them (30 MiB "
          f"launches, reduce-scatter where only a slice is read); one launch per instruction as "
          f"XLA:CPU emitted them: {human_seconds(self.comm_time_as_emitted)}.")
    if self.loop_flops_added:
      lines.append(f"XLA counts each loop body once: {self.xla_flops:.4g} FLOPs reported, "
                   f"+{self.loop_flops_added:.4g} for the remaining loop iterations.")
    if self.comm_bytes_scattered != self.compiled.comm_bytes:
      lines.append(
          f"{human_bytes(self.compiled.comm_bytes - self.comm_bytes_scattered)} of the bytes "
          "sent are all-reduces used only as each device's slice, which XLA on GPU / TPU emits "
          f"as reduce-scatters: as such, {human_bytes(self.comm_bytes_scattered)} sent "
          f"({_pct(relative_error(self.predicted.comm_bytes, self.comm_bytes_scattered))}).")
    if self.reduction_flops:
      lines.append(f"of the compiled FLOPs, {self.reduction_flops:.4g} are the sums inside "
                   "all-reduce / reduce-scatter, which the prediction leaves out.")
    m = self.memory
    lines.append(f"compiled memory: arguments {human_bytes(m.argument)} + outputs "
                 f"{human_bytes(m.output)} - aliased {human_bytes(m.alias)} + temporaries "
                 f"{human_bytes(m.temp)}")
    summary = self.collective_summary()
    if summary:
      crows = [[r["kind"], ",".join(r["axes"]) or "-", str(r["group_size"]),
                "inter" if r["crosses_nodes"] else "intra", str(r["instructions"]),
                f"{r['executions']:.0f}", human_bytes(r["nbytes"]), human_bytes(r["sent_bytes"]),
                human_seconds(r["time"])] for r in summary]
      lines += ["", "collectives in the compiled module:",
                _table(["kind", "axes", "n", "link", "ops", "runs", "buffer", "sent", "time"],
                       crows)]
    else:
      lines += ["", "collectives in the compiled module: none"]
    lines += [f"note: {n}" for n in self.notes]
    return "\n".join(lines)

  def to_dict(self) -> dict:
    """JSON-ready form; `from_dict` reads it back."""
    return {
        "mesh_shape": dict(self.mesh_shape), "strategy": self.strategy, "profile": self.profile,
        "predicted": dataclasses.asdict(self.predicted),
        "compiled": dataclasses.asdict(self.compiled),
        "errors": self.errors, "xla_flops": self.xla_flops,
        "reduction_flops": self.reduction_flops,
        "comm_bytes_scattered": self.comm_bytes_scattered,
        "comm_bytes_scattered_error": relative_error(self.predicted.comm_bytes,
                                                     self.comm_bytes_scattered),
        "loop_flops_added": self.loop_flops_added,
        "memory": dict(dataclasses.asdict(self.memory), peak=self.memory.peak),
        "collectives": [c.to_dict() for c in self.collectives],
        "collective_summary": self.collective_summary(),
        "compile_seconds": self.compile_seconds, "verify_seconds": self.verify_seconds,
        "child_process": self.child_process, "notes": list(self.notes),
        "comm_time_as_emitted": self.comm_time_as_emitted,
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Verification":
    memory = {k: v for k, v in d["memory"].items() if k != "peak"}
    return cls(
        mesh_shape=dict(d["mesh_shape"]), strategy=d["strategy"], profile=d["profile"],
        predicted=Figures(**d["predicted"]), compiled=Figures(**d["compiled"]),
        xla_flops=d["xla_flops"], loop_flops_added=d["loop_flops_added"],
        memory=MemoryBreakdown(**memory),
        collectives=tuple(Collective(**dict(c, axes=tuple(c["axes"]))) for c in d["collectives"]),
        compile_seconds=d["compile_seconds"], verify_seconds=d["verify_seconds"],
        child_process=d["child_process"], notes=tuple(d.get("notes", ())),
        comm_time_as_emitted=d.get("comm_time_as_emitted", 0.0))


def _pct(x: float | None) -> str:
  return "n/a" if x is None else f"{100 * x:+.1f}%"


def _table(header, rows) -> str:
  from wapar_jax._src.explain import _table as table
  return table(header, rows)


# --- replica groups -----------------------------------------------------------------------

def _balanced(text: str, start: int, open_ch: str, close_ch: str) -> int:
  """Index just past the bracket that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == open_ch:
      depth += 1
    elif text[i] == close_ch:
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced {open_ch}{close_ch} in {text[start:start + 80]!r}")


_IOTA = re.compile(r"\[([\d,\s]*)\]\s*<=\s*\[([\d,\s]*)\](?:\s*T\(([\d,\s]*)\))?")


def _ints(text: str) -> list[int]:
  return [int(x) for x in re.findall(r"-?\d+", text)]


def _iota(dims: Sequence[int], reshape: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  if perm:
    ids = ids.transpose(perm)
  return ids.reshape(dims)


def replica_groups_text(line: str, attribute: str = "replica_groups") -> str | None:
  """The printed value of `attribute=` in an HLO instruction line, in any of XLA's forms."""
  m = re.search(rf"\b{attribute}=", line)
  if not m:
    return None
  i = m.end()
  if line.startswith("{", i):
    return line[i:_balanced(line, i, "{", "}")]
  if line.startswith("[", i):
    it = _IOTA.match(line, i)
    if not it:
      raise ValueError(f"unrecognised replica groups {line[i:i + 80]!r}")
    return it.group(0)
  mesh = re.match(r"(maximal_)?mesh\[", line[i:])
  if mesh:
    j = _balanced(line, i + mesh.end() - 1, "[", "]")
    ids = re.match(r",\s*device_ids=\(", line[j:])
    if ids:
      j = _balanced(line, j + ids.end() - 1, "(", ")")
    axes = re.match(r"\s*\{", line[j:])
    if axes:
      j = _balanced(line, j + axes.end() - 1, "{", "}")
    return line[i:j]
  raise ValueError(f"unrecognised replica groups {line[i:i + 80]!r}")


def parse_replica_groups(text: str, num_devices: int) -> list[list[int]]:
  """Replica groups from any printed form, as lists of logical device (partition) ids.

  Forms: explicit `{{0,1},{2,3}}` (`{}` is one group of all `num_devices`), iota
  `[2,4]<=[8]` and `[4,2]<=[2,4]T(1,0)`, and the mesh form
  `mesh['a'=4,'b'=2] {'a'}` (optionally `, device_ids=(...)` after the axes, holding an id
  list, an iota `[8]<=[2,4]T(1,0)` or jax 0.10.2's short iota `[2,4]T(1,0)`; sub-axes as
  `'a':(pre)size`, and `maximal_mesh[device_id=3] {}`).

  Raises:
    ValueError: the text is none of these.
  """
  text = text.strip()
  if text.startswith("{"):
    inner = text[1:-1].strip()
    if not inner:
      return [list(range(num_devices))]
    groups = [_ints(g) for g in re.findall(r"\{([^{}]*)\}", inner)]
    if not groups:
      raise ValueError(f"unrecognised replica groups {text[:80]!r}")
    return groups
  it = _IOTA.fullmatch(text)
  if it:
    dims, reshape = _ints(it.group(1)), _ints(it.group(2))
    perm = _ints(it.group(3)) if it.group(3) else None
    ids = _iota(dims, reshape, perm)
    return ids.reshape(dims[0] if dims else 1, -1).tolist()
  m = re.match(r"maximal_mesh\[device_id=(\d+)\]", text)
  if m:
    return [[int(m.group(1))]]
  if text.startswith("mesh["):
    return _mesh_groups(text)
  raise ValueError(f"unrecognised replica groups {text[:80]!r}")


def _name(token: str) -> str:
  return token.strip().strip("'\"")


def _mesh_groups(text: str) -> list[list[int]]:
  end = _balanced(text, 4, "[", "]")
  axes = []
  for part in re.findall(r"([^,=]+)=(\d+)", text[5:end - 1]):
    axes.append((_name(part[0]), int(part[1])))
  sizes = [s for _, s in axes]
  rest = text[end:]
  ids = np.arange(math.prod(sizes))
  dev = re.match(r",\s*device_ids=\(", rest)
  if dev:
    close = _balanced(rest, dev.end() - 1, "(", ")")
    body = rest[dev.end():close - 1]
    it = _IOTA.search(body)
    short = re.fullmatch(r"\s*\[([\d,\s]*)\]\s*(?:T\(([\d,\s]*)\))?\s*", body)
    if it:
      perm = _ints(it.group(3)) if it.group(3) else None
      ids = _iota(_ints(it.group(1)), _ints(it.group(2)), perm).reshape(-1)
    elif short:  # jax 0.10.2 prints an iota as "[2,4]T(1,0)": arange reshaped, transposed
      dims = _ints(short.group(1))
      perm = _ints(short.group(2)) if short.group(2) else None
      ids = _iota([math.prod(dims)], dims, perm)
    else:
      values = _ints(body)
      if len(values) == len(sizes) + math.prod(sizes) and values[:len(sizes)] == sizes:
        values = values[len(sizes):]  # "[4,2]0,2,4,..." prints its dims first
      ids = np.asarray(values[-math.prod(sizes):])
    rest = rest[close:]
  brace = rest.find("{")
  group_axes = []
  if brace >= 0:
    for token in rest[brace + 1:_balanced(rest, brace, "{", "}") - 1].split(","):
      if not token.strip():
        continue
      sub = re.match(r"\s*(.+?)\s*:\s*\((\d+)\)\s*(\d+)\s*$", token)
      if sub:
        group_axes.append((_name(sub.group(1)), int(sub.group(2)), int(sub.group(3))))
      else:
        group_axes.append((_name(token), None, None))
  names = [n for n, _ in axes]
  # Split each mesh axis at every sub-axis boundary, major factor first, so each grouped
  # (sub-)axis is a run of whole dims of the reshaped device array.
  cuts: dict[int, set[int]] = {k: {1, s} for k, s in enumerate(sizes)}
  for name, pre, size in group_axes:
    k = names.index(name)
    if pre is not None:
      cuts[k].update({pre, pre * size})
  factor_dims, owner = [], {}
  for k, s in enumerate(sizes):
    points = sorted(cuts[k])
    for a, b in zip(points, points[1:]):
      owner[(k, a)] = len(factor_dims)
      factor_dims.append(b // a)
  grouped = []
  for name, pre, size in group_axes:
    k = names.index(name)
    lo, hi = (1, sizes[k]) if pre is None else (pre, pre * size)
    grouped += [owner[(k, a)] for a in sorted(cuts[k]) if lo <= a < hi]
  arr = ids.reshape(factor_dims) if factor_dims else ids.reshape(())
  kept = [d for d in range(len(factor_dims)) if d not in grouped]
  arr = np.transpose(arr, kept + grouped)
  group_size = math.prod(factor_dims[d] for d in grouped)
  return arr.reshape(-1, group_size).tolist()


def group_axes(groups: Sequence[Sequence[int]], mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
  """The plan's mesh axes along which members of a group differ (row-major logical ids)."""
  names = list(mesh_shape)
  shape = [mesh_shape[n] for n in names]
  total = math.prod(shape)
  varying = set()
  for g in groups:
    ids = [i for i in g if 0 <= i < total]
    if len(ids) < 2:
      continue
    coords = np.array(np.unravel_index(ids, shape))
    varying.update(k for k in range(len(names)) if len(set(coords[k])) > 1)
  return tuple(names[k] for k in sorted(varying))


def node_size(num_devices: int, devices_per_node: int) -> int:
  """Logical devices per node in the layout the planner prices (`search.axis_spans`).

  The job is spread evenly over the fewest nodes that hold it, in logical (row-major mesh)
  order, so the model axis fills a node first; a job that cannot be spread evenly fills whole
  nodes.
  """
  nodes = -(-num_devices // devices_per_node)
  return num_devices // nodes if num_devices % nodes == 0 else devices_per_node


def crosses_nodes(groups: Sequence[Sequence[int]], per_node: int) -> bool:
  """Whether a group holds devices of two nodes, `per_node` consecutive ids per node."""
  return group_span(groups, per_node)[1] > 1


def group_span(groups: Sequence[Sequence[int]], per_node: int) -> tuple[int, int]:
  """(devices of a group inside one node, nodes it spans), as `search.axis_spans` gives them.

  A group spread unevenly over nodes is (1, n): a flat ring on the slow link.
  """
  inner, outer = 1, 1
  for g in groups:
    counts: dict[int, int] = {}
    for i in g:
      counts[i // per_node] = counts.get(i // per_node, 0) + 1
    if len(set(counts.values())) > 1:
      return 1, max(len(x) for x in groups)
    if len(counts) > outer or (len(counts) == outer and len(g) // len(counts) > inner):
      inner, outer = len(g) // len(counts), len(counts)
  return inner, outer


# --- HLO text -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Instr:
  name: str
  type: str
  opcode: str
  rest: str          # operands and attributes
  computation: str


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_CALLEES = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)"
                      r"=%?([\w.\-]+)")
_CALLEE_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")


def type_bytes(type_text: str) -> float:
  """Bytes of an HLO type such as `f32[8,64]{1,0}` or a tuple of them."""
  return _type_size(type_text)[0]


def _type_size(type_text: str) -> tuple[float, float]:
  """(bytes, elements) of an HLO type or a tuple of them."""
  nbytes = elements = 0.0
  for dtype, dims in _SHAPE.findall(re.sub(r"/\*.*?\*/", "", type_text)):
    bits = _DTYPE_BITS.get(dtype)
    if not bits:
      continue
    count = math.prod(int(d) for d in dims.split(",") if d)
    nbytes += count * bits / 8
    elements += count
  return nbytes, elements


def _split_instruction(line: str, computation: str) -> _Instr | None:
  m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
  if not m:
    return None
  i = m.end()
  if line.startswith("(", i):
    j = _balanced(line, i, "(", ")")
  else:
    j = line.find(" ", i)
    if j < 0:
      return None
  op = re.match(r"\s*([\w\-]+)\(", line[j:])
  if not op:
    return None
  return _Instr(m.group(1), line[i:j], op.group(1), line[j + op.end():], computation)


@dataclasses.dataclass(frozen=True)
class HloModule:
  """The parts of a compiled module's text that verification reads."""
  num_partitions: int
  computations: Mapping[str, tuple[_Instr, ...]]
  params: Mapping[str, Mapping[str, str]]  # computation -> parameter name -> type
  order: tuple[str, ...]                   # as printed: callees before callers, ENTRY last
  entry: str


def parse_hlo(text: str) -> HloModule:
  computations: dict[str, list[_Instr]] = {}
  params: dict[str, dict[str, str]] = {}
  order, entry, current = [], "", None
  num_partitions = 1
  m = re.search(r"num_partitions=(\d+)", text)
  if m:
    num_partitions = int(m.group(1))
  for line in text.splitlines():
    if current is None:
      h = _HEADER.match(line)
      if h:
        current = h.group(2)
        computations[current] = []
        params[current] = dict(re.findall(r"([\w.\-]+):\s*([a-z][a-z0-9]*\[[\d,]*\])", h.group(3)))
        order.append(current)
        if h.group(1):
          entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    instr = _split_instruction(line, current)
    if instr is not None:
      computations[current].append(instr)
  if not entry and order:
    entry = order[-1]
  return HloModule(num_partitions, {k: tuple(v) for k, v in computations.items()}, params,
                   tuple(order), entry)


def _trip_count(instr: _Instr, module: HloModule) -> int | None:
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', instr.rest)
  if m:
    return int(m.group(1))
  # Without the backend config: `i < N` in the condition, counting from 0 by 1 (jax's scans).
  cond = re.search(r"\bcondition=%?([\w.\-]+)", instr.rest)
  if cond and cond.group(1) in module.computations:
    body = module.computations[cond.group(1)]
    consts = [int(c) for i in body if i.opcode == "constant"
              for c in re.findall(r"^(-?\d+)\)", i.rest)]
    if any("direction=LT" in i.rest for i in body if i.opcode == "compare") and len(consts) == 1:
      return consts[0]
  return None


def multiplicities(module: HloModule) -> tuple[dict[str, float], dict[str, float], list[str]]:
  """Executions per step of each computation: with loop trip counts, and as XLA counts (x1).

  Returns (with trip counts, loop bodies once, notes about loops of unknown trip count).
  """
  mult = {c: 0.0 for c in module.order}
  once = {c: 0.0 for c in module.order}
  mult[module.entry] = once[module.entry] = 1.0
  notes = []
  for comp in reversed(module.order):  # callers are printed after their callees
    if mult[comp] == 0 and once[comp] == 0:
      continue
    for instr in module.computations[comp]:
      if instr.opcode.endswith("-done") or instr.opcode.endswith("-update"):
        continue  # the -start of an async pair already called the computation
      factor = 1.0
      if instr.opcode == "while":
        trips = _trip_count(instr, module)
        if trips is None:
          notes.append(f"loop {instr.name} has no known trip count; its body is counted once")
          trips = 1
        factor = float(trips)
      callees = _CALLEES.findall(instr.rest)
      for group in _CALLEE_LISTS.findall(instr.rest):
        callees += [_name(c).lstrip("%") for c in group.split(",") if c.strip()]
      for callee in callees:
        if callee not in mult:
          continue
        is_cond = instr.opcode == "while" and re.search(rf"condition=%?{re.escape(callee)}\b",
                                                         instr.rest)
        f = factor + 1 if is_cond else factor
        mult[callee] += mult[comp] * f
        once[callee] += once[comp]
  return mult, once, notes


def _dot_flops(instr: _Instr, types: Mapping[str, str]) -> float:
  """2 x output elements x contracted elements, for dot and convolution instructions."""
  operands = re.findall(r"%([\w.\-]+)", instr.rest.split(")", 1)[0])
  out = _SHAPE.search(instr.type)
  if not out or not operands:
    return 0.0
  out_elems = math.prod(int(d) for d in out.group(2).split(",") if d)
  if instr.opcode == "dot":
    lhs = _SHAPE.search(types.get(operands[0], ""))
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.rest)
    if not lhs:
      return 0.0
    shape = [int(d) for d in lhs.group(2).split(",") if d]
    contracted = math.prod(shape[int(k)] for k in dims.group(1).split(",") if k) if dims else 1
    return 2.0 * out_elems * contracted
  if instr.opcode == "convolution" and len(operands) > 1:
    rhs = _SHAPE.search(types.get(operands[1], ""))
    labels = re.search(r"dim_labels=\w+_(\w+)->", instr.rest)
    if not rhs or not labels:
      return 0.0
    shape = [int(d) for d in rhs.group(2).split(",") if d]
    kernel = math.prod(s for s, label in zip(shape, labels.group(1)) if label != "o")
    return 2.0 * out_elems * kernel
  return 0.0


def _types(module: HloModule, comp: str) -> dict[str, str]:
  types = dict(module.params.get(comp, {}))
  types.update({i.name: i.type for i in module.computations[comp]})
  return types


def loop_flops_added(module: HloModule, mult: Mapping[str, float],
                     once: Mapping[str, float]) -> float:
  """Dot / convolution FLOPs of the loop iterations XLA's cost analysis leaves out."""
  added = 0.0
  for comp, instrs in module.computations.items():
    extra = mult.get(comp, 0.0) - once.get(comp, 0.0)
    if extra <= 0:
      continue
    types = _types(module, comp)
    for instr in instrs:
      if instr.opcode in ("dot", "convolution"):
        added += extra * _dot_flops(instr, types)
  return added


def _operands(instr: _Instr) -> list[str]:
  text = "(" + instr.rest
  return re.findall(r"%([\w.\-]+)", text[1:_balanced(text, 0, "(", ")") - 1])


def _elements(type_text: str) -> float:
  return _type_size(type_text)[1]


# Ops that read their operand element by element: a value only sliced after them is only read
# in that slice.
_ELEMENTWISE = frozenset({
    "abs", "add", "and", "cbrt", "ceil", "clamp", "compare", "convert", "cosine", "divide",
    "exponential", "exponential-minus-one", "floor", "is-finite", "log", "log-plus-one",
    "logistic", "maximum", "minimum", "multiply", "negate", "not", "or", "power", "remainder",
    "round-nearest-even", "rsqrt", "select", "sign", "sine", "sqrt", "subtract", "tanh", "xor"})


def _only_sliced(module: HloModule, comp: str, value: str, elements: float, n: int,
                 users: Mapping[str, Mapping[str, list[_Instr]]], depth: int = 0) -> bool:
  """Whether every use of `value` in `comp` is a dynamic slice of 1/n of its elements.

  Looks through bitcasts, copies and elementwise ops of the same size, and into fusions (at
  the fused parameter `value` feeds).
  """
  uses = users[comp].get(value, [])
  if not uses or depth > 8:
    return False
  for use in uses:
    if use.opcode == "dynamic-slice":
      if _operands(use)[0] != value or _elements(use.type) * n != elements:
        return False
    elif use.opcode in ("bitcast", "copy") or (
        use.opcode in _ELEMENTWISE and _elements(use.type) == elements):
      if not _only_sliced(module, comp, use.name, elements, n, users, depth + 1):
        return False
    elif use.opcode == "fusion":
      callee = re.search(r"\bcalls=%?([\w.\-]+)", use.rest)
      if not callee or callee.group(1) not in module.computations:
        return False
      fused = callee.group(1)
      params = {int(re.match(r"\s*(\d+)", i.rest).group(1)): i.name
                for i in module.computations[fused] if i.opcode == "parameter"}
      positions = [k for k, name in enumerate(_operands(use)) if name == value]
      if not positions or any(
          k not in params or not _only_sliced(module, fused, params[k], elements, n, users,
                                              depth + 1) for k in positions):
        return False
    else:
      return False
  return True


def _users(module: HloModule) -> dict[str, dict[str, list[_Instr]]]:
  users: dict[str, dict[str, list[_Instr]]] = {}
  for comp, instrs in module.computations.items():
    table: dict[str, list[_Instr]] = {}
    for instr in instrs:
      if instr.opcode in ("parameter", "constant"):
        continue
      for name in set(_operands(instr)):
        table.setdefault(name, []).append(instr)
    users[comp] = table
  return users


def _scattered_bytes(module: HloModule, comp: str, instr: _Instr, n: int, users) -> float:
  """Bytes of an all-reduce's result used only as each device's 1/n slice."""
  if n <= 1:
    return 0.0
  if not instr.type.startswith("("):
    nbytes, elements = _type_size(instr.type)
    return nbytes if _only_sliced(module, comp, instr.name, elements, n, users) else 0.0
  total = 0.0
  for use in users[comp].get(instr.name, []):
    if use.opcode != "get-tuple-element":
      continue
    nbytes, elements = _type_size(use.type)
    if _only_sliced(module, comp, use.name, elements, n, users):
      total += nbytes
  return total


def collectives(text: str, mesh_shape: Mapping[str, int], profile: DeviceProfile,
                module: HloModule | None = None, mult: Mapping[str, float] | None = None,
                notes: list[str] | None = None) -> tuple[Collective, ...]:
  """Every collective of a compiled module's text, sized, placed on mesh axes and priced.

  A replica-group form this parser does not know is priced as one group of all devices and
  named in `notes` (when given) rather than failing the whole verification.
  """
  module = module or parse_hlo(text)
  if mult is None:
    mult = multiplicities(module)[0]
  num = module.num_partitions or math.prod(mesh_shape.values())
  per_node = node_size(num, profile.devices_per_node)
  inner_link, outer_link = profile.intra_node, profile.inter_node
  done_type: dict[str, str] = {}
  for instrs in module.computations.values():
    for instr in instrs:
      if instr.opcode.endswith("-done"):
        src = re.match(r"\s*%?([\w.\-]+)", instr.rest)
        if src:
          done_type[src.group(1)] = instr.type
  found = []
  users = _users(module)
  for comp in module.order:
    count = mult.get(comp, 0.0)
    depth: dict[str, int] = {}
    for instr in module.computations[comp]:
      opcode = instr.opcode
      base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
      kind = _OPCODES.get(base)
      before = max((depth.get(o, 0) for o in _operands(instr)), default=0)
      depth[instr.name] = before + (1 if kind is not None else 0)
      if opcode.endswith("-done") or kind is None:
        continue
      type_text = done_type.get(instr.name, instr.type) if opcode.endswith("-start") else instr.type
      try:
        if kind == "collective-permute":
          pairs_text = replica_groups_text(instr.rest, "source_target_pairs") or "{}"
          groups = [g for g in parse_replica_groups(pairs_text, num) if len(set(g)) > 1] \
              if pairs_text != "{}" else []
          n = 2 if groups else 1
        else:
          groups = parse_replica_groups(replica_groups_text(instr.rest) or "{}", num)
          n = len(groups[0]) if groups else 1
      except ValueError as e:
        if notes is not None:
          notes.append(f"{instr.name}: {e}; priced as one group of all {num} devices")
        groups, n = [list(range(num))], num
      result_bytes, result_elements = _type_size(type_text)
      scale = n if kind == "reduce-scatter" else 1
      nbytes = result_bytes * scale
      reduces = kind in ("all-reduce", "reduce-scatter") and n > 1
      n_inner, n_outer = group_span(groups, per_node) if n > 1 else (n, 1)
      cost_kind = _COST_KIND.get(kind, kind)
      sent = sum(hierarchical_collective_traffic(cost_kind, nbytes, n_inner, n_outer))
      seconds = hierarchical_collective_time(
          cost_kind, nbytes, n_inner, n_outer, inner_link.bandwidth, inner_link.latency,
          outer_link.bandwidth, outer_link.latency)
      op_name = re.search(r'op_name="([^"]*)"', instr.rest)
      found.append(Collective(
          kind=kind, name=instr.name, nbytes=nbytes, group_size=n, num_groups=len(groups),
          axes=group_axes(groups, mesh_shape), crosses_nodes=n_outer > 1, count=count,
          sent_bytes=float(sent) * count, time=float(seconds) * count,
          shape=_short(type_text), op_name=op_name.group(1) if op_name else "",
          reduction_flops=result_elements * scale * count if reduces else 0.0,
          scattered_bytes=_scattered_bytes(module, comp, instr, n, users)
          if kind == "all-reduce" else 0.0, nodes=n_outer, computation=comp,
          depth=depth[instr.name]))
  return tuple(found)


def target_comm_time(found: Sequence[Collective], profile: DeviceProfile) -> float:
  """Seconds per step of the compiled collectives as GPU / TPU XLA would run them.

  XLA:CPU's pipeline differs from the accelerators' in two ways that change time, not bytes:
  it merges every gradient all-reduce of a step into one instruction but leaves all-gathers
  apart, and it all-reduces where only a slice is read. GPU / TPU XLA combines independent
  collectives of one kind and replica groups up to a size threshold (`search.COMBINE_BYTES`),
  and emits reduce-scatter for an all-reduce read only in slices. So: collectives of one
  computation at the same dependency depth, kind and groups are pooled and sent in
  ceil(bytes / COMBINE_BYTES) launches, each paying the ring latency once; sliced all-reduce
  bytes are priced as reduce-scatter.
  """
  from wapar_jax._src.cost.collectives import COMBINE_BYTES
  pools: dict[tuple, float] = collections.defaultdict(float)
  for c in found:
    if c.group_size <= 1:
      continue
    key = (c.computation, c.depth, c.group_size, c.num_groups, c.nodes, c.axes, c.count)
    if c.kind == "all-reduce" and c.scattered_bytes:
      pools[("reduce-scatter",) + key] += c.scattered_bytes
      rest = c.nbytes - c.scattered_bytes
      if rest > 0:
        pools[("all-reduce",) + key] += rest
    else:
      pools[(c.kind,) + key] += c.nbytes
  inner, outer = profile.intra_node, profile.inter_node
  total = 0.0
  for (kind, _, _, n, _, nodes, _, count), nbytes in pools.items():
    launches = max(1, math.ceil(nbytes / COMBINE_BYTES))
    n_inner = max(n // nodes, 1)
    one = hierarchical_collective_time(
        _COST_KIND.get(kind, kind), nbytes / launches, n_inner, nodes, inner.bandwidth,
        inner.latency, outer.bandwidth, outer.latency)
    total += count * launches * float(one)
  return total


# Instructions that move no data of their own, or are priced elsewhere (collectives).
_NOT_KERNELS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
    "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
    "domain", "copy-start", "copy-done", "send", "recv", "send-done", "recv-done",
})


def _kernel_computations(module: HloModule) -> set[str]:
  """Computations whose instructions run as kernels: the entry and what control flow calls.

  Fused computations (a fusion's body) and reducers (`to_apply`) are inside one kernel.
  """
  found, stack = set(), [module.entry]
  while stack:
    comp = stack.pop()
    if comp in found or comp not in module.computations:
      continue
    found.add(comp)
    for instr in module.computations[comp]:
      if instr.opcode == "while":
        stack += re.findall(r"\b(?:body|condition)=%?([\w.\-]+)", instr.rest)
      elif instr.opcode == "conditional":
        stack += re.findall(r"\b(?:true_computation|false_computation)=%?([\w.\-]+)",
                            instr.rest)
        for group in _CALLEE_LISTS.findall(instr.rest):
          stack += [_name(c).lstrip("%") for c in group.split(",") if c.strip()]
      elif instr.opcode == "call":
        stack += re.findall(r"\b(?:to_apply|calls)=%?([\w.\-]+)", instr.rest)
  return found


def _fused_dots(module: HloModule, comp: str, seen: frozenset = frozenset()):
  """(FLOPs, dtype of the first dot's operand) of the dots and convolutions in a fused body."""
  if comp in seen or comp not in module.computations:
    return 0.0, None
  types = _types(module, comp)
  flops, dtype = 0.0, None
  for instr in module.computations[comp]:
    if instr.opcode in ("dot", "convolution"):
      flops += _dot_flops(instr, types)
      operand = types.get((_operands(instr) or [""])[0], "")
      dtype = dtype or (_SHAPE.search(operand).group(1) if _SHAPE.search(operand) else None)
    for callee in re.findall(r"\bcalls=%?([\w.\-]+)", instr.rest):
      inner, inner_dtype = _fused_dots(module, callee, seen | {comp})
      flops += inner
      dtype = dtype or inner_dtype
  return flops, dtype


def _operand_reads(module: HloModule, comp: str, operand_bytes: Sequence[float]) -> list[float]:
  """Bytes a fused computation reads of each operand: a parameter used only through slices
  (slice, dynamic-slice) is read only in those slices."""
  body = module.computations.get(comp, ())
  param_index = {}
  for instr in body:
    if instr.opcode == "parameter":
      m = re.match(r"(\d+)\)", instr.rest)
      if m:
        param_index[instr.name] = int(m.group(1))
  sliced: dict[int, float] = {}
  whole: set[int] = set()
  for instr in body:
    for k, name in enumerate(_operands(instr)):
      i = param_index.get(name)
      if i is None:
        continue
      if instr.opcode in ("slice", "dynamic-slice") and k == 0:
        sliced[i] = sliced.get(i, 0.0) + type_bytes(instr.type)
      else:
        whole.add(i)
  return [b if i in whole or i not in sliced else min(b, sliced[i])
          for i, b in enumerate(operand_bytes)]


def _in_place_root(module: HloModule, comp: str) -> bool:
  body = module.computations.get(comp, ())
  root = body[-1] if body else None
  return root is not None and root.opcode in ("dynamic-update-slice", "scatter")


_HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64",
               "f8e4m3fn": "float8_e4m3fn", "f8e5m2": "float8_e5m2"}


def kernel_seconds(module: HloModule, mult: Mapping[str, float],
                   profile: DeviceProfile) -> float:
  """Roofline seconds of the compiled module's kernels per step, on one device of `profile`.

  Each kernel (a fusion, dot, convolution, copy, ... at the top of the entry or of a loop body)
  takes the larger of its dot / convolution FLOPs at the achievable peak and the bytes it reads
  and writes (operands + result) at the achievable bandwidth; an operand read only through
  slices counts the slices. An in-place update (dynamic-
  update-slice or scatter at a fusion's root) moves its update, not the buffer it writes into.
  Every kernel also pays the profile's `kernel_overhead`. This is the planner's roofline applied
  to what XLA actually emitted: its kernels, its fusion boundaries, its recomputation.
  """
  bandwidth = profile.memory_bandwidth * profile.memory_efficiency
  total = 0.0
  for comp in _kernel_computations(module):
    count = mult.get(comp, 0.0)
    if not count:
      continue
    types = _types(module, comp)
    seconds = 0.0
    for instr in module.computations[comp]:
      base = instr.opcode[:-len("-start")] if instr.opcode.endswith("-start") else instr.opcode
      if (instr.opcode in _NOT_KERNELS or base in _OPCODES or instr.opcode.endswith("-done")
          or instr.opcode.endswith("-update")):
        continue
      operands = list(dict.fromkeys(_operands(instr)))
      out_bytes = type_bytes(instr.type)
      in_bytes = [type_bytes(types.get(o, "")) for o in operands]
      if instr.opcode in ("dot", "convolution"):
        flops = _dot_flops(instr, types)
        operand = types.get(operands[0], "") if operands else ""
        dtype = _SHAPE.search(operand).group(1) if _SHAPE.search(operand) else None
      else:
        callees = re.findall(r"\bcalls=%?([\w.\-]+)", instr.rest)
        flops, dtype = _fused_dots(module, callees[0]) if callees else (0.0, None)
        if callees:
          in_bytes = _operand_reads(module, callees[0], in_bytes)
        elif instr.opcode in ("slice", "dynamic-slice") and in_bytes:
          in_bytes = [min(in_bytes[0], out_bytes)] + in_bytes[1:]
        in_place = instr.opcode in ("dynamic-update-slice", "scatter") or (
            callees and _in_place_root(module, callees[0]))
        if in_place and in_bytes:
          # The buffer (first operand) is updated where it lies: only the update moves.
          out_bytes = sum(in_bytes[1:])
          in_bytes = in_bytes[1:]
      peak = profile.flops_per_second(_HLO_DTYPES.get(dtype, "float32")) * \
          profile.compute_efficiency
      seconds += max(flops / peak, (out_bytes + sum(in_bytes)) / bandwidth)
      seconds += profile.kernel_overhead
    total += count * seconds
  return total


def _short(type_text: str, limit: int = 120) -> str:
  text = re.sub(r"/\*.*?\*/", "", type_text)
  text = re.sub(r"\{[^{}]*\}", "", text)
  return text if len(text) <= limit else text[:limit - 3] + "..."


# --- compiling ----------------------------------------------------------------------------

def _analysis_dict(analysis) -> dict:
  # cost_analysis() has returned a dict, a list of one dict, or None across jax versions.
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return dict(analysis or {})


def _memory(compiled) -> tuple[MemoryBreakdown, list[str]]:
  try:
    stats = compiled.memory_analysis()
  except Exception as e:  # some backends do not implement it; the rest of verify still holds
    return MemoryBreakdown(0.0, 0.0, 0.0, 0.0), [f"memory_analysis() failed: {e}"]
  if stats is None:
    return MemoryBreakdown(0.0, 0.0, 0.0, 0.0), ["memory_analysis() returned None"]
  get = lambda k: float(getattr(stats, k, 0) or 0)
  return MemoryBreakdown(get("argument_size_in_bytes"), get("output_size_in_bytes"),
                         get("alias_size_in_bytes"), get("temp_size_in_bytes")), []


def _cpu_only_buffers(module: HloModule) -> list[str]:
  """Notes on buffers XLA:CPU allocates where a GPU compile would not."""
  pooling = sum(1 for instrs in module.computations.values() for i in instrs
                if i.opcode == "scatter" and "select_and_scatter" in i.rest)
  if not pooling:
    return []
  return [f"XLA:CPU expanded {pooling} max-pool gradient(s) (select-and-scatter) into scatters "
          "over s32 index arrays, with one int32 iota per dim of each pooled input made at the "
          "top of the step; GPU XLA fuses the iotas and computes the indices just before each "
          "scatter, so the compiled peak here includes buffers a GPU compile does not allocate "
          "(the XLA:CPU memory figure counts them)."]


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """What a compiled step costs per device, read from the module and priced on a profile.

  Attributes:
    figures: FLOPs (loop trip counts applied), bytes sent, comm / compute / step time, peak.
      comm time is the collectives as the profile's XLA would run them (`target_comm_time`).
    xla_flops, loop_flops_added: see `Verification`.
    memory: the parts of the compiled peak memory.
    collectives: every collective instruction, in program order.
    notes: anything that limits the reading (unknown trip counts, missing analyses).
    comm_time_as_emitted: the collectives priced one launch per instruction, as XLA:CPU
      emitted them.
  """
  figures: Figures
  xla_flops: float
  loop_flops_added: float
  memory: MemoryBreakdown
  collectives: tuple[Collective, ...]
  notes: tuple[str, ...]
  comm_time_as_emitted: float = 0.0


def read_compiled(compiled, mesh_shape: Mapping[str, int],
                  profile: DeviceProfile) -> CompiledStep:
  """Reads a compiled step (FLOPs, memory, collectives, kernels) and prices it on `profile`.

  Works for any compiled SPMD step, planned or written by hand; `mesh_shape` names the axes
  its collectives' replica groups are mapped to.
  """
  notes = []
  analysis = {}
  try:
    analysis = _analysis_dict(compiled.cost_analysis())
  except Exception as e:  # the figure is then reported as 0 with the reason
    notes.append(f"cost_analysis() failed: {e}")
  if "flops" not in analysis:
    notes.append("cost_analysis() has no 'flops'; compiled FLOPs count only loop corrections")
  xla_flops = float(analysis.get("flops", 0.0))
  text = compiled.as_text()
  module = parse_hlo(text)
  mult, once, loop_notes = multiplicities(module)
  notes += loop_notes
  added = loop_flops_added(module, mult, once)
  found = collectives(text, mesh_shape, profile, module, mult, notes)
  memory, mem_notes = _memory(compiled)
  notes += mem_notes + _cpu_only_buffers(module)
  comm_time = target_comm_time(found, profile)
  compute_time = kernel_seconds(module, mult, profile)
  figures = Figures(xla_flops + added, sum(c.sent_bytes for c in found), comm_time,
                    memory.peak, compute_time, compute_time + comm_time)
  return CompiledStep(figures, xla_flops, added, memory, found, tuple(notes),
                      sum(c.time for c in found))


def analyse_compiled(compiled, plan, profile: DeviceProfile, compile_seconds: float,
                     started: float, child_process: bool = False,
                     platform: str = "cpu") -> Verification:
  """Reads a compiled step (FLOPs, memory, collectives) and sets it beside the plan.

  `platform`: where it was compiled. On "cpu" the plan's peak is taken as XLA:CPU would
  compile the step, since its buffer rules differ from GPU XLA's (see `memory.materialised`).
  """
  step = read_compiled(compiled, plan.mesh_shape, profile)
  p = plan.predicted
  peak, notes = p.peak_memory, list(step.notes)
  if platform == "cpu" and p.peak_memory_xla_cpu and p.peak_memory_xla_cpu != p.peak_memory:
    peak = p.peak_memory_xla_cpu
    notes.append(f"peak memory predicted as XLA:CPU compiles the step: "
                 f"{peak / 2**30:.2f} GiB; the plan's figure, under the buffer rules of "
                 f"{plan.profile}'s compiler, is {p.peak_memory / 2**30:.2f} GiB.")
  predicted = Figures(p.flops, p.comm_bytes, p.comm_time, peak, p.compute_time, p.step_time)
  return Verification(
      mesh_shape=dict(plan.mesh_shape), strategy=plan.strategy, profile=profile.name,
      predicted=predicted, compiled=step.figures, xla_flops=step.xla_flops,
      loop_flops_added=step.loop_flops_added, memory=step.memory,
      collectives=step.collectives, compile_seconds=compile_seconds,
      verify_seconds=time.perf_counter() - started, child_process=child_process,
      notes=tuple(notes), comm_time_as_emitted=step.comm_time_as_emitted)


def compile_like_target(lowered):
  """Compiles a lowered step as a GPU/TPU compiler would treat its remat (see above)."""
  return lowered.compile(compiler_options=TARGET_COMPILER_OPTIONS)


def lower_plan_step(plan, devices=None, loss_fn=None, optimizer=None, params=None, batch=None):
  """The plan's sharded train step lowered for `devices` (default: the plan's own) on abstract
  arguments; `loss_fn` ... `batch` as for `Plan.train_step`."""
  import jax
  from wapar_jax._src.step import abstract
  step = plan.train_step(devices=devices, loss_fn=loss_fn, optimizer=optimizer, params=params,
                         batch=batch)
  loss_fn, optimizer = plan._need(loss_fn, optimizer)
  params = abstract(plan.abstract_params if params is None else params)
  batch = abstract(plan.abstract_batch if batch is None else batch)
  opt_state = abstract(jax.eval_shape(optimizer.init, params))
  return step.lower(params, opt_state, batch)


def _compile_here(plan, devices, loss_fn, optimizer, params, batch):
  lowered = lower_plan_step(plan, devices, loss_fn, optimizer, params, batch)
  t0 = time.perf_counter()
  compiled = compile_like_target(lowered)
  return compiled, time.perf_counter() - t0


def _profile_of(plan, profile) -> DeviceProfile:
  if profile is None:
    return load_profile(plan.profile)
  return load_profile(profile)


def verify(plan, devices: Sequence[Any] | None = None, *, profile=None,
           workload: Mapping[str, Any] | None = None, loss_fn=None, optimizer=None,
           params=None, batch=None, timeout: float = DEFAULT_TIMEOUT_S) -> Verification:
  """Compiles the plan's train step for its mesh on CPU devices and compares with the plan.

  Args:
    plan: a `Plan`.
    devices: CPU devices to compile for (default: this process's CPU devices). With fewer than
      the plan needs, the compile runs in a child process with enough virtual devices.
    profile: the profile to price collectives with (default: the plan's own).
    workload: how a child process rebuilds the workload: `{"example": name, "batch_size": ...,
      "seq_len": ..., "dtype": ..., "optimizer": "adamw", "lr": 1e-3}` for a built-in example.
      Without it the child gets a cloudpickle of the loss, optimizer and trees.
    loss_fn, optimizer, params, batch: for a plan loaded from JSON (see `Plan.train_step`).
    timeout: seconds the child process may take.

  Returns:
    A frozen `Verification`.

  Raises:
    NotEnoughDevicesError: a child process is needed but the workload cannot be sent to it.
    VerificationFailedError: the child process failed or timed out.
  """
  started = time.perf_counter()
  device_profile = _profile_of(plan, profile)
  needed = plan.num_devices
  if devices is None:
    import jax
    cpu = jax.devices("cpu")
    if len(cpu) >= needed:
      devices = cpu[:needed]
  else:
    devices = list(devices)
    if len(devices) < needed:
      raise NotEnoughDevicesError(
          f"verify needs {needed} devices for mesh {dict(plan.mesh_shape)}. Pass devices=None to "
          f"compile in a child process with {needed} virtual CPU devices. Got {len(devices)}.")
  if devices is not None:
    compiled, seconds = _compile_here(plan, devices, loss_fn, optimizer, params, batch)
    return analyse_compiled(compiled, plan, device_profile, seconds, started,
                            platform=devices[0].platform)
  return _verify_in_child(plan, device_profile, workload, loss_fn, optimizer, params, batch,
                          timeout, started)


# --- child process ------------------------------------------------------------------------

def _child_request(plan, profile, workload, loss_fn, optimizer, params, batch) -> dict:
  request = {"plan": json.loads(plan.to_json()), "profile": profile.to_dict()}
  if workload is not None:
    if not isinstance(workload, Mapping) or "example" not in workload:
      raise InvalidArgumentError(
          "workload must be a dict naming a built-in example, e.g. {'example': 'gpt-tiny', "
          f"'optimizer': 'adamw', 'lr': 1e-3}}. Got {workload!r}.")
    request["workload"] = dict(workload)
    return request
  try:
    import cloudpickle
  except ImportError:
    raise NotEnoughDevicesError(
        f"verify needs {plan.num_devices} CPU devices in this process for a user-defined loss "
        "function (a child process would need cloudpickle to receive it, and it is not "
        "installed). Run in a process started with XLA_FLAGS=--xla_force_host_platform_"
        f"device_count={plan.num_devices}, or pip install cloudpickle. Got "
        f"{_cpu_count()} CPU devices.") from None
  loss_fn, optimizer = plan._need(loss_fn, optimizer)
  params = plan.abstract_params if params is None else params
  batch = plan.abstract_batch if batch is None else batch
  from wapar_jax._src.step import abstract
  try:
    blob = cloudpickle.dumps((loss_fn, optimizer, abstract(params), abstract(batch)))
  except Exception as e:  # whatever cloudpickle cannot serialise, the message names it
    raise NotEnoughDevicesError(
        f"verify needs {plan.num_devices} CPU devices in this process: the loss function or "
        "optimizer cannot be sent to a child process. Run in a process started with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={plan.num_devices}. Got {e}.") from e
  request["pickled"] = blob.hex()
  return request


def _cpu_count() -> int:
  import jax
  return len(jax.devices("cpu"))


def _child_env(n: int) -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={n}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _verify_in_child(plan, profile, workload, loss_fn, optimizer, params, batch, timeout,
                     started) -> Verification:
  request = _child_request(plan, profile, workload, loss_fn, optimizer, params, batch)
  with tempfile.TemporaryDirectory(prefix="wapar-verify-") as tmp:
    req_path, out_path = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
    with open(req_path, "w") as f:
      json.dump(request, f)
    cmd = [sys.executable, "-m", "wapar_jax._src.verify", req_path, out_path]
    try:
      done = subprocess.run(cmd, env=_child_env(plan.num_devices), capture_output=True,
                            text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      raise VerificationFailedError(
          f"the verify child process compiling mesh {dict(plan.mesh_shape)} did not finish in "
          f"{timeout:.0f} s; pass a larger timeout=, or verify in a process with "
          f"{plan.num_devices} CPU devices. Got a timeout after {timeout:.0f} s.") from None
    if done.returncode != 0 or not os.path.exists(out_path):
      tail = "\n".join(done.stderr.strip().splitlines()[-15:])
      raise VerificationFailedError(
          f"the verify child process for mesh {dict(plan.mesh_shape)} failed (exit "
          f"{done.returncode}). Its last lines:\n{tail}\nGot exit code {done.returncode}.")
    with open(out_path) as f:
      result = Verification.from_dict(json.load(f))
  return dataclasses.replace(result, verify_seconds=time.perf_counter() - started,
                             child_process=True)


def _optimizer(name: str, lr: float):
  import optax
  makers = {"adamw": optax.adamw, "adam": optax.adam, "sgd": optax.sgd,
            "adafactor": optax.adafactor, "lion": optax.lion}
  if name not in makers:
    raise InvalidArgumentError(f"optimizer must be one of {sorted(makers)}. Got {name!r}.")
  return makers[name](lr)


def _child_main(argv: Sequence[str]) -> int:
  started = time.perf_counter()
  req_path, out_path = argv
  with open(req_path) as f:
    request = json.load(f)
  from wapar_jax._src.plan import Plan
  plan = Plan.from_json(json.dumps(request["plan"]))
  profile = DeviceProfile.from_dict(request["profile"])
  if "workload" in request:
    from wapar_jax._src import zoo
    w = request["workload"]
    ex = zoo.get_example(w["example"], batch_size=w.get("batch_size"), seq_len=w.get("seq_len"),
                         dtype=w.get("dtype"))
    loss_fn, params, batch = ex.loss_fn, ex.params, ex.batch
    optimizer = _optimizer(w.get("optimizer", "adamw"), float(w.get("lr", 1e-3)))
  else:
    import cloudpickle
    loss_fn, optimizer, params, batch = cloudpickle.loads(bytes.fromhex(request["pickled"]))
  import jax
  devices = jax.devices("cpu")
  compiled, seconds = _compile_here(plan, devices[:plan.num_devices], loss_fn, optimizer, params,
                                    batch)
  result = analyse_compiled(compiled, plan, profile, seconds, started, child_process=True)
  write_text_atomic(out_path, json.dumps(result.to_dict()))
  return 0


if __name__ == "__main__":
  sys.exit(_child_main(sys.argv[1:]))
