"""Attention read from dimension classes for context parallelism (no names read).

A sequence class is a non-batch dim of a batch leaf that no weight has (the T of `tokens
[B, T]`). Attention is where a tensor holds it twice: the scores `[B, H, Tq, Tk]`, made by a
dot_general of two tensors that hold it once (`q . k`), and read by one that contracts keys
with a tensor that holds it once (`probs . v`). As every attention is written (scores
`[..., q, k]`, softmax over the last axis), the last sequence dim of such a tensor is the key.

Under context parallelism every tensor is split on its first sequence dim, so a query's keys
are on other devices: the operands whose sequence dim meets a key dim (`k` in `q . k`, `v` in
`probs . v`; in the backward pass `k` in `dscores . k`, `v` in `dout . v`) are used whole,
gathered over the context axis, and the products that contract a query dim of the scores into
a tensor that holds the sequence once (`dk`, `dv`) are partial sums over it, reduce-scattered
back to the split.
"""

from __future__ import annotations

import dataclasses
import math

from wapar_jax._src.trace.graph import TracedStep


@dataclasses.dataclass(frozen=True)
class Attention:
  """What context parallelism changes in a traced program (empty: no attention).

  Attributes:
    sequence: the sequence classes.
    size: the gcd of the sequence dims' sizes (the context degree must divide it).
    gathered: variables used whole on the sequence (keys and values), as they are made.
    reused: variables holding a gathered one's values (a scan's stack of them, or its slices
      in a later loop): whole too, but gathered where the original was.
    scattered: variables summed over the context axis and reduce-scattered (`dk`, `dv`).
    operands: (op index, operand position) of each use of a gathered variable by attention.
  """

  sequence: frozenset[int] = frozenset()
  size: int = 0
  gathered: frozenset[int] = frozenset()
  reused: frozenset[int] = frozenset()
  scattered: frozenset[int] = frozenset()
  operands: tuple[tuple[int, int], ...] = ()

  @property
  def whole(self) -> frozenset[int]:
    """Every variable a device holds whole on the sequence (its batch split only)."""
    return self.gathered | self.reused | self.scattered


def _dot_dims(eqn, lhs_rank: int, rhs_rank: int):
  """(lhs dim -> out dim, rhs dim -> out dim, lhs contracted dim -> rhs dim) of a dot_general:
  the output is the batch dims, then the lhs's free dims, then the rhs's."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs_out = {d: i for i, d in enumerate(lb)}
  rhs_out = {d: i for i, d in enumerate(rb)}
  n = len(lb)
  for d in range(lhs_rank):
    if d not in lc and d not in lb:
      lhs_out[d] = n
      n += 1
  for d in range(rhs_rank):
    if d not in rc and d not in rb:
      rhs_out[d] = n
      n += 1
  return lhs_out, rhs_out, dict(zip(lc, rc))


def find_attention(traced: TracedStep) -> Attention:
  """The attention of `traced` (see the module doc)."""
  sequence = traced.sequence_classes
  if not sequence:
    return Attention()
  classes = traced.var_classes
  seq_dims = lambda v: [d for d, c in enumerate(classes[v]) if c in sequence]  # noqa: E731
  gathered, scattered, operands = set(), set(), []
  for op in traced.ops:
    if op.primitive != "dot_general" or len(op.in_vars) != 2 or min(op.in_vars) < 0:
      continue
    lhs, rhs = op.in_vars
    (out,) = op.out_vars
    sl, sr, so = seq_dims(lhs), seq_dims(rhs), seq_dims(out)
    lhs_out, rhs_out, contracted = _dot_dims(op.eqn, len(classes[lhs]), len(classes[rhs]))
    if len(sl) == 1 and len(sr) == 1 and len(so) == 2:  # scores = q . k
      for pos, (v, dims, to_out) in enumerate(((lhs, sl, lhs_out), (rhs, sr, rhs_out))):
        if to_out.get(dims[0]) == so[-1]:
          gathered.add(v)
          operands.append((op.index, pos))
    elif sorted((len(sl), len(sr))) == [1, 2]:  # probs . v, or a cotangent's product
      twice, once, pos = (lhs, rhs, 1) if len(sl) == 2 else (rhs, lhs, 0)
      pairs = contracted if twice == lhs else {r: q for q, r in contracted.items()}
      met = pairs.get(seq_dims(twice)[-1])
      if met is not None and met == seq_dims(once)[0]:
        gathered.add(once)
        operands.append((op.index, pos))
      elif len(so) == 1 and any(pairs.get(d) == seq_dims(once)[0] for d in seq_dims(twice)):
        scattered.add(out)
  if not gathered:
    return Attention()
  size = math.gcd(*(traced.var_shape[v][d] for v in gathered for d in seq_dims(v)))
  made = {v for op in traced.ops for v in op.out_vars}
  reused = _reused(traced, gathered & made)
  return Attention(
    sequence=sequence,
    size=size,
    gathered=frozenset(gathered & made),
    reused=frozenset(reused | (gathered - made)),
    scattered=frozenset(scattered),
    operands=tuple(operands),
  )


def _reused(traced: TracedStep, gathered: set[int]) -> set[int]:
  """The stacks a loop keeps of gathered variables and their slices in later loops."""
  out = set()
  for stack, piece in traced.stacks:
    if piece in gathered:
      out.add(stack)
  for stack, piece in traced.stacks:
    if stack in out:
      out.add(piece)
  return out - gathered
