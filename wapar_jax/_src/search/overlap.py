"""The traced step's windows for hiding each class of collective (`cost.overlap`), per group set.

The collectives the pricing adds are placed on the traced step: a partial sum's reduction
after the op that makes it (where the chain of partial sums is last combined), read by the
first op that uses the sum; a reduction over the model axis in an order where the chain that
makes it runs as early as its inputs allow (`hoisted_positions`); an FSDP gather of a
parameter's use read by that use and started one gathered use ahead (XLA prefetches the next
layer's weights while the current layer runs, not all of them at the top of the step: they
would not fit). Windows are in seconds at one device per bucket of work (data category x
model split), so that a candidate scales them as it scales the step's compute.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from wapar_jax._src.cost.overlap import Windows, exposed, no_windows, windows
from wapar_jax._src.trace import TracedStep

# The classes of collectives that can hide; the pricing keeps every other collective exposed
# (gathers of activations, sequence parallelism's, ZeRO-1's gather of the updated parameters).
GRADIENTS, BATCH, MODEL_REDUCTIONS, FSDP_GATHERS = "gradients", "batch", "model", "fsdp_gathers"


@dataclasses.dataclass(frozen=True)
class StepWindows:
  """Per class of collective, its windows over one group set's buckets of work."""

  by_class: dict[str, Windows]

  def exposed(self, times: dict[str, float], scale: np.ndarray, efficiency: float) -> float:
    """Seconds of the classes' collective `times` on the critical path, the windows' buckets
    ([3 data categories, 2 model]) scaled by `scale` (1 / the candidate's divisors)."""
    flat = scale.reshape(-1)
    return sum(
      exposed(self.by_class.get(k, no_windows(flat.size)), t, flat, efficiency)
      for k, t in times.items()
    )


def first_uses(traced: TracedStep) -> np.ndarray:
  """[V] the first op reading each variable (len(ops) for one only the step's outputs read)."""
  first = np.full(traced.num_vars, len(traced.ops), dtype=np.int64)
  for op in reversed(traced.ops):
    for v in op.in_vars:
      if v >= 0:
        first[v] = op.index
  return first


# Ops through which a partial sum stays a partial sum (they are linear in it): sums of
# partials, linear ops of one, and scalings by a value that is not partial. The reduction is
# moved along them to where the partial is last combined (`search.space._reduce_at_sinks`).
SUMMING = frozenset({"add", "add_any", "sub"})
LINEAR_UNARY = frozenset(
  {"neg", "convert_element_type", "reshape", "transpose", "squeeze", "copy", "copy_p"}
)
SCALING = frozenset({"mul", "div"})
_CARRYING = SUMMING | LINEAR_UNARY | SCALING


def hoisted_positions(traced, makes: np.ndarray, sinks: np.ndarray) -> np.ndarray:
  """[N] each op's position in an order of the step where the ops making a partial sum
  (`makes`) and carrying it to its reduction (`sinks`) run as soon as their inputs are made.

  jax's transpose of a matmul emits the weight gradient before the input gradient, so in the
  jaxpr a tensor-parallel layer's input-gradient reduction is read right after it is made,
  with nothing between. XLA's scheduler issues the reduction first and runs the independent
  weight-gradient matmul while it is in flight, as the compiled modules of the suite's
  head-split transformers show (`verify.overlap`). Moving each such op to just after its
  latest input keeps the order topological."""
  ops = traced.ops
  n = len(ops)
  chain = np.asarray(makes, dtype=bool).copy()
  readers = np.zeros(traced.num_vars, dtype=np.int64)
  for op in ops:
    for v in set(op.in_vars) - {-1}:
      readers[v] += 1
  for sink in np.flatnonzero(sinks):
    stack = [int(sink)]
    while stack:
      i = stack.pop()
      if chain[i] and i != sink:
        continue
      chain[i] = True
      for v in ops[i].in_vars:
        p = traced.def_pos[v] if v >= 0 else -1
        if p >= 0 and not chain[p] and readers[v] == 1 and ops[p].primitive in _CARRYING:
          stack.append(int(p))
  if not chain.any():
    return np.arange(n)
  key = np.arange(n, dtype=float)
  step = 1.0 / (n + 1)  # below one position: a hoisted op stays before the next op
  for i in np.flatnonzero(chain):
    made = [traced.def_pos[v] for v in ops[i].in_vars if v >= 0 and traced.def_pos[v] >= 0]
    key[i] = min(key[i], max((key[p] for p in made), default=-1.0) + step)
  order = np.lexsort((np.arange(n), key))
  pos = np.empty(n, dtype=np.int64)
  pos[order] = np.arange(n)
  return pos


def _prefix(per_op: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
  rows = per_op if order is None else per_op[order]
  return np.vstack([np.zeros((1, per_op.shape[1])), np.cumsum(rows, axis=0)])


def step_windows(
  space,
  op_seconds: np.ndarray,
  op_model: np.ndarray,
  red_model_sink: np.ndarray,
  red_model: np.ndarray,
) -> StepWindows:
  """The windows of one group set: `op_model` [N] the ops whose work the model axis splits,
  `red_model_sink` [N] where a partial sum over it is reduced, `red_model` [N] the ops that
  make such partial sums."""
  n = len(op_seconds)
  bucket = space.op_data_cat * 2 + op_model.astype(np.int64)
  per_op = np.zeros((n, 6))
  per_op[np.arange(n), bucket] = op_seconds
  prefix = _prefix(per_op)
  first = space.first_use if space.first_use is not None else first_uses(space.traced)
  out = space.op_out_var
  has_out = out >= 0
  read_at = np.where(has_out, first[np.maximum(out, 0)], n)
  weighted = space.costs.multiplicity * space.op_out_bytes
  ops = np.arange(n)
  weight_out = has_out & space.var_weight[np.maximum(out, 0)]
  grads = space.red_batch_sink & weight_out
  others = space.red_batch_sink & ~weight_out
  tp = red_model_sink
  by_class = {
    GRADIENTS: windows(ops[grads], read_at[grads], weighted[grads], prefix),
    BATCH: windows(ops[others], read_at[others], weighted[others], prefix),
  }
  if tp.any():
    pos = hoisted_positions(space.traced, red_model, tp)
    at = np.append(pos, n)
    by_class[MODEL_REDUCTIONS] = windows(
      pos[tp], at[read_at[tp]], weighted[tp], _prefix(per_op, np.argsort(pos))
    )
  runs = space.gathered_runs
  if len(runs):
    used = first[space.gathered_var]
    marked = runs > 0
    # Started once the previous gathered use (another parameter's, or the previous layer's)
    # is read: one use ahead.
    uses = np.unique(used[marked])
    ahead = np.searchsorted(uses, used, side="left") - 1
    start = np.where(ahead >= 0, uses[np.maximum(ahead, 0)], -1)
    nbytes = space.var_bytes[space.gathered_var] * runs
    by_class[FSDP_GATHERS] = windows(start[marked], used[marked], nbytes[marked], prefix)
  return StepWindows(by_class)
