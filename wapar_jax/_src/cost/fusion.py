"""The memory traffic of a step as the kernels XLA fuses it into, attributed to its equations.

Summing XLA's bytes per equation counts every intermediate of an elementwise chain as written
and read again; XLA fuses the chain into one kernel that reads its inputs once and writes only
what is kept. So equations are grouped into kernels:
- an elementwise (or layout) equation joins its reader's kernel when its result is not kept in a
  buffer (`memory.buffers.materialised`) and is read by that one equation alone;
- a kept result joins its elementwise reader nearby too where the compiler does multi-output
  fusion (XLA GPU: AdamW's new moment is written out and used in the same kernel for the
  update);
- a result read by several kernels and not kept is remade in each from the buffers it comes
  from, unless that reads more bytes than the result itself: then it is written out once.
A kernel then moves each buffer it reads once and each buffer it writes. Dots, convolutions,
gathers and the like keep XLA's own figure (it knows slices and in-place updates), and launch
a kernel each; a primitive the compiler emits natively where XLA:CPU expands it
(`CompilerRules.native_kernels`) moves its operands and result once.

A replicated AdamW update thus moves 7 buffers of the parameters' size (gradient, two moments and
parameters in; two moments and parameters out) on XLA GPU, not the ~20 its equations each read
and write.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from networkx.utils import UnionFind

from wapar_jax._src.compilers import CompilerRules
from wapar_jax._src.cost.xla import StepCosts


@dataclasses.dataclass(frozen=True)
class FusedTraffic:
  """Per equation and per step: the bytes it moves as a part of its kernel, and the kernels it
  launches (its kernel's last equation launches it)."""

  nbytes: np.ndarray
  kernels: np.ndarray

  @classmethod
  def unfused(cls, costs: StepCosts) -> FusedTraffic:
    """Every equation a kernel of its own, moving what XLA's cost analysis says."""
    costed = (costs.flops > 0) | (costs.bytes_accessed > 0)
    return cls(costs.bytes_accessed, np.where(costed, costs.multiplicity, 0.0))


def _remade_from(v: int, def_pos: list[int], inputs, in_buffer: list[bool]) -> dict[int, int]:
  """{buffer: the equation reading it directly} that a value not kept is remade from: a walk
  back through the values not kept that make it, stopping at buffers."""
  found: dict[int, int] = {}
  stack, visited = [v], {v}
  while stack:
    p = def_pos[stack.pop()]
    for u in inputs[p]:
      if in_buffer[u]:
        found.setdefault(u, p)
      elif u not in visited:
        visited.add(u)
        stack.append(u)
  return found


def fused_traffic(traced, costs: StepCosts, rules: CompilerRules, kept: np.ndarray) -> FusedTraffic:
  """The step's traffic under `rules`' fusion, with `kept[v]` the variables held in buffers."""
  ops = traced.ops
  n = len(ops)
  # Python lists, not arrays, in the loops below: a step of many small parameters has
  # hundreds of thousands of equations, and numpy's scalar indexing is slow.
  var_bytes = traced.var_bytes().tolist()
  def_pos = traced.def_pos.tolist()
  mult = costs.multiplicity.tolist()
  in_buffer_array = kept | (traced.def_pos < 0)
  in_buffer_array[list(traced.output_vars)] = True
  in_buffer = in_buffer_array.tolist()
  fusing = [
    op.primitive in rules.fusible or op.primitive.startswith(rules.fusing_kernels) for op in ops
  ]
  elementwise = [op.primitive in rules.fusible for op in ops]
  inputs = [tuple({v for v in op.in_vars if v >= 0}) for op in ops]
  readers = [0] * traced.num_vars
  for ins in inputs:
    for v in ins:
      readers[v] += 1
  runs = [(op.multiplicity, op.branch) for op in ops]

  # A value that is not kept but is read by several kernels is remade in each from the buffers
  # it comes from, unless that reads more than the value itself: then XLA writes it out once
  # (multi-output fusion), else a residual stream would be remade from every earlier layer.
  # The bytes a value is remade from are summed along its chain (a buffer read twice counts
  # twice), which keeps this pass linear in the step.
  remade_bytes = [0.0] * traced.num_vars
  for op in ops:
    if not fusing[op.index]:
      continue
    total = sum(var_bytes[u] if in_buffer[u] else remade_bytes[u] for u in inputs[op.index])
    for v in op.out_vars:
      if in_buffer[v]:
        continue
      if readers[v] > 1 and total > var_bytes[v]:
        in_buffer[v] = True
      else:
        remade_bytes[v] = total

  kernels = UnionFind()
  for op in ops:
    if not fusing[op.index]:
      continue
    for v in inputs[op.index]:
      p = def_pos[v]
      if p < 0 or not elementwise[p] or runs[p] != runs[op.index]:
        continue
      fused_away = not in_buffer[v] and readers[v] == 1
      multi_output = (
        rules.multi_output_fusion and in_buffer[v] and op.index - p <= rules.local_reads
      )
      if fused_away or multi_output:
        kernels.union(p, op.index)
  kernel = [kernels[i] for i in range(n)]

  writes = [False] * n  # per kernel (its root's index): it writes a buffer
  last_member = [-1] * n
  for op in ops:
    if fusing[op.index]:
      k = kernel[op.index]
      writes[k] = writes[k] or any(in_buffer[v] for v in op.out_vars)
      last_member[k] = op.index

  # Each equation of a kernel that writes charges the buffers it reads directly, and those it
  # remakes a value of another kernel from; a buffer read twice in one kernel moves once.
  remade: dict[int, dict[int, int]] = {}
  read_by: dict[int, set[int]] = {}
  nbytes = [0.0] * n
  for op in ops:
    i = op.index
    if not fusing[i] or not writes[kernel[i]]:
      continue  # a kernel that writes nothing is remade inside each of its readers
    k = kernel[i]
    seen = read_by.setdefault(k, set())
    for v in inputs[i]:
      made_here = def_pos[v] >= 0 and kernel[def_pos[v]] == k
      if in_buffer[v]:
        reads = {} if made_here else {v: i}
      elif made_here:
        continue  # its maker, a member of this kernel, charged what it reads
      else:
        if v not in remade:
          remade[v] = _remade_from(v, def_pos, inputs, in_buffer)
        reads = remade[v]
      for u, reader in reads.items():
        if u not in seen:
          seen.add(u)
          nbytes[reader] += var_bytes[u] * mult[reader]
    nbytes[i] += mult[i] * sum(var_bytes[v] for v in op.out_vars if in_buffer[v])
  launches = np.zeros(n)
  launches[[last_member[k] for k in range(n) if writes[k]]] = 1.0
  unfused = FusedTraffic.unfused(costs)
  unfused_bytes = unfused.nbytes.copy()
  for op in ops:
    if op.primitive in rules.native_kernels:
      own = sum(var_bytes[v] for v in inputs[op.index]) + sum(var_bytes[v] for v in op.out_vars)
      unfused_bytes[op.index] = own * mult[op.index]
  fusing_array = np.array(fusing, dtype=bool)
  return FusedTraffic(
    np.where(fusing_array, np.array(nbytes), unfused_bytes),
    np.where(fusing_array, launches * costs.multiplicity, unfused.kernels),
  )
