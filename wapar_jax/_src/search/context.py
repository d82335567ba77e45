"""Context parallelism (CP) priced and laid out, from the attention the program shows
(`trace.context`).

As MaxText's all-gather context parallelism does, a `context` axis inside the batch's devices
splits every activation on its sequence: the tokens of a micro-batch are split over data x
context devices, so a step can run on more devices than the micro-batch has rows, and a
sequence too long for one device's memory is split. A CP candidate is its data-parallel (or
ZeRO-1 / FSDP) twin over all those devices, with only what attention changes priced again:

- each device computes its queries' rows of the scores `[B/data, H, T/context, T]`, the twin's
  share of the work and memory (the scores are a 1/devices share either way);
- the keys and values are used whole on the sequence: each is all-gathered over the context
  axis where it is made (again where remat recomputes it), and its cotangent, a partial sum
  over the context's queries, is reduce-scattered back; each device holds them `context` times
  the twin's share;
- the causal mask costs no imbalance: the program materialises every score and masks it, so
  each device computes its whole block whatever the mask (a blockwise kernel that skips masked
  blocks would need its chunks balanced, as MaxText's load-balanced reordering does).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jax.sharding import PartitionSpec as P

from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.search.aggregates import Aggregates
from wapar_jax._src.search.candidate import (
  CONTEXT,
  DATA,
  Candidate,
  strategy_label,
)
from wapar_jax._src.search.pricing import CommTally, axis_spans, inner_axis_spans
from wapar_jax._src.search.space import SearchSpace

# Storages a CP candidate takes, over all of the batch's devices (data and context). Not
# replicated: XLA then all-reduces the gradients over context and again over data (compiled,
# gpt2-small at 2 x 2048 on data 2 x context 4: 1.5 GiB against ZeRO-1's one reduce-scatter
# and gather, 1.0 GiB), and ZeRO-1 holds less.
CONTEXT_STORAGES = frozenset({"zero1", "fsdp"})


@dataclasses.dataclass(frozen=True)
class ContextTerms:
  """What context parallelism changes, found once per search space (unsharded, per step)."""

  whole: np.ndarray  # [V] bool: held whole on the sequence (keys, values, their cotangents)
  gathered_bytes: float  # the keys' and values' all-gathers
  gathers: float
  scattered_bytes: float  # their cotangents' reduce-scatters
  scatters: float


def context_terms(space: SearchSpace) -> ContextTerms | None:
  """The space's `ContextTerms`; None without attention."""
  attention = space.attention
  if not attention.gathered:
    return None
  traced = space.traced
  whole = np.zeros(traced.num_vars, dtype=bool)
  whole[list(attention.whole)] = True
  runs = dict.fromkeys(attention.gathered | attention.scattered, 0.0)
  for op in traced.ops:
    for v in op.out_vars:
      if v in runs:
        runs[v] += float(space.costs.multiplicity[op.index])
  total = lambda vs: (  # noqa: E731
    float(sum(space.var_bytes[v] * runs[v] for v in vs)),
    float(sum(runs[v] for v in vs)),
  )
  return ContextTerms(whole, *total(attention.gathered), *total(attention.scattered))


def context_space(space: SearchSpace, terms: ContextTerms, cp: int) -> SearchSpace:
  """`space` with the tensors held whole on the sequence `cp` times as big: priced as data
  parallelism over all the batch's devices, a device then holds them as CP does."""
  var_bytes = space.var_bytes * np.where(terms.whole, float(cp), 1.0)
  out_bytes = np.array([sum(var_bytes[v] for v in op.out_vars) for op in space.traced.ops])
  return dataclasses.replace(space, var_bytes=var_bytes, op_out_bytes=out_bytes)


def context_points(space: SearchSpace, devices: int) -> list[tuple[int, int]]:
  """(data, context) of each CP layout of `devices`: data divides the micro-batch, context > 1
  divides the sequence."""
  size = space.attention.size
  out = []
  for cp in range(2, devices + 1):
    if devices % cp == 0 and size % cp == 0 and space.batch_size % (devices // cp) == 0:
      out.append((devices // cp, cp))
  return out


def price_context(
  terms: ContextTerms, base: Candidate, agg: Aggregates, profile: DeviceProfile, cp: int
) -> Candidate:
  """`base`, the data-parallel candidate over all `base.data` devices of `context_space` (its
  sums `agg`), with the keys' and values' gathers and their cotangents' reduce-scatters over the
  context axis. Under FSDP each use's gradient is held to the weight's split (`emit.step`), so
  XLA adds a tied weight's partial sums before it reduces them, as under ZeRO-1."""
  dp = base.data
  data = dp // cp
  spans = inner_axis_spans(dp, cp, profile.devices_per_node)
  base_span = axis_spans(dp, 1, profile.devices_per_node)[DATA]
  tally = CommTally(profile, base.comm_time, base.comm_bytes)
  if base.storage == "fsdp":
    added_first = float(agg.red_data[1].sum() - agg.red_data_at_sinks[1].sum())
    tally.add("reduce-scatter", added_first, 0, dp, base_span, sign=-1.0)
  tally.add("all-gather", terms.gathered_bytes / data, terms.gathers, cp, spans[0])
  tally.add("reduce-scatter", terms.scattered_bytes / data, terms.scatters, cp, spans[0])
  # The keys' and values' gathers are read by the scores just after they are made, and their
  # gradients' reductions by the layer below: exposed.
  return tally.onto(
    base,
    strategy=strategy_label(dp, 1, base.storage, context=cp),
    cross_node_axes=tuple(a for a, span in ((DATA, spans[1]), (CONTEXT, spans[0])) if span[1] > 1),
    context=cp,
  )


def context_candidate_specs(
  space: SearchSpace, c: Candidate, twin_specs: tuple[list, list, list]
) -> tuple[list, list, list]:
  """PartitionSpecs of a CP candidate from its data-parallel twin's (`twin_specs`, over all
  the batch's devices): the state split over data and context where the twin splits it over
  data, and each batch leaf split on its batch over data and on its sequence over context."""
  token = (DATA, CONTEXT)
  widen = lambda spec: P(*(token if e == DATA else e for e in spec))  # noqa: E731
  params, opts, _ = twin_specs
  traced, sequence = space.traced, space.attention.sequence
  batch_specs = []
  for v in traced.batch_vars:
    entries = [None] * len(traced.var_shape[v])
    entries[0] = DATA
    d = next((d for d, cl in enumerate(traced.var_classes[v]) if d > 0 and cl in sequence), None)
    if d is not None and traced.var_shape[v][d] % c.context == 0:
      entries[d] = CONTEXT
    batch_specs.append(P(*entries))
  return [widen(s) for s in params], [widen(s) for s in opts], batch_specs
