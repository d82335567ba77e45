"""One candidate priced: compute over the mesh, collectives per axis, memory per device."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from wapar_jax._src.cost.collectives import (
  COMBINE_BYTES,
  combined_launches,
  hierarchical_collective_steps,
  hierarchical_collective_traffic,
)
from wapar_jax._src.memory import liveness
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.search.aggregates import Aggregates, MemoryCurves, data_divisors
from wapar_jax._src.search.candidate import (
  DATA,
  GATHERING,
  MODEL,
  Candidate,
  step_seconds,
  strategy_label,
)
from wapar_jax._src.search.overlap import BATCH, FSDP_GATHERS, GRADIENTS, MODEL_REDUCTIONS
from wapar_jax._src.search.space import SearchSpace


def fsdp_shardable(space: SearchSpace, dp: int, groups: tuple[int, ...]) -> np.ndarray:
  """Per parameter: has a dim, not on the model axis, that splits dp ways; and is big enough."""
  in_groups = {c for g in groups for c in space.groups[g].classes}
  loop = space.traced.loop_classes
  ok = np.zeros(len(space.param_dims), dtype=bool)
  for i, dims in enumerate(space.param_dims):
    if space.param_bytes[i] < space.fsdp_min_bytes:
      continue
    ok[i] = any(size % dp == 0 and c not in in_groups and c not in loop for c, size in dims)
  return ok


def gathered_strided(
  space: SearchSpace, dp: int, groups: tuple[int, ...], shardable: np.ndarray, tp: int
) -> np.ndarray:
  """Per FSDP-sharded parameter: gathered along a dim with a non-trivial dim before it (in the
  per-device layout), which a compiler with `copies_strided_gathers` gathers transposed and
  copies back to row-major."""
  in_groups = {c for g in groups for c in space.groups[g].classes}
  loop = space.traced.loop_classes
  strided = np.zeros(len(space.param_dims), dtype=bool)
  for i in np.flatnonzero(shardable):
    dims = space.param_dims[i]
    d = fsdp_dim(dims, dp, [c in in_groups for c, _ in dims], loop)
    if d is not None:
      before = math.prod(size // tp if c in in_groups else size for c, size in dims[:d])
      strided[i] = before > 1
  return strided


def fsdp_dim(
  dims: Sequence[tuple[int, int]], dp: int, taken: Sequence[bool], loop_classes: frozenset[int]
) -> int | None:
  """The dim a parameter is split on along the data axis: the largest free one that divides."""
  best = None
  for d, (c, size) in enumerate(dims):
    if taken[d] or size % dp or c in loop_classes:
      continue
    if best is None or size > dims[best][1]:
      best = d
  return best


def _combined(nbytes: float) -> float:
  """Collectives left after XLA combines independent ones of `nbytes` in all."""
  return float(math.ceil(nbytes / COMBINE_BYTES)) if nbytes > 0 else 0.0


def _combined_as(nbytes: float, buffers: np.ndarray) -> float:
  """Collectives left after XLA combines `nbytes` sent as buffers in the proportions of
  `buffers` (each parameter's gradient or shard): merged up to the threshold, and one larger
  than it whole (`combined_launches`), as the compiled truth counts them."""
  total = float(buffers.sum())
  if nbytes <= 0 or total <= 0:
    return _combined(nbytes)
  return float(combined_launches(buffers * (nbytes / total)))


def _combined_gathers(nbytes: np.ndarray, runs: np.ndarray) -> float:
  """FSDP gathers left after XLA combines them: the gathers that run equally often (the step's
  own, or one loop body's per iteration) depend on no other collective, so they are combined up
  to the threshold, as the compiled truth pools them (`verify.collectives.target_comm_time`)."""
  return float(sum(r * combined_launches(nbytes[runs == r]) for r in np.unique(runs)))


def _live(space: SearchSpace, which: np.ndarray, nbytes: np.ndarray, until_made=False, lead=0.0):
  """Per program point, the per-device bytes of the gathered uses selected by `which`; each
  marked use's copy made `lead` bytes of earlier gathers ahead of it (a prefetch)."""
  made = space.traced.def_pos[space.gathered_var[which]]
  start = made
  if lead > 0 and made.size > 1:
    order = np.argsort(made, kind="stable")
    size = nbytes[which][order]
    before = np.cumsum(size) - size  # bytes gathered ahead of each use
    # The earliest use whose gathers up to this one fit in `lead`, and never the use itself.
    first = np.searchsorted(before, before - lead, side="left")
    first = np.minimum(first, np.maximum(np.arange(len(order)) - 1, 0))
    start = np.empty_like(made)
    start[order] = made[order][first]
    start = np.where(space.gathered_runs[which] > 0, start, made)
  return liveness.liveness_curves(
    start,
    made if until_made else space.traced.last_use[space.gathered_var[which]],
    nbytes[which],
    np.full(len(made), liveness.DATA_NONE),
    np.zeros(len(made), dtype=bool),
    len(space.traced.ops),
  )[liveness.DATA_NONE, 0]


def axis_spans(dp: int, tp: int, devices_per_node: int) -> dict[str, tuple[int, int]]:
  """Per mesh axis, (devices of it inside one node, nodes it spans).

  The layout is the one `emit.make_mesh` builds with `mesh_utils.create_hybrid_device_mesh`:
  the job spread evenly over the fewest nodes that hold it, the model axis filling a node first
  and the data axis taking what is left, then spanning nodes. So tensor parallelism crosses
  nodes only when it is wider than a node or does not divide it, and a data axis of dp over k
  nodes is dp / k devices per node times k nodes. A job that cannot be spread evenly is priced
  as flat rings on the slow link: its slowest group is one that crosses.
  """
  d = dp * tp
  nodes = -(-d // devices_per_node)
  if nodes == 1:
    return {DATA: (dp, 1), MODEL: (tp, 1)}
  if d % nodes == 0:
    per_node = d // nodes
    model_inner = math.gcd(tp, per_node)
    data_inner = math.gcd(dp, per_node // model_inner)
    if model_inner * data_inner == per_node:
      return {DATA: (data_inner, dp // data_inner), MODEL: (model_inner, tp // model_inner)}
  return {DATA: (1, dp), MODEL: (1, tp)}


def _ring_cost(profile: DeviceProfile, kind: str, nbytes: float, count: float, span):
  """(latency seconds, transfer seconds, bytes sent) of `count` collectives of `kind` moving
  `nbytes` per device in all over `span` (devices in a node, nodes): two-level (reduce-scatter
  in the node, across nodes on 1 / n_inner, all-gather in the node) once it spans nodes, a
  plain ring on the fast link while it stays in one."""
  inner, outer = profile.intra_node, profile.inter_node
  steps_in, steps_out = hierarchical_collective_steps(kind, *span)
  bytes_in, bytes_out = hierarchical_collective_traffic(kind, nbytes, *span)
  latency = (steps_in * inner.latency + steps_out * outer.latency) * count
  return latency, bytes_in / inner.bandwidth + bytes_out / outer.bandwidth, bytes_in + bytes_out


class CommTally:
  """A candidate's communication time and bytes sent, as a family's own collectives are added
  to (or moved out of) its twin's: each priced as a ring, two-level where it spans nodes."""

  def __init__(self, profile: DeviceProfile, time: float, sent: float):
    self.profile, self.time, self.sent = profile, time, sent

  def add(self, kind: str, nbytes: float, count: float, n: int, span, sign: float = 1.0):
    """`count` collectives of `kind` over `n` devices laid out as `span` (devices in a node,
    nodes) moving `nbytes` per device in all; `sign` -1 takes their bytes away."""
    if n <= 1 or nbytes <= 0:
      return
    latency, transfer, sent = _ring_cost(self.profile, kind, nbytes, count, span)
    self.time += sign * transfer
    self.time += latency
    self.sent += sign * sent

  def onto(self, base: Candidate, **changes) -> Candidate:
    """`base` with this communication (and `changes`): what base hides stays hidden, what the
    family added is exposed."""
    exposed = max(self.time - (base.comm_time - base.exposed_comm), 0.0)
    step_time = step_seconds(base.compute_time, self.time, exposed)
    return dataclasses.replace(
      base,
      step_time=step_time,
      comm_time=self.time,
      exposed_comm_time=exposed,
      comm_bytes=self.sent,
      energy=self.profile.step_energy(base.devices, step_time, base.compute_time),
      **changes,
    )


def inner_axis_spans(dp: int, k: int, devices_per_node: int):
  """((devices inside one node, nodes spanned) of the inner `k` devices of a dp-way batch split
  (an expert or context axis), the same of the data axis's rest), in `axis_spans`'s layout:
  inside a node first."""
  inner, nodes = axis_spans(dp, 1, devices_per_node)[DATA]
  k_in = math.gcd(k, inner)
  if k_in in (k, inner):
    return (k_in, k // k_in), (inner // k_in, nodes * k_in // k)
  return (1, k), (1, dp // k)


def price(
  space: SearchSpace,
  agg: Aggregates,
  profile: DeviceProfile,
  dp: int,
  tp: int,
  groups: tuple[int, ...],
  storage: str,
  budget: float,
  sequence_parallel: bool = False,
) -> Candidate | None:
  """The candidate's predicted time, traffic, energy and per-device memory, and whether it fits
  `budget` under every rule set of the space (the target compiler's, and any bounding it).

  Hybrid sharding ("hsdp") splits the state over the data axis's devices inside a node (the
  fsdp axis) and replicates it across nodes: None where the data axis does not span nodes with
  more than one device in each (it would be plain FSDP or data parallelism).

  `sequence_parallel` (`agg` aggregated with it): each all-reduce over the model axis becomes
  a reduce-scatter leaving the tensor-parallel region, each sequence-split activation a region
  reads is all-gathered once (three partial sums leave a layer's q / k / v projections, one
  input enters them), and the weight gradients summed over the split tokens outside the
  regions are all-reduced over the model axis.
  """
  d = dp * tp
  sharded_state = storage != "replicated"
  spans = axis_spans(dp, tp, profile.devices_per_node)
  data_span, model_span = spans[DATA], spans[MODEL]
  fsdp = 1
  state_span = data_span  # the devices the state is split over, and the nodes they span
  if storage == "hsdp":
    fsdp, nodes = data_span
    if fsdp == 1 or nodes == 1:
      return None
    state_span = (fsdp, 1)
  split = fsdp if storage == "hsdp" else dp  # how many ways sharded state is split
  data_div = data_divisors(dp, storage, fsdp)
  div = np.array(data_div, dtype=float)[:, None] * np.array([1.0, tp])[None, :]
  compute_time = float((agg.compute / div).sum()) + profile.step_overhead
  flops = float((agg.flops / div).sum())

  model_scale = np.array([1.0, 1.0 / tp])
  data_scale = np.array([1.0, 1.0 / dp])

  comm_time = 0.0
  comm_bytes = 0.0

  hideable: dict[str, float] = {}  # seconds per class of collective that can overlap

  def add(kind, nbytes, count, n, span, hides=None):
    nonlocal comm_time, comm_bytes
    if n <= 1 or count <= 0:
      return
    latency, transfer, sent = _ring_cost(profile, kind, nbytes, count, span)
    seconds = latency + transfer
    comm_time += seconds
    comm_bytes += sent
    if hides is not None:
      hideable[hides] = hideable.get(hides, 0.0) + seconds

  # Partial sums over the data axis: weight gradients (reduce-scattered when state is sharded).
  # Reducing into a split gradient of a weight used unconstrained (ZeRO-1), XLA first adds its
  # partial sums (a tied embedding's lookup and output projection) and reduce-scatters the sum;
  # into a replicated one, or from uses constrained to the gathered layout (FSDP), it reduces
  # each partial as it is made (both measured on tied GPT-2).
  weight_kind = "reduce-scatter" if sharded_state else "all-reduce"
  partials = agg.red_data_at_sinks if storage == "zero1" else agg.red_data
  grad_bytes = float(partials[1] @ model_scale)
  param_div = np.where(agg.param_model, tp, 1).astype(float)
  per_param = space.param_bytes / param_div
  grad_count = _combined_as(grad_bytes, per_param) + agg.loop_iterations
  if storage == "hsdp":
    # Into a gradient split over fsdp and replicated over data, XLA all-reduces over both axes
    # and slices (compiled: gpt2-small on 2 x 8 devices), not a reduce-scatter in the node and
    # an all-reduce of the shards across nodes.
    # So it reduces each partial sum of a weight as it is made, as into a replicated one.
    add("all-reduce", float(agg.red_data[1] @ model_scale), grad_count, dp, data_span, GRADIENTS)
  else:
    add(weight_kind, grad_bytes, grad_count, dp, data_span, GRADIENTS)
  # Other partial sums over the batch (the loss, norms): independent ones go out as one tuple
  # all-reduce; dependent ones (batch-norm statistics, layer after layer) one round after
  # another.
  other_bytes = float(agg.red_data[0] @ model_scale)
  other_count = _combined(other_bytes) + max(space.batch_reduce_rounds - 1, 0)
  add("all-reduce", other_bytes, other_count + agg.loop_iterations, dp, data_span, BATCH)
  add(
    "reduce-scatter" if sequence_parallel else "all-reduce",
    float(data_scale @ agg.red_model @ model_scale),
    float(agg.red_model_n.sum()),
    tp,
    model_span,
    MODEL_REDUCTIONS,
  )
  # Sequence parallelism: each activation (or cotangent) entering a region, gathered once.
  add("all-gather", agg.sequence_gathers / dp, agg.sequence_gathers_n, tp, model_span)
  add("all-to-all", agg.sequence_reshards / dp / tp, agg.sequence_reshards_n, tp, model_span)
  # Weight gradients summed over the split tokens: independent, combined as the data axis's.
  partials_n = _combined(agg.sequence_partials) + agg.sequence_partials_n
  add("all-reduce", agg.sequence_partials, partials_n, tp, model_span)
  add(
    "all-gather",
    float(agg.gather_data @ model_scale),
    float(agg.gather_data_n.sum()),
    dp,
    data_span,
  )
  add(
    "all-gather",
    float(agg.gather_model @ data_scale),
    float(agg.gather_model_n.sum()),
    tp,
    model_span,
  )

  opt_div = np.where(agg.opt_model, tp, 1).astype(float)
  shardable = fsdp_shardable(space, split, groups) if split > 1 else np.zeros(len(param_div), bool)
  # FSDP's gathered parameters per program point, by the compiler's prefetch distance.
  gathered_live: dict[float, np.ndarray] = {}
  relayout: np.ndarray | float = 0.0
  zero1_gathered = 0.0
  if storage in GATHERING:
    # Each use of a split parameter gathers it there, a layer's slice inside a loop over
    # layers, and the copy lives until its last read: the layer itself, or the backward pass
    # where the forward pass's copy is kept (no remat). Big parameters that do not split dp
    # ways are in param_mem instead, and their uses alias them.
    split_uses = shardable[space.gathered_param]
    runs = space.gathered_runs
    nbytes = space.var_bytes[space.gathered_var] / np.where(agg.gathered_model, tp, 1)
    marked = split_uses & (runs > 0)
    add(
      "all-gather",
      float((nbytes * runs)[marked].sum()),
      _combined_gathers(nbytes[marked], runs[marked]),
      split,
      state_span,
      FSDP_GATHERS,
    )
    param_mem = float((per_param / np.where(shardable, split, 1)).sum())
    held = split_uses & (runs >= 0)
    gathered_live = {
      lead: _live(space, held, nbytes, lead=lead)
      for lead in {b.rules.prefetched_gather_bytes for b in space.buffers}
    }
    if any(b.rules.copies_strided_gathers for b in space.buffers):
      # Such a compiler gathers a parameter split along a minor dim in a transposed layout and
      # copies it back to row-major: both buffers are live where it gathers.
      strided = gathered_strided(space, split, groups, shardable, tp)[space.gathered_param]
      relayout = _live(space, marked & strided, nbytes, until_made=True)
  else:
    param_mem = float(per_param.sum())
    if storage == "zero1":  # updated parameters are all-gathered from their shards
      shards = per_param[shardable]
      zero1_gathered = float(shards.sum())  # into a new buffer
      add("all-gather", zero1_gathered, _combined_as(zero1_gathered, shards), dp, data_span)
  opt_shard = np.where(
    space.opt_weight & (space.opt_bytes >= space.fsdp_min_bytes) & sharded_state, split, 1
  )
  opt_mem = float((space.opt_bytes / opt_div / opt_shard).sum())

  # Collective buffers the liveness scan does not see, where gradients are all-reduced at full
  # size and combined in buckets (`CompilerRules.combine_count`): each bucket reads full-size
  # partial sums and writes a new full-size result, both live where it reduces. Replicated,
  # the liveness scan holds one of the two, partial sum then result; sharded, it holds the 1/dp
  # slice, so the full-size gradient counts while it lives too.
  def temporaries(m: MemoryCurves, rules) -> float:
    grad_shadow: np.ndarray | float = 0.0
    if dp > 1 and m.grad_curves is not None:
      grad_shadow = liveness.per_device(m.combine_curves, (1, 1, 1), tp)
      if sharded_state:
        grad_shadow = grad_shadow + liveness.per_device(m.grad_curves, (1, 1, 1), tp)
    extra = grad_shadow + gathered_live.get(rules.prefetched_gather_bytes, 0.0)
    extra = extra + (relayout if rules.copies_strided_gathers else 0.0)
    temps = liveness.peak_bytes(m.curves, data_div, tp, extra=extra)
    if storage == "zero1":
      # ZeRO-1 gathers the updated parameters after the update, once the gradient reduction's
      # buffers are freed: the two never coexist.
      return max(temps, liveness.bytes_at(m.curves, m.update_pos, data_div, tp) + zero1_gathered)
    return temps

  state = param_mem + opt_mem + space.batch_bytes / dp + space.model_state_bytes
  peak = state + max(temporaries(m, b.rules) for m, b in zip(agg.memory, space.buffers))

  exposed_comm = comm_time - sum(hideable.values())
  if agg.windows is not None:
    exposed_comm += agg.windows.exposed(hideable, 1.0 / div, profile.overlap_efficiency)
  else:
    exposed_comm = comm_time
  step_time = step_seconds(compute_time, comm_time, exposed_comm)
  energy = profile.step_energy(d, step_time, compute_time)
  return Candidate(
    devices=d,
    data=dp,
    model=tp,
    model_groups=tuple(groups),
    storage=storage,
    strategy=strategy_label(dp, tp, storage, sequence_parallel=sequence_parallel),
    step_time=step_time,
    compute_time=compute_time,
    comm_time=comm_time,
    exposed_comm_time=exposed_comm,
    flops=flops,
    comm_bytes=comm_bytes,
    peak_memory=peak,
    energy=energy,
    fits=peak <= budget,
    param_memory=param_mem,
    opt_state_memory=opt_mem,
    activation_memory=peak - param_mem - opt_mem,
    remat=space.remat,
    microbatches=space.microbatches,
    cross_node_axes=tuple(a for a in (DATA, MODEL) if spans[a][1] > 1),
    fsdp=fsdp,
    sequence_parallel=sequence_parallel,
  )
