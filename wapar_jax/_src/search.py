"""Device count x mesh shape x dimension-class assignment -> ranked candidates.

A candidate is (data degree dp, model degree tp, the groups of dimension classes split on the
model axis, and where parameters / optimizer state are stored along the data axis). The batch
class is always split on the data axis.

Evaluation is exact enumeration, made cheap by one observation: for a fixed set of model-split
groups, every op and every variable falls in one of a handful of sharding categories (carries
the batch or not, is weight-shaped or not, touches a model-split class or not), and its per-device
cost is its unsharded cost divided by dp and/or tp according to its category. So one O(#ops) pass
per group set yields a few sums, and each (dp, tp, storage) is then priced in O(1) time plus one
max over the memory curves. Thousands of candidates for a 7B model cost well under a second,
which is why there is no need for beam search or an ILP at this scale.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Mapping, Sequence

import numpy as np

from wapar_jax._src import memory
from wapar_jax._src.cost.xla import StepCosts
from wapar_jax._src.cost.collectives import (COMBINE_BYTES, hierarchical_collective_steps,
                                             hierarchical_collective_traffic)
from wapar_jax.errors import IndivisibleBatchError, InvalidArgumentError
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.trace import TracedStep

STRATEGIES = ("auto", "dp", "zero1", "fsdp", "tp", "dp_tp")
STORAGES = ("replicated", "zero1", "fsdp")
OBJECTIVES = ("time", "energy")
# Whose buffer rules decide whether a plan fits: the compiler that will run the step
# (memory.compiler_for the profile), or XLA:CPU's, so that `plan.verify()` on CPU devices checks
# the fit (its peaks are higher: every GPU XLA compile measured lay below XLA:CPU's).
MEMORY_RULES = ("profile", memory.XLA_CPU)
DATA, MODEL = "data", "model"
# Fraction of device memory a plan leaves free: fragmentation and runtime buffers (~10%), and
# the memory model's error. At 10% the fastest 1.3B plan on 4 x titanxp-pcie sat 0.2% under
# its budget and compiled 3.6% over the prediction, past 90% of the card.
DEFAULT_MEMORY_HEADROOM = 0.15
# Parameters smaller than this stay replicated under FSDP: a collective per bias or norm scale
# costs more latency than the memory it saves.
FSDP_MIN_BYTES = 64 * 1024
# Model-split group sets are enumerated exhaustively over at most this many groups (the largest).
MAX_SEARCHED_GROUPS = 12
# XLA combines independent collectives (weight gradients, FSDP gathers) up to this many bytes
# (XLA GPU's all-reduce combine threshold); one combined collective pays latency once.

# Summed per-op bytes of elementwise ops over-count fused programs (see DESIGN): count a share.
FUSED_BYTES_SHARE = 0.3


@dataclasses.dataclass(frozen=True)
class Group:
  """Isomorphic dimension classes decided together (e.g. the MLP hidden dim of every layer)."""
  index: int
  classes: frozenset[int]
  size: int
  param_bytes: float
  label: str


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One point of the search with its predicted figures (per device, per step)."""
  devices: int
  data: int
  model: int
  model_groups: tuple[int, ...]
  storage: str
  strategy: str
  step_time: float
  compute_time: float
  comm_time: float
  flops: float
  comm_bytes: float
  peak_memory: float
  energy: float
  fits: bool
  # Per-device memory by term (bytes); peak_memory is their sum.
  param_memory: float = 0.0
  opt_state_memory: float = 0.0
  activation_memory: float = 0.0
  # How the step is run: rematerialisation policy and gradient-accumulation micro-batches.
  remat: str = "none"
  microbatches: int = 1
  # Mesh axes whose collectives cross nodes (laid out as create_hybrid_device_mesh does).
  cross_node_axes: tuple[str, ...] = ()
  # The peak as XLA:CPU would compile the step (what `plan.verify()` compiles on this host);
  # peak_memory is under the rules that decide the fit (MEMORY_RULES: by default the profile's
  # compiler, memory.compiler_for). 0 in plans from before.
  peak_memory_xla_cpu: float = 0.0

  @property
  def mesh_shape(self) -> dict[str, int]:
    return mesh_shape(self.data, self.model)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["model_groups"] = list(self.model_groups)
    d["cross_node_axes"] = list(self.cross_node_axes)
    d["mesh_shape"] = self.mesh_shape
    return d


def mesh_shape(dp: int, tp: int) -> dict[str, int]:
  """Axes of size 1 are dropped, except that one device still has a (data=1) mesh."""
  shape = {DATA: dp, MODEL: tp}
  kept = {k: v for k, v in shape.items() if v > 1}
  return kept or {DATA: 1}


def strategy_label(dp: int, tp: int, storage: str) -> str:
  if dp * tp == 1:
    return "single"
  if tp == 1:
    return {"replicated": "dp", "zero1": "zero1", "fsdp": "fsdp"}[storage]
  if dp == 1:
    return "tp"
  return "dp_tp" if storage == "replicated" else f"dp_tp+{storage}"


def _allowed(strategy: str, dp: int, tp: int, storage: str, groups: tuple) -> bool:
  if strategy == "auto" or dp * tp == 1:
    return True
  if strategy in ("dp", "zero1", "fsdp"):
    return tp == 1 and storage == {"dp": "replicated", "zero1": "zero1", "fsdp": "fsdp"}[strategy]
  if strategy == "tp":
    return dp == 1 and bool(groups)
  # "dp_tp"; `search` has already rejected names outside STRATEGIES.
  return dp > 1 and tp > 1 and bool(groups) and storage == "replicated"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Everything the search needs from a traced step, as arrays. Built once, profile-free."""
  traced: TracedStep
  costs: StepCosts
  groups: tuple[Group, ...]
  batch_classes: frozenset[int]
  self_paired: frozenset[int]       # group ids that occur twice in one tensor
  conflicts: np.ndarray             # [G, G] bool: the two groups share a tensor
  var_group: np.ndarray             # [V, G] bool
  var_bytes: np.ndarray             # [V]
  var_batch: np.ndarray             # [V] bool
  var_weight: np.ndarray            # [V] bool: shaped like a parameter, no batch dim
  # Per compiler (memory.COMPILERS): ([V] bool counted in the temporaries' liveness, [V] last
  # op needing each, counting recomputation by fusion).
  temps: Mapping[str, tuple[np.ndarray, np.ndarray]]
  scratch: Mapping[str, memory.Scratch]  # per compiler: buffers no variable stands for
  op_group: np.ndarray              # [N, G] bool
  op_data_cat: np.ndarray           # [N] memory.DATA_* category of the op's work
  op_out_var: np.ndarray            # [N] first output variable (-1 if none)
  op_out_bytes: np.ndarray          # [N] bytes of all outputs
  red_batch: np.ndarray             # [N] bool: a reduced dim carries the batch
  red_group: np.ndarray             # [N, G] bool
  red_batch_sink: np.ndarray        # [N] bool: where a chain of partial sums is reduced
  red_group_sink: np.ndarray        # [N, G] bool
  gathers: tuple[np.ndarray, ...]   # (op, var, is_batch, group or -1) of dims needing a gather
  param_group: np.ndarray           # [P, G] bool
  param_bytes: np.ndarray           # [P]
  param_dims: tuple[tuple[tuple[int, int], ...], ...]  # per param: (class, size) per dim
  # Per param: the last op reading it for compute, not for the optimizer update (how long an
  # FSDP-gathered copy lives); the step's end where a loop reads it (needed every iteration).
  param_read_until: np.ndarray
  param_first_read: np.ndarray  # [P] first op reading each parameter
  opt_bytes: np.ndarray             # [O]
  opt_weight: np.ndarray            # [O] bool: shaped like a parameter
  opt_group: np.ndarray             # [O, G] bool
  batch_bytes: float
  batch_size: int
  # Batch reductions on the longest chain of reductions that depend on one another (batch-norm
  # statistics: the variance needs the reduced mean, the next layer needs both, and so on back
  # through the backward pass). All but the last are collectives of their own.
  batch_reduce_rounds: int = 0
  remat: str = "none"
  microbatches: int = 1


def build_space(traced: TracedStep, costs: StepCosts, param_paths: Sequence[str], *,
                remat: str = "none", microbatches: int = 1) -> SearchSpace:
  """Groups the dimension classes and lays the step out as arrays for the search."""
  v_classes = traced.var_classes
  batch_classes = set()
  for v in traced.batch_vars:
    if not traced.var_shape[v]:
      raise InvalidArgumentError(
          "every batch leaf needs a leading batch dimension to split over devices. "
          f"Got a scalar batch leaf (leaf {traced.batch_vars.index(v)}).")
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
    label = f"size {sig[0]}: " + ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else "")
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
  param_signatures = {tuple(sorted(v_classes[v])) for v in traced.param_vars}
  var_weight = np.zeros(nv, dtype=bool)
  for v in range(nv):
    cls = v_classes[v]
    gs = [class_group[c] for c in cls if c in class_group]
    var_group[v, gs] = True
    if len(gs) != len(set(gs)):
      self_paired.update(g for g in gs if gs.count(g) > 1)
    for a, b in itertools.combinations(set(gs), 2):
      conflicts[a, b] = conflicts[b, a] = True
    var_batch[v] = any(c in batch_classes for c in cls)
    var_weight[v] = bool(cls) and not var_batch[v] and tuple(sorted(cls)) in param_signatures

  ops = traced.ops
  n = len(ops)
  op_group = np.zeros((n, num_groups), dtype=bool)
  op_data_cat = np.full(n, memory.DATA_NONE)
  op_out_var = np.full(n, -1)
  op_out_bytes = np.zeros(n)
  red_batch = np.zeros(n, dtype=bool)
  red_group = np.zeros((n, num_groups), dtype=bool)
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
      op_data_cat[op.index] = memory.DATA_BATCH
    elif op.out_vars and var_weight[op.out_vars[0]]:
      op_data_cat[op.index] = memory.DATA_WEIGHT
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
  outputs = set(traced.output_vars) - {traced.loss_var}
  not_temporary = list(traced.param_vars + traced.opt_state_vars + traced.batch_vars)
  not_temporary += list(outputs)  # new params / opt state are written into donated buffers
  temps = {}
  for compiler in memory.COMPILERS:
    temp_vars, temp_last_use = memory.materialised(traced, compiler)
    temp_vars[not_temporary] = False
    temps[compiler] = (temp_vars, temp_last_use)
  scratch = {compiler: memory.scratch_buffers(traced, compiler) for compiler in memory.COMPILERS}

  pv = list(traced.param_vars)
  ov = list(traced.opt_state_vars)
  param_index = {v: i for i, v in enumerate(pv)}
  param_read_until = np.zeros(len(pv), dtype=np.int64)
  param_first_read = np.full(len(pv), len(ops), dtype=np.int64)
  for op in ops:
    for v in op.in_vars:
      i = param_index.get(v)
      if i is None:
        continue
      param_first_read[i] = min(param_first_read[i], op.index)
      if op_data_cat[op.index] != memory.DATA_WEIGHT:  # not the optimizer update
        param_read_until[i] = len(ops) if op.multiplicity > 1 else max(param_read_until[i], op.index)
  return SearchSpace(
      traced=traced, costs=costs, groups=tuple(groups), batch_classes=frozenset(batch_classes),
      self_paired=frozenset(self_paired), conflicts=conflicts, var_group=var_group,
      var_bytes=var_bytes, var_batch=var_batch, var_weight=var_weight, temps=temps,
      scratch=scratch,
      op_group=op_group, op_data_cat=op_data_cat, op_out_var=op_out_var,
      op_out_bytes=op_out_bytes, red_batch=red_batch, red_group=red_group,
      red_batch_sink=red_batch_sink, red_group_sink=red_group_sink,
      gathers=(np.asarray(g_op, dtype=np.int64), np.asarray(g_var, dtype=np.int64),
               np.asarray(g_batch, dtype=bool), np.asarray(g_group, dtype=np.int64)),
      param_group=var_group[pv], param_bytes=var_bytes[pv],
      param_dims=tuple(tuple(zip(v_classes[v], traced.var_shape[v])) for v in pv),
      param_read_until=param_read_until, param_first_read=param_first_read,
      opt_bytes=var_bytes[ov], opt_weight=var_weight[ov], opt_group=var_group[ov],
      batch_bytes=float(sum(var_bytes[v] for v in traced.batch_vars)), batch_size=batch_size,
      batch_reduce_rounds=_reduction_rounds(ops, red_batch_sink),
      remat=remat, microbatches=microbatches)


# Ops through which a partial sum stays a partial sum (they are linear in it).
_SUMMING = frozenset({"add", "add_any", "sub"})
_LINEAR_UNARY = frozenset({"neg", "convert_element_type", "reshape", "transpose", "squeeze",
                           "copy", "copy_p"})
_SCALING = frozenset({"mul", "div"})


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
  state: dict[int, tuple] = {}   # partial variable -> (over batch, groups)
  carrier: dict[int, int] = {}   # partial variable -> op charged for its reduction
  for op in ops:
    i = op.index
    own = (bool(red_batch[i]), tuple(np.flatnonzero(red_group[i])))
    if len(op.out_vars) != 1:
      continue
    out = op.out_vars[0]
    if own != (False, ()):
      state[out], carrier[out] = own, i
      continue
    ins = [v for v in op.in_vars if v >= 0]
    partial = [v for v in ins if v in state and uses[v] == 1]
    if not partial:
      continue
    if op.primitive in _SUMMING:
      ok = len(partial) == len(op.in_vars) and len({state[v] for v in partial}) == 1
    elif op.primitive in _LINEAR_UNARY:
      ok = len(op.in_vars) == 1
    elif op.primitive in _SCALING:  # partial * x and partial / x, with x not partial
      ok = len(partial) == 1 and len([v for v in ins if v in state]) == 1 and (
          op.primitive == "mul" or op.in_vars[0] == partial[0])
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
  ok = [g.index for g in space.groups
        if g.size % tp == 0 and g.index not in space.self_paired and g.param_bytes > 0]
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


@dataclasses.dataclass(frozen=True)
class _MemoryCurves:
  """Liveness of the temporaries under one compiler's buffer rules."""
  curves: np.ndarray        # memory.liveness_curves
  update_pos: int           # program point where the weight gradients are all live
  # memory.liveness_curves of the weight gradients alone (None where reductions run in place)
  grad_curves: np.ndarray | None
  # The same gradients, each at the one point where its combined reduction runs (None where
  # reductions run in place)
  combine_curves: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class _Aggregates:
  """Sums over ops / variables for one model-split group set (see module docstring)."""
  compute: np.ndarray       # [3 data cats, 2 model] seconds at one device
  flops: np.ndarray         # [3, 2]
  red_data: np.ndarray      # [2 weight-shaped?, 2 model] output bytes reduced over data
  red_data_n: np.ndarray    # [2, 2] collective counts (weight gradients: see loop_iterations)
  loop_iterations: float    # iterations of the deepest loop holding weight-gradient reductions
  red_model: np.ndarray     # [2 batch, 2 model] output bytes reduced over model
  red_model_n: np.ndarray
  gather_data: np.ndarray   # [2 model] input bytes gathered over data
  gather_data_n: np.ndarray
  gather_model: np.ndarray  # [2 batch] input bytes gathered over model
  gather_model_n: np.ndarray
  memory: Mapping[str, _MemoryCurves]  # per compiler
  # [2 model, points]: bytes of parameters big enough for FSDP while compute still reads them
  gathered_curves: np.ndarray
  param_model: np.ndarray   # [P] bool
  opt_model: np.ndarray     # [O] bool


def _gemm_size(eqn) -> float:
  """Geometric mean of the (m, n, k) of a dot or convolution seen as one GEMM; 0 otherwise."""
  name = eqn.primitive.name
  if name == "dot_general":
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    k = math.prod(lhs[d] for d in lc)
    m = math.prod(lhs[d] for d in range(len(lhs)) if d not in lc and d not in lb)
    n = math.prod(rhs[d] for d in range(len(rhs)) if d not in rc and d not in rb)
  elif name == "conv_general_dilated":
    dn = eqn.params["dimension_numbers"]
    out, rhs = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
    n = out[dn.out_spec[1]]
    k = math.prod(rhs) // max(rhs[dn.rhs_spec[0]], 1)
    m = math.prod(out) // max(n, 1)
  else:
    return 0.0
  return float(m * n * k) ** (1 / 3)


def matmul_efficiency(space: SearchSpace, profile: DeviceProfile) -> np.ndarray:
  """Per op: the fraction of peak its matmul reaches at its size (1 for other ops, and for
  profiles without `matmul_half_size`)."""
  half = profile.matmul_half_size
  if not half:
    return np.ones(len(space.traced.ops))
  size = np.array([_gemm_size(op.eqn) for op in space.traced.ops])
  return np.where(size > 0, size / (size + half), 1.0)


def op_roofline(space: SearchSpace, profile: DeviceProfile) -> tuple[np.ndarray, np.ndarray]:
  """Per op on one device: (FLOPs / achievable peak, bytes / achievable bandwidth) seconds."""
  peak = np.array([profile.flops_per_second(_op_dtype(op)) for op in space.traced.ops])
  peak = peak * matmul_efficiency(space, profile)
  fusible = np.array([op.fusible for op in space.traced.ops], dtype=bool)
  nbytes = space.costs.bytes_accessed * np.where(fusible, FUSED_BYTES_SHARE, 1.0)
  return (space.costs.flops / (peak * profile.compute_efficiency),
          nbytes / (profile.memory_bandwidth * profile.memory_efficiency))


def _op_seconds(space: SearchSpace, profile: DeviceProfile) -> np.ndarray:
  """Roofline time of each op on one device: the larger of its compute and memory time, plus
  the profile's per-kernel overhead for every run of an op that XLA does not fuse away."""
  fusible = np.array([op.fusible for op in space.traced.ops], dtype=bool)
  costed = (space.costs.flops > 0) | (space.costs.bytes_accessed > 0)
  kernels = np.where(~fusible & costed, space.costs.multiplicity, 0.0)
  return np.maximum(*op_roofline(space, profile)) + profile.kernel_overhead * kernels


def data_divisors(dp: int, storage: str) -> tuple[int, int, int]:
  """Data-axis split of work / values per memory.DATA_* category: batch, weight-shaped, other.

  Weight-shaped work (the optimizer update) splits only when the state is sharded.
  """
  return dp, dp if storage != "replicated" else 1, 1


def _op_dtype(op):
  for v in list(op.eqn.invars) + list(op.eqn.outvars):
    dtype = getattr(v.aval, "dtype", None)
    if dtype is not None:
      return dtype
  return "float32"


def _aggregate(space: SearchSpace, groups: tuple[int, ...], op_seconds: np.ndarray) -> _Aggregates:
  mask = np.zeros(len(space.groups), dtype=bool)
  mask[list(groups)] = True
  var_model = space.var_group[:, mask].any(axis=1)
  op_model = space.op_group[:, mask].any(axis=1).astype(np.int64)
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
  in_loop_weight = space.red_batch & (out_weight == 1) & (mult > 1)
  loop_iterations = float(mult[in_loop_weight].max()) if in_loop_weight.any() else 0.0
  red_m = space.red_group[:, mask].any(axis=1)
  red_model = summed(red_m, out_batch, out_model, weighted)
  red_model_n = summed(space.red_group_sink[:, mask].any(axis=1), out_batch, out_model, mult)

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
  data_cat = np.where(space.var_batch, memory.DATA_BATCH,
                      np.where(space.var_weight, memory.DATA_WEIGHT, memory.DATA_NONE))
  # Weight gradients, full size (the partial sums a data-axis reduction reads), while they live.
  grads = np.zeros(t.num_vars, dtype=bool)
  grads[out[space.red_batch_sink & (out_weight == 1) & has_out]] = True
  curves_by_compiler = {}
  for compiler, (temp, last_use) in space.temps.items():
    extra = space.scratch[compiler]
    curves = memory.liveness_curves(
        np.concatenate([t.def_pos[temp], extra.start]),
        np.concatenate([last_use[temp], extra.stop]),
        np.concatenate([space.var_bytes[temp], extra.nbytes]),
        np.concatenate([data_cat[temp], data_cat[extra.like]]),
        np.concatenate([var_model[temp], var_model[extra.like]]), len(t.ops))
    grad_curves = combine_curves = None
    if not memory.REDUCES_IN_PLACE[compiler]:
      made, kinds = t.def_pos[grads], np.full(int(grads.sum()), memory.DATA_NONE)
      grad_curves = memory.liveness_curves(made, last_use[grads], space.var_bytes[grads], kinds,
                                           var_model[grads], len(t.ops))
      # Each bucket of gradients, in the order they are made, reduces right after its last is
      # made, once that op's operands are freed.
      order = np.argsort(made, kind="stable")
      bucket = np.empty_like(order)
      bucket[order] = np.arange(len(order)) // memory.CPU_COMBINE_COUNT
      reduced_at = np.zeros(int(bucket.max(initial=-1)) + 1, dtype=np.int64)
      np.maximum.at(reduced_at, bucket, made + 1)
      combine_curves = memory.liveness_curves(
          reduced_at[bucket], reduced_at[bucket], space.var_bytes[grads], kinds,
          var_model[grads], len(t.ops))
    curves_by_compiler[compiler] = _MemoryCurves(
        curves, int(np.argmax(curves[memory.DATA_WEIGHT].sum(axis=0))), grad_curves,
        combine_curves)
  param_model = space.param_group[:, mask].any(axis=1)
  big = space.param_bytes >= FSDP_MIN_BYTES
  gathered_curves = memory.liveness_curves(
      np.zeros(int(big.sum()), dtype=np.int64), space.param_read_until[big],
      space.param_bytes[big], np.full(int(big.sum()), memory.DATA_NONE), param_model[big],
      len(t.ops))[memory.DATA_NONE]
  return _Aggregates(compute, flops, red_data, red_data_n, loop_iterations, red_model,
                     red_model_n, gather_data,
                     gather_data_n, gather_model, gather_model_n, curves_by_compiler,
                     gathered_curves, param_model, space.opt_group[:, mask].any(axis=1))


def _fsdp_shardable(space: SearchSpace, dp: int, groups: tuple[int, ...]) -> np.ndarray:
  """Per parameter: has a dim, not on the model axis, that splits dp ways; and is big enough."""
  in_groups = {c for g in groups for c in space.groups[g].classes}
  loop = space.traced.loop_classes
  ok = np.zeros(len(space.param_dims), dtype=bool)
  for i, dims in enumerate(space.param_dims):
    if space.param_bytes[i] < FSDP_MIN_BYTES:
      continue
    ok[i] = any(size % dp == 0 and c not in in_groups and c not in loop for c, size in dims)
  return ok


def _gathered_strided(space: SearchSpace, dp: int, groups: tuple[int, ...],
                      shardable: np.ndarray, tp: int) -> np.ndarray:
  """Per FSDP-sharded parameter: gathered along a dim with a non-trivial dim before it (in the
  per-device layout), which XLA:CPU gathers transposed and copies back to row-major."""
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


def fsdp_dim(dims: Sequence[tuple[int, int]], dp: int, taken: Sequence[bool],
             loop_classes: frozenset[int]) -> int | None:
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


def _price(space: SearchSpace, agg: _Aggregates, profile: DeviceProfile, dp: int, tp: int,
           groups: tuple[int, ...], storage: str, budget: float, fit_compiler: str) -> Candidate:
  d = dp * tp
  sharded_state = storage != "replicated"
  data_div = data_divisors(dp, storage)
  div = np.array(data_div, dtype=float)[:, None] * np.array([1.0, tp])[None, :]
  compute_time = float((agg.compute / div).sum())
  flops = float((agg.flops / div).sum())

  spans = axis_spans(dp, tp, profile.devices_per_node)
  data_span, model_span = spans[DATA], spans[MODEL]
  inner, outer = profile.intra_node, profile.inter_node
  model_scale = np.array([1.0, 1.0 / tp])
  data_scale = np.array([1.0, 1.0 / dp])

  comm_time = 0.0
  comm_bytes = 0.0

  def add(kind, nbytes, count, n, span):
    # Two-level (reduce-scatter in node, across nodes on 1/n_inner, all-gather in node) once
    # the axis spans nodes; a plain ring on the fast link while it stays in one.
    nonlocal comm_time, comm_bytes
    if n <= 1 or count <= 0:
      return
    n_inner, n_outer = span
    steps_in, steps_out = hierarchical_collective_steps(kind, n_inner, n_outer)
    bytes_in, bytes_out = hierarchical_collective_traffic(kind, nbytes, n_inner, n_outer)
    comm_time += (steps_in * inner.latency + steps_out * outer.latency) * count
    comm_time += bytes_in / inner.bandwidth + bytes_out / outer.bandwidth
    comm_bytes += bytes_in + bytes_out

  # Partial sums over the data axis: weight gradients (reduce-scattered when state is sharded).
  weight_kind = "reduce-scatter" if sharded_state else "all-reduce"
  grad_bytes = float(agg.red_data[1] @ model_scale)
  add(weight_kind, grad_bytes, _combined(grad_bytes) + agg.loop_iterations, dp, data_span)
  # Other partial sums over the batch (the loss, norms): independent ones go out as one tuple
  # all-reduce (measured); dependent ones (batch-norm statistics, layer after layer) one round
  # after another (measured on ResNet-50: 206 all-reduces).
  other_bytes = float(agg.red_data[0] @ model_scale)
  other_count = _combined(other_bytes) + max(space.batch_reduce_rounds - 1, 0)
  add("all-reduce", other_bytes, other_count + agg.loop_iterations, dp, data_span)
  add("all-reduce", float(data_scale @ agg.red_model @ model_scale), float(agg.red_model_n.sum()), tp, model_span)
  add("all-gather", float(agg.gather_data @ model_scale), float(agg.gather_data_n.sum()), dp, data_span)
  add("all-gather", float(agg.gather_model @ data_scale), float(agg.gather_model_n.sum()), tp, model_span)

  param_div = np.where(agg.param_model, tp, 1).astype(float)
  opt_div = np.where(agg.opt_model, tp, 1).astype(float)
  shardable = _fsdp_shardable(space, dp, groups) if dp > 1 else np.zeros(len(param_div), bool)
  per_param = space.param_bytes / param_div
  gathered_live: np.ndarray | float = 0.0  # FSDP's gathered parameters, per program point
  relayout_cpu: np.ndarray | float = 0.0
  zero1_gathered = 0.0
  if storage == "fsdp":
    # Gathered once, at the top of the step where the emitted step pins parameters to their
    # compute layout; the backward pass reads the same gathered copy (measured on gpt2-small,
    # 8 devices: 74 all-gathers of 474 MiB, one per parameter), which lives until its last
    # read there (AlexNet: the classifier's gathered weights are gone when its weight
    # gradients are made). Big parameters that do not split dp ways are in param_mem instead.
    gathered = float(per_param[shardable].sum())
    add("all-gather", gathered, _combined(gathered) + agg.loop_iterations, dp, data_span)
    param_mem = float((per_param / np.where(shardable, dp, 1)).sum())
    unsplit = float(per_param[~shardable & (space.param_bytes >= FSDP_MIN_BYTES)].sum())
    gathered_live = np.maximum(agg.gathered_curves[0] + agg.gathered_curves[1] / tp - unsplit, 0)
    # XLA:CPU gathers a parameter split along a minor dim in a transposed layout and copies
    # it back, every copy at the top of the step, each living until the parameter's first
    # read (GPT-1.3B, 4 devices, per-layer remat: 24 MLP input kernels, 1.5 GiB).
    strided = _gathered_strided(space, dp, groups, shardable, tp)
    k = int(strided.sum())
    relayout_cpu = memory.liveness_curves(
        np.zeros(k, dtype=np.int64), space.param_first_read[strided], per_param[strided],
        np.full(k, memory.DATA_NONE), np.zeros(k, dtype=bool),
        len(space.traced.ops))[memory.DATA_NONE, 0]
  else:
    param_mem = float(per_param.sum())
    if storage == "zero1":  # updated parameters are all-gathered from their shards
      zero1_gathered = float(per_param[shardable].sum())  # into a new buffer
      add("all-gather", zero1_gathered, _combined(zero1_gathered), dp, data_span)
  opt_shard = np.where(space.opt_weight & (space.opt_bytes >= FSDP_MIN_BYTES) & sharded_state, dp, 1)
  opt_mem = float((space.opt_bytes / opt_div / opt_shard).sum())
  # Collective buffers the liveness scan does not see. XLA:CPU reduces gradients over the
  # data axis with all-reduces (sharded state too: it has no reduce-scatter and slices the
  # full result), combined in buckets (memory.CPU_COMBINE_COUNT), each reading full-size
  # partial sums and writing a new full-size result: both live where the bucket reduces
  # (AlexNet ZeRO-1 on 4 devices: 16 gradients of 233 MiB, twice, at the end of the backward
  # pass; GPT-1.3B's two buckets one after the other). Replicated, the liveness scan holds
  # one of the two, partial sum then result; sharded it holds the 1/dp slice: count the
  # full-size gradient while it lives too. GPU XLA reduces into the partial sums' own buffer
  # (see memory.REDUCES_IN_PLACE).
  def temporaries(compiler: str) -> float:
    m = agg.memory[compiler]
    grad_shadow: np.ndarray | float = 0.0
    if dp > 1 and m.grad_curves is not None:
      grad_shadow = memory.per_device(m.combine_curves, (1, 1, 1), tp)
      if sharded_state:
        grad_shadow = grad_shadow + memory.per_device(m.grad_curves, (1, 1, 1), tp)
    extra = grad_shadow + gathered_live + (relayout_cpu if compiler == memory.XLA_CPU else 0.0)
    temps = memory.peak_bytes(m.curves, data_div, tp, extra=extra)
    if storage == "zero1":
      # ZeRO-1 gathers the updated parameters after the update, once the gradient reduction's
      # buffers are freed: the two never coexist (measured, 1.3B on 4 devices: compiled
      # temporaries 16.6 GiB, summing both predicted 22.7).
      return max(temps, memory.bytes_at(m.curves, m.update_pos, data_div, tp) + zero1_gathered)
    return temps

  state = param_mem + opt_mem + space.batch_bytes / dp
  peak_xla_cpu = state + temporaries(memory.XLA_CPU)
  peak = peak_xla_cpu if fit_compiler == memory.XLA_CPU else state + temporaries(fit_compiler)
  if fit_compiler == memory.XLA_GPU and space.remat != "none":
    # GPU XLA does not keep to the jaxpr's order in a rematerialised backward pass: it runs
    # recomputations and defers weight-gradient matmuls across layers, and kept more than
    # XLA:CPU in both remat plans compiled for an H200 (GPT-1.3B, per-layer: 12.95 GiB
    # against XLA:CPU's 12.01, predicted 9.36 under GPU rules; GPT-7B, dots saved: every
    # layer's recomputed softmax at once, 71.3 against 50.4). Fit such plans to the larger
    # of the two compilers' rules.
    peak = max(peak, peak_xla_cpu)

  step_time = compute_time + comm_time
  energy = d * (profile.power_idle_watts * step_time +
                (profile.power_busy_watts - profile.power_idle_watts) * compute_time)
  return Candidate(devices=d, data=dp, model=tp, model_groups=tuple(groups), storage=storage,
                   strategy=strategy_label(dp, tp, storage), step_time=step_time,
                   compute_time=compute_time, comm_time=comm_time, flops=flops,
                   comm_bytes=comm_bytes, peak_memory=peak, energy=energy, fits=peak <= budget,
                   param_memory=param_mem, opt_state_memory=opt_mem,
                   activation_memory=peak - param_mem - opt_mem,
                   remat=space.remat, microbatches=space.microbatches,
                   cross_node_axes=tuple(a for a in (DATA, MODEL) if spans[a][1] > 1),
                   peak_memory_xla_cpu=peak_xla_cpu)


def device_counts(max_devices: int, all_devices: bool) -> list[int]:
  """Every count up to 64 (as WAP swept), then multiples of 8 and powers of two."""
  if all_devices:
    return [max_devices]
  counts = {d for d in range(1, min(max_devices, 64) + 1)}
  counts.update(d for d in range(8, max_devices + 1, 8))
  counts.update(2 ** k for k in range(int(math.log2(max_devices)) + 1))
  counts.add(max_devices)
  return sorted(counts)


def search(space: SearchSpace, profile: DeviceProfile, max_devices: int, *,
           strategy: str = "auto", objective: str = "time",
           memory_headroom: float = DEFAULT_MEMORY_HEADROOM,
           all_devices: bool = False, memory_rules: str = "profile") -> list[Candidate]:
  """All candidates, fitting ones first, each part ordered by the objective."""
  if strategy not in STRATEGIES:
    raise InvalidArgumentError(f"strategy must be one of {STRATEGIES}. Got {strategy!r}.")
  if objective not in OBJECTIVES:
    raise InvalidArgumentError(f"objective must be one of {OBJECTIVES}. Got {objective!r}.")
  if not 0 <= memory_headroom < 1:
    raise InvalidArgumentError(f"memory_headroom must be in [0, 1). Got {memory_headroom!r}.")
  if memory_rules not in MEMORY_RULES:
    raise InvalidArgumentError(f"memory_rules must be one of {MEMORY_RULES}. Got {memory_rules!r}.")
  fit_compiler = memory.compiler_for(profile.kind) if memory_rules == "profile" else memory_rules
  budget = profile.memory_bytes * (1 - memory_headroom)
  op_seconds = _op_seconds(space, profile)
  aggregates: dict[tuple[int, ...], _Aggregates] = {}
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
          if not _allowed(strategy, dp, tp, storage, groups):
            continue
          if groups not in aggregates:
            aggregates[groups] = _aggregate(space, groups, op_seconds)
          found.append(_price(space, aggregates[groups], profile, dp, tp, groups, storage, budget,
                              fit_compiler))
  if not found:
    divisible = [d for d in range(1, max_devices + 1) if space.batch_size % d == 0]
    raise IndivisibleBatchError(
        f"no {strategy!r} plan exists for up to {max_devices} devices: the batch size "
        f"{space.batch_size} splits only over {divisible} data-parallel devices, and no "
        "parameter dimension splits over the rest. Use a batch size divisible by the device "
        f"count, or another strategy. Got batch size {space.batch_size}.")
  return sorted(found, key=rank_key(objective))


def rank_value(objective: str):
  """The figure the objective minimises."""
  return (lambda c: c.step_time) if objective == "time" else (lambda c: c.energy)


def rank_key(objective: str):
  """Fitting first, then the objective; within 0.01%: fewer devices, then less memory."""
  value = rank_value(objective)
  return lambda c: (not c.fits, float(f"{value(c):.4g}"), c.devices, c.peak_memory, c.model)


def batch_size_of(space: SearchSpace) -> int:
  """The global batch: the micro-batch size times the micro-batch count."""
  return space.batch_size * space.microbatches
