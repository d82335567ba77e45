"""`plan()`: trace -> cost -> search -> Plan. The only module that knows every planning stage."""

from __future__ import annotations

import functools
import gc
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec as P

from wapar_jax._src import batch_axes as batch_axes_lib
from wapar_jax._src import compilers, optimizers, search
from wapar_jax._src.compilers import CompilerRules
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.plan import Plan, Prediction
from wapar_jax._src.planner import details, inputs, levers, notices, pipelines
from wapar_jax._src.profiles import DeviceProfile, load_profile
from wapar_jax._src.search import DEFAULT_MEMORY_HEADROOM, Candidate
from wapar_jax._src.step import REMAT_CHOICES, has_layers, without_ambient_mesh
from wapar_jax._src.trace import trace_train_step
from wapar_jax._src.tree import abstract, leaf_paths, nest, path_str, specs_like
from wapar_jax.errors import IndivisibleBatchError, InvalidArgumentError, NoFeasiblePlanError

# Candidates kept on the Plan besides the best one per device count.
KEPT_CANDIDATES = 20


def _compiler_rules(memory_rules: str, profile: DeviceProfile) -> CompilerRules:
  """The buffer rules that decide whether a plan fits: by default, the profile's compiler's."""
  if memory_rules == "profile":
    return compilers.for_profile(profile.kind)
  if memory_rules not in compilers.REGISTRY:
    raise InvalidArgumentError(
      f"memory_rules must be 'profile' or one of {tuple(compilers.REGISTRY)}. Got {memory_rules!r}."
    )
  return compilers.REGISTRY[memory_rules]


def _kept(ranked: Sequence[Candidate]) -> tuple[Candidate, ...]:
  """Top candidates plus the best fitting one per device count (the WAP curve)."""
  best_per_count: dict[int, Candidate] = {}
  for c in ranked:
    if c.devices not in best_per_count or (c.fits and not best_per_count[c.devices].fits):
      best_per_count[c.devices] = c
  keep = set(map(id, ranked[:KEPT_CANDIDATES])) | set(map(id, best_per_count.values()))
  return tuple(c for c in ranked if id(c) in keep)


def _cyclic_gc_paused(fn: Callable) -> Callable:
  """`fn` run with Python's cyclic garbage collector paused, then restored as it was.

  Tracing a step makes millions of long-lived objects (equations, tracebacks, avals) that each
  full collection scans again while collecting almost nothing (25 collections, 30 objects for
  10,000 tiny parameters): a third of planning time (36 s -> 24 s; gpt2-small 1.25 s -> 0.8 s),
  with the same peak memory, since reference counting frees nearly all of it.
  """

  @functools.wraps(fn)
  def paused(*args, **kwargs):
    enabled = gc.isenabled()
    gc.disable()
    try:
      return fn(*args, **kwargs)
    finally:
      if enabled:
        gc.enable()

  return paused


@without_ambient_mesh
@_cyclic_gc_paused
def plan(
  loss_fn: Callable,
  params: Any,
  batch: Any,
  *,
  optimizer: optax.GradientTransformation | optax.MultiSteps,
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
  memory_rules: str = "profile",
  stages: int | None = None,
  max_seconds: float | None = None,
  model_state: Any = None,
  batch_axes: Any = 0,
  sequence_parallel: bool | None = None,
) -> Plan:
  """Plans how to shard a single-device train step.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`, single-device code with no sharding in it.
      With an NNX model as `params`, `loss_fn(model, batch)` instead; with `model_state`,
      `loss_fn(params, batch, model_state) -> (loss, new_model_state)`.
    params: pytree of arrays or `jax.ShapeDtypeStruct` (never materialised), or an `nnx.Module`
      (e.g. from `nnx.eval_shape(lambda: Model(...))`): its `nnx.Param` state is planned, the
      rest (BatchNorm statistics, `nnx.Rngs` that dropout draws from) is its model state.
    batch: pytree of arrays or `jax.ShapeDtypeStruct`; dim 0 of every leaf is the batch unless
      `batch_axes` says otherwise.
    optimizer: the optax transformation the train step applies, or an `optax.MultiSteps`.
    devices: how many devices to plan for (real or not), or a list of jax devices. Default: all
      devices of this process. Every count up to it is considered.
    profile: a built-in profile name (see `wapar_jax.list_profiles()`), a JSON file, or a
      `DeviceProfile`.
    objective: "time" (step time) or "energy" (joules per step over the devices used).
    strategy: "auto", or one family for baselines: "dp", "zero1", "fsdp", "hsdp", "tp",
      "dp_tp", "pp" (a pipeline of the loss's layers over a stage axis, with any of the
      data / tensor families inside each stage), or "ep" (expert parallelism: the experts of
      the step's mixture-of-experts layers split over an `expert` axis of the batch's devices,
      tokens moved by all-to-all; "auto" searches it too), or "cp" (context parallelism: every
      activation split on its sequence over a `context` axis of the batch's devices, attention's
      keys and values gathered over it, so a micro-batch splits beyond its rows; "auto"
      searches it too).
    memory_headroom: fraction of device memory kept free: fragmentation, runtime buffers and the
      memory model's error (its accuracy is in benchmarks/results/suite.md).
    all_devices: only consider using every device offered.
    cache: keep per-equation XLA costs on disk (~/.cache/wapar_jax) across runs.
    progress: `progress(phase, items) -> iterable of items`, wrapped around each long phase
      ("tracing", "cost analysis" over the unique equations, "search"), e.g. to draw bars.
    remat: per-layer rematerialisation, "none", "layers" or "layers_dots" (keep matmul
      outputs); default: searched when memory, not speed, decides the plan.
    microbatches: gradient-accumulation micro-batches per step; default: searched likewise.
    memory_rules: whose buffer rules decide whether a plan fits: "profile" (default), the
      compiler that runs the profile's devices (GPU XLA for GPU profiles, TPU XLA for TPU
      ones, XLA:CPU for CPU ones), or a compiler's name ("xla:gpu", "xla:tpu", "xla:cpu"),
      e.g. "xla:cpu" to plan a step that `plan.verify()` on CPU devices can show fits.
    stages: pipeline stages: 1 for no pipeline, k for exactly k; default searched (with any
      strategy that allows one: "auto" and "pp").
    max_seconds: a bound on planning time, counted from the call: past it the search stops
      once a candidate that fits was found, and the best plan so far is returned with a
      warning saying how much was searched. Tracing and costing the plain step always finish
      (no plan exists without them), and the search finishes the device count it is pricing,
      so the call returns within max_seconds plus the time to price one device count (well
      under a second) unless tracing alone takes longer. None (default): no limit.
    model_state: state the step reads and returns updated, not trained: linen's
      `batch_stats`, a PRNG key for dropout (`jax.random.key`), counters. Replicated on every
      device; the step becomes `(params, opt_state, batch, model_state) -> (params, opt_state,
      loss, model_state)`. An NNX model's non-Param state is its model state. Pipelines are not
      searched for a loss with model state.
    batch_axes: the batch dim of every batch leaf (an int), or a tree shaped like batch with an
      int per leaf, e.g. 1 for a time-major `(seq, batch)` batch. Every leaf must have the same
      size along it. Pipelines are searched only for batches with the batch dim first.
    sequence_parallel: Megatron-style sequence parallelism for plans with a model axis: the
      activations outside the tensor-parallel regions (norms, residual adds; found from the
      dimension classes) split on the sequence over the model axis, entering each region by an
      all-gather and leaving it by a reduce-scatter instead of an all-reduce. None (default):
      searched beside tensor parallelism alone; False: never; True: every plan with a model
      axis has it (where the model degree divides the sequence and the heads are split).

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
  optimizer = optimizers.as_transformation(optimizer)
  nnx_model = inputs.is_nnx_module(params)
  if nnx_model:
    if model_state is not None:
      raise InvalidArgumentError(
        "an NNX model carries its own state (everything but its nnx.Param variables is the "
        "model state): pass the model alone, without model_state. Got model_state too."
      )
    loss_fn, params, model_state = inputs.from_nnx(loss_fn, params)
  if model_state is not None and not jax.tree.leaves(model_state):
    model_state = None
  if not jax.tree.leaves(params):
    raise InvalidArgumentError("params has no array leaves: nothing to plan. Got an empty tree.")
  inputs.check_leaves(params, batch, model_state)
  axes = batch_axes_lib.per_leaf(batch, batch_axes)
  batch_axes_lib.check_sizes(batch, axes)
  moved = batch_axes_lib.moved(axes)
  if remat is not None and remat not in REMAT_CHOICES:
    raise InvalidArgumentError(f"remat must be one of {REMAT_CHOICES} or None. Got {remat!r}.")
  if microbatches is not None and (
    isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1
  ):
    raise InvalidArgumentError(
      f"microbatches must be a positive int or None. Got {microbatches!r}."
    )
  if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
    raise InvalidArgumentError(f"stages must be a positive int or None. Got {stages!r}.")
  if sequence_parallel not in (True, False, None):
    raise InvalidArgumentError(
      f"sequence_parallel must be True, False or None (searched). Got {sequence_parallel!r}."
    )
  max_devices, device_list = inputs.device_count(devices)
  deadline = None if max_seconds is None else t0 + inputs.positive_seconds(max_seconds)
  device_profile = load_profile(profile)
  rules = _compiler_rules(memory_rules, device_profile)

  abstract_params, abstract_batch = abstract(params), abstract(batch)
  abstract_state = None if model_state is None else abstract(model_state)
  state_args = () if abstract_state is None else (abstract_state,)
  # Planned rows first: the search, micro-batches and pipelines read the batch dim as dim 0.
  rows_batch = batch_axes_lib.rows_first(abstract_batch, axes) if moved else abstract_batch
  rows_loss = batch_axes_lib.loss_on_rows_first(loss_fn, axes) if moved else loss_fn
  notices.many_leaves(len(jax.tree.leaves(abstract_params)))
  phase = (lambda name, items: items) if progress is None else progress
  param_paths = [path_str(k) for k in leaf_paths(abstract_params)]
  budget = device_profile.memory_bytes * (1 - memory_headroom)
  timings = {"trace_seconds": 0.0, "cost_seconds": 0.0, "search_seconds": 0.0}
  jaxpr_cache: dict = {}
  # One cost cache for every variant: without the disk (cache=False) each would cost anew.
  cost_cache = CostCache(persist=cache)
  # Per variant searched: how much of its sweep was priced.
  coverage: dict[tuple[str, int], search.Searched] = {}

  def run(variant: tuple[str, int]):
    remat_choice, k = variant
    t_start = time.perf_counter()
    for _ in phase("tracing", [loss_fn]):
      traced, _ = trace_train_step(
        rows_loss,
        abstract_params,
        rows_batch,
        optimizer,
        remat=remat_choice,
        microbatches=k,
        jaxpr_cache=jaxpr_cache,
        state=abstract_state,
      )
    t_traced = time.perf_counter()
    costs = step_costs(
      traced,
      cost_cache,
      progress=None if progress is None else (lambda keys: progress("cost analysis", keys)),
    )
    t_costed = time.perf_counter()
    space = search.build_space(
      traced, costs, param_paths, rules=rules, remat=remat_choice, microbatches=k
    )
    if deadline is None and variant == first:
      notices.large_search(space, max_devices, all_devices)
    try:
      for _ in phase("search", [space]):
        swept = search.search_until(
          space,
          device_profile,
          max_devices,
          strategy="auto" if strategy == "pp" else strategy,
          objective=objective,
          memory_headroom=memory_headroom,
          all_devices=all_devices,
          deadline=deadline,
          sequence_parallel=sequence_parallel,
        )
      ranked = swept.ranked
      coverage[variant] = swept
    except IndivisibleBatchError:
      if variant == (remat or "none", microbatches or 1):
        raise
      ranked = []  # a micro-batch count the mesh cannot split: not an option
    timings["trace_seconds"] += t_traced - t_start
    timings["cost_seconds"] += t_costed - t_traced
    timings["search_seconds"] += time.perf_counter() - t_costed
    return traced, costs, space, ranked

  first = (remat or "none", microbatches or 1)
  # Past the deadline no further variant is started once one candidate fits.
  stop = lambda: (
    deadline is not None
    and time.perf_counter() > deadline
    and any(c.fits for r in results.values() for c in r[3])
  )
  skipped = []
  results = {first: run(first)}
  traced = results[first][0]
  if traced.unknown_primitives:
    # Never crash on a primitive without a sharding rule: its dims are linked position by
    # position, which at worst prices an extra collective, and XLA still costs its work.
    warnings.warn(
      f"wapar_jax has no sharding rule for primitive(s) {', '.join(traced.unknown_primitives)}; "
      "they were costed conservatively (dims of equal shape kept together, work from XLA's "
      "cost analysis). Check the plan with plan.explain().",
      stacklevel=2,
    )
  # Pipelines first: they are priced on the per-layer remat variant, itself a memory lever.
  found, stack_run = None, None
  pipelines_allowed = (
    strategy in ("auto", "pp") and stages != 1 and abstract_state is None and not moved
  )
  pipelines_wanted = pipelines_allowed and remat in (None, "layers") and microbatches in (None, 1)
  if pipelines_wanted and strategy == "auto" and stages is None and stop():
    skipped.append("pipelines (a stage axis)")
  elif pipelines_wanted:
    t_pipe = time.perf_counter()
    cut = pipelines.cuttable_stack(loss_fn, abstract_params, abstract_batch)
    if cut is not None:
      stack_run = results.get(pipelines.STACK_VARIANT) or run(pipelines.STACK_VARIANT)
      bases = stack_run[3]
      if all_devices:  # S stages stand on plans for max_devices / S devices, which it left out
        bases = search.search(
          stack_run[2],
          device_profile,
          max_devices,
          objective=objective,
          memory_headroom=memory_headroom,
        )
      found = pipelines.search_pipelines(
        cut,
        abstract_params,
        abstract_batch,
        optimizer,
        bases,
        profile=device_profile,
        max_devices=max_devices,
        all_devices=all_devices,
        objective=objective,
        memory_headroom=memory_headroom,
        rules=rules,
        cost_cache=cost_cache,
      )
    timings["pipeline_seconds"] = time.perf_counter() - t_pipe
  staged = list(found.candidates) if found is not None else []

  def reuse_stack_run(variant):  # the stack's variant, traced already for the pipelines
    return stack_run if variant == pipelines.STACK_VARIANT and stack_run else run(variant)

  # The levers are searched as without pipelines, in their own order (the stack's variant is
  # kept aside until its turn): a pipeline is chosen only by a margin over the best plan
  # without one (`pipelines.ranked_with_margin`), which must be found first.
  ruled_out = 0  # memory levers not traced: sure to fit nowhere (`levers.cannot_fit`)
  for variant in levers.memory_variants(
    results[first][3],
    remat,
    microbatches,
    objective,
    lambda: has_layers(rows_loss, (abstract_params, rows_batch, *state_args), jaxpr_cache),
    search.batch_size_of(results[first][2]),
  ):
    if variant in results:
      continue
    searched = {v: r[3] for v, r in results.items()}
    if stack_run is not None:
      searched.setdefault(pipelines.STACK_VARIANT, stack_run[3])
    if levers.cannot_fit(variant, searched, budget):
      ruled_out += 1
      continue
    if stop():
      skipped.append("the remaining memory levers (remat, gradient accumulation)")
      break
    results[variant] = reuse_stack_run(variant)
    if levers.enough_variants(results, objective):
      break
  for variant in levers.speed_variants(traced, remat, microbatches, results):
    if stop():
      skipped.append("per-layer remat for speed")
      break
    results[variant] = reuse_stack_run(variant)
  if stack_run is not None:
    results.setdefault(pipelines.STACK_VARIANT, stack_run)
  cut = {v: s for v, s in coverage.items() if s.cut_short}
  if cut or skipped:
    notices.cut_short(max_seconds, time.perf_counter() - t0, cut, skipped)
  ranked = [c for r in results.values() for c in r[3]] + staged
  if stages is not None:
    ranked = [c for c in ranked if c.stages == stages]
  if strategy == "pp":
    ranked = [c for c in ranked if c.stages > 1]
  if not ranked:
    raise InvalidArgumentError(
      "no pipeline plan exists for this loss: a pipeline needs a stack of identical layers "
      "(a scan over layers, or a Python loop of blocks) passing on arrays with the batch's "
      "rows, and stages x repeats dividing the layers, two or more devices, a batch that "
      "splits over them, no model state, and the batch dim first. Plan with stages=None or "
      "strategy='auto'. Got "
      f"devices={max_devices}, stages={stages}, strategy={strategy!r}, model state: "
      f"{'yes' if abstract_state is not None else 'no'}."
    )
  ranked = pipelines.ranked_with_margin(ranked, objective, strategy == "pp" or stages is not None)
  best = ranked[0]
  variant = pipelines.STACK_VARIANT if best.stages > 1 else (best.remat, best.microbatches)
  traced, costs, space, _ = results[variant]
  if not best.fits:
    closest = min(ranked, key=lambda c: c.peak_memory)
    raise NoFeasiblePlanError(
      levers.no_fit_message(space, closest, budget, device_profile, param_paths), closest
    )

  p_keys = leaf_paths(abstract_params)
  stage_layout = None
  if best.stages > 1:
    stage_layout, p_specs, o_specs, b_specs = pipelines.pipeline_specs(
      found, space, best, len(p_keys)
    )
  else:
    p_specs, o_specs, b_specs = search.specs_for(space, best)
  b_keys = leaf_paths(abstract_batch)
  flat_p = dict(zip(p_keys, p_specs))
  flat_o = dict(zip(p_keys, o_specs))
  if moved:
    b_specs = [batch_axes_lib.spec_as_given(s, a) for s, a in zip(b_specs, axes)]
  flat_b = dict(zip(b_keys, b_specs))
  # Replicated: batch statistics and keys are small, and every device reads all of them.
  flat_s = {k: P() for k in leaf_paths(abstract_state)} if abstract_state is not None else {}
  # An NNX State's specs as plain nested dicts, as a plan loaded from JSON has them.
  like = lambda tree, flat, what: nest(flat) if nnx_model else specs_like(tree, flat, what)
  return Plan(
    mesh_shape=best.mesh_shape,
    param_specs=like(abstract_params, flat_p, "parameter specs"),
    batch_specs=specs_like(abstract_batch, flat_b, "batch specs"),
    opt_state_param_specs=like(abstract_params, flat_o, "optimizer-state specs"),
    predicted=Prediction.of(best, budget),
    candidates=_kept(ranked),
    chosen=best,
    strategy=best.strategy,
    objective=objective,
    profile=device_profile.name,
    devices_offered=max_devices,
    model_split=tuple(space.groups[g].label for g in best.model_groups),
    stats={
      **timings,
      "total_seconds": time.perf_counter() - t0,
      "ops": len(traced.ops),
      "variants_searched": len(results),
      "variants_ruled_out": ruled_out,
      "unique_ops": costs.unique_ops,
      "lowered_ops": costs.lowered_ops,
      "candidates_evaluated": len(ranked),
      "device_counts_in_sweep": sum(s.counts for s in coverage.values()),
      "device_counts_priced": sum(s.counts_priced for s in coverage.values()),
      "total_flops": costs.total_flops,
      "nodes": -(-best.devices // device_profile.devices_per_node),  # the fewest that hold it
    },
    flat_param_specs=flat_p,
    flat_opt_specs=flat_o,
    flat_batch_specs=flat_b,
    model_state_specs=(
      None if abstract_state is None else like(abstract_state, flat_s, "model-state specs")
    ),
    flat_model_state_specs=flat_s if abstract_state is not None else None,
    _loss_fn=loss_fn,
    _optimizer=optimizer,
    _abstract_params=abstract_params,
    _abstract_batch=abstract_batch,
    _abstract_model_state=abstract_state,
    _device_list=device_list,
    memory_decision=levers.memory_decision(ranked, best, objective),
    details=details.build(
      space, best, device_profile, abstract_params, abstract_batch, p_specs, batch_axes=axes
    ),
    flat_batch_axes=dict(zip(b_keys, axes)) if moved else None,
    pipeline=stage_layout,
  )
