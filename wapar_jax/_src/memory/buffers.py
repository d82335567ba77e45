"""Which values of a traced step a compiler keeps in buffers of their own, and for how long.

Temporaries come from a linear liveness scan of the flattened step (a loop body's values appear
once, as XLA reuses their buffers every iteration). Values that XLA fuses away — outputs of
elementwise ops consumed right away — are not counted; values kept for the backward pass are.
Which elementwise values are kept depends on the compiler: its `CompilerRules` say.
"""

from __future__ import annotations

import numpy as np

from wapar_jax._src.compilers import CompilerRules


def materialised(traced, rules: CompilerRules) -> tuple[np.ndarray, np.ndarray]:
  """Which variables the compiler keeps in a buffer of their own, and until when each is needed.

  Outputs of non-fusible ops (dots, reductions, gathers, ...) are. Layout ops (broadcast,
  reshape, transpose, convert) are bitcasts or fused into every consumer, so never. An
  elementwise result read by a single elementwise op or reduction is fused into it and
  recomputed there, and so is one whose readers all follow it closely (XLA duplicates a cheap
  producer into neighbouring kernels: a batch norm's output feeding both the ReLU and its
  mask). One read by a kernel that cannot fuse its producers (a dot, a convolution, a gather)
  is written out, and so is one such a kernel reads through `rules.kernel_reads_through`.
  A value read again much later is kept when `rules.kept_if_read_later` says so (a LayerNorm's
  normalised input, a GELU's tanh, the attention softmax kept for the backward pass); else it
  is recomputed inside the backward kernels that read it, from kept inputs.
  """
  n = traced.num_vars
  keep_all_far = rules.kept_if_read_later is None
  # Per primitive once, then per op and variable as arrays: a step of many small parameters
  # has hundreds of thousands of ops but a few dozen primitives.
  kinds: dict[str, tuple[bool, bool, bool, bool, bool]] = {}
  for op in traced.ops:
    p = op.primitive
    if p not in kinds:
      fusible = p in rules.fusible
      kinds[p] = (
        fusible,
        p in rules.layout,
        p in rules.expensive,
        keep_all_far or p in rules.kept_if_read_later,
        not fusible and not p.startswith(rules.fusing_kernels),
      )
  op_kind = np.array([kinds[op.primitive] for op in traced.ops], dtype=bool).reshape(-1, 5)
  out_op = np.array([op.index for op in traced.ops for _ in op.out_vars], dtype=np.int64)
  out_var = np.array([v for op in traced.ops for v in op.out_vars], dtype=np.int64)
  in_op = np.array([op.index for op in traced.ops for _ in set(op.in_vars) - {-1}], np.int64)
  in_var = np.array([v for op in traced.ops for v in set(op.in_vars) - {-1}], dtype=np.int64)
  made_by_fusible, layout, expensive, kept_if_far = (np.zeros(n, dtype=bool) for _ in range(4))
  for flags, column in zip((made_by_fusible, layout, expensive, kept_if_far), range(4)):
    flags[out_var] = op_kind[out_op, column]
  readers = np.bincount(in_var, minlength=n).astype(np.int64)
  read_by_kernel = np.zeros(n, dtype=bool)
  read_by_kernel[in_var[op_kind[in_op, 4]]] = True
  for op in reversed(traced.ops):
    if op.primitive in rules.kernel_reads_through and read_by_kernel[list(op.out_vars)].any():
      read_by_kernel[[v for v in op.in_vars if v >= 0]] = True
  far = traced.last_use - traced.def_pos > rules.local_reads
  read_again_later = (readers > 1) & far & kept_if_far
  kept = ~layout & (~made_by_fusible | read_by_kernel | read_again_later)
  last_use = traced.last_use.copy()
  # Reads the compiler serves from a buffer of its own do not keep a variable alive: it dies
  # at its last other reader.
  plain_last = (
    _last_plain_reads(traced, rules.rerouted_reads(traced)) if rules.rerouted_reads else {}
  )
  for v, last in plain_last.items():
    last_use[v] = last
  # A value recomputed where it is read keeps its own inputs alive until then. So does an
  # elementwise value that dies early for such a reroute: it is recomputed later from its
  # inputs (ResNet-50: a block's output, read in the backward pass by the next block's
  # residual gradient, is remade from the kept convolution outputs and batch statistics).
  remade_later = np.zeros(n, dtype=bool)
  remade_later[[v for v in plain_last if made_by_fusible[v]]] = True
  needed = _needed_until(traced, kept, remade_later, last_use)
  # An expensive value read nearby and, through a cheap value recomputed from it, much later
  # is read again later too: XLA keeps it rather than recompute it there (a GELU's tanh feeds
  # `one_minus_square`, whose only reader is in the backward pass). Cheap chains are
  # recomputed whole.
  read_through_later = (
    expensive
    & ~kept
    & (readers > 1)
    & (needed > traced.last_use)
    & (needed - traced.def_pos > rules.local_reads)
  )
  if read_through_later.any():
    kept |= read_through_later
    needed = _needed_until(traced, kept, remade_later, last_use)
  last_use = np.where(remade_later, last_use, needed)
  _share_dying_buffers(traced, kept, last_use, rules)
  return kept, last_use


def _needed_until(
  traced, kept: np.ndarray, remade_later: np.ndarray, last_use: np.ndarray
) -> np.ndarray:
  """Until when each variable is needed: a value recomputed where it is read (not kept, or
  remade later) keeps its own inputs alive until its last read."""
  needed = last_use.copy()
  for op in reversed(traced.ops):
    remade = [v for v in op.out_vars if not kept[v] or remade_later[v]]
    if remade:
      until = max(needed[v] for v in remade)
      for v in op.in_vars:
        if v >= 0 and needed[v] < until:
          needed[v] = until
  return needed


def _share_dying_buffers(
  traced, kept: np.ndarray, last_use: np.ndarray, rules: CompilerRules
) -> None:
  """An elementwise kernel or an in-place update writes into a same-size buffer it reads last.

  XLA's buffer assignment lets such a kernel's output take over an operand buffer that dies
  there, so the two are never live together: the dying operand is freed one op earlier. The
  operand may be read through the fusion (its last use was moved here above). Measured on
  GPT-2's loss gradient: logits, their scatter-added gradient and the sum of both are two
  buffers in the compiled step, not three.
  """
  nbytes = traced.var_bytes()
  temporaries = kept & (traced.def_pos >= 0)
  dying: dict[int, list[int]] = {}
  for v in np.flatnonzero(temporaries):
    dying.setdefault(int(last_use[v]), []).append(int(v))
  for op in traced.ops:
    if not (op.primitive in rules.fusible or op.primitive in rules.in_place):
      continue
    candidates = dying.get(op.index, [])
    for out in op.out_vars:
      if not kept[out]:
        continue
      for v in candidates:
        if nbytes[v] == nbytes[out] and traced.def_pos[v] < op.index:
          last_use[v] = op.index - 1
          candidates.remove(v)
          break


def _last_plain_reads(traced, rerouted: set[tuple[int, int]]) -> dict[int, int]:
  """{variable: its last read} counting only reads of the variable itself, for variables the
  step makes that the compiler reads elsewhere through a buffer of its own (`rerouted`:
  (variable, op) pairs)."""
  outputs = set(traced.output_vars)
  last = {
    v: int(traced.def_pos[v]) for v, _ in rerouted if traced.def_pos[v] >= 0 and v not in outputs
  }
  for op in traced.ops:
    for v in op.in_vars:
      if v in last and (v, op.index) not in rerouted:
        last[v] = max(last[v], op.index)
  return last
