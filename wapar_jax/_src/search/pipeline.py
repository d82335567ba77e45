"""Pipeline candidates: a priced data / tensor plan of the whole step, its layers cut into stages.

A pipeline step is two programs (`emit.pipeline`): the layer stack, each stage running its chunk
for every micro-batch, and the rest of the loss (embedding, head, loss), data-parallel over the
data and stage axes together. Both are priced from candidates the search already has:

- the whole step on the inner mesh (data x model), with per-layer remat as a pipeline stage
  rematerialises its chunk: `base`;
- the step of the loss without its layers (each layer passes its input on) on the same mesh,
  `rest_here`, and on the data x stage devices, `rest_wide`.

The stack's share is `base - rest_here`. A stage does 1/S of it, for R * M + S - 1 iterations
where R * M carry work (every stage computes through the bubble, as a scan of fixed length
must); its layers' gradients are reduced over its data axis only. Between stages each iteration
sends one micro-batch's activations forward and its gradient back (`ppermute`); entering the
pipeline the rows are gathered over the stage axis, leaving it they are split again. Memory per
device: the rest's state and activations at data x stage, 1/S of the stack's state and
gradient, every iteration's chunk input (GPipe keeps them for the backward pass), the
micro-batch buffers, and one chunk's layers' activations for one micro-batch while it is
recomputed.

FSDP inside a stage (storage "fsdp"): the stage's layer weights, gradients and optimizer state
split over its data axis too (1 / (S * dp) per device). Each iteration all-gathers its chunk's
weights and, in the backward pass, gathers them again (the chunk is rematerialised) and
reduce-scatters their gradient, on the data axis's link; with one repeat the forward pass's
gathers run once (`emit.pipeline`). Memory: the split state and one gathered chunk. Not with a
model axis: XLA replicates a weight over the model axis before the manual all-gather over data,
so each iteration gathers it over the model axis too (compiled: gpt2-medium on 2 stages x 2
data x 2 model, 2.5 GiB of model-axis gathers and twice the predicted step).
"""

from __future__ import annotations

import dataclasses
import functools

from wapar_jax._src.cost.collectives import collective_traffic, hierarchical_collective_time
from wapar_jax._src.emit.mesh import hybrid_shapes
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.search.candidate import DATA, Candidate, step_seconds, strategy_label
from wapar_jax._src.search.pricing import axis_spans

# Storages a stage's layers can use. The gather-once form of FSDP (`StageLayout.gather_once`)
# is not searched: compiled, it peaks where ZeRO-1 does and steps slower (gpt-1.3b, 4 stages x 2
# data, 2 repeats: 5.34 vs 5.38 GiB, 1.19 vs 0.96 s; benchmarks/results/pipeline.md).
PIPELINE_STORAGES = frozenset({"replicated", "zero1", "fsdp"})
# The storage of the candidate a storage's layer internals are read from (`layer_internals`):
# FSDP's activations also hold gathered weights and full-size gradient shadows, which a stage's
# are priced apart (compiled, gpt-1.3b on 4 stages x 2: read from FSDP's own, its peak came
# out twice the compiled one).
INTERNALS_FROM = {"fsdp": "replicated"}
# Storages a stage can use only without a model axis (see above).
WITHOUT_MODEL_AXIS = frozenset({"fsdp"})
# Repeats (circular schedules) and micro-batches per stage searched.
REPEATS = (1, 2, 4)
MICROBATCHES_PER_STAGE = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class StackShape:
  """What the search knows of the loss's layer stack: its depth and what flows between
  layers, in bytes for the whole batch."""

  layers: int
  carry_bytes: float
  layer_leaves: int = 1  # parameter leaves per layer: collectives per gather of a chunk


def stage_span(stages: int, inner: int, devices_per_node: int) -> tuple[int, int]:
  """(stage devices inside one node, nodes the stage axis spans), the stage axis outermost."""
  shapes = hybrid_shapes((stages, inner), devices_per_node)
  if shapes is None:
    return 1, stages
  (ici, _), (dcn, _) = shapes
  return ici, dcn


def schedules(layers: int, stages: int, rows: int):
  """(repeats, micro-batches) worth pricing for `stages`: chunks that divide the layers,
  micro-batches that divide the rows each data-parallel group has (circular: at least S)."""
  for r in REPEATS:
    if layers % (stages * r):
      continue
    for per_stage in MICROBATCHES_PER_STAGE:
      m = per_stage * stages
      if rows % m == 0:
        yield r, m


def _weight_collectives(
  stack_bytes: float, chunks: int, gathers: float, scatters: float, leaves: int, span, profile
) -> tuple[float, float]:
  """(seconds, bytes sent) of FSDP's weight collectives on the data axis: `gathers`
  all-gathers and `scatters` reduce-scatters of one of `chunks` equal chunks of the stack's
  gathered weights (`stack_bytes` per device), one collective per parameter leaf."""
  chunk, n = stack_bytes / chunks, span[0] * span[1]
  seconds = sent = 0.0
  for kind, count in (("all-gather", gathers), ("reduce-scatter", scatters)):
    each = hierarchical_collective_time(
      kind,
      chunk / leaves,
      *span,
      profile.intra_node.bandwidth,
      profile.intra_node.latency,
      profile.inter_node.bandwidth,
      profile.inter_node.latency,
    )
    seconds += count * leaves * each
    sent += count * collective_traffic(kind, chunk, n)
  return seconds, sent


def layer_internals(base: Candidate, rest_here: Candidate, stack: StackShape) -> float:
  """One layer's activations inside it (whole batch, per device of `base`'s mesh): base's
  activations beyond the rest's, less every layer's gradient and input (per-layer remat)."""
  stack_params = max(base.param_memory - rest_here.param_memory, 0.0)
  stack_act = max(base.activation_memory - rest_here.activation_memory, 0.0)
  return max(stack_act - stack_params - stack.carry_bytes / base.data * stack.layers, 0.0)


def price_pipeline(
  base: Candidate,
  rest_here: Candidate,
  rest_wide: Candidate,
  stack: StackShape,
  profile: DeviceProfile,
  stages: int,
  repeats: int,
  microbatches: int,
  budget: float,
  internals: float,
) -> Candidate:
  """The pipeline of `stages` x `repeats` chunks and `microbatches` on `base`'s inner mesh;
  `internals`: one layer's activations inside it (`layer_internals`)."""
  s, r, m = stages, repeats, microbatches
  dp, tp = base.data, base.model
  iterations = r * m + s - 1
  through = iterations / (r * m)  # work a stage does, bubble included, per unit of its share
  stack_compute = max(base.compute_time - rest_here.compute_time, 0.0)
  stack_flops = max(base.flops - rest_here.flops, 0.0)
  stack_comm = max(base.comm_time - rest_here.comm_time, 0.0)
  stack_bytes = max(base.comm_bytes - rest_here.comm_bytes, 0.0)
  # Tensor-parallel collectives run with the layers (through the bubble too); with tp == 1 the
  # stack's communication is its gradient reduction, which a stage does once for its layers.
  comm_share = through if tp > 1 else 1.0
  fsdp = base.storage == "fsdp"
  stack_params = max(base.param_memory - rest_here.param_memory, 0.0)
  gathered = stack_params * dp if fsdp else stack_params  # the stack's weights, whole
  data_span = axis_spans(dp, tp, profile.devices_per_node)[DATA]
  weights = functools.partial(
    _weight_collectives, gathered, leaves=stack.layer_leaves, span=data_span, profile=profile
  )
  if fsdp:
    # base's own weight collectives (per layer: gathered, gathered again by the remat, gradient
    # reduce-scattered) are the pipeline's to price, per iteration below.
    own_time, own_bytes = weights(stack.layers, 2 * stack.layers, stack.layers)
    stack_comm = max(stack_comm - own_time, 0.0)
    stack_bytes = max(stack_bytes - own_bytes, 0.0)
  compute_time = rest_wide.compute_time + stack_compute / s * through
  if not fsdp:
    # Every iteration a stage slices its chunk's weights out of its stack for the forward and
    # for the backward pass (a copy each: read and write) and adds the chunk's weight gradient
    # into its accumulator (two reads, a write): traffic the step without stages never has.
    # Compiled gpt2-large, 4 stages x data 2: two slices and one accumulation per iteration.
    chunk_params = stack_params / (s * r)
    compute_time += (
      iterations * chunk_params * 7 / (profile.memory_bandwidth * profile.memory_efficiency)
    )
  comm_time = rest_wide.comm_time + stack_comm / s * comm_share
  comm_bytes = rest_wide.comm_bytes + stack_bytes / s * comm_share
  if fsdp:
    forward = iterations if r > 1 else 1  # one repeat: the forward pass gathers once
    t, sent = weights(s * r, forward + iterations, iterations)
    comm_time += t
    comm_bytes += sent

  span_in, span_out = stage_span(s, dp * tp, profile.devices_per_node)
  link = profile.inter_node if span_out > 1 else profile.intra_node
  rows_bytes = stack.carry_bytes / dp  # one data-parallel group's rows of the carry
  act = rows_bytes / m
  # Every iteration passes a micro-batch's carry on, and its gradient back.
  p2p = 2 * iterations * (link.latency + act / link.bandwidth)
  comm_time += p2p
  comm_bytes += 2 * iterations * act

  def over_stages(kind: str, nbytes: float) -> float:
    nonlocal comm_bytes
    comm_bytes += collective_traffic(kind, nbytes, s)
    return hierarchical_collective_time(
      kind,
      nbytes,
      span_in,
      span_out,
      profile.intra_node.bandwidth,
      profile.intra_node.latency,
      profile.inter_node.bandwidth,
      profile.inter_node.latency,
    )

  # Into the pipeline the rows are gathered over stages (their gradient reduce-scattered back);
  # out of it the last stage's results are split over the stages again (and the gradient back).
  comm_time += over_stages("all-gather", rows_bytes) + over_stages("reduce-scatter", rows_bytes)
  comm_time += 2 * over_stages("all-to-all", rows_bytes)

  param_memory = rest_wide.param_memory + (base.param_memory - rest_here.param_memory) / s
  opt_memory = rest_wide.opt_state_memory + (base.opt_state_memory - rest_here.opt_state_memory) / s
  per_chunk = stack.layers // (s * r)
  buffers = (3 if r > 1 else 2) * rows_bytes  # micro-batched input, outputs (, circulated)
  stage_params = stack_params / s
  if fsdp:
    # The split accumulator and one gathered chunk: the chunk's gradient is reduce-scattered
    # leaf by leaf as the backward pass makes it, into the accumulator in place.
    gradients = stage_params + gathered / (s * r)
  else:
    # The stage's gradient accumulator, the chunk's gradient of an iteration and, in a circular
    # schedule, that chunk's gradient placed into a stage-sized buffer before it is added.
    gradients = stage_params * (1 + 1 / r + (1 if r > 1 else 0))
  backward = (
    gradients
    + iterations * act  # each iteration's chunk input, kept for the backward pass
    + buffers
    + per_chunk * internals / m  # one chunk's layers recomputed for one micro-batch
  )
  # After the loop: the gradient, and under ZeRO-1 the updated parameters gathered.
  update = stage_params * (2 if base.storage == "zero1" else 1)
  activations = rest_wide.activation_memory + max(backward, update)
  peak = param_memory + opt_memory + activations
  # Hidden as in the pipeline's parts: the rest of the step as rest_wide hides it, the stack's
  # share of base's; the stage-to-stage sends and the gathers over stages stay exposed.
  hidden = lambda c: c.comm_time - c.exposed_comm
  stack_hidden = max(hidden(base) - hidden(rest_here), 0.0) / s * comm_share
  exposed = max(comm_time - hidden(rest_wide) - stack_hidden, 0.0)
  step_time = step_seconds(compute_time, comm_time, exposed)
  d = base.devices * s
  energy = profile.step_energy(d, step_time, compute_time)
  return dataclasses.replace(
    base,
    devices=d,
    strategy=strategy_label(dp, tp, base.storage, s),
    step_time=step_time,
    compute_time=compute_time,
    comm_time=comm_time,
    exposed_comm_time=exposed,
    flops=rest_wide.flops + stack_flops / s * through,
    comm_bytes=comm_bytes,
    peak_memory=peak,
    energy=energy,
    fits=peak <= budget,
    param_memory=param_memory,
    opt_state_memory=opt_memory,
    activation_memory=activations,
    remat="layers",
    microbatches=1,
    cross_node_axes=("stage",) * (span_out > 1) + base.cross_node_axes,
    stages=s,
    repeats=r,
    stage_microbatches=m,
  )
