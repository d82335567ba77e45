"""Reading a compiled module's HLO text: computations, instructions, types, loop counts.

Only what verification needs is read: each instruction's name, type, opcode and the rest of
its line, the computations' parameters and calling order, and how often each computation runs
per step once loop trip counts are applied.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

# Collective opcodes as XLA prints them -> the kind verification names them by (async -start
# forms are looked up by their base opcode).
COLLECTIVE_OPCODES = {
  "all-reduce": "all-reduce",
  "all-gather": "all-gather",
  "reduce-scatter": "reduce-scatter",
  "all-to-all": "all-to-all",
  "ragged-all-to-all": "all-to-all",
  "collective-permute": "collective-permute",
  "collective-broadcast": "collective-permute",
}
_DTYPE_BITS = {
  "pred": 8,
  "s2": 2,
  "u2": 2,
  "s4": 4,
  "u4": 4,
  "s8": 8,
  "u8": 8,
  "s16": 16,
  "u16": 16,
  "f16": 16,
  "bf16": 16,
  "s32": 32,
  "u32": 32,
  "f32": 32,
  "s64": 64,
  "u64": 64,
  "f64": 64,
  "c64": 64,
  "c128": 128,
  "token": 0,
  "tf32": 32,
}


def balanced_end(text: str, start: int, open_ch: str, close_ch: str) -> int:
  """Index just past the bracket that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == open_ch:
      depth += 1
    elif text[i] == close_ch:
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced {open_ch}{close_ch} in {text[start : start + 80]!r}")


def unquote(token: str) -> str:
  """A printed name without surrounding blanks and quotes."""
  return token.strip().strip("'\"")


@dataclasses.dataclass(frozen=True)
class Instr:
  """One instruction line of a computation, split into its parts."""

  name: str
  type: str
  opcode: str
  rest: str  # operands and attributes
  computation: str


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_CALLEES = re.compile(
  r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)"
  r"=%?([\w.\-]+)"
)
CALLEE_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")


# Ops that read their operand element by element: a value only sliced after them is only read
# in that slice.
ELEMENTWISE_OPCODES = frozenset(
  {
    "abs",
    "add",
    "and",
    "cbrt",
    "ceil",
    "clamp",
    "compare",
    "convert",
    "cosine",
    "divide",
    "exponential",
    "exponential-minus-one",
    "floor",
    "is-finite",
    "log",
    "log-plus-one",
    "logistic",
    "maximum",
    "minimum",
    "multiply",
    "negate",
    "not",
    "or",
    "power",
    "remainder",
    "round-nearest-even",
    "rsqrt",
    "select",
    "sign",
    "sine",
    "sqrt",
    "subtract",
    "tanh",
    "xor",
  }
)


def async_base(opcode: str) -> str:
  """The op an async half is part of ("all-gather-start", "all-gather-done" -> "all-gather")."""
  for suffix in ("-start", "-done"):
    if opcode.endswith(suffix):
      return opcode[: -len(suffix)]
  return opcode


def type_bytes(type_text: str) -> float:
  """Bytes of an HLO type such as `f32[8,64]{1,0}` or a tuple of them."""
  return type_size(type_text)[0]


def _arrays(type_text: str) -> list[tuple[float, int]]:
  """(bytes, elements) of each array of an HLO type: one for an array, one per tuple element."""
  out = []
  for dtype, dims in SHAPE.findall(re.sub(r"/\*.*?\*/", "", type_text)):
    bits = _DTYPE_BITS.get(dtype)
    if bits:
      count = math.prod(int(d) for d in dims.split(",") if d)
      out.append((count * bits / 8, count))
  return out


def buffer_bytes(type_text: str) -> list[float]:
  """Bytes of each array of an HLO type (one for an array, one per element of a tuple)."""
  return [nbytes for nbytes, _ in _arrays(type_text)]


def type_size(type_text: str) -> tuple[float, float]:
  """(bytes, elements) of an HLO type or a tuple of them."""
  arrays = _arrays(type_text)
  return float(sum(b for b, _ in arrays)), float(sum(n for _, n in arrays))


def _split_instruction(line: str, computation: str) -> Instr | None:
  m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
  if not m:
    return None
  i = m.end()
  if line.startswith("(", i):
    j = balanced_end(line, i, "(", ")")
  else:
    j = line.find(" ", i)
    if j < 0:
      return None
  op = re.match(r"\s*([\w\-]+)\(", line[j:])
  if not op:
    return None
  return Instr(m.group(1), line[i:j], op.group(1), line[j + op.end() :], computation)


@dataclasses.dataclass(frozen=True)
class HloModule:
  """The parts of a compiled module's text that verification reads."""

  num_partitions: int
  computations: Mapping[str, tuple[Instr, ...]]
  params: Mapping[str, Mapping[str, str]]  # computation -> parameter name -> type
  order: tuple[str, ...]  # as printed: callees before callers, ENTRY last
  entry: str


def parse_hlo(text: str) -> HloModule:
  """The computations of a compiled module's text (`compiled.as_text()`), as `HloModule`."""
  computations: dict[str, list[Instr]] = {}
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
  return HloModule(
    num_partitions, {k: tuple(v) for k, v in computations.items()}, params, tuple(order), entry
  )


def _trip_count(instr: Instr, module: HloModule) -> int | None:
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', instr.rest)
  if m:
    return int(m.group(1))
  # Without the backend config: `i < N` in the condition, counting from 0 by 1 (jax's scans).
  cond = re.search(r"\bcondition=%?([\w.\-]+)", instr.rest)
  if cond and cond.group(1) in module.computations:
    body = module.computations[cond.group(1)]
    consts = [
      int(c) for i in body if i.opcode == "constant" for c in re.findall(r"^(-?\d+)\)", i.rest)
    ]
    if any("direction=LT" in i.rest for i in body if i.opcode == "compare") and len(consts) == 1:
      return consts[0]
  return None


def multiplicities(module: HloModule) -> tuple[dict[str, float], dict[str, float], list[str]]:
  """Executions per step of each computation: with loop trip counts, and as XLA counts (x1).

  Returns (with trip counts, loop bodies once, notes about loops of unknown trip count).
  """
  mult = dict.fromkeys(module.order, 0.0)
  once = dict.fromkeys(module.order, 0.0)
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
      for group in CALLEE_LISTS.findall(instr.rest):
        callees += [unquote(c).lstrip("%") for c in group.split(",") if c.strip()]
      for callee in callees:
        if callee not in mult:
          continue
        is_cond = instr.opcode == "while" and re.search(
          rf"condition=%?{re.escape(callee)}\b", instr.rest
        )
        f = factor + 1 if is_cond else factor
        mult[callee] += mult[comp] * f
        once[callee] += once[comp]
  return mult, once, notes


def value_types(module: HloModule, comp: str) -> dict[str, str]:
  """Type of every value of a computation (parameters and instructions), by name."""
  types = dict(module.params.get(comp, {}))
  types.update({i.name: i.type for i in module.computations[comp]})
  return types


def operand_names(instr: Instr) -> list[str]:
  """Names of the values an instruction reads, in operand order."""
  text = "(" + instr.rest
  return re.findall(r"%([\w.\-]+)", text[1 : balanced_end(text, 0, "(", ")") - 1])


def element_count(type_text: str) -> float:
  """Elements of an HLO type or a tuple of them."""
  return type_size(type_text)[1]
