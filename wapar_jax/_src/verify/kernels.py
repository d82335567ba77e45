"""The compiled module's kernels: dot / convolution FLOPs and a roofline of their time.

`loop_flops_added` gives the FLOPs XLA's cost analysis leaves out of loop bodies' later
iterations; `kernel_seconds` prices every kernel XLA emitted (fusions, dots, copies, ...) with
the planner's roofline on a device profile.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from wapar_jax._src import compilers
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.verify.hlo import (
  CALLEE_LISTS,
  COLLECTIVE_OPCODES,
  ELEMENTWISE_OPCODES,
  SHAPE,
  HloModule,
  Instr,
  async_base,
  element_count,
  operand_names,
  type_bytes,
  unquote,
  value_types,
)


def _dot_flops(instr: Instr, types: Mapping[str, str]) -> float:
  """2 x output elements x contracted elements, for dot and convolution instructions."""
  operands = re.findall(r"%([\w.\-]+)", instr.rest.split(")", 1)[0])
  out = SHAPE.search(instr.type)
  if not out or not operands:
    return 0.0
  out_elems = math.prod(int(d) for d in out.group(2).split(",") if d)
  if instr.opcode == "dot":
    lhs = SHAPE.search(types.get(operands[0], ""))
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.rest)
    if not lhs:
      return 0.0
    shape = [int(d) for d in lhs.group(2).split(",") if d]
    contracted = math.prod(shape[int(k)] for k in dims.group(1).split(",") if k) if dims else 1
    return 2.0 * out_elems * contracted
  if instr.opcode == "convolution" and len(operands) > 1:
    rhs = SHAPE.search(types.get(operands[1], ""))
    labels = re.search(r"dim_labels=\w+_(\w+)->", instr.rest)
    if not rhs or not labels:
      return 0.0
    shape = [int(d) for d in rhs.group(2).split(",") if d]
    kernel = math.prod(s for s, label in zip(shape, labels.group(1)) if label != "o")
    return 2.0 * out_elems * kernel
  return 0.0


def loop_flops_added(
  module: HloModule, mult: Mapping[str, float], once: Mapping[str, float]
) -> float:
  """Dot / convolution FLOPs of the loop iterations XLA's cost analysis leaves out."""
  added = 0.0
  for comp, instrs in module.computations.items():
    extra = mult.get(comp, 0.0) - once.get(comp, 0.0)
    if extra <= 0:
      continue
    types = value_types(module, comp)
    for instr in instrs:
      if instr.opcode in ("dot", "convolution"):
        added += extra * _dot_flops(instr, types)
  return added


# Instructions that move no data of their own, or are priced elsewhere (collectives).
_NOT_KERNELS = frozenset(
  {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "domain",
    "copy-start",
    "copy-done",
    "send",
    "recv",
    "send-done",
    "recv-done",
  }
)


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
        stack += re.findall(r"\b(?:true_computation|false_computation)=%?([\w.\-]+)", instr.rest)
        for group in CALLEE_LISTS.findall(instr.rest):
          stack += [unquote(c).lstrip("%") for c in group.split(",") if c.strip()]
      elif instr.opcode == "call":
        stack += re.findall(r"\b(?:to_apply|calls)=%?([\w.\-]+)", instr.rest)
  return found


def _fused_dots(module: HloModule, comp: str, seen: frozenset = frozenset()):
  """(FLOPs, dtype of the first dot's operand) of the dots and convolutions in a fused body."""
  if comp in seen or comp not in module.computations:
    return 0.0, None
  types = value_types(module, comp)
  flops, dtype = 0.0, None
  for instr in module.computations[comp]:
    if instr.opcode in ("dot", "convolution"):
      flops += _dot_flops(instr, types)
      operand = types.get((operand_names(instr) or [""])[0], "")
      dtype = dtype or (SHAPE.search(operand).group(1) if SHAPE.search(operand) else None)
    for callee in re.findall(r"\bcalls=%?([\w.\-]+)", instr.rest):
      inner, inner_dtype = _fused_dots(module, callee, seen | {comp})
      flops += inner
      dtype = dtype or inner_dtype
  return flops, dtype


# Ops whose result has its operand's elements, one for one: a part of the result needs only
# the same part of the operand.
_SAME_ELEMENTS = ELEMENTWISE_OPCODES | {"bitcast", "copy", "reshape", "transpose"}


def _operand_reads(module: HloModule, comp: str, operand_bytes: Sequence[float]) -> list[float]:
  """Bytes a fused computation reads of each operand. A fused kernel computes only the elements
  its result needs, so an operand that reaches the result only through slices (slice,
  dynamic-slice), possibly after elementwise ops (a sum of two gradients, then the device's
  shard of it), is read only in those slices."""
  body = module.computations.get(comp, ())
  if not body:
    return list(operand_bytes)
  types = value_types(module, comp)
  # The fraction of each value's elements the root needs, from the root back.
  need = {body[-1].name: 1.0}
  for instr in reversed(body):
    have = need.get(instr.name, 0.0)
    operands = operand_names(instr)
    for k, name in enumerate(operands):
      if instr.opcode in ("slice", "dynamic-slice") and k == 0:
        whole = element_count(types.get(name, ""))
        part = have * element_count(instr.type) / whole if whole else 1.0
      elif instr.opcode in _SAME_ELEMENTS:
        part = have
      else:
        part = 1.0 if have > 0 else 0.0
      need[name] = max(need.get(name, 0.0), part)
  param_index = {}
  for instr in body:
    if instr.opcode == "parameter":
      m = re.match(r"(\d+)\)", instr.rest)
      if m:
        param_index[int(m.group(1))] = instr.name
  return [b * min(need.get(param_index.get(i, ""), 1.0), 1.0) for i, b in enumerate(operand_bytes)]


def _in_place_root(module: HloModule, comp: str) -> bool:
  body = module.computations.get(comp, ())
  root = body[-1] if body else None
  return root is not None and root.opcode in ("dynamic-update-slice", "scatter")


_HLO_DTYPES = {
  "f32": "float32",
  "bf16": "bfloat16",
  "f16": "float16",
  "f64": "float64",
  "f8e4m3fn": "float8_e4m3fn",
  "f8e5m2": "float8_e5m2",
}


def kernel_seconds(module: HloModule, mult: Mapping[str, float], profile: DeviceProfile) -> float:
  """Roofline seconds of the compiled module's kernels per step, on one device of `profile`.

  Each kernel (a fusion, dot, convolution, copy, ... at the top of the entry or of a loop body)
  takes the larger of its dot / convolution FLOPs at the achievable peak and the bytes it reads
  and writes (operands + result) at the achievable bandwidth; an operand read only through
  slices counts the slices. An in-place update (dynamic-
  update-slice or scatter at a fusion's root) moves its update, not the buffer it writes into.
  Every kernel also pays the profile's `kernel_overhead`. This is the planner's roofline applied
  to what XLA actually emitted: its kernels, its fusion boundaries, its recomputation.
  """
  total = 0.0
  for comp in kernel_computations(module):
    count = mult.get(comp, 0.0)
    if count:
      total += count * sum(instruction_seconds(module, comp, profile))
  return total


def kernel_computations(module: HloModule) -> set[str]:
  """Computations whose instructions run as kernels (see `_kernel_computations`)."""
  return _kernel_computations(module)


def _is_expanded_select_and_scatter(instr: Instr) -> bool:
  return instr.opcode in ("scatter", "fusion") and "select_and_scatter" in instr.rest


def native_select_and_scatter(module: HloModule, comp: str) -> dict[str, float]:
  """Bytes of each max-pool gradient XLA:CPU expanded in `comp`, as one native kernel moves
  them, by instruction: the scatter gets its pooled input + source + result, and the rest of
  its expansion (index iotas, the zero buffer, the arg-max reduce-window, the index packing)
  gets 0.

  XLA:CPU's `SelectAndScatterExpander` turns select-and-scatter into those kernels; XLA GPU
  emits one kernel (`IrEmitterUnnested::EmitSelectAndScatter`). The expansion is what feeds the
  scatter's buffer and indices and computes indices (s32) or from no data at all; its one
  data input, the pooled activation, is what it reads beyond them."""
  by_name = {i.name: i for i in module.computations[comp]}
  types = value_types(module, comp)
  out: dict[str, float] = {}
  for scatter in module.computations[comp]:
    if not _is_expanded_select_and_scatter(scatter):
      continue
    operands = operand_names(scatter)
    if len(operands) < 3:
      continue
    members, inputs, todo = set(), set(), list(operands[:2])
    while todo:
      name = todo.pop()
      instr = by_name.get(name)
      if instr is None or instr.opcode == "constant" or name in members or name in inputs:
        continue
      reads = [
        o for o in operand_names(instr) if getattr(by_name.get(o), "opcode", "") != "constant"
      ]
      if instr.opcode != "parameter" and ("s32" in instr.type or not reads):
        members.add(name)
        todo += reads
      else:
        inputs.add(name)
    if not inputs:  # no pooled activation found: not the expansion this reads
      continue
    out.update(dict.fromkeys(members, 0.0))
    data = inputs | {operands[2]}
    out[scatter.name] = type_bytes(scatter.type) + sum(type_bytes(types.get(n, "")) for n in data)
  return out


def _only_copies(module: HloModule, instr: Instr) -> bool:
  """A copy instruction, or a fusion whose body only copies its one parameter (a relayout)."""
  if instr.opcode == "copy":
    return True
  callees = re.findall(r"\bcalls=%?([\w.\-]+)", instr.rest) if instr.opcode == "fusion" else []
  body = module.computations.get(callees[0], ()) if callees else ()
  return len(body) == 2 and body[0].opcode == "parameter" and body[1].opcode == "copy"


def strided_gather_copies(module: HloModule, comp: str) -> set[str]:
  """The relayout copies XLA:CPU puts around an all-gather along a minor dim: the shard copied
  into a layout where the gathered dim is major, and the gathered result copied back
  (`CompilerRules.copies_strided_gathers`)."""
  by_name = {i.name: i for i in module.computations[comp]}
  found = set()
  for instr in module.computations[comp]:
    if async_base(instr.opcode) != "all-gather":
      continue
    for name in operand_names(instr):
      if name in by_name and _only_copies(module, by_name[name]):
        found.add(name)
  gathers = {i.name for i in module.computations[comp] if async_base(i.opcode) == "all-gather"}
  for instr in module.computations[comp]:
    operands = operand_names(instr)
    if len(operands) == 1 and operands[0] in gathers and _only_copies(module, instr):
      found.add(instr.name)
  return found


def instruction_seconds(module: HloModule, comp: str, profile: DeviceProfile) -> list[float]:
  """Per instruction of `comp`, in order, its kernel's roofline seconds for one run (0 for an
  instruction that launches no kernel: collectives, tuples, parameters, ...). Where the
  profile's compiler emits a max-pool gradient natively, XLA:CPU's expansion of it is priced as
  that one kernel (`native_select_and_scatter`); where it gathers along a minor dim in place,
  XLA:CPU's copies around the gather cost nothing (`strided_gather_copies`)."""
  bandwidth = profile.memory_bandwidth * profile.memory_efficiency
  types = value_types(module, comp)
  rules = compilers.for_profile(profile.kind)
  native = (
    native_select_and_scatter(module, comp)
    if "select_and_scatter_add" in rules.native_kernels
    else {}
  )
  if not rules.copies_strided_gathers:
    native.update(dict.fromkeys(strided_gather_copies(module, comp), 0.0))
  out = []
  for instr in module.computations[comp]:
    if instr.name in native:
      nbytes = native[instr.name]
      out.append(nbytes / bandwidth + profile.kernel_overhead if nbytes else 0.0)
      continue
    if (
      instr.opcode in _NOT_KERNELS
      or async_base(instr.opcode) in COLLECTIVE_OPCODES
      or instr.opcode.endswith("-done")
      or instr.opcode.endswith("-update")
    ):
      out.append(0.0)
      continue
    operands = list(dict.fromkeys(operand_names(instr)))
    out_bytes = type_bytes(instr.type)
    in_bytes = [type_bytes(types.get(o, "")) for o in operands]
    if instr.opcode in ("dot", "convolution"):
      flops = _dot_flops(instr, types)
      operand = types.get(operands[0], "") if operands else ""
      dtype = SHAPE.search(operand).group(1) if SHAPE.search(operand) else None
    else:
      callees = re.findall(r"\bcalls=%?([\w.\-]+)", instr.rest)
      flops, dtype = _fused_dots(module, callees[0]) if callees else (0.0, None)
      if callees:
        in_bytes = _operand_reads(module, callees[0], in_bytes)
      elif instr.opcode in ("slice", "dynamic-slice") and in_bytes:
        in_bytes = [min(in_bytes[0], out_bytes)] + in_bytes[1:]
      in_place = instr.opcode in ("dynamic-update-slice", "scatter") or (
        callees and _in_place_root(module, callees[0])
      )
      if in_place and in_bytes:
        # The buffer (first operand) is updated where it lies: only the update moves.
        out_bytes = sum(in_bytes[1:])
        in_bytes = in_bytes[1:]
    peak = profile.flops_per_second(_HLO_DTYPES.get(dtype, "float32")) * profile.compute_efficiency
    if instr.opcode == "convolution":
      peak *= profile.conv_efficiency
    seconds = max(flops / peak, (out_bytes + sum(in_bytes)) / bandwidth)
    out.append(seconds + profile.kernel_overhead)
  return out
