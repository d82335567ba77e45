"""The memory traffic of a step as the kernels XLA fuses it into, attributed to its equations.

Summing XLA's bytes per equation counts every intermediate of an elementwise chain as written
and read again; XLA fuses the chain into one kernel that reads its inputs once and writes only
what is kept. So equations are grouped into kernels:
- an elementwise (or layout) equation joins its reader's kernel when its result is not kept in a
  buffer (`memory.buffers.materialised`) and is read by that one equation alone;
- a kept result joins its elementwise reader nearby too where the compiler does multi-output
  fusion (XLA GPU: AdamW's new moment is written out and used in the same kernel for the
  update);
- a result read by several kernels and not kept is recomputed in each: they read its inputs.
A kernel then moves each buffer it reads once and each buffer it writes. Dots, convolutions,
gathers and the like keep XLA's own figure (it knows slices and in-place updates), and launch
a kernel each.

The replicated AdamW update of GPT-2 small, 7 buffers of 497 MB per step (gradient, two moments
and parameters in, two moments and parameters out), is counted as those 7 and not as the
~20 its equations each read and write.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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


class _Kernels:
  """Union-find over equations: each set is one kernel."""

  def __init__(self, n: int):
    self.parent = list(range(n))

  def find(self, i: int) -> int:
    root = i
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[i] != root:
      self.parent[i], i = root, self.parent[i]
    return root

  def join(self, a: int, b: int) -> None:
    self.parent[self.find(a)] = self.find(b)


def _reads(i: int, inputs, in_buffer: np.ndarray, sources) -> dict[int, int]:
  """{buffer: the equation reading it directly} of what equation `i` reads, through the values
  it remakes."""
  reads: dict[int, int] = {}
  for v in inputs[i]:
    if in_buffer[v]:
      reads[v] = i
    else:
      reads.update(sources.get(v, {}))
  return reads


def fused_traffic(traced, costs: StepCosts, rules: CompilerRules, kept: np.ndarray) -> FusedTraffic:
  """The step's traffic under `rules`' fusion, with `kept[v]` the variables held in buffers."""
  ops = traced.ops
  n = len(ops)
  var_bytes = traced.var_bytes()
  in_buffer = kept | (traced.def_pos < 0)
  in_buffer[list(traced.output_vars)] = True
  fusing = np.array(
    [op.primitive in rules.fusible or op.primitive.startswith(rules.fusing_kernels) for op in ops]
  )
  elementwise = np.array([op.primitive in rules.fusible for op in ops])
  inputs = [tuple({v for v in op.in_vars if v >= 0}) for op in ops]
  readers = np.zeros(traced.num_vars, dtype=np.int64)
  for ins in inputs:
    readers[list(ins)] += 1
  runs = [(op.multiplicity, op.branch) for op in ops]

  # A value that is not kept but is read by several kernels is remade in each from the buffers
  # it comes from, unless that reads more than the value itself: then XLA writes it out once
  # (multi-output fusion), else a residual stream would be remade from every earlier layer.
  sources: dict[int, dict[int, int]] = {}  # value -> {buffer it is remade from: direct reader}
  for op in ops:
    if not fusing[op.index]:
      continue
    reads = _reads(op.index, inputs, in_buffer, sources)
    for v in op.out_vars:
      if in_buffer[v]:
        continue
      if readers[v] > 1 and sum(var_bytes[u] for u in reads) > var_bytes[v]:
        in_buffer[v] = True
      else:
        sources[v] = reads

  kernels = _Kernels(n)
  for op in ops:
    if not fusing[op.index]:
      continue
    for v in inputs[op.index]:
      p = int(traced.def_pos[v])
      if p < 0 or not elementwise[p] or runs[p] != runs[op.index]:
        continue
      fused_away = not in_buffer[v] and readers[v] == 1
      multi_output = (
        rules.multi_output_fusion and in_buffer[v] and op.index - p <= rules.local_reads
      )
      if fused_away or multi_output:
        kernels.join(p, op.index)

  writes = np.zeros(n, dtype=bool)  # per kernel (its root's index): it writes a buffer
  last_member = np.full(n, -1, dtype=np.int64)
  for op in ops:
    if fusing[op.index]:
      k = kernels.find(op.index)
      writes[k] |= any(in_buffer[v] for v in op.out_vars)
      last_member[k] = op.index

  read_by: dict[int, set[int]] = {}
  nbytes = np.zeros(n)
  for op in ops:
    i = op.index
    if not fusing[i]:
      continue
    k = kernels.find(i)
    reads = _reads(i, inputs, in_buffer, sources)
    for v in [v for v in reads if traced.def_pos[v] >= 0]:
      if kernels.find(int(traced.def_pos[v])) == k:
        del reads[v]  # made in this kernel: no read from memory
    if not writes[k]:
      continue  # remade inside each of its readers, which move its bytes
    seen = read_by.setdefault(k, set())
    for v, reader in reads.items():
      if v not in seen:
        seen.add(v)
        nbytes[reader] += var_bytes[v] * costs.multiplicity[reader]
    nbytes[i] += costs.multiplicity[i] * sum(var_bytes[v] for v in op.out_vars if in_buffer[v])
  launches = np.zeros(n)
  roots = np.flatnonzero(writes)
  launches[last_member[roots]] = 1.0
  unfused = FusedTraffic.unfused(costs)
  return FusedTraffic(
    np.where(fusing, nbytes, unfused.nbytes),
    np.where(fusing, launches * costs.multiplicity, unfused.kernels),
  )
