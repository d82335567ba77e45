"""The plan's peak memory as the compiler verify uses would compile it.

A plan predicts its peak under the buffer rules of its profile's compiler (GPU XLA for a GPU
profile). `verify` compiles on CPU devices, and XLA:CPU keeps more buffers, so the figure to
hold the compiled peak against is the same candidate priced again under XLA:CPU's rules: only
for the one plan checked, never for every candidate of the search.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from wapar_jax._src.compilers import CompilerRules
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.search import aggregate, build_space, price
from wapar_jax._src.search.context import context_space, context_terms
from wapar_jax._src.search.experts import expert_space, expert_terms
from wapar_jax._src.trace import trace_train_step
from wapar_jax._src.tree import abstract, leaf_paths, path_str


def peak_under(
  plan,
  rules: CompilerRules,
  profile: DeviceProfile,
  loss_fn=None,
  optimizer=None,
  params=None,
  batch=None,
  model_state=None,
  fsdp_min_bytes: float | None = None,
) -> float | None:
  """The chosen candidate's per-device peak under `rules`; None when the traced step's
  dimension groups are not the ones the plan was made with (another model), or for a pipeline
  plan.

  `loss_fn` ... `batch`: as for `Plan.train_step`, needed only for a plan loaded from JSON.
  `fsdp_min_bytes`: the size below which FSDP keeps a leaf whole, where the step priced holds
  its leaves at another size than the plan did (a float32 twin).
  """
  if plan.pipeline is not None:  # priced from two searches (planner.pipelines), not one step
    return None
  loss_fn, optimizer = plan._need(loss_fn, optimizer)
  params = abstract(plan._abstract_params if params is None else params)
  batch = abstract(plan._abstract_batch if batch is None else batch)
  c = plan.chosen
  model_state = plan._abstract_model_state if model_state is None else model_state
  traced, _ = trace_train_step(
    loss_fn,
    params,
    batch,
    optimizer,
    remat=c.remat,
    microbatches=c.microbatches,
    state=None if plan.flat_model_state_specs is None else abstract(model_state),
  )
  paths = [path_str(k) for k in leaf_paths(params)]
  space = build_space(
    traced,
    step_costs(traced, CostCache()),
    paths,
    rules=rules,
    remat=c.remat,
    microbatches=c.microbatches,
  )
  if fsdp_min_bytes is not None:
    space = dataclasses.replace(space, fsdp_min_bytes=fsdp_min_bytes)
  if any(g >= len(space.groups) for g in c.model_groups) or tuple(
    space.groups[g].label for g in c.model_groups
  ) != tuple(plan.model_split):
    return None
  # Memory does not depend on the ops' times: price with none.
  sp = c.sequence_parallel
  if c.expert > 1:  # memory is the data-parallel step's with the experts split (search.experts)
    space = expert_space(space, expert_terms(space), c.expert, c.storage)
  if c.context > 1:  # the data-parallel step's over all devices, keys and values whole
    space = context_space(space, context_terms(space), c.context)
  sums = aggregate(space, c.model_groups, np.zeros(len(traced.ops)), sp)
  return price(
    space, sums, profile, c.data, c.model, c.model_groups, c.storage, math.inf, sp
  ).peak_memory
