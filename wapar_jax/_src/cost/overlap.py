"""How much of a class of collectives hides behind independent compute: windows and exposure.

XLA's latency-hiding scheduler starts a collective once its operand is made and waits for it
only where its result is first read; the kernels between the two run while it is in flight.
In a topological order of the step (a jaxpr's equations, a compiled computation's
instructions) every op strictly between a collective's producer and its first consumer is
independent of it, so the compute there is the collective's *window*, and a prefix sum over the
order gives any window in O(1). Why not networkx's ancestor / descendant sets: per collective
they cost O(V + E) and would also count ops the scheduler keeps on the far side of the
producer (it moves collectives, not the compute around them), for hundreds of candidates.

Collectives of a class share one stream. Those whose windows overlap form a *bundle* (a
step's weight-gradient reductions, all read by the optimizer update): the stream runs them in
the order they are made, so the k-th and every later one of the bundle must fit in the compute
from the k-th's producer to the earliest consumer among them. Bundles that do not overlap (the
tensor-parallel all-reduces of successive layers, FSDP's gathers one use ahead) add up. The
hidden time is the window's compute times the profile's `overlap_efficiency`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Windows:
  """The collectives of one class, grouped in bundles, each with its window of compute.

  Attributes:
    share: [K] the bytes of this and the later collectives of its bundle, over the class's bytes.
    compute: [K, B] seconds of compute per bucket of work in the collective's window, up to
      the earliest consumer of its bundle's later collectives; the caller scales the buckets
      (the planner: by how a candidate splits each kind of work).
    starts: [bundles] the first row of each bundle.
  """

  share: np.ndarray
  compute: np.ndarray
  starts: np.ndarray

  @property
  def empty(self) -> bool:
    return len(self.share) == 0


def no_windows(buckets: int = 1) -> Windows:
  return Windows(np.zeros(0), np.zeros((0, buckets)), np.zeros(0, dtype=np.int64))


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
  total = weight.sum()
  share = np.empty_like(weight)
  deadline = np.empty_like(consumer)
  for b, s in enumerate(starts):  # suffix sums and minima inside each bundle
    e = starts[b + 1] if b + 1 < len(starts) else len(weight)
    share[s:e] = np.cumsum(weight[s:e][::-1])[::-1] / total
    deadline[s:e] = np.minimum.accumulate(consumer[s:e][::-1])[::-1]
  compute = np.maximum(prefix[deadline] - prefix[producer + 1], 0.0)
  return Windows(share, compute, starts)


def exposed(w: Windows, total: float, scale: np.ndarray, efficiency: float) -> float:
  """Seconds of the class's `total` collective time left on the critical path, its windows'
  buckets scaled by `scale` ([B]) and hidden at `efficiency`. A class with time but no
  windows (nothing in the graph to place it) stays exposed."""
  if total <= 0:
    return 0.0
  if w.empty or efficiency <= 0:
    return total
  late = total * w.share - efficiency * (w.compute @ scale)
  return float(np.maximum(np.maximum.reduceat(late, w.starts), 0.0).sum())
