"""How much of a class of collectives hides behind independent compute: windows and exposure.

XLA's latency-hiding scheduler starts a collective once its operand is made and waits for it
only where its result is first read; the kernels between the two run while it is in flight.
In a topological order of the step (a jaxpr's equations, a compiled computation's
instructions) every op strictly between a collective's producer and its first consumer is
independent of it, so the compute there is the collective's *window*, and a prefix sum over the
order gives any window in O(1). Why not networkx's ancestor / descendant sets: per collective
they cost O(V + E) and would also count ops the scheduler keeps on the far side of the
producer (it moves collectives, not the compute around them), for hundreds of candidates.

Collectives of a class share one stream and run in the order they are made (first in, first
out). Those whose windows overlap form a *bundle* (a step's weight-gradient reductions, all
read by the optimizer update): without compute waiting, the i-th of a bundle finishes at
max over k <= i of (start of k's window + the stream time of k..i), and it is late by what that
exceeds its reader; the bundle's exposure is its latest collective's lateness. Bundles that do
not overlap (the tensor-parallel all-reduces of successive layers, FSDP's gathers one use
ahead) add up. A collective's time hides behind its window's compute times the profile's
`overlap_efficiency`; both sides are prefix sums, so a bundle is priced with one running
minimum.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Windows:
  """The collectives of one class in the order they are made, grouped in bundles.

  Attributes:
    through: [K] bytes of the bundle's collectives up to and including this one, over the
      class's bytes (`before`: excluding it).
    opened: [K, B] seconds of compute per bucket of work before the collective's window opens
      (its producer done); `due`: before its first reader. The caller scales the buckets (the
      planner: by how a candidate splits each kind of work).
    bundle: [K] the bundle of each collective; starts: [bundles] its first row.
  """

  through: np.ndarray
  before: np.ndarray
  opened: np.ndarray
  due: np.ndarray
  bundle: np.ndarray
  starts: np.ndarray

  @property
  def empty(self) -> bool:
    return len(self.through) == 0

  @property
  def compute(self) -> np.ndarray:
    """[K, B] the compute inside each collective's own window."""
    return np.maximum(self.due - self.opened, 0.0)


def no_windows(buckets: int = 1) -> Windows:
  none = np.zeros(0)
  return Windows(none, none, np.zeros((0, buckets)), np.zeros((0, buckets)), none, none)


def windows(
  producer: np.ndarray, consumer: np.ndarray, weight: np.ndarray, prefix: np.ndarray
) -> Windows:
  """The windows of collectives made after op `producer[k]` and first read by op
  `consumer[k]`, sized `weight[k]` (bytes); `prefix[i]` is the compute of ops 0..i-1 per
  bucket ([N + 1, B]), so the ops strictly between p and q have prefix[q] - prefix[p + 1]."""
  producer = np.asarray(producer, dtype=np.int64)
  consumer = np.maximum(np.asarray(consumer, dtype=np.int64), producer + 1)
  weight = np.asarray(weight, dtype=float)
  keep = weight > 0
  producer, consumer, weight = producer[keep], consumer[keep], weight[keep]
  if not len(weight):
    return no_windows(prefix.shape[1])
  order = np.lexsort((consumer, producer))
  producer, consumer, weight = producer[order], consumer[order], weight[order]
  # A new bundle where a collective is made at or after every earlier one has been read.
  reach = np.maximum.accumulate(consumer)
  new = np.ones(len(producer), dtype=bool)
  new[1:] = producer[1:] >= reach[:-1]
  starts = np.flatnonzero(new)
  bundle = np.cumsum(new) - 1
  total = np.cumsum(weight)
  base = np.concatenate([[0.0], total])[starts][bundle]  # bytes of the earlier bundles
  through = (total - base) / total[-1]
  before = through - weight / total[-1]
  return Windows(
    through,
    before,
    prefix[producer + 1],
    prefix[np.minimum(consumer, len(prefix) - 1)],
    bundle,
    starts,
  )


# Larger than any stream time or compute of a step (seconds): offsets each bundle's values so
# that one running minimum over all bundles never reaches into an earlier one.
_APART = 1e4


def exposed(w: Windows, total: float, scale: np.ndarray, efficiency: float) -> float:
  """Seconds of the class's `total` collective time left on the critical path, its windows'
  buckets scaled by `scale` ([B]) and hidden at `efficiency`. A class with time but no
  windows (nothing in the graph to place it) stays exposed."""
  if total <= 0:
    return 0.0
  if w.empty or efficiency <= 0:
    return total
  # Collective i of a bundle is late by max over k <= i of
  # (stream time of k..i) - efficiency * (compute from k's producer to i's reader).
  finish = total * w.through - efficiency * (w.due @ scale)
  offset = _APART * w.bundle
  start = np.minimum.accumulate(total * w.before - efficiency * (w.opened @ scale) - offset)
  late = finish - (start + offset)
  return float(np.maximum(np.maximum.reduceat(late, w.starts), 0.0).sum())
