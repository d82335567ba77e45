"""The search: every device count, mesh shape, model-split group set and state storage."""

from __future__ import annotations

import math

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
  """Whether a (dp, tp, storage) point belongs to `strategy`; one device belongs to all."""
  if strategy == "auto" or dp * tp == 1:
    return True
  data, model, storages = _FAMILIES[strategy]
  return _DEGREE[data](dp) and _DEGREE[model](tp) and storage in storages


def device_counts(max_devices: int, all_devices: bool) -> list[int]:
  """Every count up to 64 (as WAP swept), then multiples of 8 and powers of two."""
  if all_devices:
    return [max_devices]
  counts = set(range(1, min(max_devices, 64) + 1))
  counts.update(d for d in range(8, max_devices + 1, 8))
  counts.update(2**k for k in range(int(math.log2(max_devices)) + 1))
  counts.add(max_devices)
  return sorted(counts)


def search(
  space: SearchSpace,
  profile: DeviceProfile,
  max_devices: int,
  *,
  strategy: str = "auto",
  objective: str = "time",
  memory_headroom: float = DEFAULT_MEMORY_HEADROOM,
  all_devices: bool = False,
) -> list[Candidate]:
  """All candidates, fitting ones first, each part ordered by the objective.

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
  budget = profile.memory_bytes * (1 - memory_headroom)
  op_seconds = roofline.op_seconds(space.traced, space.costs, profile, space.fusible)
  aggregates: dict[tuple[int, ...], Aggregates] = {}
  found = []
  for d in device_counts(max_devices, all_devices):
    for tp in (t for t in range(1, d + 1) if d % t == 0):
      dp = d // tp
      if space.batch_size % dp:
        continue
      for groups in group_sets(space, tp):
        if tp > 1 and not groups:
          continue
        for storage in STORAGES if dp > 1 else ("replicated",):
          if not _allowed(strategy, dp, tp, storage):
            continue
          if space.remat in _FSDP_ONLY_REMAT and storage not in GATHERING:
            continue  # the same program as without remat: nothing is gathered
          if groups not in aggregates:
            aggregates[groups] = aggregate(space, groups, op_seconds)
          c = price(space, aggregates[groups], profile, dp, tp, groups, storage, budget)
          if c is not None:
            found.append(c)
  if not found and strategy == "hsdp":
    raise InvalidArgumentError(
      f"no 'hsdp' plan exists for up to {max_devices} devices: hybrid sharding splits the state "
      "inside a node and replicates it across nodes, so its data axis must span at least two "
      f"nodes of {profile.devices_per_node} {profile.name} devices with two or more in each. "
      f"Offer more devices, or use strategy='fsdp'. Got devices={max_devices}, batch size "
      f"{space.batch_size}."
    )
  if not found:
    divisible = [d for d in range(1, max_devices + 1) if space.batch_size % d == 0]
    raise IndivisibleBatchError(
      f"no {strategy!r} plan exists for up to {max_devices} devices: the batch size "
      f"{space.batch_size} splits only over {divisible} data-parallel devices, and no "
      "parameter dimension splits over the rest. Use a batch size divisible by the device "
      f"count, or another strategy. Got batch size {space.batch_size}."
    )
  return sorted(found, key=rank_key(objective))


def batch_size_of(space: SearchSpace) -> int:
  """The global batch: the micro-batch size times the micro-batch count."""
  return space.batch_size * space.microbatches
