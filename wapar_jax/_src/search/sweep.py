"""The search: every device count, mesh shape, model-split group set and state storage."""

from __future__ import annotations

import dataclasses
import functools
import math
import time

from wapar_jax._src.cost import roofline
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.search.aggregates import Aggregates, aggregate
from wapar_jax._src.search.candidate import (
  DEFAULT_MEMORY_HEADROOM,
  GATHERING,
  OBJECTIVES,
  STORAGES,
  STRATEGIES,
  Candidate,
  rank_key,
)
from wapar_jax._src.search.context import (
  CONTEXT_STORAGES,
  context_points,
  context_space,
  context_terms,
  price_context,
)
from wapar_jax._src.search.experts import (
  EXPERT_STORAGES,
  expert_degrees,
  expert_space,
  expert_terms,
  price_expert,
)
from wapar_jax._src.search.pricing import price
from wapar_jax._src.search.space import SearchSpace, group_sets
from wapar_jax.errors import IndivisibleBatchError, InvalidArgumentError

# What each strategy allows, as (data degree, model degree, storages): a degree is "one" (1),
# "many" (> 1) or "any"; a model degree above 1 needs a model-split group set.
_FAMILIES = {
  "dp": ("any", "one", frozenset({"replicated"})),
  "zero1": ("any", "one", frozenset({"zero1"})),
  "fsdp": ("any", "one", frozenset({"fsdp"})),
  "hsdp": ("any", "one", frozenset({"hsdp"})),
  "tp": ("one", "many", frozenset({"replicated"})),
  "dp_tp": ("many", "many", frozenset({"replicated"})),
}
# Remat policies that recompute only what an FSDP step gathers.
_FSDP_ONLY_REMAT = frozenset({"weights"})
_DEGREE = {"one": lambda n: n == 1, "many": lambda n: n > 1, "any": lambda n: True}


def _allowed(strategy: str, dp: int, tp: int, storage: str) -> bool:
  """Whether a (dp, tp, storage) point belongs to `strategy`; one device belongs to all. An
  "ep" search prices its data-parallel points only as the base of its EP candidates."""
  if strategy == "auto" or dp * tp == 1:
    return True
  if strategy not in _FAMILIES:
    return False
  data, model, storages = _FAMILIES[strategy]
  return _DEGREE[data](dp) and _DEGREE[model](tp) and storage in storages


# The WAP sweep: every count up to here, then multiples of 8 (a node of 8 GPUs) up to
# _MULTIPLES_OF_8_UP_TO, and powers of two and the offered count throughout.
_EVERY_COUNT_UP_TO = 64
_MULTIPLES_OF_8_UP_TO = 1024
# Above _MULTIPLES_OF_8_UP_TO only counts whose odd part is at most this are swept: 2^k times
# 1, 5/4, 3/2 or 7/4, four per doubling, each within 25% of the next. Why the optimum stays in
# the set in practice: a count is usable only as dp * tp with dp dividing the batch and tp a
# model dim, and batch sizes and model dims are powers of two times 3, 5 or 7 (768, 3072,
# 50304 = 2^7 * 3 * 131, batches of 96 * 2^k), so the counts they split into evenly are of this
# form; and at that scale the step time moves smoothly with the count (compute as 1/d,
# collective latency as log d), so a count left out is within 25% of a kept one.
_LARGEST_ODD_PART = 7


def in_sweep(d: int, max_devices: int, all_devices: bool) -> bool:
  """Whether the sweep considers `d` of `max_devices` devices (see _LARGEST_ODD_PART)."""
  if all_devices or d == max_devices:
    return d == max_devices
  if d > max_devices:
    return False
  odd = d >> ((d & -d).bit_length() - 1)
  return (
    d <= _EVERY_COUNT_UP_TO
    or (d <= _MULTIPLES_OF_8_UP_TO and d % 8 == 0)
    or odd <= _LARGEST_ODD_PART
  )


def divisors(n: int) -> list[int]:
  """Every divisor of n, ascending: trial division up to sqrt(n)."""
  small, large = [], []
  for k in range(1, math.isqrt(n) + 1):
    if n % k == 0:
      small.append(k)
      if k != n // k:
        large.append(n // k)
  return small + large[::-1]


def model_degrees(space: SearchSpace) -> list[int]:
  """1 and every model degree that splits at least one group the model axis can take."""
  degrees = {1}
  for g in space.groups:
    if g.index not in space.self_paired and g.param_bytes > 0:
      degrees.update(divisors(g.size))
  return sorted(degrees)


def sweep_points(space: SearchSpace, max_devices: int, all_devices: bool) -> list[tuple]:
  """(device count, its model degrees ascending) for each count of the sweep that splits as
  dp * tp, dp dividing the batch and tp a model degree; powers of two first, so that a search
  cut short by its deadline has the coarse curve.

  Built from divisors, never by scanning counts: the cost is (divisors of the batch) x (model
  degrees), whatever the device count.
  """
  by_count: dict[int, list[int]] = {}
  for dp in divisors(space.batch_size):
    for tp in model_degrees(space):
      if in_sweep(dp * tp, max_devices, all_devices):
        by_count.setdefault(dp * tp, []).append(tp)
  order = sorted(by_count, key=lambda d: (d & (d - 1) != 0, d))
  return [(d, sorted(by_count[d])) for d in order]


def sweep_size(space: SearchSpace, max_devices: int, all_devices: bool) -> int:
  """About how many candidates `search_until` prices: every point of the sweep times its
  model-split group sets and state storages."""
  sets = functools.cache(lambda tp: max(len(group_sets(space, tp)), 1))
  return sum(
    sets(tp) * (len(STORAGES) if d > tp else 1)
    for d, degrees in sweep_points(space, max_devices, all_devices)
    for tp in degrees
  )


@dataclasses.dataclass(frozen=True)
class Searched:
  """A search's candidates, ranked, and how much of the sweep it priced before its deadline."""

  ranked: list[Candidate]
  counts: int  # device counts of the sweep (`sweep_points`)
  counts_priced: int

  @property
  def cut_short(self) -> bool:
    return self.counts_priced < self.counts


def search(
  space: SearchSpace,
  profile: DeviceProfile,
  max_devices: int,
  *,
  strategy: str = "auto",
  objective: str = "time",
  memory_headroom: float = DEFAULT_MEMORY_HEADROOM,
  all_devices: bool = False,
  sequence_parallel: bool | None = False,
) -> list[Candidate]:
  """All candidates, fitting ones first, each part ordered by the objective (`search_until`
  with no deadline)."""
  return search_until(
    space,
    profile,
    max_devices,
    strategy=strategy,
    objective=objective,
    memory_headroom=memory_headroom,
    all_devices=all_devices,
    sequence_parallel=sequence_parallel,
  ).ranked


def sequence_choices(space: SearchSpace, tp: int, groups, wanted: bool | None) -> tuple:
  """Whether a (tp, groups) point is priced without and / or with sequence parallelism: with
  it only on a model axis that splits the sequence evenly and whose regions hold the attention
  scores (`SearchSpace.sequence_pairs`). `wanted` None searches both, False never SP, True only
  SP on a model axis: a point where it is not possible is not priced (a plan without a model
  axis still is)."""
  possible = (
    tp > 1
    and space.sequence_size % tp == 0
    and space.sequence_size > 0
    and bool(space.sequence_pairs[:, list(groups)].any(axis=1).all())
  )
  if wanted and tp > 1:
    return (True,) if possible else ()
  return (False, True) if possible and wanted is None else (False,)


def search_until(
  space: SearchSpace,
  profile: DeviceProfile,
  max_devices: int,
  *,
  strategy: str = "auto",
  objective: str = "time",
  memory_headroom: float = DEFAULT_MEMORY_HEADROOM,
  all_devices: bool = False,
  deadline: float | None = None,
  sequence_parallel: bool | None = False,
) -> Searched:
  """The candidates of every point of the sweep priced before `deadline` (a
  `time.perf_counter()` value; None: no limit), fitting ones first, each part ordered by the
  objective. Past the deadline the search stops at the next device count once a candidate
  fits; until one does it goes on. `sequence_parallel`: see `sequence_choices`.

  Evaluation is exact enumeration: each (dp, tp, storage) of a group set costs O(1) plus one
  max over the memory curves (`aggregate`), so thousands of candidates for a 7B model cost
  well under a second, and neither beam search nor an ILP is needed at this scale.
  """
  if strategy not in STRATEGIES:
    raise InvalidArgumentError(f"strategy must be one of {STRATEGIES}. Got {strategy!r}.")
  if objective not in OBJECTIVES:
    raise InvalidArgumentError(f"objective must be one of {OBJECTIVES}. Got {objective!r}.")
  if not 0 <= memory_headroom < 1:
    raise InvalidArgumentError(f"memory_headroom must be in [0, 1). Got {memory_headroom!r}.")
  if strategy == "cp" and not space.attention.gathered:
    raise InvalidArgumentError(
      "strategy 'cp' splits attention's queries over a context axis, and this step has none: "
      "no tensor holds a sequence dim of the batch twice (the scores [B, H, T, T] of q . k). "
      "Use another strategy. Got strategy='cp'."
    )
  if strategy == "ep" and not space.experts.classes:
    raise InvalidArgumentError(
      "strategy 'ep' splits the experts of mixture-of-experts layers, and this step has none: "
      "no dot_general batches a weight over a dim it shares with the batch's activations (the "
      "e of GShard's 'becd,edf->becf'). Use another strategy. Got strategy='ep'."
    )
  budget = profile.memory_bytes * (1 - memory_headroom)
  op_seconds = roofline.op_seconds(space.traced, space.costs, profile, space.traffic)
  aggregates: dict[tuple[tuple[int, ...], bool], Aggregates] = {}
  expert_spaces: dict[tuple[int, str], tuple[SearchSpace, Aggregates]] = {}
  sets_of = functools.cache(lambda tp: group_sets(space, tp))
  points = sweep_points(space, max_devices, all_devices)
  found = []
  priced = 0
  terms = expert_terms(space) if strategy in ("auto", "ep") else None
  for d, degrees in points:
    if deadline is not None and time.perf_counter() > deadline and any(c.fits for c in found):
      break
    priced += 1
    for tp in degrees:
      dp = d // tp
      for groups in sets_of(tp):
        if tp > 1 and not groups:
          continue
        for storage in STORAGES if dp > 1 else ("replicated",):
          if terms is not None and tp == 1 and storage in EXPERT_STORAGES:
            found += _expert_points(
              space, terms, expert_spaces, op_seconds, profile, dp, storage, budget
            )
          if not _allowed(strategy, dp, tp, storage):
            continue
          if space.remat in _FSDP_ONLY_REMAT and storage not in GATHERING:
            continue  # the same program as without remat: nothing is gathered
          for sp in sequence_choices(space, tp, groups, sequence_parallel):
            if (groups, sp) not in aggregates:
              aggregates[groups, sp] = aggregate(space, groups, op_seconds, sp)
            agg = aggregates[groups, sp]
            c = price(space, agg, profile, dp, tp, groups, storage, budget, sp)
            if c is not None:
              found.append(c)
  if strategy in ("auto", "cp"):
    found += _context_points(
      space, op_seconds, profile, max_devices, all_devices, budget, only_beyond=strategy == "auto"
    )
  if not found and strategy == "hsdp":
    raise InvalidArgumentError(
      f"no 'hsdp' plan exists for up to {max_devices} devices: hybrid sharding splits the state "
      "inside a node and replicates it across nodes, so its data axis must span at least two "
      f"nodes of {profile.devices_per_node} {profile.name} devices with two or more in each. "
      f"Offer more devices, or use strategy='fsdp'. Got devices={max_devices}, batch size "
      f"{space.batch_size}."
    )
  if not found:
    divisible = [d for d in divisors(space.batch_size) if d <= max_devices]
    raise IndivisibleBatchError(
      f"no {strategy!r} plan exists for up to {max_devices} devices: the batch size "
      f"{space.batch_size} splits only over {divisible} data-parallel devices, and no "
      "parameter dimension splits over the rest. Use a batch size divisible by the device "
      f"count, or another strategy. Got batch size {space.batch_size}."
    )
  # Ascending device counts first, as the points were once swept, so that ties keep their order.
  found.sort(key=lambda c: c.devices)
  return Searched(sorted(found, key=rank_key(objective)), len(points), priced)


def _expert_points(space, terms, spaces, op_seconds, profile, dp, storage, budget) -> list:
  """The EP candidates of a data-parallel point: one per expert degree (`search.experts`).
  `spaces`: per (degree, storage), the space with the expert weights 1/ep as big and its sums
  (the storage decides which of the weights and state are scaled, `expert_space`)."""
  if space.remat in _FSDP_ONLY_REMAT:
    return []
  found = []
  for ep in expert_degrees(space, dp):
    if (ep, storage) not in spaces:
      scaled = expert_space(space, terms, ep, storage)
      spaces[ep, storage] = scaled, aggregate(scaled, (), op_seconds, False)
    scaled, agg = spaces[ep, storage]
    base = price(scaled, agg, profile, dp, 1, (), storage, budget)
    found.append(price_expert(terms, base, profile, ep))
  return found


def _context_points(
  space, op_seconds, profile, max_devices, all_devices, budget, only_beyond: bool
) -> list:
  """The CP candidates of every device count of the sweep that splits as data x context, data
  dividing the micro-batch and context the sequence (`search.context`); with `only_beyond` (as
  "auto" searches) only where the micro-batch's rows do not split over them all: elsewhere the
  data-parallel twin on the same devices runs the same work with less communication and no
  more memory."""
  terms = context_terms(space)
  if terms is None or space.remat in _FSDP_ONLY_REMAT:
    return []
  counts = {
    data * cp
    for data in divisors(space.batch_size)
    for cp in divisors(space.attention.size)[1:]
    if in_sweep(data * cp, max_devices, all_devices)
    and (space.batch_size % (data * cp) or not only_beyond)
  }
  spaces: dict[int, tuple[SearchSpace, Aggregates]] = {}
  found = []
  for d in sorted(counts):
    for _, cp in context_points(space, d):
      if cp not in spaces:
        scaled = context_space(space, terms, cp)
        spaces[cp] = scaled, aggregate(scaled, (), op_seconds, False)
      scaled, agg = spaces[cp]
      for storage in sorted(CONTEXT_STORAGES):
        base = price(scaled, agg, profile, d, 1, (), storage, budget)
        if base is not None:
          found.append(price_context(terms, base, agg, profile, cp))
  return found


def batch_size_of(space: SearchSpace) -> int:
  """The global batch: the micro-batch size times the micro-batch count."""
  return space.batch_size * space.microbatches
