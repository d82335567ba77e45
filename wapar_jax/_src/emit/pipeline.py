"""Pipeline parallelism: the loss's layer stack split into stages over a `stage` mesh axis.

Built from JAX's own pieces, as MaxText's pipeline and the jax docs' GPipe example are: a
`shard_map` manual over the stage axis only (data and model axes stay with XLA's partitioner),
a `lax.scan` over pipeline iterations, and `lax.ppermute` passing each stage's output to the
next stage. Autodiff of that scan is the backward pass, GPipe's schedule run in reverse; no
runtime of our own.

Schedules: S stages, R repeats (circular: stage s holds the layer chunks s, s + S, ..., so a
micro-batch goes round the stages R times), M micro-batches. Item i = r * M + m is micro-batch m
on its r-th round; stage s works on item t - s at iteration t, so a step takes R * M + S - 1
iterations and the bubble is (S - 1) / (R * M + S - 1). Circular schedules need M >= S: the
first stage takes micro-batch m back from the last stage M iterations after it sent it on.
GPipe's memory, not 1F1B's: the backward pass is the scan's transpose, so every iteration's
chunk input is kept until it runs (each chunk is rematerialised from that input). 1F1B
interleaves forward and backward micro-batches, which needs the backward pass written by hand
inside the loop; jax's autodiff of a scan cannot reorder it.

Everything outside the layers (embedding, head, loss) runs data-parallel over the data and stage
axes together: the batch is split over both, gathered over the stage axis into the pipeline
and split again after it.

Storage (`StageLayout`): the stack's parameters live as one array per layer parameter shaped
[S, R, layers per chunk, ...], split over the stage axis on dim 0. The user's tree (per-layer
leaves of a Python loop, or a scan's stacked leaves in layer order) is moved in and out of it by
`to_storage` / `from_storage`; in a step the layers never move between devices.

FSDP inside a stage (MaxText's): a layer parameter's spec may also split it over the stage's
data axis. Each pipeline iteration then all-gathers its chunk's weights where it runs them and
reduce-scatters their gradients back (MaxText's default: memory of one gathered chunk), or,
with `gather_once`, the stage's weights are gathered once before the loop and their gradient
reduce-scattered once after it (MaxText's `pipeline_fsdp_ag_once`: ZeRO-1's traffic). With one
repeat the chunk is loop-invariant and JAX's scan partial evaluation computes the forward pass's
gathers once before its loop; the backward pass, rematerialising the chunk, gathers in every
iteration (compiled: scan GPT, 2 stages x 2 data).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wapar_jax._src import layers
from wapar_jax._src.emit import shardings as shardings_lib
from wapar_jax._src.emit import step as step_lib
from wapar_jax._src.step import split_rows
from wapar_jax.errors import InvalidArgumentError

STAGE = "stage"


@dataclasses.dataclass(frozen=True)
class StageLayout:
  """Where a pipeline keeps the loss's layers: S stages x R repeats of equal chunks.

  Attributes:
    layers: how many layers the stack has.
    stacked: the layers' parameters are stacked leaves (a scan), else one leaf per layer.
    layer_params: per parameter of a layer, the flat indices of the leaves holding it (one
      stacked leaf, or one per layer in layer order).
    n_params: parameter leaves of the loss.
    stages, repeats, microbatches: the schedule.
    gather_once: layer weights split over the data axis are gathered once per step, before the
      loop, not by each iteration for its chunk.
  """

  layers: int
  stacked: bool
  layer_params: tuple[tuple[int, ...], ...]
  n_params: int
  stages: int
  repeats: int
  microbatches: int
  gather_once: bool = False

  @property
  def per_chunk(self) -> int:
    return self.layers // (self.stages * self.repeats)

  @property
  def rest(self) -> tuple[int, ...]:
    """Flat indices of the parameter leaves that are not layer parameters."""
    owned = {leaf for p in self.layer_params for leaf in p}
    return tuple(k for k in range(self.n_params) if k not in owned)

  def chunk_layers(self, stage: int) -> list[list[int]]:
    """Per repeat, the layers stage `stage` runs."""
    c = self.per_chunk
    return [
      list(range((r * self.stages + stage) * c, (r * self.stages + stage + 1) * c))
      for r in range(self.repeats)
    ]

  def _chunked(self, stacked):
    """[L, ...] in layer order -> [S, R, c, ...]: layer (r * S + s) * c + j at [s, r, j]."""
    s, r, c = self.stages, self.repeats, self.per_chunk
    return jnp.swapaxes(stacked.reshape(r, s, c, *stacked.shape[1:]), 0, 1)

  def _unchunked(self, chunked):
    return jnp.swapaxes(chunked, 0, 1).reshape(self.layers, *chunked.shape[3:])

  def to_storage(self, params) -> dict:
    """The user's params -> `{"stages": [S, R, c, ...] per layer parameter, "rest": leaves}`."""
    leaves = jax.tree.leaves(params)
    if self.stacked:
      stages = [self._chunked(leaves[p[0]]) for p in self.layer_params]
    else:
      stages = [self._chunked(jnp.stack([leaves[k] for k in p])) for p in self.layer_params]
    return {"stages": stages, "rest": [leaves[k] for k in self.rest]}

  def from_storage(self, storage: Mapping, treedef):
    """The storage tree back in the user's tree of structure `treedef`."""
    leaves: list = [None] * self.n_params
    for k, x in zip(self.rest, storage["rest"]):
      leaves[k] = x
    for p, chunked in zip(self.layer_params, storage["stages"]):
      stacked = self._unchunked(chunked)
      if self.stacked:
        leaves[p[0]] = stacked
      else:
        for layer, k in enumerate(p):
          leaves[k] = stacked[layer]
    return jax.tree.unflatten(treedef, leaves)

  def storage_specs(self, layer_specs, rest_specs) -> dict:
    """Specs of the storage tree: a layer parameter split over stages on dim 0, then its
    layer's spec (`layer_specs`, one per layer parameter, without a layer dim)."""
    return {
      "stages": [P(STAGE, None, None, *s) for s in layer_specs],
      "rest": list(rest_specs),
    }

  def stored_specs(self, flat_specs) -> dict:
    """Storage specs from the user's leaves' specs (flat, in leaf order): a stacked layer
    leaf's spec begins with its layer (stage) dim, a per-layer leaf's is its layer's."""
    within = [
      P(*tuple(flat_specs[p[0]])[1:]) if self.stacked else flat_specs[p[0]]
      for p in self.layer_params
    ]
    return self.storage_specs(within, [flat_specs[k] for k in self.rest])

  def storage_shapes(self, params) -> dict:
    """Abstract storage of abstract `params`."""
    return jax.eval_shape(self.to_storage, params)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["layer_params"] = [list(p) for p in self.layer_params]
    if not self.gather_once:  # the search never sets it: searched plans' files stay as they were
      del d["gather_once"]
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> StageLayout:
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: d[k] for k in fields if k in d}  # gather_once is absent from older files
    values["layer_params"] = tuple(tuple(int(i) for i in p) for p in d["layer_params"])
    return cls(**values)


def stage_layout(
  loss_fn: Callable, params, batch, stages: int, repeats: int = 1, microbatches: int = 1
) -> StageLayout:
  """The layout of `loss_fn`'s layers over `stages` x `repeats`; a named error when the loss
  has no layer stack, its layers do not split into equal chunks, or the batch does not split
  into `microbatches`."""
  stack, _ = _trace(loss_fn, params, batch, microbatches)
  if stack.length % (stages * repeats):
    raise InvalidArgumentError(
      f"the loss's {stack.length} layers do not split into {stages} stages x {repeats} "
      f"repeats of equal chunks; choose stages x repeats dividing {stack.length}. Got "
      f"stages={stages}, repeats={repeats}."
    )
  if repeats > 1 and microbatches < stages:
    raise InvalidArgumentError(
      f"a circular pipeline needs at least as many micro-batches as stages; use "
      f"microbatches >= {stages}. Got microbatches={microbatches}."
    )
  return StageLayout(
    stack.length,
    stack.stacked,
    stack.params,
    len(jax.tree.leaves(params)),
    stages,
    repeats,
    microbatches,
  )


@dataclasses.dataclass(frozen=True)
class _Traced:
  closed: jex.core.ClosedJaxpr  # the loss for the whole batch
  stack: layers.LayerStack
  layer: jex.core.ClosedJaxpr  # one layer traced for a micro-batch's rows (shapes are fixed)
  by_micro: frozenset[int]  # consts computed from the batch: they go by micro-batch


def _no_pipeline(reason: str) -> InvalidArgumentError:
  return InvalidArgumentError(
    f"a pipeline needs a stack of identical layers (a scan over layers, or a Python loop of "
    f"blocks) passing on arrays with the batch's rows, but {reason}. Plan this loss without "
    "pipeline stages."
  )


def _trace(loss_fn, params, batch, pieces: int) -> tuple[layers.LayerStack, _Traced]:
  """The loss's stack, with its layer traced for 1 / `pieces` of the batch's rows (a
  micro-batch's rows on one device)."""
  n_params = len(jax.tree.leaves(params))
  closed = jax.make_jaxpr(loss_fn)(params, batch)
  micro = jax.eval_shape(lambda b: jax.tree.map(lambda x: split_rows(x, pieces)[0], b), batch)
  try:
    stack = layers.find(closed.jaxpr, n_params)
    micro_stack = layers.same_stack(jax.make_jaxpr(loss_fn)(params, micro).jaxpr, n_params, stack)
  except layers.NoLayerStack as e:
    raise _no_pipeline(str(e)) from None
  if (micro_stack.length, micro_stack.params) != (stack.length, stack.params):
    raise _no_pipeline("its layers are not the same for a micro-batch as for the whole batch")
  rows = {getattr(v.aval, "shape", ())[:1] for v in stack.carry}
  if len(rows) != 1 or rows == {()}:
    raise _no_pipeline(f"the layers pass on {[str(v.aval) for v in stack.carry]}")
  (row,) = rows
  by_micro = frozenset(
    k
    for k in _batch_dependent(closed.jaxpr, n_params, stack)
    if stack.consts[k].aval.shape[:1] == row
  )
  return stack, _Traced(closed, stack, micro_stack.body, by_micro)


def _batch_dependent(jaxpr, n_params: int, stack) -> list[int]:
  """Positions of the stack's consts computed from the batch."""
  tainted = set(jaxpr.invars[n_params:])
  for eqn in jaxpr.eqns[: stack.start]:
    if any(isinstance(v, jex.core.Var) and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  return [k for k, v in enumerate(stack.consts) if isinstance(v, jex.core.Var) and v in tainted]


def _merge(x):
  return jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:])


def _index(xs, k):
  return [lax.dynamic_index_in_dim(x, k, 0, keepdims=False) for x in xs]


def _put(buffers, values, k, where):
  """Each buffer with slot k set to its value where `where`, in place (one slot written)."""
  return [
    lax.dynamic_update_index_in_dim(b, jnp.where(where, v, b[k]), k, 0)
    for b, v in zip(buffers, values)
  ]


def _manual(spec: P, axes) -> P:
  """`spec` with only the mesh axes in `axes` kept (what a `shard_map` manual over them takes)."""
  kept = []
  for e in spec:
    names = tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a in axes)
    kept.append(names if len(names) > 1 else names[0] if names else None)
  return P(*kept)


def _gathered(xs, specs, lead: int):
  """Each of `xs` all-gathered along the dims its storage spec splits over the rows' axes;
  `lead`: the storage dims (stage, repeat, layer) `xs` no longer has."""
  out = []
  for x, spec in zip(xs, specs):
    for d, e in enumerate(tuple(spec)[3:], start=3 - lead):
      if e is not None:
        x = lax.all_gather(x, e, axis=d, tiled=True)
    out.append(x)
  return out


def pipelined_loss(
  loss_fn: Callable,
  params,
  batch,
  layout: StageLayout,
  mesh: Mesh,
  *,
  stage_specs=None,
  rows_axes: tuple[str, ...] = ("data",),
  remat: bool = True,
) -> Callable:
  """`(storage, batch) -> loss`: `loss_fn` (planned for abstract `params` and `batch`) with its
  layer stack run as a pipeline over the mesh's stage axis; every other equation as written,
  data-parallel over `rows_axes` and the stage axis. `stage_specs`: the storage specs of the
  layers' parameters (default: split over stages only); those that split a weight over the
  rows' axes too make it FSDP inside the stage."""
  rows = tuple(a for a in rows_axes if a in mesh.axis_names)
  split = [_manual(spec, rows) for spec in (stage_specs or [P(STAGE)] * len(layout.layer_params))]
  in_stage = [P(STAGE, *tuple(spec)[1:]) for spec in split]
  row_devices = math.prod(mesh.shape[a] for a in rows)
  _, traced = _trace(loss_fn, params, batch, layout.microbatches * row_devices)
  stack = traced.stack
  s_count, r_count, m_count = layout.stages, layout.repeats, layout.microbatches
  items = r_count * m_count
  layer = jex.core.jaxpr_as_fun(traced.layer)
  by_micro, n_consts = traced.by_micro, len(stack.consts)
  outside = NamedSharding(mesh, P((*rows, STAGE)))  # the rest of the loss: rows over stages too
  inside = NamedSharding(mesh, P(None, rows or None))  # [M, b, ...]: whole on every stage

  def chunk(consts, carry, local, r):
    """Stage chunk r of layers on `carry`, each layer a slice of `local` ([R, c, ...] leaves).
    Indexed inside the checkpoint, so the backward pass keeps the stage's parameters once
    (loop-invariant), not one slice per iteration."""
    params = _index(local, r) if r_count > 1 else [x[0] for x in local]
    if not layout.gather_once:  # gathered here, and rematerialised in the backward pass
      params = _gathered(params, split, 2)

    def one(c, p):
      return tuple(layer(*consts, *c, *p)), None

    # Unrolled: a scan would copy each layer's residuals into stacks and out again (the
    # chunk's recomputation cost 1.7 times its first pass so, compiled: gpt2-small, 3 layers).
    return list(lax.scan(one, tuple(carry), tuple(params), unroll=True)[0])

  if remat:  # a stage keeps only each chunk's input for the backward pass
    chunk = jax.checkpoint(chunk)

  def stage_loop(stacked, shared, micro_consts, micro_carry):
    """Manual over the stage axis: `stacked` leaves are this stage's [1, R, c, ...]."""
    s = lax.axis_index(STAGE)
    local = [x[0] for x in stacked]
    if layout.gather_once:  # the stage's weights whole for the loop, their gradient split after
      local = _gathered(local, split, 1)
    shift = [(k, (k + 1) % s_count) for k in range(s_count)]

    def iteration(state, t):
      held, looped, outputs = state
      i = jnp.clip(t - s, 0, items - 1)
      m, r = i % m_count, i // m_count
      fresh = _index(micro_carry, m)
      if r_count > 1:
        fresh = [jnp.where(r == 0, f, a) for f, a in zip(fresh, _index(looped, m))]
      x = [jnp.where(s == 0, f, h) for f, h in zip(fresh, held)]
      it_shared, it_micro = iter(shared), iter(_index(micro_consts, m))
      consts = [next(it_micro) if k in by_micro else next(it_shared) for k in range(n_consts)]
      y = chunk(consts, x, local, r)
      done = (t - s >= 0) & (t - s < items) & (s == s_count - 1) & (r == r_count - 1)
      outputs = _put(outputs, y, m, done)
      passed = [lax.ppermute(v, STAGE, shift) for v in y]
      if r_count > 1:  # the first stage files what comes round by its micro-batch
        j = t - (s_count - 1)
        keep = (s == 0) & (j >= 0) & (j < items)
        looped = _put(looped, passed, jnp.clip(j, 0, items - 1) % m_count, keep)
      return (passed, looped, outputs), None

    held = [jnp.zeros_like(x[0]) for x in micro_carry]
    looped = [jnp.zeros_like(x) for x in micro_carry] if r_count > 1 else []
    outputs = [jnp.zeros_like(x) for x in micro_carry]
    steps = jnp.arange(items + s_count - 1)
    (_, _, outputs), _ = lax.scan(iteration, (held, looped, outputs), steps)
    return [o[None] for o in outputs]  # only the last stage's are the results

  # Manual over the rows' axes too: left to XLA, a stage's weight gradients would be reduced
  # over the data axis inside the loop, once per iteration, instead of once at its end.
  by_rows = P(None, rows or None)
  run = jax.shard_map(
    stage_loop,
    mesh=mesh,
    in_specs=(in_stage, P(), by_rows, by_rows),
    out_specs=P(STAGE, None, rows or None),
    axis_names={STAGE, *rows},
    # The layer's equations are bound as traced, without the casts to per-stage values that
    # the varying-axes check asks for; nothing leaves the map summed over stages.
    check_vma=False,
  )

  def run_stack(stacked, consts, carry):
    into = lambda x: lax.with_sharding_constraint(split_rows(x, m_count), inside)  # noqa: E731
    shared = [c for j, c in enumerate(consts) if j not in by_micro]
    micro = [into(c) for j, c in enumerate(consts) if j in by_micro]
    outs = run(list(stacked), shared, micro, [into(x) for x in carry])
    return [lax.with_sharding_constraint(_merge(x[-1]), outside) for x in outs]

  def pipelined(storage, batch):
    args: list = [None] * layout.n_params
    for k, x in zip(layout.rest, storage["rest"]):
      args[k] = x
    batch = lax.with_sharding_constraint(batch, jax.tree.map(lambda _: outside, batch))
    run_here = lambda consts, carry: run_stack(storage["stages"], consts, carry)  # noqa: E731
    return layers.evaluate_around(traced.closed, args + jax.tree.leaves(batch), stack, run_here)[0]

  return pipelined


def pipeline_train_step(
  loss_fn, optimizer, mesh, layout: StageLayout, params, batch, param_specs, opt_specs, batch_specs
):
  """The jitted step of a pipeline plan: the loss's layers run by stage, the parameters stored
  by stage (`param_specs` / `opt_specs`: the user's leaves' specs, flat), everything else as
  the other families' steps."""
  stored_specs = layout.stored_specs(param_specs)
  loss = pipelined_loss(loss_fn, params, batch, layout, mesh, stage_specs=stored_specs["stages"])
  stored = layout.storage_shapes(params)
  opt_state_specs = shardings_lib.opt_state_specs(optimizer, stored, layout.stored_specs(opt_specs))
  return step_lib.sharded_train_step(
    loss,
    optimizer,
    mesh,
    stored_specs,
    opt_state_specs,
    batch_specs,
    planned_batch=batch,
    # The stages' weights are gathered in the pipeline's loop (`pipelined_loss`); constrained
    # at their use, the shard_map's input, XLA would gather each whole stage before it too.
    gathered_specs={**stored_specs, "stages": [P(STAGE)] * len(stored_specs["stages"])},
  )


def bubble(stages: int, repeats: int, microbatches: int) -> float:
  """The idle fraction of a pipeline step."""
  return (stages - 1) / (repeats * microbatches + stages - 1)
