"""GPU XLA's rules (measured on an H200 through mock devices, `benchmarks/gpu_memory.py`), and
TPU's, which have no measurements of their own yet and take GPU XLA's."""

from __future__ import annotations

import dataclasses

from wapar_jax._src.compilers.rules import BITCASTS, EXPENSIVE, CompilerRules
from wapar_jax._src.cost.collectives import COMBINE_BYTES

XLA_GPU = CompilerRules(
  name="xla:gpu",
  kernel_reads_through=BITCASTS,
  # It recomputes a cheap elementwise value inside the backward kernels that read it (a
  # LayerNorm's normalised input, a residual sum), from kept inputs.
  kept_if_read_later=EXPENSIVE,
  reduces_in_place=True,
  combine_count=None,
  copies_strided_gathers=False,
  # In a rematerialised backward pass it runs each layer's recomputation and input gradients,
  # then every weight-gradient matmul at the end, keeping more than the jaxpr's order implies;
  # XLA:CPU's rules bound what it keeps there (docs/memory_model.md).
  remat_at_least="xla:cpu",
  # Its latency-hiding scheduler keeps one asynchronous all-gather in flight (its default
  # `all_gather_overlap_limit`), of gathers combined up to the combine threshold: the next
  # combined gather is issued as the current one's layer starts.
  prefetched_gather_bytes=COMBINE_BYTES,
  # Its emitter runs a max-pool gradient as one select-and-scatter kernel (a thread per source
  # element scans its window, then adds into the result), not XLA:CPU's scatter loop.
  native_kernels=frozenset({"select_and_scatter_add"}),
)

XLA_TPU = dataclasses.replace(XLA_GPU, name="xla:tpu")
