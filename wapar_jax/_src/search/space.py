"""The traced step laid out for the search: dimension groups and per-op / per-variable arrays.

Isomorphic dimension classes (the MLP hidden dim of every layer) form one group, decided
together. Every op and variable is then tagged with the groups it touches, whether it carries
the batch, whether it is weight-shaped, and where its partial sums are reduced, so that the
pricing of one candidate is a few sums over these arrays.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from wapar_jax._src import compilers
from wapar_jax._src.compilers import CompilerRules, Scratch
from wapar_jax._src.cost.fusion import FusedTraffic, fused_traffic
from wapar_jax._src.cost.xla import StepCosts
from wapar_jax._src.memory import buffers as buffers_lib
from wapar_jax._src.memory import liveness
from wapar_jax._src.search.overlap import LINEAR_UNARY, SCALING, SUMMING, first_uses
from wapar_jax._src.trace import TracedStep
from wapar_jax._src.trace.context import Attention, find_attention
from wapar_jax._src.trace.experts import Experts, find_experts
from wapar_jax.errors import InvalidArgumentError

# Model-split group sets are enumerated exhaustively over at most this many groups (the largest).
MAX_SEARCHED_GROUPS = 12
# Parameters smaller than this stay replicated under FSDP: a collective per bias or norm scale
# costs more latency than the memory it saves.
FSDP_MIN_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Group:
  """Isomorphic dimension classes decided together (e.g. the MLP hidden dim of every layer)."""

  index: int
  classes: frozenset[int]
  size: int
  param_bytes: float
  label: str


@dataclasses.dataclass(frozen=True)
class CompilerBuffers:
  """A step's temporaries under one compiler's rules."""

  rules: CompilerRules
  kept: np.ndarray  # [V] bool: counted in the temporaries' liveness
  last_use: np.ndarray  # [V] last op needing each, counting recomputation by fusion
  scratch: Scratch  # buffers no variable stands for


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Everything the search needs from a traced step, as arrays: built once per compiler."""

  traced: TracedStep
  costs: StepCosts
  groups: tuple[Group, ...]
  batch_classes: frozenset[int]
  self_paired: frozenset[int]  # group ids that occur twice in one tensor
  conflicts: np.ndarray  # [G, G] bool: the two groups share a tensor
  var_group: np.ndarray  # [V, G] bool
  var_bytes: np.ndarray  # [V]
  var_batch: np.ndarray  # [V] bool
  var_weight: np.ndarray  # [V] bool: shaped like a parameter, no batch dim
  # The temporaries under the rules of the compiler that runs the step, then under any rules
  # that bound its peak (`CompilerRules.remat_at_least`).
  buffers: tuple[CompilerBuffers, ...]
  traffic: FusedTraffic  # per op: bytes its kernel moves for it, kernels it launches
  op_group: np.ndarray  # [N, G] bool
  op_data_cat: np.ndarray  # [N] liveness.DATA_* category of the op's work
  op_out_var: np.ndarray  # [N] first output variable (-1 if none)
  op_out_bytes: np.ndarray  # [N] bytes of all outputs
  red_batch: np.ndarray  # [N] bool: a reduced dim carries the batch
  red_group: np.ndarray  # [N, G] bool
  red_batch_sink: np.ndarray  # [N] bool: where a chain of partial sums is reduced
  red_group_sink: np.ndarray  # [N, G] bool
  gathers: tuple[np.ndarray, ...]  # (op, var, is_batch, group or -1) of dims needing a gather
  param_group: np.ndarray  # [P, G] bool
  param_bytes: np.ndarray  # [P]
  param_dims: tuple[tuple[tuple[int, int], ...], ...]  # per param: (class, size) per dim
  # Gathered uses of parameters (`TracedStep.gathered`), where an FSDP step gathers a layer's
  # weights, and the copies a loop keeps of them for the backward pass: [K] each.
  gathered_var: np.ndarray
  gathered_param: np.ndarray
  gathered_runs: np.ndarray  # times gathered per step (0: a kept copy, -1: a view of one)
  opt_bytes: np.ndarray  # [O]
  opt_weight: np.ndarray  # [O] bool: shaped like a parameter
  opt_group: np.ndarray  # [O, G] bool
  batch_bytes: float
  batch_size: int
  # A model's state (batch statistics, PRNG keys): replicated, read and written every step.
  model_state_bytes: float = 0.0
  # Batch reductions on the longest chain of reductions that depend on one another (batch-norm
  # statistics: the variance needs the reduced mean, the next layer needs both, and so on back
  # through the backward pass). All but the last are collectives of their own.
  batch_reduce_rounds: int = 0
  remat: str = "none"
  microbatches: int = 1
  # Parameters (and optimizer-state leaves) smaller than this stay whole under FSDP. A float32
  # twin of a bf16 plan (verify) judges its leaves at the bf16 size, as the plan did.
  fsdp_min_bytes: float = FSDP_MIN_BYTES
  # Sequence parallelism: [V] bool, the activations it splits on the sequence over the model
  # axis (a batch class and a sequence class: a non-batch dim of a batch leaf that no weight
  # has, the T of `tokens [B, T]`); and the gcd of the sequence dims' sizes (0: no sequence
  # dim), which the model degree must divide.
  var_sequence: np.ndarray | None = None
  # [S, G] the groups of each tensor holding a sequence class twice (attention scores, T x T):
  # SP splits one of the two, so a query's keys would be on other devices; it is priced only
  # where each such tensor is inside a region (split on its heads), as Megatron-SP leaves it.
  sequence_pairs: np.ndarray | None = None
  # [N] bool: where a sum over a sequence class (a weight gradient summed over the tokens) is
  # last combined (a tied weight's two partial sums are added first): under sequence
  # parallelism a partial sum the model axis reduces.
  red_sequence: np.ndarray | None = None
  sequence_size: int = 0
  # The mixture-of-experts layers' experts classes, which expert parallelism splits.
  experts: Experts = Experts()
  # The attention context parallelism splits on the sequence.
  attention: Attention = Attention()
  # [V] the first op reading each variable (`search.overlap.first_uses`): where a collective
  # of it must have finished.
  first_use: np.ndarray | None = None
  # [K, 3] (op, operand, output) of each gather reading a variable (sequence parallelism
  # prices the reshard of a region tensor gathered out of its region).
  gather_reads: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int64))


def build_space(
  traced: TracedStep,
  costs: StepCosts,
  param_paths: Sequence[str],
  *,
  rules: CompilerRules,
  remat: str = "none",
  microbatches: int = 1,
) -> SearchSpace:
  """Groups the dimension classes and lays the step out as arrays for the search, with its
  temporaries under `rules` (the compiler that runs the step)."""
  v_classes = traced.var_classes
  batch_classes = set()
  for v in traced.batch_vars:
    if not traced.var_shape[v]:
      raise InvalidArgumentError(
        "every batch leaf needs a leading batch dimension to split over devices. "
        f"Got a scalar batch leaf (leaf {traced.batch_vars.index(v)})."
      )
    batch_classes.add(v_classes[v][0])
  # Under gradient accumulation the batch class is the micro-batch: what splits must divide it.
  batch_size = math.gcd(*(traced.class_size[c] for c in batch_classes))

  # Group parameter classes by a signature: class size and where they occur in parameters.
  occurrences: dict[int, list] = {}
  for v, path in zip(traced.param_vars, param_paths):
    for d, c in enumerate(v_classes[v]):
      occurrences.setdefault(c, []).append((traced.var_shape[v], d, path, traced.var_itemsize[v]))
  by_signature: dict[tuple, list[int]] = {}
  for c, occ in occurrences.items():
    if c in batch_classes or c in traced.loop_classes:
      continue
    sig = (traced.class_size[c], tuple(sorted((shape, d) for shape, d, _, _ in occ)))
    by_signature.setdefault(sig, []).append(c)
  groups = []
  class_group = {}
  for sig, classes in by_signature.items():
    g = len(groups)
    occ = [o for c in classes for o in occurrences[c]]
    nbytes = sum(math.prod(shape) * itemsize for shape, _, _, itemsize in occ)
    names = sorted({f"{p}[{d}]" for _, d, p, _ in occ})
    label = (
      f"size {sig[0]}: " + ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else "")
    )
    groups.append(Group(g, frozenset(classes), sig[0], float(nbytes), label))
    for c in classes:
      class_group[c] = g
  num_groups = len(groups)

  nv = traced.num_vars
  var_group = np.zeros((nv, num_groups), dtype=bool)
  var_batch = np.zeros(nv, dtype=bool)
  var_bytes = traced.var_bytes()
  self_paired, conflicts = set(), np.zeros((num_groups, num_groups), dtype=bool)
  # As a multiset: a weight gradient computed transposed (dW^T = dy^T x, then a transpose, as
  # jax differentiates a Dense layer fed by a reshape) is still weight-shaped.
  # A layer's slice of a parameter stacked for a scan is weight-shaped too: its gradient is
  # reduced as the stacked parameter's is.
  param_signatures = {tuple(sorted(v_classes[v])) for v in traced.param_vars}
  param_signatures |= {
    tuple(sorted(c for c in v_classes[v] if c not in traced.loop_classes))
    for v in traced.param_vars
  }
  var_weight = np.zeros(nv, dtype=bool)
  sequence = traced.sequence_classes
  var_sequence = np.zeros(nv, dtype=bool)
  var_sequence_pair = np.zeros(nv, dtype=bool)
  for v in range(nv):
    cls = v_classes[v]
    gs = [class_group[c] for c in cls if c in class_group]
    var_group[v, gs] = True
    if len(gs) != len(set(gs)):
      self_paired.update(g for g in gs if gs.count(g) > 1)
    for a, b in itertools.combinations(set(gs), 2):
      conflicts[a, b] = conflicts[b, a] = True
    var_batch[v] = any(c in batch_classes for c in cls)
    var_sequence[v] = var_batch[v] and any(c in sequence for c in cls)
    var_sequence_pair[v] = var_batch[v] and sum(c in sequence for c in cls) > 1
    var_weight[v] = bool(cls) and not var_batch[v] and tuple(sorted(cls)) in param_signatures

  ops = traced.ops
  n = len(ops)
  op_group = np.zeros((n, num_groups), dtype=bool)
  op_data_cat = np.full(n, liveness.DATA_NONE)
  op_out_var = np.full(n, -1)
  op_out_bytes = np.zeros(n)
  red_batch = np.zeros(n, dtype=bool)
  red_group = np.zeros((n, num_groups), dtype=bool)
  red_sequence = np.zeros(n, dtype=bool)
  g_op, g_var, g_batch, g_group = [], [], [], []
  for op in ops:
    vs = [v for v in op.in_vars + op.out_vars if v >= 0]
    # A dim the op must gather first does not split its work.
    gathered = {(k, d) for k, d in op.gather_dims}
    for k, v in enumerate(op.in_vars):
      if v >= 0:
        for d, c in enumerate(v_classes[v]):
          if c in class_group and (k, d) not in gathered:
            op_group[op.index, class_group[c]] = True
    for v in op.out_vars:
      op_group[op.index, [class_group[c] for c in v_classes[v] if c in class_group]] = True
    if any(var_batch[v] for v in vs):
      op_data_cat[op.index] = liveness.DATA_BATCH
    elif op.out_vars and var_weight[op.out_vars[0]]:
      op_data_cat[op.index] = liveness.DATA_WEIGHT
    if op.out_vars:
      op_out_var[op.index] = op.out_vars[0]
      op_out_bytes[op.index] = sum(var_bytes[v] for v in op.out_vars)
    out_classes = {c for v in op.out_vars for c in v_classes[v]}
    for k, d in op.reduce_dims:
      c = v_classes[op.in_vars[k]][d]
      if c in out_classes:  # the result is split the same way: each device owns its part
        continue
      if c in batch_classes:
        red_batch[op.index] = True
      elif c in class_group:
        red_group[op.index, class_group[c]] = True
      if c in sequence:
        red_sequence[op.index] = True
    for k, d in op.gather_dims:
      v = op.in_vars[k]
      c = v_classes[v][d]
      if c in batch_classes or c in class_group:
        g_op.append(op.index)
        g_var.append(v)
        g_batch.append(c in batch_classes)
        g_group.append(class_group.get(c, -1))

  red_batch_sink, red_group_sink = red_batch.copy(), red_group.copy()
  _reduce_at_sinks(ops, red_batch_sink, red_group_sink)
  red_sequence_sink = red_sequence.copy()
  _reduce_at_sinks(ops, red_sequence_sink, np.zeros((n, 0), dtype=bool))
  outputs = set(traced.output_vars) - {traced.loss_var}
  not_temporary = list(
    traced.param_vars + traced.opt_state_vars + traced.batch_vars + traced.state_vars
  )
  not_temporary += list(outputs)  # new params / opt state are written into donated buffers
  # Gathered uses alias their parameter unless FSDP splits it; the pricing counts them then.
  gathered = np.array(traced.gathered, dtype=float).reshape(-1, 3)
  gathered_var = gathered[:, 0].astype(np.int64)
  not_temporary += list(gathered_var)
  materialised = {r.name: buffers_lib.materialised(traced, r) for r in _rule_sets(rules, remat)}
  buffers = tuple(
    _buffers(r, *materialised[r.name], not_temporary, traced) for r in _rule_sets(rules, remat)
  )

  pv = list(traced.param_vars)
  ov = list(traced.opt_state_vars)
  return SearchSpace(
    traced=traced,
    costs=costs,
    groups=tuple(groups),
    batch_classes=frozenset(batch_classes),
    self_paired=frozenset(self_paired),
    conflicts=conflicts,
    var_group=var_group,
    var_bytes=var_bytes,
    var_batch=var_batch,
    var_weight=var_weight,
    buffers=buffers,
    traffic=fused_traffic(traced, costs, rules, materialised[rules.name][0]),
    op_group=op_group,
    op_data_cat=op_data_cat,
    op_out_var=op_out_var,
    op_out_bytes=op_out_bytes,
    red_batch=red_batch,
    red_group=red_group,
    red_batch_sink=red_batch_sink,
    red_group_sink=red_group_sink,
    gathers=(
      np.asarray(g_op, dtype=np.int64),
      np.asarray(g_var, dtype=np.int64),
      np.asarray(g_batch, dtype=bool),
      np.asarray(g_group, dtype=np.int64),
    ),
    param_group=var_group[pv],
    param_bytes=var_bytes[pv],
    param_dims=tuple(tuple(zip(v_classes[v], traced.var_shape[v])) for v in pv),
    gathered_var=gathered_var,
    gathered_param=gathered[:, 1].astype(np.int64),
    gathered_runs=gathered[:, 2],
    opt_bytes=var_bytes[ov],
    opt_weight=var_weight[ov],
    opt_group=var_group[ov],
    batch_bytes=float(sum(var_bytes[v] for v in traced.batch_vars)),
    batch_size=batch_size,
    model_state_bytes=float(sum(var_bytes[v] for v in traced.state_vars)),
    batch_reduce_rounds=_reduction_rounds(ops, red_batch_sink),
    remat=remat,
    microbatches=microbatches,
    var_sequence=var_sequence,
    sequence_pairs=var_group[var_sequence_pair],
    red_sequence=red_sequence_sink,
    sequence_size=math.gcd(*(traced.class_size[c] for c in sequence)) if sequence else 0,
    experts=find_experts(traced),
    attention=find_attention(traced),
    first_use=first_uses(traced),
    gather_reads=np.array(
      [
        (op.index, op.in_vars[0], op.out_vars[0])
        for op in traced.ops
        if op.primitive == "gather" and op.in_vars[0] >= 0
      ],
      dtype=np.int64,
    ).reshape(-1, 3),
  )


def _rule_sets(rules: CompilerRules, remat: str) -> tuple[CompilerRules, ...]:
  """The target compiler's rules, and the rules bounding its peak in a rematerialised step."""
  if remat != "none" and rules.remat_at_least:
    return rules, compilers.REGISTRY[rules.remat_at_least]
  return (rules,)


def _buffers(
  rules: CompilerRules, kept: np.ndarray, last_use: np.ndarray, not_temporary: list[int], traced
) -> CompilerBuffers:
  kept = kept.copy()
  kept[not_temporary] = False
  return CompilerBuffers(rules, kept, last_use, rules.scratch_buffers(traced))


def _reduction_rounds(ops, reduces: np.ndarray) -> int:
  """How many reductions lie on the longest dependency path (1 when none depends on another:
  then all of them can go out combined at the end)."""
  depth: dict[int, int] = {}
  rounds = 0
  for op in ops:
    d = max((depth.get(v, 0) for v in op.in_vars if v >= 0), default=0)
    if reduces[op.index] and op.multiplicity:
      d += 1
      rounds = max(rounds, d)
    for v in op.out_vars:
      depth[v] = d
  return rounds


def _reduce_at_sinks(ops, red_batch: np.ndarray, red_group: np.ndarray) -> None:
  """Moves each partial-sum reduction flag to where the partial value is last combined.

  dx = dq Wq^T + dk Wk^T + dv Wv^T under a head split is three partial sums that XLA reduces in
  one tuple all-reduce: the bytes are those of all three (measured: it does not add the
  partials first), but the latency is paid once. These flags count collectives, not bytes.
  """
  uses: dict[int, int] = {}
  for op in ops:
    for v in op.in_vars:
      if v >= 0:
        uses[v] = uses.get(v, 0) + 1
  state: dict[int, tuple] = {}  # partial variable -> (over batch, groups)
  carrier: dict[int, int] = {}  # partial variable -> op charged for its reduction
  # Each op's own flags, read before the loop moves any (it moves them onto later ops only).
  own_batch, own_any = red_batch.tolist(), red_group.any(axis=1).tolist()
  for op in ops:
    i = op.index
    if len(op.out_vars) != 1:
      continue
    own = (own_batch[i], tuple(np.flatnonzero(red_group[i])) if own_any[i] else ())
    out = op.out_vars[0]
    if own != (False, ()):
      state[out], carrier[out] = own, i
      continue
    ins = [v for v in op.in_vars if v >= 0]
    partial = [v for v in ins if v in state and uses[v] == 1]
    if not partial:
      continue
    if op.primitive in SUMMING:
      ok = len(partial) == len(op.in_vars) and len({state[v] for v in partial}) == 1
    elif op.primitive in LINEAR_UNARY:
      ok = len(op.in_vars) == 1
    elif op.primitive in SCALING:  # partial * x and partial / x, with x not partial
      ok = (
        len(partial) == 1
        and len([v for v in ins if v in state]) == 1
        and (op.primitive == "mul" or op.in_vars[0] == partial[0])
      )
    else:
      ok = False
    if not ok:
      continue
    for v in partial:
      red_batch[carrier[v]] = False
      red_group[carrier[v]] = False
    over_batch, groups = state[partial[0]]
    red_batch[i] = over_batch
    red_group[i, list(groups)] = True
    state[out], carrier[out] = state[partial[0]], i


def eligible_groups(space: SearchSpace, tp: int) -> list[int]:
  """Groups that can be split tp ways on the model axis, largest parameters first."""
  ok = [
    g.index
    for g in space.groups
    if g.size % tp == 0 and g.index not in space.self_paired and g.param_bytes > 0
  ]
  ok.sort(key=lambda g: -space.groups[g].param_bytes)
  return ok[:MAX_SEARCHED_GROUPS]


def group_sets(space: SearchSpace, tp: int) -> list[tuple[int, ...]]:
  """Every set of eligible groups no two of which share a tensor (one model axis per tensor)."""
  if tp == 1:
    return [()]
  ok = eligible_groups(space, tp)
  sets = []
  for r in range(1, len(ok) + 1):
    for combo in itertools.combinations(ok, r):
      if not any(space.conflicts[a, b] for a, b in itertools.combinations(combo, 2)):
        sets.append(tuple(sorted(combo)))
  return sets
