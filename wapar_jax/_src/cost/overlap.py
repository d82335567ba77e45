"""How much of a class of collectives hides behind independent compute: windows and exposure.

XLA's latency-hiding scheduler starts a collective once its operand is made and waits for it
only where its result is first read; the kernels between the two run while it is in flight.
In a topological order of the step (a jaxpr's equations, a compiled computation's
instructions) every op strictly between a collective's producer and its first consumer is
independent of it, so the compute there is the collective's *window*, and a prefix sum over the
order gives any window in O(1). Why not networkx's ancestor / descendant sets: per collective
they cost O(V + E) and would also count ops the scheduler keeps on the far side of the
producer, for hundreds of candidates; the one move of compute that matters, issuing a
tensor-parallel input gradient's reduction before the weight gradient is computed, is made on
the order itself (`search.overlap.hoisted_positions`).

Collectives of a class share one stream and run in the order they are made (first in, first
out), the compute in another. The exposure is an event simulation of the two: a collective is
issued once its producer has run, starts when the stream is free, and its first reader waits
for it; each wait delays the compute after it, and so every later collective's issue. A
collective's time hides behind the compute times the profile's `overlap_efficiency`. The
simulation steps once per collective, so a class of a hundred thousand reductions read by
one update (a model of many tiny parameters) costs a hundred thousand steps; the windows are
sorted once, when they are made.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Windows:
  """The collectives of one class in the order they are made.

  Attributes:
    share: [K] each collective's bytes over the class's bytes: its share of the stream time.
    opened: [K, B] seconds of compute per bucket of work before the collective's window opens
      (its producer done); `due`: before its first reader. The caller scales the buckets (the
      planner: by how a candidate splits each kind of work).
    made_at / read_at: [K] positions of the producer and of the first reader in the order.
    waits: [K] the collectives in the order their readers run.
  """

  share: np.ndarray
  opened: np.ndarray
  due: np.ndarray
  made_at: np.ndarray
  read_at: np.ndarray
  waits: np.ndarray

  @property
  def empty(self) -> bool:
    return len(self.share) == 0

  @property
  def compute(self) -> np.ndarray:
    """[K, B] the compute inside each collective's own window."""
    return np.maximum(self.due - self.opened, 0.0)


def no_windows(buckets: int = 1) -> Windows:
  index = np.zeros(0, dtype=np.int64)
  empty = np.zeros((0, buckets))
  return Windows(np.zeros(0), empty, empty, index, index, index)


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
  return Windows(
    weight / weight.sum(),
    prefix[producer + 1],
    prefix[np.minimum(consumer, len(prefix) - 1)],
    producer,
    consumer,
    np.argsort(consumer, kind="stable"),
  )


def exposed(w: Windows, total: float, scale: np.ndarray, efficiency: float) -> float:
  """Seconds of the class's `total` collective time left on the critical path, its windows'
  buckets scaled by `scale` ([B]) and hidden at `efficiency`. A class with time but no
  windows (nothing in the graph to place it) stays exposed."""
  if total <= 0:
    return 0.0
  if w.empty or efficiency <= 0:
    return total
  took = (total * w.share).tolist()
  issued = (efficiency * (w.opened @ scale)).tolist()
  due = (efficiency * (w.due @ scale)).tolist()
  made_at, read_at = w.made_at.tolist(), w.read_at.tolist()
  finish = [0.0] * len(took)
  stalled, free, nxt = 0.0, 0.0, 0
  for j in w.waits.tolist():
    # Every collective made before this reader runs is issued first, in the order made.
    while nxt < len(took) and made_at[nxt] < read_at[j]:
      free = max(issued[nxt] + stalled, free) + took[nxt]
      finish[nxt] = free
      nxt += 1
    stalled = max(stalled, finish[j] - due[j])
  return float(stalled)
