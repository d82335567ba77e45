"""The memory levers (per-layer remat, gradient accumulation) and what to say when memory decides.

The plain step is searched first; the levers only add work, so they are searched only when
memory ruled out the fastest plain candidate, cheapest lever first, until one fits close to the
unconstrained optimum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from wapar_jax._src.fmt import human_bytes, human_seconds
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.search import Candidate, SearchSpace, rank_value

# Memory levers tried in order of their usual cost: gathering FSDP weights again in the backward
# pass (only collectives), accumulation (no extra FLOPs), remat keeping matmul outputs, then full
# per-layer remat, then both.
_VARIANT_ORDER = (
  ("weights", 1),
  ("none", 2),
  ("layers_dots", 1),
  ("none", 4),
  ("layers", 1),
  ("none", 8),
  ("layers_dots", 2),
  ("layers", 2),
  ("layers", 4),
  ("layers", 8),
  ("none", 16),
  ("layers", 16),
)


def memory_variants(ranked, remat, microbatches, objective, layers_exist, batch_size):
  """Remat / accumulation variants worth searching after the plain one.

  None when the user fixed both, or when the plain search's fastest candidate fits: the levers
  only add work, so they can win only where memory ruled that candidate out.
  """
  if remat is not None and microbatches is not None:
    return
  if not ranked:
    return
  value = rank_value(objective)
  unconstrained = min(ranked, key=value)
  if unconstrained.fits:
    return
  has_layers_cache = []
  for choice, k in _VARIANT_ORDER:
    if remat is not None and choice != remat or microbatches is not None and k != microbatches:
      continue
    if batch_size % k:
      continue
    if choice != "none":
      if not has_layers_cache:
        has_layers_cache.append(layers_exist())
      if not has_layers_cache[0]:
        continue
    yield choice, k


# Rematerialisation policies whose activations are no larger than each policy's: per-layer remat
# keeps only each layer's input, and recomputes its gathers too, so it bounds every policy.
_ACTIVATION_FLOORS = {
  "none": ("none", "layers"),
  "weights": ("layers",),
  "layers_dots": ("layers",),
  "layers": ("layers",),
}


def cannot_fit(variant, searched: Mapping[tuple[str, int], Sequence[Candidate]], budget) -> bool:
  """Whether a variant not yet traced is sure to have no fitting candidate, from one searched
  already: its activations are at least those of a policy that keeps no more (`_ACTIVATION_FLOORS`)
  with k' micro-batches, times k' / k (accumulation divides what scales with the batch and adds
  an accumulator), while parameters and optimizer state do not change; and its candidates are a
  subset of that variant's (the micro-batch must still divide by the data degree)."""
  remat, k = variant
  for (floor, k_floor), ranked in searched.items():
    if floor not in _ACTIVATION_FLOORS[remat] or k % k_floor or not ranked:
      continue
    lowest = min(
      c.param_memory + c.opt_state_memory + c.activation_memory * k_floor / k for c in ranked
    )
    if lowest > budget:
      return True
  return False


def speed_variants(traced, remat, microbatches, searched):
  """Per-layer remat searched for speed, not memory: a scan over layers copies every residual it
  keeps for the backward pass into a stack and out again (`TracedStep.loop_copies`), which can
  cost more than recomputing the layer (compiled gpt2-small with nn.scan on 8 devices: 48.7 ms
  rematerialised against 61.7 ms)."""
  if remat is not None or not traced.loop_copies:
    return
  k = microbatches or 1
  if ("layers", k) not in searched:
    yield "layers", k


# Once some variant fits, this many more (the next cheapest levers) are searched, then stop.
_VARIANTS_AFTER_FIRST_FIT = 2


def enough_variants(results, objective) -> bool:
  """Stop when a fit is within 5% of the unconstrained optimum, or a few levers after a fit."""
  value = rank_value(objective)
  everything = [c for r in results.values() for c in r[3]]
  fitting = [value(c) for c in everything if c.fits]
  if not fitting:
    return False
  if min(fitting) <= 1.05 * min(value(c) for c in everything):
    return True
  order = list(results)
  first_fit = next(i for i, v in enumerate(order) if any(c.fits for c in results[v][3]))
  return len(order) - 1 - first_fit >= _VARIANTS_AFTER_FIRST_FIT


def memory_decision(ranked, best: Candidate, objective: str) -> str:
  """Which memory term ruled out faster plans, in a sentence; empty when none did."""
  value = rank_value(objective)
  faster = [c for c in ranked if not c.fits and value(c) < value(best)]
  if not faster:
    return ""
  top = min(faster, key=value)
  terms = {
    "parameters": top.param_memory,
    "optimizer state": top.opt_state_memory,
    "activations and temporaries": top.activation_memory,
  }
  term = max(terms, key=terms.get)
  levers = []
  if best.remat != "none":
    levers.append(f"per-layer remat ({best.remat})")
  if best.microbatches > 1:
    levers.append(f"{best.microbatches} gradient-accumulation micro-batches")
  if best.storage != "replicated":
    levers.append(f"{best.storage} state sharding")
  return (
    f"memory decided this plan: the fastest option, {top.strategy} on {top.mesh_shape}"
    f" (remat {top.remat}, {top.microbatches} micro-batch(es)), needs "
    f"{human_bytes(top.peak_memory)} per device, mostly {term} "
    f"({human_bytes(terms[term])}); the chosen plan fits with "
    f"{', '.join(levers) or 'a different mesh'} at {human_seconds(best.step_time)} "
    f"instead of {human_seconds(top.step_time)}."
  )


def no_fit_message(
  space: SearchSpace,
  closest: Candidate,
  budget: float,
  profile: DeviceProfile,
  param_paths: Sequence[str] = (),
) -> str:
  traced = space.traced
  largest = sorted(range(len(traced.param_vars)), key=lambda i: -space.param_bytes[i])[:5]
  paths = list(param_paths) or [f"param {i}" for i in range(len(traced.param_vars))]
  tensors = ", ".join(
    f"{paths[i]} {list(traced.var_shape[traced.param_vars[i]])} "
    f"({human_bytes(space.param_bytes[i])})"
    for i in largest
  )
  total = float(space.param_bytes.sum() + space.opt_bytes.sum())
  need = math.ceil(total / budget) if budget > 0 else 0
  # Every count up to the closest one's was searched and none fit: more are needed than that.
  need = max(need, closest.devices + 1)
  return (
    f"no plan fits {human_bytes(budget)} per {profile.name} device. Closest: "
    f"{closest.strategy} on mesh {closest.mesh_shape} needs "
    f"{human_bytes(closest.peak_memory)} per device. Parameters and optimizer state "
    f"alone are {human_bytes(total)}, so the smallest device count that could fit is "
    f"{need} (fully sharded; activations may need more). Largest parameters: {tensors}. "
    f"Offer at least {need} devices, a device with more "
    "memory, a smaller batch, or lower memory_headroom."
  )
