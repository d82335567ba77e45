"""Expert parallelism (EP) priced and laid out, from the experts classes (`trace.experts`).

As GShard and MaxText do, the expert axis reuses devices that split the batch: the tokens stay
split over all dp data-parallel devices, and `expert` of them (the mesh's expert axis, inside
the data axis) split the experts of every MoE layer. An EP candidate is its data-parallel (or
ZeRO-1) twin with only the terms the experts class touches priced again, since everything else
runs as it does there:

- the expert weights, their gradients and updates take 1/expert of the memory (priced as the
  data-parallel candidate of a space whose expert weights are that small, `expert_space`), and
  the gradients are reduced over the data axis's other dp / expert devices only (none when
  expert = dp);
- the expert-side activations (`expert_in [B, E, C, D]`, the hidden, the output) are split on E
  instead of B: the same bytes per device and the same work, but each switch between the token
  side and the expert side is an all-to-all over the expert axis of that tensor's per-device
  bytes, 4 per layer and step (dispatch and combine, forward and backward; compiled on a
  2-layer MoE: exactly these, plus XLA:CPU's gather of the router's top-k input).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax.sharding import PartitionSpec as P

from wapar_jax._src.cost.collectives import (
  COMBINE_BYTES,
)
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.search.candidate import DATA, EXPERT, Candidate, strategy_label
from wapar_jax._src.search.pricing import CommTally, axis_spans, fsdp_dim, inner_axis_spans
from wapar_jax._src.search.space import SearchSpace
from wapar_jax._src.trace.experts import expert_side

# Storages an EP candidate takes: ZeRO-1 and FSDP split the other weights' state (and, FSDP,
# the weights) over all the batch's devices and the experts' over the data axis's rest; hybrid
# sharding would need a third axis of the batch's devices.
EXPERT_STORAGES = frozenset({"replicated", "zero1", "fsdp"})


@dataclasses.dataclass(frozen=True)
class ExpertTerms:
  """What expert parallelism changes, found once per search space."""

  weight: np.ndarray  # [V] bool: weight-shaped with an experts dim (weights, gradients, state)
  param_bytes: float  # of the expert weights
  grad_bytes: float  # their gradients' reductions over the batch, per step (unsharded)
  grad_bytes_at_sinks: float  # the same, each chain of partial sums counted once
  gathered_bytes: float  # FSDP's gathers of the expert weights at their uses, per step
  switch_bytes: float  # the all-to-alls' tensors per step (unsharded)
  switches: float  # all-to-alls per step


def expert_terms(space: SearchSpace) -> ExpertTerms | None:
  """The space's `ExpertTerms`; None without a MoE layer."""
  experts = space.experts
  if not experts.classes:
    return None
  traced = space.traced
  has = np.array([bool(set(cls) & experts.classes) for cls in traced.var_classes])
  weight = has & space.var_weight
  out = space.op_out_var
  weighted = space.costs.multiplicity * space.op_out_bytes
  grads = (out >= 0) & weight[np.maximum(out, 0)]
  side = np.array(expert_side(traced, experts))
  token = space.var_batch & ~side
  runs: dict[int, float] = {}  # expert-side tensor crossing to or from the token side -> runs
  for op in traced.ops:
    ins = [v for v in op.in_vars if v >= 0]
    mult = float(space.costs.multiplicity[op.index])
    if any(token[v] for v in ins):
      runs.update((v, mult) for v in op.out_vars if side[v])
    if any(token[v] for v in op.out_vars):
      runs.update((v, mult) for v in ins if side[v])
  runs_of = np.maximum(space.gathered_runs, 0)
  gathered = weight[space.gathered_var] * space.var_bytes[space.gathered_var] * runs_of
  switched = np.fromiter(runs, dtype=np.int64, count=len(runs))
  times = np.fromiter(runs.values(), dtype=float, count=len(runs))
  return ExpertTerms(
    weight=weight,
    param_bytes=float(
      space.var_bytes[list(traced.param_vars)][weight[list(traced.param_vars)]].sum()
    ),
    grad_bytes=float(weighted[space.red_batch & grads].sum()),
    grad_bytes_at_sinks=float(weighted[space.red_batch_sink & grads].sum()),
    gathered_bytes=float(gathered.sum()),
    switch_bytes=float((space.var_bytes[switched] * times).sum()),
    switches=float(times.sum()),
  )


def expert_space(space: SearchSpace, terms: ExpertTerms, ep: int, storage: str) -> SearchSpace:
  """`space` with every expert weight, gradient and update 1/ep as big, as each device holds
  them (FSDP: as it gathers them), and their stored weights and optimizer state too where
  ZeRO-1 / FSDP does not split those over all the batch's devices already: priced as data
  parallelism, its memory follows every buffer rule of the compiler."""
  traced = space.traced
  scale = np.where(terms.weight, 1.0 / ep, 1.0)
  var_bytes = space.var_bytes * scale
  out_bytes = np.array([sum(var_bytes[v] for v in op.out_vars) for op in traced.ops])
  opt_scale = scale[list(traced.opt_state_vars)] if storage == "replicated" else 1.0
  param_scale = scale[list(traced.param_vars)] if storage != "fsdp" else 1.0
  return dataclasses.replace(
    space,
    var_bytes=var_bytes,
    op_out_bytes=out_bytes,
    param_bytes=space.param_bytes * param_scale,
    opt_bytes=space.opt_bytes * opt_scale,
  )


def expert_degrees(space: SearchSpace, dp: int) -> list[int]:
  """The expert degrees > 1 of a dp-way data axis: divisors of both dp and the experts."""
  n = math.gcd(dp, space.experts.size)
  return [k for k in range(2, n + 1) if n % k == 0]


def expert_spans(dp: int, ep: int, devices_per_node: int) -> dict[str, tuple[int, int]]:
  """(devices inside one node, nodes spanned) of the data and expert axes of a dp-way batch
  split whose inner `ep` devices are the expert axis."""
  experts, data = inner_axis_spans(dp, ep, devices_per_node)
  return {EXPERT: experts, DATA: data}


def price_expert(terms: ExpertTerms, base: Candidate, profile: DeviceProfile, ep: int) -> Candidate:
  """`base`, the data-parallel candidate (tp = 1, replicated, ZeRO-1 or FSDP) of `expert_space`,
  with the experts' gradient reductions and gathers moved onto the data axis and the
  all-to-alls added on the expert axis."""
  dp = base.data
  rest = dp // ep
  spans = expert_spans(dp, ep, profile.devices_per_node)
  base_span = axis_spans(dp, 1, profile.devices_per_node)[DATA]
  tally = CommTally(profile, base.comm_time, base.comm_bytes)
  collective = tally.add

  zero1 = base.storage == "zero1"
  kind = "all-reduce" if base.storage == "replicated" else "reduce-scatter"
  grads = (terms.grad_bytes_at_sinks if zero1 else terms.grad_bytes) / ep
  # The experts' gradients leave the base's combined reduction over all dp devices (bytes
  # only: it still runs for the other weights) for one of their own over the data axis.
  collective(kind, grads, 0, dp, base_span, sign=-1.0)
  collective(kind, grads, math.ceil(grads / COMBINE_BYTES), rest, spans[DATA])
  if zero1:  # the updated expert weights are gathered over the data axis only
    shard = terms.param_bytes / ep
    collective("all-gather", shard, 0, dp, base_span, sign=-1.0)
    collective("all-gather", shard, math.ceil(shard / COMBINE_BYTES), rest, spans[DATA])
  if base.storage == "fsdp":  # each use gathers the device's experts over the data axis only
    collective("all-gather", terms.gathered_bytes / ep, 0, dp, base_span, sign=-1.0)
    collective("all-gather", terms.gathered_bytes / ep, 0, rest, spans[DATA])
  collective("all-to-all", terms.switch_bytes / dp, terms.switches, ep, spans[EXPERT])
  # The reductions moved onto the data axis keep base's windows; the all-to-alls sit between
  # the router and the experts, on the critical path.
  return tally.onto(
    base,
    strategy=strategy_label(dp, 1, base.storage, expert=ep),
    cross_node_axes=tuple(a for a in (DATA, EXPERT) if spans[a][1] > 1),
    expert=ep,
  )


def expert_candidate_specs(space: SearchSpace, c: Candidate) -> tuple[list, list, list]:
  """PartitionSpecs of an EP candidate's params, their optimizer state and the batch: each
  expert weight split on its experts dim over the expert axis; under ZeRO-1 the state of the
  other weights split over the batch's devices (data and expert), the experts' over the data
  axis's rest; under FSDP the weights themselves too."""
  ep, rest = c.expert, c.data // c.expert
  token = (DATA, EXPERT)
  experts, loop = space.experts.classes, space.traced.loop_classes
  param_specs, opt_specs = [], []
  for i, dims in enumerate(space.param_dims):
    entries = [None] * len(dims)
    d = next((d for d, (cl, n) in enumerate(dims) if cl in experts and n % ep == 0), None)
    if d is not None:
      entries[d] = EXPERT
    stored = list(entries)
    if c.storage != "replicated" and space.param_bytes[i] >= space.fsdp_min_bytes:
      split, axis = (rest, DATA) if d is not None else (c.data, token)
      if split > 1:
        k = fsdp_dim(dims, split, [e is not None for e in entries], loop)
        if k is not None:
          stored[k] = axis
    param_specs.append(P(*stored) if c.storage == "fsdp" else P(*entries))
    opt_specs.append(P(*stored))
  batch_specs = []
  for v in space.traced.batch_vars:
    entries = [None] * len(space.traced.var_shape[v])
    entries[0] = token
    batch_specs.append(P(*entries))
  return param_specs, opt_specs, batch_specs
