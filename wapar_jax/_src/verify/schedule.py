"""How a scheduled module overlaps its collectives with compute: async start / done pairs.

GPU XLA's latency-hiding scheduler splits a collective into `<kind>-start` and `<kind>-done`
(or wraps it in `async-start` / `async-done`) and moves independent kernels between the two,
where they run while the collective is in flight. A module's text lists each computation's
instructions in schedule order, so the kernels printed between a start and its done are the
ones overlapped with it. XLA:CPU schedules nothing this way.
"""

from __future__ import annotations

import dataclasses
import re

from wapar_jax._src.verify.hlo import COLLECTIVE_OPCODES, HloModule, operand_names

# Instructions that launch no kernel: naming or moving buffers, and (by their opcodes' ends)
# the halves of other async ops.
_NOT_COMPUTE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "send",
  "recv",
  "after-all",
  "add-dependency",
  "opt-barrier",
  "partition-id",
  "replica-id",
}
_ASYNC_HALVES = ("-start", "-update", "-done")
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class AsyncCollective:
  """One collective the scheduler split into a start and a done.

  Attributes:
    kind: as `Collective.kind` ("all-gather", "all-reduce", ...).
    start: the start instruction's name; computation: where both halves are.
    overlapped: kernels (fusions, dots, custom calls, ...) scheduled between start and done.
  """

  kind: str
  start: str
  computation: str
  overlapped: int


def _kind(instr, module: HloModule) -> str:
  """The collective kind an async start begins, "" for an async op that is no collective."""
  if instr.opcode.endswith("-start") and instr.opcode[: -len("-start")] in COLLECTIVE_OPCODES:
    return COLLECTIVE_OPCODES[instr.opcode[: -len("-start")]]
  if instr.opcode == "async-start":
    m = _CALLS.search(instr.rest)
    for inner in module.computations.get(m.group(1), ()) if m else ():
      if inner.opcode in COLLECTIVE_OPCODES:
        return COLLECTIVE_OPCODES[inner.opcode]
  return ""


def _is_kernel(opcode: str) -> bool:
  return opcode not in _NOT_COMPUTE and not opcode.endswith(_ASYNC_HALVES)


def async_collectives(module: HloModule) -> tuple[AsyncCollective, ...]:
  """Every async collective of the module, with the kernels scheduled inside its window."""
  found = []
  for comp, instrs in module.computations.items():
    open_at: dict[str, tuple[str, int]] = {}  # start name -> (kind, position)
    for pos, instr in enumerate(instrs):
      kind = _kind(instr, module)
      if kind:
        open_at[instr.name] = (kind, pos)
        continue
      if not instr.opcode.endswith("-done"):
        continue
      started = [n for n in operand_names(instr) if n in open_at]
      if not started:
        continue
      kind, begin = open_at.pop(started[0])
      between = instrs[begin + 1 : pos]
      kernels = sum(1 for i in between if _is_kernel(i.opcode))
      found.append(AsyncCollective(kind, started[0], comp, kernels))
  return tuple(found)
