"""What a researcher's own `jax.jit` loop takes from a plan: NamedShardings shaped like its trees,
and the plan's compute layout applied to its loss.

In / out shardings alone leave XLA free to lay the step out otherwise than planned (an FSDP step
then gathers activations instead of weights): the emitted step constrains each use of a
parameter (`gathers.at_use`). `constrained_loss` hands the user's loss that same machinery, so a
hand-written `jax.jit` step compiles to the program `plan.train_step()` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

from wapar_jax._src import batch_axes as batch_axes_lib
from wapar_jax._src.emit.shardings import named
from wapar_jax._src.emit.step import layout_levers
from wapar_jax._src.step import loss_and_grads, planned_loss
from wapar_jax.errors import ExplicitAxesError


@dataclasses.dataclass(frozen=True)
class Shardings:
  """NamedShardings of a train step's trees on one mesh, each shaped like the tree it lays out.

  Pass them to `jax.jit(..., in_shardings=..., out_shardings=...)` and `jax.device_put`.

  Attributes:
    mesh: the mesh they are on (the loss's sharding: `NamedSharding(mesh, P())`).
    params: per parameter leaf (for an NNX plan, shaped like `nnx.state(model, nnx.Param)`).
    opt_state: per optimizer-state leaf; None when no optimizer was given or carried.
    batch: per batch leaf.
    model_state: per leaf of the model's state (batch statistics, PRNG keys); None for a
      model without state.
  """

  mesh: Mesh
  params: Any
  opt_state: Any
  batch: Any
  model_state: Any = None


def shardings(mesh: Mesh, param_specs, opt_specs, batch_specs, state_specs=None) -> Shardings:
  return Shardings(
    mesh=mesh,
    params=named(mesh, param_specs),
    opt_state=None if opt_specs is None else named(mesh, opt_specs),
    batch=named(mesh, batch_specs),
    model_state=None if state_specs is None else named(mesh, state_specs),
  )


def auto_twin(mesh: Mesh) -> Mesh:
  """`mesh` with Auto axes: the plan's layout is constraints that XLA propagates, which
  Explicit axes turn into assertions (and sharding-in-types rules into another program)."""
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _explicit_axes(tree) -> tuple[str, ...]:
  """Explicit axes of the mesh in context or of the arrays' types (traced in explicit mode)."""
  meshes = [jax.sharding.get_abstract_mesh()]
  meshes += [getattr(jax.typeof(x).sharding, "mesh", None) for x in jax.tree.leaves(tree)]
  return tuple(
    dict.fromkeys(
      name
      for m in meshes
      if m is not None and not m.empty
      for name, kind in zip(m.axis_names, m.axis_types)
      if kind == AxisType.Explicit
    )
  )


def refuse_explicit(what: str, params, batch) -> None:
  explicit = _explicit_axes((params, batch))
  if explicit:
    raise ExplicitAxesError(
      f"plan.{what} runs where mesh axes {list(explicit)} are Explicit: the plan's layout is "
      "constraints XLA propagates (Auto axes), which Explicit axes turn into assertions or "
      "another program. Run the whole step in Auto mode: jax.jit(jax.sharding.auto_axes("
      "train_step, out_sharding=(param specs, opt-state specs, P())), in_shardings=...), "
      "the specs read off plan.shardings(mesh) (see plan.constrain's docstring), or build the "
      f"mesh with Auto axes (plan.make_mesh()). Got Explicit axes {list(explicit)}."
    )


def constrained_loss(
  loss_fn: Callable,
  mesh: Mesh,
  param_specs,
  batch_specs,
  *,
  remat: str,
  sequence_parallel: bool = False,
) -> Callable:
  """`loss_fn` laid out as the emitted step lays it out: FSDP weights constrained to their
  gathered layout at each use (a scanned layer's slice inside the scan), the batch held to its
  split, the activations split on the sequence under sequence parallelism, and the plan's
  per-layer remat."""
  loss_fn, hook, _ = layout_levers(
    loss_fn, auto_twin(mesh), param_specs, batch_specs, sequence_parallel=sequence_parallel
  )
  return planned_loss(loss_fn, remat=remat, gather=hook)


def constrained_grads(
  loss_fn: Callable,
  mesh: Mesh,
  param_specs,
  batch_specs,
  grad_specs,
  *,
  remat,
  microbatches,
  with_state: bool = False,
  batch_axes=None,
  sequence_parallel: bool = False,
) -> Callable:
  """`(params, batch) -> (loss, grads)` as the emitted step computes them: `constrained_loss`
  differentiated, accumulated over the plan's micro-batches with gradients held split. With a
  model's state, `(params, batch, state) -> ((loss, state), grads)`; with `batch_axes` (batch
  dims other than dim 0), run rows first as the emitted step runs."""
  loss_fn, batch_specs, taking_given = batch_axes_lib.rows_first_program(
    loss_fn, batch_specs, batch_axes
  )
  loss_fn, hook, hold = layout_levers(
    loss_fn, auto_twin(mesh), param_specs, batch_specs, grad_specs, sequence_parallel
  )
  grads = loss_and_grads(
    loss_fn,
    remat=remat,
    microbatches=microbatches,
    gather=hook,
    hold_grads=hold,
    with_state=with_state,
  )
  return taking_given(grads, position=1)
