"""`plan()`: trace -> cost -> search -> Plan. The only module that knows every stage."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import optax
from jax.sharding import PartitionSpec as P

from wapar_jax._src import details as details_lib, emit, search as search_lib
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax.errors import IndivisibleBatchError, InvalidArgumentError, NoFeasiblePlanError
from wapar_jax._src.plan import Plan, Prediction
from wapar_jax._src.profiles import DeviceProfile, load_profile
from wapar_jax._src.search import DATA, DEFAULT_MEMORY_HEADROOM, MODEL, Candidate, SearchSpace
from wapar_jax._src.step import REMAT_CHOICES, abstract, has_layers
from wapar_jax._src.trace import trace_train_step

# Candidates kept on the Plan besides the best one per device count.
KEPT_CANDIDATES = 20


def _is_nnx_module(x) -> bool:
  try:
    from flax import nnx
  except ImportError:
    return False
  return isinstance(x, nnx.Module)


def _from_nnx(loss_fn: Callable, model):
  """An NNX model becomes (loss over its Param state, abstract Param state)."""
  from flax import nnx
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_over_params(params, batch):
    return loss_fn(nnx.merge(graphdef, params, rest), batch)

  return loss_over_params, params


def _device_count(devices) -> tuple[int, list | None]:
  if devices is None:
    return jax.device_count(), None
  if isinstance(devices, int) and not isinstance(devices, bool):
    if devices < 1:
      raise InvalidArgumentError(f"devices must be at least 1. Got {devices}.")
    return devices, None
  try:
    device_list = list(devices)
  except TypeError:
    raise InvalidArgumentError(
        f"devices must be an int or a list of jax devices. Got {type(devices).__name__}.") from None
  if not device_list:
    raise InvalidArgumentError("devices is an empty list. Got [].")
  return len(device_list), device_list


def _specs_for(space: SearchSpace, c: Candidate) -> tuple[list[P], list[P], list[P]]:
  """PartitionSpecs of params (as stored), their optimizer state, and the batch."""
  traced = space.traced
  model_classes = {cl for g in c.model_groups for cl in space.groups[g].classes}
  shardable = (search_lib._fsdp_shardable(space, c.data, c.model_groups)
               if c.data > 1 else [False] * len(traced.param_vars))
  param_specs, opt_specs = [], []
  for i, v in enumerate(traced.param_vars):
    dims = space.param_dims[i]
    entries = [None] * len(dims)
    if c.model > 1:
      for d, (cl, size) in enumerate(dims):
        if cl in model_classes and size % c.model == 0:
          entries[d] = MODEL
          break  # one mesh axis appears at most once in a spec
    tp_only = P(*entries)
    split = list(entries)
    if shardable[i]:
      d = search_lib.fsdp_dim(dims, c.data, [e is not None for e in entries], traced.loop_classes)
      if d is not None:
        split[d] = DATA
    param_specs.append(P(*split) if c.storage == "fsdp" else tp_only)
    opt_specs.append(P(*split) if c.storage in ("fsdp", "zero1") else tp_only)
  batch_specs = []
  for v in traced.batch_vars:
    entries = [None] * len(traced.var_shape[v])
    if c.data > 1:
      entries[0] = DATA
    batch_specs.append(P(*entries))
  return param_specs, opt_specs, batch_specs


def _kept(ranked: Sequence[Candidate]) -> tuple[Candidate, ...]:
  """Top candidates plus the best fitting one per device count (the WAP curve)."""
  best_per_count: dict[int, Candidate] = {}
  for c in ranked:
    if c.devices not in best_per_count or (c.fits and not best_per_count[c.devices].fits):
      best_per_count[c.devices] = c
  keep = set(map(id, ranked[:KEPT_CANDIDATES])) | set(map(id, best_per_count.values()))
  return tuple(c for c in ranked if id(c) in keep)


def plan(loss_fn: Callable, params: Any, batch: Any, *,
         optimizer: optax.GradientTransformation,
         devices: int | Sequence[Any] | None = None,
         profile: str | DeviceProfile = "h100-sxm",
         objective: str = "time",
         strategy: str = "auto",
         memory_headroom: float = DEFAULT_MEMORY_HEADROOM,
         all_devices: bool = False,
         cache: bool = True,
         progress: Callable | None = None,
         remat: str | None = None,
         microbatches: int | None = None,
         memory_rules: str = "profile") -> Plan:
  """Plans how to shard a single-device train step.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`, single-device code with no sharding in it.
      With an NNX model as `params`, `loss_fn(model, batch)` instead.
    params: pytree of arrays or `jax.ShapeDtypeStruct` (never materialised), or an `nnx.Module`
      (e.g. from `nnx.eval_shape(lambda: Model(...))`).
    batch: pytree of arrays or `jax.ShapeDtypeStruct`; dim 0 of every leaf is the batch.
    optimizer: the optax transformation the train step applies.
    devices: how many devices to plan for (real or not), or a list of jax devices. Default: all
      devices of this process. Every count up to it is considered.
    profile: a built-in profile name (see `wapar_jax.list_profiles()`), a JSON file, or a
      `DeviceProfile`.
    objective: "time" (step time) or "energy" (joules per step over the devices used).
    strategy: "auto", or one family for baselines: "dp", "zero1", "fsdp", "tp", "dp_tp".
    memory_headroom: fraction of device memory kept free: fragmentation, runtime buffers and the
      memory model's error (predicted peaks are within 15% of XLA's compiled peak on most of
      the benchmark suite, median 2.3%, either side).
    all_devices: only consider using every device offered.
    cache: keep per-equation XLA costs on disk (~/.cache/wapar_jax) across runs.
    progress: `progress(phase, items) -> iterable of items`, wrapped around each long phase
      ("tracing", "cost analysis" over the unique equations, "search"), e.g. to draw bars.
    remat: per-layer rematerialisation, "none", "layers" or "layers_dots" (keep matmul
      outputs); default: searched when memory, not speed, decides the plan.
    microbatches: gradient-accumulation micro-batches per step; default: searched likewise.
    memory_rules: whose buffer rules decide whether a plan fits: "profile", the compiler that
      will run the step (GPU XLA for GPU and TPU profiles), or "xla:cpu", to plan a step that
      `plan.verify()` on CPU devices can show fits (XLA:CPU keeps more buffers than GPU XLA
      in a plain backward pass; in a rematerialised one GPU XLA kept more, so a GPU or TPU
      profile fits its remat plans to the larger of the two). `plan.predicted` reports both.

  Returns:
    A frozen `Plan`.

  Raises:
    NoFeasiblePlanError: nothing fits memory, even with per-layer remat and gradient
      accumulation; the error carries the closest candidate.

  Example:
    >>> plan = wapar_jax.plan(loss_fn, params, batch, optimizer=optax.adamw(1e-3), devices=8)
    >>> step = plan.train_step()
  """
  t0 = time.perf_counter()
  if not callable(loss_fn):
    raise InvalidArgumentError(f"loss_fn must be callable. Got {type(loss_fn).__name__}.")
  if not isinstance(optimizer, optax.GradientTransformation):
    raise InvalidArgumentError(
        "optimizer must be an optax.GradientTransformation, e.g. optax.adamw(1e-3). "
        f"Got {type(optimizer).__name__}.")
  if _is_nnx_module(params):
    loss_fn, params = _from_nnx(loss_fn, params)
  if not jax.tree.leaves(params):
    raise InvalidArgumentError("params has no array leaves: nothing to plan. Got an empty tree.")
  if remat is not None and remat not in REMAT_CHOICES:
    raise InvalidArgumentError(f"remat must be one of {REMAT_CHOICES} or None. Got {remat!r}.")
  if microbatches is not None and (isinstance(microbatches, bool) or
                                   not isinstance(microbatches, int) or microbatches < 1):
    raise InvalidArgumentError(
        f"microbatches must be a positive int or None. Got {microbatches!r}.")
  max_devices, device_list = _device_count(devices)
  device_profile = load_profile(profile)

  abstract_params, abstract_batch = abstract(params), abstract(batch)
  phase = (lambda name, items: items) if progress is None else progress
  param_paths = [emit.path_str(k) for k in emit.leaf_paths(abstract_params)]
  budget = device_profile.memory_bytes * (1 - memory_headroom)
  timings = {"trace_seconds": 0.0, "cost_seconds": 0.0, "search_seconds": 0.0}
  jaxpr_cache: dict = {}

  def run(variant: tuple[str, int]):
    remat_choice, k = variant
    t_start = time.perf_counter()
    for _ in phase("tracing", [loss_fn]):
      traced, _ = trace_train_step(loss_fn, abstract_params, abstract_batch, optimizer,
                                   remat=remat_choice, microbatches=k, jaxpr_cache=jaxpr_cache)
    t_traced = time.perf_counter()
    costs = step_costs(traced, CostCache(persist=cache),
                       progress=None if progress is None else
                       (lambda keys: progress("cost analysis", keys)))
    t_costed = time.perf_counter()
    space = search_lib.build_space(traced, costs, param_paths, remat=remat_choice,
                                   microbatches=k)
    try:
      for _ in phase("search", [space]):
        ranked = search_lib.search(space, device_profile, max_devices, strategy=strategy,
                                   objective=objective, memory_headroom=memory_headroom,
                                   all_devices=all_devices, memory_rules=memory_rules)
    except IndivisibleBatchError:
      if variant == (remat or "none", microbatches or 1):
        raise
      ranked = []  # a micro-batch count the mesh cannot split: not an option
    timings["trace_seconds"] += t_traced - t_start
    timings["cost_seconds"] += t_costed - t_traced
    timings["search_seconds"] += time.perf_counter() - t_costed
    return traced, costs, space, ranked

  first = (remat or "none", microbatches or 1)
  results = {first: run(first)}
  traced = results[first][0]
  if traced.unknown_primitives:
    # Never crash on a primitive without a sharding rule: its dims are linked position by
    # position, which at worst prices an extra collective, and XLA still costs its work.
    warnings.warn(
        f"wapar_jax has no sharding rule for primitive(s) {', '.join(traced.unknown_primitives)}; "
        "they were costed conservatively (dims of equal shape kept together, work from XLA's "
        "cost analysis). Check the plan with plan.explain().", stacklevel=2)
  for variant in _memory_variants(results[first][3], remat, microbatches, objective,
                                  lambda: has_layers(loss_fn, abstract_params, abstract_batch,
                                                     jaxpr_cache),
                                  search_lib.batch_size_of(results[first][2])):
    results[variant] = run(variant)
    if _enough_variants(results, objective):
      break
  ranked = sorted((c for r in results.values() for c in r[3]), key=search_lib.rank_key(objective))
  best = ranked[0]
  traced, costs, space, _ = results[(best.remat, best.microbatches)]
  if not best.fits:
    closest = min(ranked, key=lambda c: c.peak_memory)
    raise NoFeasiblePlanError(
        _no_fit_message(space, closest, budget, device_profile, param_paths), closest)

  p_specs, o_specs, b_specs = _specs_for(space, best)
  p_keys = emit.leaf_paths(abstract_params)
  b_keys = emit.leaf_paths(abstract_batch)
  flat_p = dict(zip(p_keys, p_specs))
  flat_o = dict(zip(p_keys, o_specs))
  flat_b = dict(zip(b_keys, b_specs))
  return Plan(
      mesh_shape=best.mesh_shape,
      param_specs=emit.specs_like(abstract_params, flat_p, "parameter specs"),
      batch_specs=emit.specs_like(abstract_batch, flat_b, "batch specs"),
      opt_state_param_specs=emit.specs_like(abstract_params, flat_o, "optimizer-state specs"),
      predicted=Prediction.of(best, budget),
      candidates=_kept(ranked),
      chosen=best,
      strategy=best.strategy,
      objective=objective,
      profile=device_profile.name,
      devices_offered=max_devices,
      model_split=tuple(space.groups[g].label for g in best.model_groups),
      stats={**timings, "total_seconds": time.perf_counter() - t0, "ops": len(traced.ops),
             "variants_searched": len(results),
             "unique_ops": costs.unique_ops, "lowered_ops": costs.lowered_ops,
             "candidates_evaluated": len(ranked), "total_flops": costs.total_flops},
      flat_param_specs=flat_p, flat_opt_specs=flat_o, flat_batch_specs=flat_b,
      loss_fn=loss_fn, optimizer=optimizer, abstract_params=abstract_params,
      abstract_batch=abstract_batch, device_list=device_list,
      memory_decision=_memory_decision(ranked, best, objective),
      details=details_lib.build(space, best, device_profile, abstract_params, abstract_batch,
                                p_specs))


# Memory levers tried in order of their usual cost: accumulation first (no extra FLOPs), then
# remat keeping matmul outputs, then full per-layer remat, then both.
_VARIANT_ORDER = (("none", 2), ("layers_dots", 1), ("none", 4), ("layers", 1), ("none", 8),
                  ("layers_dots", 2), ("layers", 2), ("layers", 4), ("layers", 8), ("none", 16),
                  ("layers", 16))


def _memory_variants(ranked, remat, microbatches, objective, layers_exist, batch_size):
  """Remat / accumulation variants worth searching after the plain one.

  None when the user fixed both, or when the plain search's fastest candidate fits: the levers
  only add work, so they can win only where memory ruled that candidate out.
  """
  if remat is not None and microbatches is not None:
    return
  if not ranked:
    return
  value = search_lib.rank_value(objective)
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


# Once some variant fits, this many more (the next cheapest levers) are searched, then stop.
_VARIANTS_AFTER_FIRST_FIT = 2


def _enough_variants(results, objective) -> bool:
  """Stop when a fit is within 5% of the unconstrained optimum, or a few levers after a fit."""
  value = search_lib.rank_value(objective)
  everything = [c for r in results.values() for c in r[3]]
  fitting = [value(c) for c in everything if c.fits]
  if not fitting:
    return False
  if min(fitting) <= 1.05 * min(value(c) for c in everything):
    return True
  order = list(results)
  first_fit = next(i for i, v in enumerate(order) if any(c.fits for c in results[v][3]))
  return len(order) - 1 - first_fit >= _VARIANTS_AFTER_FIRST_FIT


def _memory_decision(ranked, best: Candidate, objective: str) -> str:
  """Which memory term ruled out faster plans, in a sentence; empty when none did."""
  from wapar_jax._src.explain import human_bytes, human_seconds
  value = search_lib.rank_value(objective)
  faster = [c for c in ranked if not c.fits and value(c) < value(best)]
  if not faster:
    return ""
  top = min(faster, key=value)
  terms = {"parameters": top.param_memory, "optimizer state": top.opt_state_memory,
           "activations and temporaries": top.activation_memory}
  term = max(terms, key=terms.get)
  levers = []
  if best.remat != "none":
    levers.append(f"per-layer remat ({best.remat})")
  if best.microbatches > 1:
    levers.append(f"{best.microbatches} gradient-accumulation micro-batches")
  if best.storage != "replicated":
    levers.append(f"{best.storage} state sharding")
  return (f"memory decided this plan: the fastest option, {top.strategy} on {top.mesh_shape}"
          f" (remat {top.remat}, {top.microbatches} micro-batch(es)), needs "
          f"{human_bytes(top.peak_memory)} per device, mostly {term} "
          f"({human_bytes(terms[term])}); the chosen plan fits with "
          f"{', '.join(levers) or 'a different mesh'} at {human_seconds(best.step_time)} "
          f"instead of {human_seconds(top.step_time)}.")


def _no_fit_message(space: SearchSpace, closest: Candidate, budget: float,
                    profile: DeviceProfile, param_paths: Sequence[str] = ()) -> str:
  from wapar_jax._src.explain import human_bytes
  traced = space.traced
  largest = sorted(range(len(traced.param_vars)), key=lambda i: -space.param_bytes[i])[:5]
  paths = list(param_paths) or [f"param {i}" for i in range(len(traced.param_vars))]
  tensors = ", ".join(f"{paths[i]} {list(traced.var_shape[traced.param_vars[i]])} "
                      f"({human_bytes(space.param_bytes[i])})" for i in largest)
  total = float(space.param_bytes.sum() + space.opt_bytes.sum())
  need = math.ceil(total / budget) if budget > 0 else 0
  # Every count up to the closest one's was searched and none fit: more are needed than that.
  need = max(need, closest.devices + 1)
  return (f"no plan fits {human_bytes(budget)} per {profile.name} device. Closest: "
          f"{closest.strategy} on mesh {closest.mesh_shape} needs "
          f"{human_bytes(closest.peak_memory)} per device. Parameters and optimizer state "
          f"alone are {human_bytes(total)}, so the smallest device count that could fit is "
          f"{need} (fully sharded; activations may need more). Largest parameters: {tensors}. "
          f"Offer at least {need} devices, a device with more "
          "memory, a smaller batch, or lower memory_headroom.")
