"""The compiled module's collectives against its own dataflow: how much of each can hide.

The compiled truth of the overlap model (`cost.overlap`), read from the module XLA built, not
from the planner: in each computation that runs kernels (the entry, loop bodies), a
collective's window is the kernels printed between the last of its operands' producers and
the first instruction that reads its result (through a get-tuple-element, for one of a tuple
collective's results; through the -done of an async pair). The printed order is a topological
order of the computation's dataflow, so every kernel in the window is independent of the
collective. XLA:CPU combines a step's gradient all-reduces into one tuple instruction; each
operand is placed on its own (producer, first reader), as GPU XLA's combiner keeps
independent ones apart up to its size threshold. A loop body's windows are per iteration and
its collectives' exposure counts once per trip.

Each (computation, kind, mesh axes) is one stream, as the planner's classes are, and so are
the reductions first read by a kernel that also reads a step argument holding at least a
device's share of the reduced elements (the optimizer update of a parameter: a weight
gradient) apart from the rest (the loss, batch-norm statistics); an
all-gather is started no earlier than the previous all-gather's reader, one use ahead, as
the planner prices FSDP (XLA bounds its prefetch by memory, and the CPU module's order says
nothing of that bound).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence

import numpy as np

from wapar_jax._src.cost.overlap import exposed, windows
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.verify.collectives import target_comm_time
from wapar_jax._src.verify.hlo import (
  COLLECTIVE_OPCODES,
  HloModule,
  async_base,
  element_count,
  operand_names,
  type_bytes,
)
from wapar_jax._src.verify.kernels import instruction_seconds, kernel_computations
from wapar_jax._src.verify.results import Collective

# Instructions that only name a value (or part of one): a reader of theirs reads the collective.
_PASS_THROUGH = frozenset({"get-tuple-element", "bitcast", "tuple", "copy-start", "copy-done"})


def _tuple_index(instr) -> int | None:
  m = re.search(r"\bindex=(\d+)", instr.rest)
  return int(m.group(1)) if m else None


def collective_windows(module: HloModule, comp: str) -> dict[str, tuple]:
  """Per collective instruction of `comp`: (producer positions, first-reader positions, bytes,
  whether the reader updates a step argument from it: `_updates_argument`) per operand,
  positions in the computation's printed order (-1: a parameter)."""
  instrs = module.computations[comp]
  pos = {i.name: k for k, i in enumerate(instrs)}
  types = {i.name: i.type for i in instrs}
  types.update(module.params.get(comp, {}))
  arguments = {i.name for i in instrs if i.opcode == "parameter"}
  readers: dict[str, list[int]] = collections.defaultdict(list)
  for k, instr in enumerate(instrs):
    for name in dict.fromkeys(operand_names(instr)):
      readers[name].append(k)

  def first_read(name: str, index: int | None = None, depth: int = 0) -> int:
    # The first instruction that does work with `name` (its `index`-th part, for a tuple).
    best = len(instrs)
    for k in readers.get(name, ()):
      r = instrs[k]
      if r.opcode.endswith("-done") or (r.opcode in _PASS_THROUGH and depth < 4):
        if r.opcode == "get-tuple-element" and index is not None and _tuple_index(r) != index:
          continue
        best = min(best, first_read(r.name, None, depth + 1))
      else:
        best = min(best, k)
    return best

  found = {}
  for instr in instrs:
    if instr.opcode.endswith("-done") or COLLECTIVE_OPCODES.get(async_base(instr.opcode)) is None:
      continue
    operands = operand_names(instr)
    made = [pos.get(o, -1) for o in operands]
    tuple_result = len(operands) > 1
    reads = [first_read(instr.name, i if tuple_result else None) for i in range(len(operands))]
    sizes = [type_bytes(types.get(o, "")) for o in operands]
    whole = [element_count(types.get(o, "")) for o in operands]
    if not tuple_result:
      made, reads = [max(made, default=-1)], reads[:1]
      sizes, whole = [sum(sizes)], [sum(whole)]
    updates = [
      r < len(instrs) and _updates_argument(instrs[r], arguments, types, n, module.num_partitions)
      for r, n in zip(reads, whole)
    ]
    found[instr.name] = (
      np.array(made),
      np.array(reads),
      np.array(sizes, dtype=float),
      np.array(updates, dtype=bool),
    )
  return found


def _updates_argument(reader, arguments, types, elements: float, partitions: int) -> bool:
  """Whether `reader` updates a step argument from a collective's result of `elements`: it
  reads an argument holding at least one device's share of them (a parameter or its shard, not
  a norm's scale beside an activation's gradient)."""
  return any(
    a in arguments and element_count(types.get(a, "")) * partitions >= elements
    for a in operand_names(reader)
  )


def exposed_comm_time(
  module: HloModule,
  mult: Mapping[str, float],
  found: Sequence[Collective],
  profile: DeviceProfile,
) -> float:
  """Seconds per step of the collectives `found` (`collectives.collectives`) on the critical
  path, each class (computation, kind, mesh axes) one stream priced as `target_comm_time`
  prices it, hidden behind its windows at the profile's `overlap_efficiency`."""
  by_class: dict[tuple, list[Collective]] = collections.defaultdict(list)
  for c in found:
    by_class[(c.computation, c.kind, c.axes)].append(c)
  runs_kernels = kernel_computations(module)
  placed: dict[str, dict[str, tuple]] = {}
  prefixes: dict[str, np.ndarray] = {}
  total = 0.0
  for (comp, _, _), members in by_class.items():
    seconds = target_comm_time(members, profile)
    count = mult.get(comp, 0.0)
    if seconds <= 0 or not count:
      continue
    if comp not in runs_kernels or profile.overlap_efficiency <= 0:
      total += seconds
      continue
    if comp not in placed:
      placed[comp] = collective_windows(module, comp)
      per_run = np.array(instruction_seconds(module, comp, profile))
      prefixes[comp] = np.concatenate([[0.0], np.cumsum(per_run)])[:, None]
    parts = [placed[comp][c.name] for c in members if c.name in placed[comp]]
    if not parts:
      total += seconds
      continue
    made, reads, sizes, updates = (np.concatenate(x) for x in zip(*parts))
    if members[0].kind == "all-gather":
      made = np.maximum(made, _one_use_ahead(reads))
    for stream in (updates, ~updates):
      if not stream.any():
        continue
      w = windows(made[stream], reads[stream], sizes[stream], prefixes[comp])
      share = seconds * sizes[stream].sum() / sizes.sum()
      # Per run of the computation: its windows are one iteration's kernels.
      total += count * exposed(w, share / count, np.ones(1), profile.overlap_efficiency)
  return total


def _one_use_ahead(reads: np.ndarray) -> np.ndarray:
  """Per all-gather, the previous all-gather's reader (-1 for the first): where it may start."""
  uses = np.unique(reads)
  ahead = np.searchsorted(uses, reads, side="left") - 1
  return np.where(ahead >= 0, uses[np.maximum(ahead, 0)], -1)
