"""The jitted, sharded train step: in / out shardings, donation, FSDP weights gathered at use,
behind checks of its inputs (`TrainStep`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wapar_jax._src import batch_axes as batch_axes_lib
from wapar_jax._src.emit import context, experts, sequence
from wapar_jax._src.emit.shardings import named
from wapar_jax._src.step import make_train_step
from wapar_jax._src.tree import path_keys, path_str
from wapar_jax.errors import DonatedInputError, InvalidArgumentError, PlanMismatchError

# Mesh axes that store state split, never compute on it: a weight is gathered over them.
_STORAGE_AXES = frozenset({"data", "fsdp"})
# Axes that split the batch's devices beside data.
_BATCH_AXES = frozenset({experts.EXPERT, context.CONTEXT})


def _compute_spec(spec: P) -> P:
  """The layout a parameter is used in: its storage spec without the data / fsdp split."""

  def drop(entry):
    if isinstance(entry, tuple):
      # Beside data, the expert (context) axis is the rest of the batch's devices storing a
      # weight split (FSDP with expert or context parallelism); alone, it splits the experts.
      storage = _STORAGE_AXES | (_BATCH_AXES if experts.DATA in entry else set())
      kept = tuple(a for a in entry if a not in storage)
      return kept if len(kept) > 1 else (kept[0] if kept else None)
    return None if entry in _STORAGE_AXES else entry

  return P(*(drop(e) for e in spec))


def _gather_hook(mesh: Mesh, param_specs):
  """The emitted step's `gathers.at_use` hook: each use of a parameter stored split on the data
  axis (FSDP) constrained to its gathered compute layout; None when no parameter is.

  In / out shardings alone leave XLA free to propagate differently: an FSDP step then gathers
  activations or splits the logits matmul instead of gathering weights, sending about ten
  times the bytes. A constraint at each use (on the layer's slice inside a scan) makes XLA
  gather each layer's weights just before the layer. Nothing else is pinned: a parameter
  already stored in its compute layout needs no constraint, and one would stop XLA from adding
  a tied weight's partial gradients before it reduces them.
  """
  specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  compute = [_compute_spec(s) for s in specs]
  split = [c != s for c, s in zip(compute, specs)]
  if not any(split):
    return None

  def hook(i, value, dropped):
    if not split[i]:
      return value
    spec = P(*tuple(compute[i])[dropped:])
    if context.CONTEXT in mesh.shape:
      return _gathered(value, mesh, spec, P(*tuple(specs[i])[dropped:]))
    return jax.lax.with_sharding_constraint(value, NamedSharding(mesh, spec))

  return hook


def _gathered(value, mesh: Mesh, compute: P, stored: P):
  """`value` constrained to its compute layout, its cotangent to its stored split: with the
  tokens split over data and context, a gradient constrained whole is all-reduced over
  context and then over data (compiled: 2.3x the bytes of one reduce-scatter over both)."""

  @jax.custom_vjp
  def gather(x):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, compute))

  def forward(x):
    return gather(x), None

  def backward(_, g):
    return (jax.lax.with_sharding_constraint(g, NamedSharding(mesh, stored)),)

  gather.defvjp(forward, backward)
  return gather(value)


def _batch_pinned(loss_fn: Callable, mesh: Mesh, batch_specs) -> Callable:
  """`loss_fn` with the batch held to its split: with weights gathered, the activations must
  follow the batch, not the weights' storage split."""
  split = named(mesh, batch_specs)
  return lambda params, batch, *state: loss_fn(
    params, jax.lax.with_sharding_constraint(batch, split), *state
  )


def layout_levers(
  loss_fn: Callable,
  mesh: Mesh,
  param_specs,
  batch_specs,
  grad_specs=None,
  sequence_parallel: bool = False,
  gathered_specs=None,
):
  """(loss, gather hook, gradient hold) of the emitted step: the loss with its batch pinned
  when weights are gathered at use (and its activations split on the sequence with
  `sequence_parallel`, `sequence.sequence_split`; on the experts where the mesh has an expert
  axis, `experts.expert_split`; on the sequence where it has a context axis,
  `context.context_split`), the `gathers.at_use` hook (None if no weight is), and the
  constraint keeping accumulated gradients split (None unless `grad_specs`). `gathered_specs`:
  the specs the hook reads (default `param_specs`)."""
  if sequence_parallel:
    loss_fn = sequence.sequence_split(loss_fn, mesh, param_specs, batch_specs)
  count = lambda specs: len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))  # noqa: E731
  if experts.EXPERT in mesh.shape:
    loss_fn = experts.expert_split(loss_fn, mesh, count(param_specs), count(batch_specs))
  if context.CONTEXT in mesh.shape:
    loss_fn = context.context_split(loss_fn, mesh, count(param_specs), count(batch_specs))
  hook = _gather_hook(mesh, param_specs if gathered_specs is None else gathered_specs)
  if hook is not None:
    loss_fn = _batch_pinned(loss_fn, mesh, batch_specs)
  hold = None
  if grad_specs is not None:
    split = named(mesh, grad_specs)
    hold = lambda grads: jax.lax.with_sharding_constraint(grads, split)  # noqa: E731
  return loss_fn, hook, hold


def sharded_train_step(
  loss_fn: Callable,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  param_specs,
  opt_specs,
  batch_specs,
  *,
  planned_batch,
  remat: str = "none",
  microbatches: int = 1,
  grad_specs=None,
  state_specs=None,
  batch_axes=None,
  sequence_parallel: bool = False,
  gathered_specs=None,
):
  """The jitted step with in/out shardings; params and opt state are donated. `grad_specs`
  (per parameter) keeps accumulated gradients split, as ZeRO stores the optimizer state.
  `planned_batch` (abstract is enough) sets the batch size the step takes. `state_specs`: the
  loss carries a model's state (`make_train_step(with_state=True)`), laid out so and donated.
  `batch_axes`: the batch dim of each batch leaf (flattened order) where one is not dim 0; the
  step takes the batch so and runs rows first (`batch_axes.rows_first`). `sequence_parallel`:
  the activations outside the tensor-parallel regions split on the sequence over the model
  axis (`sequence.sequence_split`). `gathered_specs`: the specs whose split parameters are
  gathered where used (default `param_specs`; a pipeline gathers its stages' in its loop)."""
  p_sh, o_sh, b_sh = named(mesh, param_specs), named(mesh, opt_specs), named(mesh, batch_specs)
  s_sh = () if state_specs is None else (named(mesh, state_specs),)
  loss_fn, rows_specs, taking_given = batch_axes_lib.rows_first_program(
    loss_fn, batch_specs, batch_axes
  )
  loss_fn, hook, hold = layout_levers(
    loss_fn, mesh, param_specs, rows_specs, grad_specs, sequence_parallel, gathered_specs
  )
  step = make_train_step(
    loss_fn,
    optimizer,
    remat=remat,
    microbatches=microbatches,
    gather=hook,
    hold_grads=hold,
    with_state=state_specs is not None,
  )
  jitted = jax.jit(
    taking_given(step, position=2),
    in_shardings=(p_sh, o_sh, b_sh, *s_sh),
    out_shardings=(p_sh, o_sh, NamedSharding(mesh, P()), *s_sh),
    donate_argnums=(0, 1, 3) if s_sh else (0, 1),
  )
  return TrainStep(jitted, (p_sh, o_sh, b_sh, *s_sh), planned_batch, batch_axes, mesh)


_ARGS = ("params", "opt_state", "batch", "model_state")


def _rows(batch, axes=None) -> list[tuple]:
  """The batch dim of each batch leaf (dim 0, or `axes[i]`), () for a leaf without one."""
  leaves = jax.tree.leaves(batch)
  axes = [0] * len(leaves) if axes is None or len(axes) != len(leaves) else axes
  return [tuple(getattr(x, "shape", ()))[a : a + 1] for x, a in zip(leaves, axes)]


@functools.cache
def _holds_buffers(leaf_type: type) -> bool:
  """A jax.Array type, not a tracer's (the step may run inside a user's jit or scan); cached by
  type because isinstance against jax.Array costs more than the check it guards."""
  return issubclass(leaf_type, jax.Array) and not issubclass(leaf_type, jax.core.Tracer)


def _concrete(x) -> bool:
  return _holds_buffers(type(x))


def _deleted(x) -> bool:
  return _holds_buffers(type(x)) and x.is_deleted()


def _named_leaves(name: str, tree) -> list[tuple[str, Any]]:
  """("<name>/<path>", leaf) for every leaf of one of the step's arguments."""
  return [
    (path_str((name, *path_keys(path))), leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


class TrainStep:
  """The jitted step, behind checks that touch no buffer and sync no device (microseconds per
  call). Refused by name: inputs donated to an earlier call (jax would crash the process on
  them), a batch of another size than planned (jax would silently compile a step no plan was
  made for), inputs laid out otherwise than the plan says (jax's error, without the fix).

  Everything else (`lower`, `trace`, ...) is the jitted function's.
  """

  def __init__(self, jitted, shardings, planned_batch, batch_axes=None, mesh=None):
    self._jitted = jitted
    self._mesh = mesh
    self._shardings = shardings
    self._batch_axes = batch_axes
    self._rows = _rows(planned_batch, batch_axes)

  def __getattr__(self, name):
    attribute = getattr(self._jitted, name)
    if not callable(attribute) or self._mesh is None:
      return attribute

    @functools.wraps(attribute)
    def in_plan_mesh(*args, **kwargs):
      with _plan_mesh(self._mesh):
        return attribute(*args, **kwargs)

    return in_plan_mesh

  def __call__(self, params, opt_state, batch, *model_state):
    args = (params, opt_state, batch, *model_state)
    if len(args) != len(self._shardings):
      raise _wrong_arity(len(args), len(self._shardings))
    if any(_deleted(x) for x in jax.tree.leaves(args)):
      raise _donated(args)
    rows = _rows(batch, self._batch_axes)
    if rows != self._rows and len(rows) == len(self._rows):  # another structure: jax's error
      raise _other_batch_size(batch, self._rows, self._batch_axes)
    try:
      with _plan_mesh(self._mesh):
        return self._jitted(*args)
    except ValueError as e:  # jax checks the layouts before it runs (or donates) anything
      misplaced = _misplaced(args, self._shardings)
      if not misplaced:
        raise
      raise PlanMismatchError(
        "the step's inputs must be laid out as the plan says: put params on "
        "the plan's mesh with plan.shard(params), create the optimizer state with "
        "plan.init_opt_state(params) and put each batch there with plan.shard_batch(batch) "
        "(host and numpy arrays are taken as they are). "
        f"Got {len(misplaced)} leaves laid out otherwise: {'; '.join(misplaced[:3])}."
      ) from e


def _plan_mesh(mesh):
  """The plan's own (Auto) mesh as the context the step traces in, where the caller has set an
  Explicit one (`jax.set_mesh`, `jax.make_mesh`'s default axis types): jax would trace it with
  shardings in its types, another program (gpt-tiny DP x TP: 70 all-gathers instead of 6
  all-reduces). Elsewhere no mesh is set: with one, optax's update adds `reshard`s."""
  ambient = jax.sharding.get_abstract_mesh()
  if mesh is None or ambient.empty or AxisType.Explicit not in ambient.axis_types:
    return contextlib.nullcontext()
  return jax.set_mesh(mesh)


def _wrong_arity(given: int, expected: int) -> InvalidArgumentError:
  if expected == 4:
    return InvalidArgumentError(
      "this plan's model carries state (batch statistics, PRNG keys): the step is "
      "step(params, opt_state, batch, model_state) -> (params, opt_state, loss, model_state); "
      "put the state on the mesh with plan.shard_model_state(model_state). "
      f"Got {given} arguments."
    )
  return InvalidArgumentError(
    "the step is step(params, opt_state, batch) -> (params, opt_state, loss): this plan's model "
    f"has no model state. Got {given} arguments."
  )


def _donated(args) -> DonatedInputError:
  deleted = [
    path for name, tree in zip(_ARGS, args) for path, x in _named_leaves(name, tree) if _deleted(x)
  ]
  return DonatedInputError(
    f"{deleted[0]} was donated to an earlier call of the train step, which freed its buffers: "
    "the step donates params and opt_state (and model_state), so after `params, opt_state, "
    "loss = step(params, opt_state, batch)` only the arrays it returned are valid. Pass those "
    "(to keep the old values, copy them before the call, e.g. jax.tree.map(jnp.copy, params)). "
    f"Got {len(deleted)} deleted leaves, first: {', '.join(deleted[:3])}."
  )


def _other_batch_size(batch, planned: list[tuple], axes) -> PlanMismatchError:
  leaves = _named_leaves("batch", batch)
  axes = [0] * len(leaves) if axes is None else axes
  wrong = [
    (path, list(getattr(x, "shape", ())), want[0] if want else None, a)
    for (path, x), want, a in zip(leaves, planned, axes)
    if tuple(getattr(x, "shape", ()))[a : a + 1] != want
  ]
  path, shape, rows, axis = wrong[0]
  return PlanMismatchError(
    f"the step was built for batches of {rows} rows (dim {axis} of {path}), and jax would "
    "compile "
    "another step for any other size, one no plan was made for. Pass batches of "
    f"{rows} rows, or build a step for the new size with plan.train_step(batch=<a batch of "
    "that size; jax.ShapeDtypeStruct leaves are enough>) (it must divide the plan's data axis), "
    f"or plan again. Got {len(wrong)} leaves of another size, first: {path} of shape {shape}."
  )


def _layout(sharding) -> str:
  if isinstance(sharding, NamedSharding):
    return f"{sharding.spec} over the mesh {dict(sharding.mesh.shape)}"
  return str(sharding)


def _misplaced(args, shardings) -> list[str]:
  """'path is <layout>, the plan's step takes <layout>' for each jax.Array laid out otherwise
  (an argument of another tree structure is left to jax's own error)."""
  out = []
  for name, tree, tree_shardings in zip(_ARGS, args, shardings):
    leaves, expected = _named_leaves(name, tree), jax.tree.leaves(tree_shardings)
    if len(leaves) == len(expected):
      out += [
        f"{path} is {_layout(x.sharding)}, the plan's step takes {_layout(want)}"
        for (path, x), want in zip(leaves, expected)
        if _concrete(x) and not x.sharding.is_equivalent_to(want, x.ndim)
      ]
  return out
