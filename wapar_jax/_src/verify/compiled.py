"""A compiled step read whole: FLOPs, memory, collectives and kernel time, priced on a profile.

`read_compiled` works for any compiled SPMD step, planned or written by hand; it puts the
readings of `hlo`, `collectives` and `kernels` together with XLA's own cost and memory analyses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from wapar_jax._src.compat import analysis_dict
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.search.candidate import step_seconds
from wapar_jax._src.verify.collectives import collectives, target_comm_time
from wapar_jax._src.verify.hlo import HloModule, multiplicities, parse_hlo
from wapar_jax._src.verify.kernels import kernel_seconds, loop_flops_added
from wapar_jax._src.verify.overlap import exposed_comm_time
from wapar_jax._src.verify.results import Collective, Figures, MemoryBreakdown


def memory_breakdown(compiled) -> tuple[MemoryBreakdown, list[str]]:
  """`compiled.memory_analysis()` as a `MemoryBreakdown`, and notes when it is unavailable."""
  try:
    stats = compiled.memory_analysis()
  except Exception as e:  # some backends do not implement it; the rest of verify still holds
    return MemoryBreakdown(0.0, 0.0, 0.0, 0.0), [f"memory_analysis() failed: {e}"]
  if stats is None:
    return MemoryBreakdown(0.0, 0.0, 0.0, 0.0), ["memory_analysis() returned None"]
  get = lambda k: float(getattr(stats, k, 0) or 0)
  return MemoryBreakdown(
    get("argument_size_in_bytes"),
    get("output_size_in_bytes"),
    get("alias_size_in_bytes"),
    get("temp_size_in_bytes"),
  ), []


def _cpu_only_buffers(module: HloModule) -> list[str]:
  """Notes on buffers XLA:CPU allocates where a GPU compile would not."""
  pooling = sum(
    1
    for instrs in module.computations.values()
    for i in instrs
    if i.opcode == "scatter" and "select_and_scatter" in i.rest
  )
  if not pooling:
    return []
  return [
    f"XLA:CPU expanded {pooling} max-pool gradient(s) (select-and-scatter) into scatters "
    "over s32 index arrays, with one int32 iota per dim of each pooled input made at the "
    "top of the step; GPU XLA fuses the iotas and computes the indices just before each "
    "scatter, so the compiled peak here includes buffers a GPU compile does not allocate "
    "(the XLA:CPU memory figure counts them)."
  ]


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """What a compiled step costs per device, read from the module and priced on a profile.

  Attributes:
    figures: FLOPs (loop trip counts applied), bytes sent, comm / compute / step time, peak.
      comm time is the collectives as the profile's XLA would run them (`target_comm_time`);
      the exposed part of it is what the module's own dataflow leaves on the critical path
      (`verify.overlap`); step time as the search ranks (`search.candidate.step_seconds`).
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


def read_compiled(compiled, mesh_shape: Mapping[str, int], profile: DeviceProfile) -> CompiledStep:
  """Reads a compiled step (FLOPs, memory, collectives, kernels) and prices it on `profile`.

  Works for any compiled SPMD step, planned or written by hand; `mesh_shape` names the axes
  its collectives' replica groups are mapped to.
  """
  notes = []
  analysis = {}
  try:
    analysis = analysis_dict(compiled.cost_analysis())
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
  memory, mem_notes = memory_breakdown(compiled)
  notes += mem_notes + _cpu_only_buffers(module)
  comm_time = target_comm_time(found, profile)
  compute_time = kernel_seconds(module, mult, profile) + profile.step_overhead
  exposed = exposed_comm_time(module, mult, found, profile)
  figures = Figures(
    xla_flops + added,
    sum(c.sent_bytes for c in found),
    comm_time,
    memory.peak,
    compute_time,
    step_seconds(compute_time, comm_time, exposed),
    exposed,
  )
  return CompiledStep(
    figures, xla_flops, added, memory, found, tuple(notes), sum(c.time for c in found)
  )
