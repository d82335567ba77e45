"""Pipeline plans: the loss's layers cut into stages, searched beside the other families.

Priced from two searches (`search.pipeline`): the whole step with per-layer remat (the planner's
own variant), and the step of the loss without its layers. The chosen pipeline's specs come
from the same two: each layer parameter takes its spec in the whole step's candidate, split over
stages; every other leaf and the batch take the rest's, whose data axis is data x stage.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from wapar_jax._src import layers, search
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.emit.pipeline import STAGE, StageLayout
from wapar_jax._src.search import pipeline as pricing
from wapar_jax._src.search.candidate import DATA, Candidate
from wapar_jax._src.trace import trace_train_step
from wapar_jax.errors import IndivisibleBatchError

# The per-layer remat variant a pipeline's stack is priced with: a stage rematerialises its chunk.
STACK_VARIANT = ("layers", 1)
# A pipeline is chosen over the best plan without one only when predicted this much better: its
# predictions run 3-13% under the compiled steps where the other families' run 5-31% over
# (benchmarks/results/pipeline.md), so a closer call is not one the model can make.
PIPELINE_MARGIN = 0.15


@dataclasses.dataclass(frozen=True)
class PipelineSearch:
  """What a pipeline plan is built from: the rest's space and candidates, the stack."""

  stack: layers.LayerStack
  shape: pricing.StackShape
  rest_leaves: tuple[int, ...]
  rest_space: search.SearchSpace
  rest: dict  # (data, model, storage) -> the rest's best candidate
  candidates: tuple[Candidate, ...]


def _rest_key(c: Candidate) -> tuple[int, int, str]:
  return c.data, c.model, c.storage


def cuttable_stack(loss_fn: Callable, params, batch):
  """`layers.without_stack` of the loss when it has layers a pipeline can cut (a stack passing
  on arrays with the batch's rows), else None; checked before the search traces a variant for
  them."""
  try:
    rest_loss, stack, rest_leaves = layers.without_stack(loss_fn, params, batch)
  except layers.NoLayerStack:
    return None
  rows = {getattr(v.aval, "shape", ())[:1] for v in stack.carry}
  if len(rows) != 1 or rows == {()} or stack.length < 2:
    return None
  return rest_loss, stack, rest_leaves


def search_pipelines(
  cut,
  params,
  batch,
  optimizer,
  base_ranked,
  *,
  profile,
  max_devices: int,
  all_devices: bool,
  objective: str,
  memory_headroom: float,
  rules,
  cost_cache: CostCache,
) -> PipelineSearch | None:
  """Pipeline candidates on `base_ranked` (the whole step's candidates with per-layer remat),
  for the loss's stack `cut` (`cuttable_stack`)."""
  rest_loss, stack, rest_leaves = cut
  carry_bytes = float(sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in stack.carry))
  shape = pricing.StackShape(stack.length, carry_bytes, len(stack.params))
  leaves = jax.tree.leaves(params)
  rest_params = [leaves[k] for k in rest_leaves]
  try:
    traced, _ = trace_train_step(rest_loss, rest_params, batch, optimizer)
  except Exception:  # an optimizer tied to the whole tree's structure (multi_transform labels)
    return None
  costs = step_costs(traced, cost_cache)
  paths = [f"rest {k}" for k in rest_leaves]
  rest_space = search.build_space(traced, costs, paths, rules=rules)
  try:
    ranked = search.search(
      rest_space, profile, max_devices, objective=objective, memory_headroom=memory_headroom
    )
  except IndivisibleBatchError:
    return None
  rest: dict = {}
  for c in ranked:
    if c.context > 1:  # its data degree counts the context axis's devices too
      continue
    if _rest_key(c) not in rest or c.step_time < rest[_rest_key(c)].step_time:
      rest[_rest_key(c)] = c
  budget = profile.memory_bytes * (1 - memory_headroom)
  batch_rows = jax.tree.leaves(batch)[0].shape[0]
  found = []
  siblings = {
    (c.data, c.model, c.model_groups, c.storage): c
    for c in base_ranked
    if c.expert == 1 and c.context == 1
  }
  for base in base_ranked:
    # The pipeline's stage function has no expert or context axis: its stages run those plans'
    # data-parallel twins, which the search priced too.
    if (
      base.storage not in pricing.PIPELINE_STORAGES
      or base.stages > 1
      or base.expert > 1
      or base.context > 1
    ):
      continue
    if base.model > 1 and base.storage in pricing.WITHOUT_MODEL_AXIS:
      continue
    here = rest.get(_rest_key(base))
    if here is None:
      continue
    source = pricing.INTERNALS_FROM.get(base.storage, base.storage)
    like = siblings.get((base.data, base.model, base.model_groups, source), base)
    internals = pricing.layer_internals(like, rest.get(_rest_key(like), here), shape)
    for s in range(2, stack.length + 1):
      d = base.devices * s
      if d > max_devices or (all_devices and d != max_devices):
        continue
      wide = rest.get((base.data * s, base.model, base.storage))
      if wide is None:
        continue
      for r, m in pricing.schedules(stack.length, s, batch_rows // base.data):
        found.append(
          pricing.price_pipeline(base, here, wide, shape, profile, s, r, m, budget, internals)
        )
  return PipelineSearch(stack, shape, rest_leaves, rest_space, rest, tuple(found))


def ranked_with_margin(ranked, objective: str, pipelines_asked: bool) -> list[Candidate]:
  """Candidates ranked, a fitting pipeline first only when it beats the best fitting plan
  without one by `PIPELINE_MARGIN` (unless pipelines were asked for)."""
  ranked = sorted(ranked, key=search.rank_key(objective))
  if pipelines_asked or not ranked or ranked[0].stages == 1 or not ranked[0].fits:
    return ranked
  value = search.rank_value(objective)
  flat = next((c for c in ranked if c.stages == 1 and c.fits), None)
  if flat is None or value(ranked[0]) * (1 + PIPELINE_MARGIN) <= value(flat):
    return ranked
  return [flat] + [c for c in ranked if c is not flat]


def _widened(spec: P, data: int) -> P:
  """A spec of the rest's mesh on the pipeline's: its data axis is data x stage (the stage
  axis alone where the pipeline has no data axis)."""
  wide = (DATA, STAGE) if data > 1 else (STAGE,)

  def entry(e):
    axes = e if isinstance(e, tuple) else (e,)
    if DATA not in axes:
      return e
    out = tuple(a for x in axes for a in (wide if x == DATA else (x,)))
    return out if len(out) > 1 else out[0]

  return P(*(entry(e) for e in spec))


def pipeline_specs(found: PipelineSearch, base_space, best: Candidate, n_params: int):
  """(StageLayout, param specs, opt-state param specs, batch specs) of a chosen pipeline: the
  user's leaves' specs (a stacked layer leaf split over stages on its layer dim; a per-layer
  leaf its layer's spec, the stage given by the layout)."""
  base_p, base_o, _ = search.specs_for(base_space, best)
  rest_c = found.rest[(best.data * best.stages, best.model, best.storage)]
  rest_p, rest_o, rest_b = search.specs_for(found.rest_space, rest_c)
  stack = found.stack
  p_specs: list = [None] * n_params
  o_specs: list = [None] * n_params
  for k, pk, ok in zip(found.rest_leaves, rest_p, rest_o):
    p_specs[k], o_specs[k] = _widened(pk, best.data), _widened(ok, best.data)
  for leaves in stack.params:
    for k in leaves:
      if stack.stacked:  # the layer dim comes first and is the stage's
        p_specs[k] = P(STAGE, *tuple(base_p[k])[1:])
        o_specs[k] = P(STAGE, *tuple(base_o[k])[1:])
      else:
        p_specs[k], o_specs[k] = base_p[k], base_o[k]
  layout = StageLayout(
    stack.length,
    stack.stacked,
    stack.params,
    n_params,
    best.stages,
    best.repeats,
    best.stage_microbatches,
  )
  return layout, p_specs, o_specs, [_widened(b, best.data) for b in rest_b]
