"""Expert parallelism (EP) in the emitted step: expert-side activations split on the experts.

The expert weights `[E, ...]` are stored split on E over the mesh's `expert` axis (their
specs); the tokens are split over the data and expert axes together. Inside the loss, each
expert-side tensor (`trace.experts.expert_side`: `expert_in [B, E, C, D]`, the hidden and the
output, and by transposition their cotangents) is constrained to E on the expert axis and its
batch on the data axis, and every other tensor with the batch to the batch's split, so XLA's
partitioner moves tokens to their experts' devices by an all-to-all and back where the two
meet. Weight specs alone leave XLA to choose: on 8 devices it adds all-to-alls and gathers the
combine's `[B, T, D]` input in the backward pass; on 2 x 8 it emits no all-to-all at all and
gathers activations (benchmarks/results/expert_parallel.md). Constraining the expert side only
made XLA gather `[B, T, D]` tensors too, and the routing's `[B, E]` statistics (no slot dim)
split on E cost a small all-to-all each: both measured on a 2-layer MoE.
"""

from __future__ import annotations

from collections.abc import Callable

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from wapar_jax._src.emit.sequence import constrained
from wapar_jax._src.trace.builder import trace_jaxpr
from wapar_jax._src.trace.experts import expert_side, find_experts

EXPERT, DATA = "expert", "data"


def expert_specs(
  closed, n_params: int, n_batch: int, n_state: int, data_entry, token_entry
) -> dict:
  """{id of an equation: the spec its output is constrained to}, for every output of the loss
  (and of the scans in it) that carries the batch: an expert-side one split on its (first)
  experts dim over the expert axis and on the batch over `data_entry` (None: not split), any
  other on the batch over `token_entry` (the batch's devices)."""
  traced = trace_jaxpr(closed, n_params, 0, n_batch, loss_output=0, num_state=n_state)
  experts = find_experts(traced)
  side = expert_side(traced, experts)
  classes = traced.var_classes
  batch = traced.batch_classes
  specs = {}
  for op in traced.ops:
    if len(op.out_vars) != 1 or not batch & set(classes[op.out_vars[0]]):
      continue
    out = op.out_vars[0]
    entries = [None] * len(classes[out])
    lead = next(d for d, c in enumerate(classes[out]) if c in batch)
    if side[out]:
      entries[next(d for d, c in enumerate(classes[out]) if c in experts.classes)] = EXPERT
      entries[lead] = data_entry
    else:
      entries[lead] = token_entry
    specs[id(op.eqn)] = P(*entries)
  return specs


def expert_split(loss_fn: Callable, mesh: Mesh, n_params: int, n_batch: int) -> Callable:
  """`loss_fn(params, batch, *state)` with its expert-side activations split on the experts
  over the mesh's expert axis (see the module doc)."""
  data_entry = DATA if mesh.shape.get(DATA, 1) > 1 else None
  token_entry = (DATA, EXPERT) if DATA in mesh.shape else EXPERT
  return constrained(
    loss_fn,
    mesh,
    lambda closed, n_state: expert_specs(
      closed, n_params, n_batch, n_state, data_entry, token_entry
    ),
  )
