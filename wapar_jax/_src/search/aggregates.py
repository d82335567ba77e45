"""Sums over ops and variables for one set of model-split groups.

For a fixed set of model-split groups, every op and every variable falls in one of a handful of
sharding categories (carries the batch or not, is weight-shaped or not, touches a model-split
class or not), and its per-device cost is its unsharded cost divided by dp and/or tp according
to its category. So one O(#ops) pass per group set yields a few sums, and each (dp, tp,
storage) is then priced in O(1) plus one max over the memory curves.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from wapar_jax._src.memory import liveness
from wapar_jax._src.search.overlap import StepWindows, step_windows
from wapar_jax._src.search.space import CompilerBuffers, SearchSpace
from wapar_jax._src.trace.dim_rules import PASS_THROUGH


@dataclasses.dataclass(frozen=True)
class MemoryCurves:
  """Liveness of the temporaries under one compiler's buffer rules."""

  curves: np.ndarray  # liveness.liveness_curves
  update_pos: int  # program point where the weight gradients are all live
  # liveness.liveness_curves of the weight gradients alone (None where reductions run in place)
  grad_curves: np.ndarray | None
  # The same gradients, each at the one point where its combined reduction runs (None where
  # reductions run in place)
  combine_curves: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Aggregates:
  """Sums over ops / variables for one model-split group set (see the package docstring)."""

  compute: np.ndarray  # [3 data cats, 2 model] seconds at one device
  flops: np.ndarray  # [3, 2]
  red_data: np.ndarray  # [2 weight-shaped?, 2 model] output bytes reduced over data
  red_data_n: np.ndarray  # [2, 2] collective counts (weight gradients: see loop_iterations)
  # [2, 2] as red_data, counting each chain of partial sums once, where it is last combined
  red_data_at_sinks: np.ndarray
  loop_iterations: float  # iterations of the deepest loop holding weight-gradient reductions
  red_model: np.ndarray  # [2 batch, 2 model] output bytes reduced over model
  red_model_n: np.ndarray
  gather_data: np.ndarray  # [2 model] input bytes gathered over data
  gather_data_n: np.ndarray
  gather_model: np.ndarray  # [2 batch] input bytes gathered over model
  gather_model_n: np.ndarray
  memory: tuple[MemoryCurves, ...]  # per rule set of SearchSpace.buffers, in its order
  gathered_model: np.ndarray  # [K] bool: the gathered use (SearchSpace.gathered_var) is split
  param_model: np.ndarray  # [P] bool
  opt_model: np.ndarray  # [O] bool
  # Under sequence parallelism (0 without it): bytes of the weight gradients partial over the
  # model axis (summed over the split tokens outside the regions), and bytes and count of the
  # all-gathers of the sequence-split activations (and cotangents) entering the regions.
  sequence_partials: float = 0.0
  sequence_partials_n: float = 0.0  # launches beyond the combined ones: loop iterations
  sequence_gathers: float = 0.0
  sequence_gathers_n: float = 0.0
  # Under sequence parallelism: bytes (unsharded) and count of the region tensors a gather reads
  # for a tensor outside the regions (a loss's logits, split on the vocabulary, at the labels),
  # which XLA moves to the sequence split by all-to-all, forward and backward.
  sequence_reshards: float = 0.0
  sequence_reshards_n: float = 0.0
  # Where each class of collective can hide behind independent compute (`search.overlap`).
  windows: StepWindows | None = None


def data_divisors(dp: int, storage: str, fsdp: int = 1) -> tuple[int, int, int]:
  """Data-axis split of work / values per memory.DATA_* category: batch, weight-shaped, other.

  Weight-shaped work (the optimizer update) splits only when the state is sharded: dp ways,
  or `fsdp` ways under hybrid sharding.
  """
  weight = {"replicated": 1, "hsdp": fsdp}.get(storage, dp)
  return dp, weight, 1


def _group_mask(space: SearchSpace, groups) -> np.ndarray:
  mask = np.zeros(len(space.groups), dtype=bool)
  mask[list(groups)] = True
  return mask


def model_split(space: SearchSpace, groups, sequence_parallel: bool):
  """([V] region vars, [N] region ops, [V] vars split on the model axis, [N] ops whose work it
  splits): the tensor-parallel regions of `groups`, and with `sequence_parallel` the
  activations outside them split on the sequence and the work that reads or makes them."""
  mask = _group_mask(space, groups)
  # Split by the tensor-parallel regions themselves: what the model axis reduces and gathers.
  region_var = space.var_group[:, mask].any(axis=1)
  region_op = space.op_group[:, mask].any(axis=1)
  if not sequence_parallel:
    return region_var, region_op, region_var, region_op
  split = space.var_sequence & ~region_var
  return region_var, region_op, region_var | split, region_op | _touches(space, split)


def aggregate(
  space: SearchSpace,
  groups: tuple[int, ...],
  op_seconds: np.ndarray,
  sequence_parallel: bool = False,
) -> Aggregates:
  """The sums one model-split group set needs, over every op and variable of the step.

  With `sequence_parallel` the activations outside the tensor-parallel regions
  (`SearchSpace.var_sequence` without a model-split class) are split on the model axis too, and
  so is the work of the ops that read or make them (norms, residual adds, the untied LM head's
  matmuls); the regions read them all-gathered, and sums over the split tokens outside the
  regions (weight gradients) are partial over the model axis.
  """
  mask = _group_mask(space, groups)
  region_var, region_op, var_model, op_model = model_split(space, groups, sequence_parallel)
  sequence_copies = None
  if sequence_parallel:
    sequence_copies = _gathered_copies(space, var_model & ~region_var, region_op)
  op_model = op_model.astype(np.int64)
  cat = space.op_data_cat
  compute = np.zeros((3, 2))
  flops = np.zeros((3, 2))
  np.add.at(compute, (cat, op_model), op_seconds)
  np.add.at(flops, (cat, op_model), space.costs.flops)

  mult = space.costs.multiplicity
  out = space.op_out_var
  has_out = out >= 0
  out_model = np.where(has_out, var_model[np.maximum(out, 0)], False).astype(np.int64)
  out_batch = np.where(has_out, space.var_batch[np.maximum(out, 0)], False).astype(np.int64)
  out_weight = np.where(has_out, space.var_weight[np.maximum(out, 0)], False).astype(np.int64)
  weighted = mult * space.op_out_bytes

  def summed(select, index_a, index_b, values):
    acc = np.zeros((2, 2))
    np.add.at(acc, (index_a[select], index_b[select]), values[select])
    return acc

  red_data = summed(space.red_batch, out_weight, out_model, weighted)
  red_data_n = summed(space.red_batch_sink, out_weight, out_model, mult)
  red_data_at_sinks = summed(space.red_batch_sink, out_weight, out_model, weighted)
  in_loop_weight = space.red_batch & (out_weight == 1) & (mult > 1)
  loop_iterations = float(mult[in_loop_weight].max()) if in_loop_weight.any() else 0.0
  # Bytes a model-axis reduction moves: its full output (a reduce-scatter's too), so the
  # regions' own split, not the sequence split of their outputs.
  out_region = np.where(has_out, region_var[np.maximum(out, 0)], False).astype(np.int64)
  red_m = space.red_group[:, mask].any(axis=1)
  red_m_sink = space.red_group_sink[:, mask].any(axis=1)
  # Sums over the split tokens outside a region (the norms' and the embeddings' weight
  # gradients), each chain counted once where it is last combined.
  sequence_partials, sequence_partials_n = 0.0, 0.0
  if sequence_parallel:
    over_tokens = space.red_sequence & (out_region == 0)
    sequence_partials = float(weighted[over_tokens].sum())
    # Combined into one launch, but once per iteration of a loop over layers holding them.
    looped = mult[over_tokens & (mult > 1)]
    sequence_partials_n = float(looped.max()) if looped.size else 0.0
  red_model = summed(red_m, out_batch, out_region, weighted)
  red_model_n = summed(red_m_sink, out_batch, out_region, mult)

  g_op, g_var, g_batch, g_group = space.gathers
  g_bytes = space.var_bytes[g_var] * mult[g_op]
  g_model = var_model[g_var].astype(np.int64)
  gather_data = np.bincount(g_model[g_batch], weights=g_bytes[g_batch], minlength=2)
  gather_data_n = np.bincount(g_model[g_batch], weights=mult[g_op][g_batch], minlength=2)
  on_model = (g_group >= 0) & mask[np.maximum(g_group, 0)]
  g_vbatch = space.var_batch[g_var].astype(np.int64)
  gather_model = np.bincount(g_vbatch[on_model], weights=g_bytes[on_model], minlength=2)
  gather_model_n = np.bincount(g_vbatch[on_model], weights=mult[g_op][on_model], minlength=2)

  t = space.traced
  data_cat = np.where(
    space.var_batch,
    liveness.DATA_BATCH,
    np.where(space.var_weight, liveness.DATA_WEIGHT, liveness.DATA_NONE),
  )
  # Weight gradients, full size (the partial sums a data-axis reduction reads), while they live.
  grads = np.zeros(t.num_vars, dtype=bool)
  grads[out[space.red_batch_sink & (out_weight == 1) & has_out]] = True
  curves = tuple(
    _memory_curves(space, b, data_cat, var_model, grads, sequence_copies) for b in space.buffers
  )
  param_model = space.param_group[:, mask].any(axis=1)
  return Aggregates(
    compute,
    flops,
    red_data,
    red_data_n,
    red_data_at_sinks,
    loop_iterations,
    red_model,
    red_model_n,
    gather_data,
    gather_data_n,
    gather_model,
    gather_model_n,
    curves,
    var_model[space.gathered_var],
    param_model,
    space.opt_group[:, mask].any(axis=1),
    sequence_partials,
    sequence_partials_n,
    *_gather_totals(space, sequence_copies),
    *(_reshards(space, region_var) if sequence_parallel else (0.0, 0.0)),
    step_windows(space, op_seconds, op_model, red_m_sink, red_m),
  )


def _reshards(space: SearchSpace, region_var: np.ndarray) -> tuple[float, float]:
  """(bytes, count) per step of the all-to-alls that move a region tensor a gather reads out of
  a region (compiled: moe-gpt's logits at its labels, data 4 x model 2, 2 x 393 MiB a step).
  An embedding table's lookup (no batch) is masked and reduced instead."""
  ops, source, out = space.gather_reads.T
  moved = region_var[source] & space.var_batch[source] & ~region_var[out] & space.var_sequence[out]
  runs = space.costs.multiplicity[ops[moved]]
  return float(2 * (runs * space.var_bytes[source[moved]]).sum()), float(2 * runs.sum())


def _memory_curves(
  space: SearchSpace,
  buffers: CompilerBuffers,
  data_cat: np.ndarray,
  var_model: np.ndarray,
  grads: np.ndarray,
  sequence_copies: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> MemoryCurves:
  """Liveness of the temporaries under one compiler's rules for one group set, with the
  gathered copies of sequence-split activations (`_gathered_copies`), if any."""
  t = space.traced
  temp, last_use, extra = buffers.kept, buffers.last_use, buffers.scratch
  copy_var, copy_start, copy_stop = sequence_copies or (np.zeros(0, np.int64),) * 3
  curves = liveness.liveness_curves(
    np.concatenate([t.def_pos[temp], extra.start, copy_start]),
    np.concatenate([last_use[temp], extra.stop, copy_stop]),
    np.concatenate([space.var_bytes[temp], extra.nbytes, space.var_bytes[copy_var]]),
    np.concatenate([data_cat[temp], data_cat[extra.like], data_cat[copy_var]]),
    np.concatenate([var_model[temp], var_model[extra.like], np.zeros(len(copy_var), bool)]),
    len(t.ops),
  )
  grad_curves = combine_curves = None
  if not buffers.rules.reduces_in_place:
    made, kinds = t.def_pos[grads], np.full(int(grads.sum()), liveness.DATA_NONE)
    grad_curves = liveness.liveness_curves(
      made, last_use[grads], space.var_bytes[grads], kinds, var_model[grads], len(t.ops)
    )
    # Each bucket of gradients, in the order they are made, reduces right after its last is
    # made, once that op's operands are freed.
    order = np.argsort(made, kind="stable")
    bucket = np.empty_like(order)
    bucket[order] = np.arange(len(order)) // buffers.rules.combine_count
    reduced_at = np.zeros(int(bucket.max(initial=-1)) + 1, dtype=np.int64)
    np.maximum.at(reduced_at, bucket, made + 1)
    combine_curves = liveness.liveness_curves(
      reduced_at[bucket],
      reduced_at[bucket],
      space.var_bytes[grads],
      kinds,
      var_model[grads],
      len(t.ops),
    )
  return MemoryCurves(
    curves, int(np.argmax(curves[liveness.DATA_WEIGHT].sum(axis=0))), grad_curves, combine_curves
  )


def _gather_totals(space: SearchSpace, copies) -> tuple[float, float]:
  """(bytes, count) of the all-gathers that make `_gathered_copies`, per step."""
  if copies is None:
    return 0.0, 0.0
  var, first, _ = copies
  runs = space.costs.multiplicity[first]
  return float((space.var_bytes[var] * runs).sum()), float(runs.sum())


def _touches(space: SearchSpace, split: np.ndarray) -> np.ndarray:
  """[N] bool: the op reads or writes a variable of `split` (its work splits with it)."""
  out = np.zeros(len(space.traced.ops), dtype=bool)
  for op in space.traced.ops:
    out[op.index] = any(v >= 0 and split[v] for v in op.in_vars + op.out_vars)
  return out


def _gathered_copies(space: SearchSpace, split: np.ndarray, region_op: np.ndarray):
  """(variable, first, last region op reading it) per sequence-split activation a
  tensor-parallel region reads: the region takes it all-gathered, and XLA keeps that full copy
  for the region's backward pass (the weight gradient reads it again) rather than gathering it
  twice (compiled: GPT-2 medium, TP 8). A pass-through op (the optimization barrier that orders
  each rematerialised layer's recompute) hands its operands on split as they came, so it gathers
  none of them."""
  first: dict[int, int] = {}
  last: dict[int, int] = {}
  for op in space.traced.ops:
    if region_op[op.index] and op.primitive not in PASS_THROUGH:
      for v in op.in_vars:
        if v >= 0 and split[v]:
          first.setdefault(v, op.index)
          last[v] = op.index
  var = np.fromiter(first, dtype=np.int64, count=len(first))
  return (
    var,
    np.array([first[v] for v in var], dtype=np.int64),
    np.array([last[v] for v in var], dtype=np.int64),
  )
