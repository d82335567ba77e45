"""The traced step's windows for hiding each class of collective (`cost.overlap`), per group set.

The collectives the pricing adds are placed on the traced step: a partial sum's reduction
after the op that makes it (where the chain of partial sums is last combined), read by the
first op that uses the sum; an FSDP gather of a parameter's use read by that use and started
one gathered use ahead (XLA prefetches the next layer's weights while the current layer runs,
not all of them at the top of the step: they would not fit). Windows are in seconds at one
device per bucket of work (data category x model split), so that a candidate scales them as
it scales the step's compute.
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


def step_windows(
  space, op_seconds: np.ndarray, op_model: np.ndarray, red_model_sink: np.ndarray
) -> StepWindows:
  """The windows of one group set: `op_model` [N] the ops whose work the model axis splits,
  `red_model_sink` [N] where a partial sum over it is reduced."""
  n = len(op_seconds)
  bucket = space.op_data_cat * 2 + op_model.astype(np.int64)
  per_op = np.zeros((n, 6))
  per_op[np.arange(n), bucket] = op_seconds
  prefix = np.vstack([np.zeros((1, 6)), np.cumsum(per_op, axis=0)])
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
    MODEL_REDUCTIONS: windows(ops[tp], read_at[tp], weighted[tp], prefix),
  }
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
