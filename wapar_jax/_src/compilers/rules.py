"""What a compiler does with a train step's values, as data: one frozen object per compiler.

The memory model and the roofline read these rules instead of asking which compiler runs the
step, in the spirit of jax's per-platform lowering registry: the common rules below, and each
compiler's object overriding what it does differently (`xla_gpu.py`, `xla_cpu.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from wapar_jax._src.trace import ELEMENTWISE

# Ops XLA fuses into their consumers: their outputs are rarely materialised in memory.
FUSIBLE = ELEMENTWISE | {
  "broadcast_in_dim",
  "reshape",
  "squeeze",
  "expand_dims",
  "transpose",
  "iota",
}
# Never a buffer of their own: bitcasts, or fused into every consumer.
LAYOUT = frozenset(
  {
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "expand_dims",
    "transpose",
    "convert_element_type",
    "iota",
    "copy",
    "copy_p",
  }
)
BITCASTS = frozenset({"reshape", "squeeze", "expand_dims"})
# Non-elementwise kernels that still fuse their elementwise producers (reduce fusions).
FUSING_KERNELS = ("reduce_", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin")
# Kernels XLA runs in place on their first operand.
IN_PLACE = frozenset(
  {
    "scatter",
    "scatter-add",
    "scatter-sub",
    "scatter-mul",
    "scatter-min",
    "scatter-max",
    "dynamic_update_slice",
  }
)
# Elementwise ops XLA does not duplicate into a second fusion (its `IsExpensive`).
EXPENSIVE = frozenset(
  {
    "div",
    "sqrt",
    "rsqrt",
    "cbrt",
    "exp",
    "exp2",
    "expm1",
    "log",
    "log1p",
    "logistic",
    "pow",
    "atan2",
    "cos",
    "sin",
    "tan",
    "tanh",
    "erf",
    "erfc",
    "erf_inv",
    "rem",
  }
)


@dataclasses.dataclass(frozen=True)
class Scratch:
  """Buffers a compiled step has that no variable of the step stands for.

  Each is sharded like a variable of the step (`like`), with its own size, live from op `start`
  to op `stop` inclusive.
  """

  like: np.ndarray
  nbytes: np.ndarray
  start: np.ndarray
  stop: np.ndarray

  @classmethod
  def none(cls) -> Scratch:
    empty = np.zeros(0, dtype=np.int64)
    return cls(empty, np.zeros(0), empty, empty)

  @classmethod
  def concatenate(cls, parts) -> Scratch:
    parts = [p for p in parts if p.like.size]
    if not parts:
      return cls.none()
    return cls(
      *(np.concatenate([getattr(p, f) for p in parts]) for f in ("like", "nbytes", "start", "stop"))
    )


@dataclasses.dataclass(frozen=True)
class CompilerRules:
  """Which values of a step a compiler fuses, keeps in buffers, and how it reduces gradients.

  Attributes:
    name: the registry name ("xla:gpu", "xla:tpu", "xla:cpu").
    kernel_reads_through: layout primitives through which a kernel reads its operand's buffer
      (the operand is then written out).
    kept_if_read_later: of the elementwise values read again far from where they are made,
      which the compiler keeps rather than recomputes: None keeps every one, a set keeps only
      values made by those primitives.
    reduces_in_place: a gradient all-reduce writes into its operand's buffer.
    combine_count: the compiler all-reduces gradients at full size (no reduce-scatter),
      combining this many at a time, each bucket's inputs and results live at once; None when
      it reduces in place or reduce-scatters.
    copies_strided_gathers: an FSDP gather along a minor dim is made in a transposed layout and
      copied back to row-major, both buffers live where it gathers.
    scratch: functions `traced -> Scratch` listing buffers of the compiler's own.
    rerouted_reads: `traced -> {(variable, op)}`: reads the compiler serves from a scratch
      buffer instead of the variable, so the variable dies at its last other reader.
    remat_at_least: in a rematerialised step the peak is at least the one under these rules
      (a registry name), where the compiler reorders the backward pass beyond what its own
      rules describe.
    fusible: primitives fused into their consumers (their bytes mostly never move; no kernel
      launch of their own).
    layout: primitives whose results never get a buffer.
    in_place: kernels that write into their first operand's buffer.
    fusing_kernels: name prefixes of non-elementwise kernels that fuse their producers.
    expensive: elementwise primitives not duplicated into a second fusion: a value they make,
      read nearby and again far later through a cheap value recomputed from it, is kept.
    local_reads: readers within this many equations of a value count as its neighbours
      (a cheap producer is duplicated into neighbouring kernels).
    multi_output_fusion: an elementwise result written out is also used by a kernel that reads
      it nearby, in registers (XLA GPU's multi-output fusion), not read back from memory.
    native_kernels: primitives the compiler emits as one kernel of their own that reads each
      operand and writes its result once, which XLA:CPU (whose cost analysis prices the step)
      expands into loops that count each window element as a separate access: XLA GPU's
      select-and-scatter (a max-pool gradient, 7.5x its operands' bytes once expanded).
    prefetched_gather_bytes: an FSDP gather runs this many bytes of gathers ahead of its use
      (its copy is live from there): the asynchronous collectives in flight while the layers
      before it compute. 0 where collectives run in program order.
  """

  name: str
  kernel_reads_through: frozenset[str]
  kept_if_read_later: frozenset[str] | None
  reduces_in_place: bool
  combine_count: int | None
  copies_strided_gathers: bool
  scratch: tuple[Callable, ...] = ()
  rerouted_reads: Callable | None = None
  remat_at_least: str | None = None
  fusible: frozenset[str] = FUSIBLE
  layout: frozenset[str] = LAYOUT
  in_place: frozenset[str] = IN_PLACE
  fusing_kernels: tuple[str, ...] = FUSING_KERNELS
  expensive: frozenset[str] = EXPENSIVE
  local_reads: int = 12
  prefetched_gather_bytes: float = 0.0
  multi_output_fusion: bool = True
  native_kernels: frozenset[str] = frozenset()

  def scratch_buffers(self, traced) -> Scratch:
    """Every buffer of the compiler's own for `traced`."""
    return Scratch.concatenate([make(traced) for make in self.scratch])
