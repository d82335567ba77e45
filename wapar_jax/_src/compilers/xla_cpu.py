"""XLA:CPU's rules: what `plan.verify()` compiles with on CPU devices.

It keeps more buffers than GPU XLA: every value read again far from where it is made, operands a
kernel reads through a transpose or copy, a second full-size buffer for each all-reduced
gradient (it has no reduce-scatter: sharded gradients are all-reduced at full size and sliced),
and buffers of its own that the step has no value for (`transposed_conv_operands`,
`max_pool_gradient_indices`, `scatter_zeros`).
"""

from __future__ import annotations

import math

import numpy as np

from wapar_jax._src.compilers.rules import LAYOUT, CompilerRules, Scratch

# XLA:CPU's all-reduce combiner merges this many operands into one all-reduce, with no byte
# limit (its CpuAllReduceCombiner): gradients reduce in buckets, in the order they are made.
CPU_COMBINE_COUNT = 256


def _canonical_spec(spec, is_kernel: bool) -> bool:
  rank = len(spec)
  if is_kernel:  # output feature, input feature, spatial: laid out spatial..., in, out
    return tuple(spec) == (rank - 1, rank - 2, *range(rank - 2))
  return tuple(spec) == (0, rank - 1, *range(1, rank - 1))  # batch, feature, spatial


def _transposed_conv_reads(traced) -> list[tuple[int, int]]:
  """(variable, conv op) for each conv operand XLA:CPU transposes first."""
  twins = []
  for op in traced.ops:
    if op.primitive != "conv_general_dilated":
      continue
    dn = op.eqn.params["dimension_numbers"]
    for k, (spec, is_kernel) in enumerate(((dn.lhs_spec, False), (dn.rhs_spec, True))):
      v = op.in_vars[k]
      if v >= 0 and not _canonical_spec(spec, is_kernel):
        twins.append((v, op.index))
  return twins


def _is_constant_fill(traced, v: int) -> bool:
  """Whether variable v is a broadcast of a literal (zeros for a scatter to add into)."""
  if v < 0 or traced.def_pos[v] < 0:
    return False
  op = traced.ops[traced.def_pos[v]]
  return op.primitive == "broadcast_in_dim" and all(
    u < 0 or not traced.var_shape[u] for u in op.in_vars
  )


def _scratch(like, nbytes, start, stop) -> Scratch:
  return Scratch(
    np.asarray(like, dtype=np.int64),
    np.asarray(nbytes, dtype=float),
    np.asarray(start, dtype=np.int64),
    np.asarray(stop, dtype=np.int64),
  )


def transposed_conv_operands(traced) -> Scratch:
  """A convolution whose dimension numbers are not XLA:CPU's layout reads a transposed copy.

  XLA:CPU runs a convolution on operands laid out batch-major / feature-minor (kernels
  spatial-major, output feature minor); a kernel gradient reads the activations with batch and
  feature swapped, through a copy made as soon as its operand is and living until the conv.
  """
  sizes = traced.var_bytes()
  reads = _transposed_conv_reads(traced)
  return _scratch(
    [v for v, _ in reads],
    [sizes[v] for v, _ in reads],
    [max(int(traced.def_pos[v]), 0) for v, _ in reads],
    [c for _, c in reads],
  )


def max_pool_gradient_indices(traced) -> Scratch:
  """A max pool's gradient expanded into argmax coordinates and a scatter into zeros.

  XLA:CPU rewrites `select_and_scatter_add` as a reduce-window over the pool's input and one
  int32 iota per dim giving the argmax's coordinates, then a scatter into zeros. The iotas and
  the zeros are made at the top of the step (they read nothing); the iotas die where the
  forward pool runs (the indices are computed right after it), the zeros become the gradient.
  """
  sizes = traced.var_bytes()
  pooled_at = {op.in_vars[0]: op.index for op in traced.ops if op.primitive == "reduce_window_max"}
  like, nbytes, start, stop = [], [], [], []
  for op in traced.ops:
    if op.primitive != "select_and_scatter_add":
      continue
    source, operand = op.in_vars[0], op.in_vars[1]
    rank = len(traced.var_shape[operand])
    pooled = pooled_at.get(operand, int(traced.def_pos[traced.loss_var]))
    like += [operand, operand, source]
    nbytes += [
      sizes[operand],
      4 * rank * math.prod(traced.var_shape[operand]),
      4 * rank * math.prod(traced.var_shape[source]),
    ]
    start += [0, 0, pooled]
    stop += [op.index - 1, pooled, op.index]
  return _scratch(like, nbytes, start, stop)


def scatter_zeros(traced) -> Scratch:
  """A gather's gradient (an embedding's, a cross-entropy's) scatter-adds into zeros, which
  XLA:CPU makes at the top of the step."""
  sizes = traced.var_bytes()
  like, nbytes, start, stop = [], [], [], []
  for op in traced.ops:
    if op.primitive == "scatter-add" and _is_constant_fill(traced, op.in_vars[0]):
      out = op.out_vars[0]
      like.append(out)
      nbytes.append(sizes[out])
      start.append(0)
      stop.append(op.index - 1)
  return _scratch(like, nbytes, start, stop)


def rerouted_reads(traced) -> set[tuple[int, int]]:
  """Reads XLA:CPU serves from a buffer of its own: a transposed conv operand's, and a max
  pool's input, whose gradient reads the argmax indices instead."""
  rerouted = set(_transposed_conv_reads(traced))
  rerouted.update(
    (op.in_vars[1], op.index) for op in traced.ops if op.primitive == "select_and_scatter_add"
  )
  return rerouted


XLA_CPU = CompilerRules(
  name="xla:cpu",
  kernel_reads_through=LAYOUT,
  kept_if_read_later=None,
  reduces_in_place=False,
  combine_count=CPU_COMBINE_COUNT,
  copies_strided_gathers=True,
  scratch=(transposed_conv_operands, max_pool_gradient_indices, scatter_zeros),
  rerouted_reads=rerouted_reads,
  # Compiled AdamW on XLA:CPU: the two moments and the update are three kernels, the update
  # reading both new moments back.
  multi_output_fusion=False,
)
