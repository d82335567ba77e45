"""Which dim of each batch leaf is the batch: `plan(batch_axes=...)`, and the rows-first layout.

Everything past the planner's entry reads the batch dim as dim 0 (the search's batch class, the
micro-batch split, the pipeline's rows). A batch given time-major, `(seq, batch, ...)`, is
planned and run as its rows-first twin: the loss sees the batch as the user gave it (the dim
moved back inside the loss, a local transpose under any sharding), and the emitted step takes
the user's layout and moves the dim in front before the rows-first step. Specs are stated in the
user's layout.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from wapar_jax._src.tree import path_keys, path_str
from wapar_jax.errors import InvalidArgumentError


def per_leaf(batch, batch_axes) -> tuple[int, ...]:
  """The batch dim of every leaf of `batch` (flattened order), non-negative.

  `batch_axes` is one int for every leaf, or a tree shaped like `batch` (or a prefix of it)
  with an int per leaf or subtree.
  """
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  if _is_axis(batch_axes):
    given = [batch_axes] * len(leaves)
  else:
    try:
      given = jax.tree.leaves(
        jax.tree.map(lambda a, sub: [a] * len(jax.tree.leaves(sub)), batch_axes, batch)
      )
    except (ValueError, TypeError) as e:
      raise InvalidArgumentError(
        "batch_axes must be an int (the batch dim of every batch leaf) or a tree shaped like "
        "batch with an int per leaf, e.g. {'tokens': 1, 'mask': 1}. "
        f"Got {reprlib.repr(batch_axes)}: {e}"
      ) from e
  out = []
  for (path, x), axis in zip(leaves, given):
    rank = len(getattr(x, "shape", ()))
    if not _is_axis(axis) or not -rank <= axis < rank:
      raise InvalidArgumentError(
        f"batch_axes for batch leaf {path_str(path_keys(path))} must be a dim of its shape "
        f"{list(getattr(x, 'shape', ()))} (an int in [{-rank}, {rank})). Got {axis!r}."
      )
    out.append(int(axis) % rank)
  return tuple(out)


def _is_axis(a) -> bool:
  return isinstance(a, numbers.Integral) and not isinstance(a, bool)


def check_sizes(batch, axes: Sequence[int]) -> int:
  """The batch size all leaves agree on, else an error naming each leaf's size."""
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  sizes = {path_str(path_keys(p)): int(x.shape[a]) for (p, x), a in zip(leaves, axes)}
  if len(set(sizes.values())) > 1:
    shown = ", ".join(f"{k}: {v}" for k, v in list(sizes.items())[:6])
    raise InvalidArgumentError(
      "every batch leaf must have the same batch size along its batch dim (batch_axes, default "
      "0): the planner splits them together over the data axis. Give a leaf that is not per "
      "example (a mask shared by all rows, a table) to loss_fn by closing over it, or name "
      f"its batch dim in batch_axes. Got sizes {shown}."
    )
  return next(iter(sizes.values()))


def moved(axes: Sequence[int]) -> bool:
  return any(axes)


def _rows_first_shape(shape: tuple, axis: int) -> tuple:
  return (shape[axis], *shape[:axis], *shape[axis + 1 :])


def rows_first(batch, axes: Sequence[int]):
  """`batch` with each leaf's batch dim moved to the front (arrays or ShapeDtypeStructs)."""
  leaves, treedef = jax.tree.flatten(batch)

  def move(x, a):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(_rows_first_shape(tuple(x.shape), a), x.dtype)
    return jnp.moveaxis(x, a, 0)

  return jax.tree.unflatten(treedef, [move(x, a) for x, a in zip(leaves, axes)])


def as_given(batch, axes: Sequence[int]):
  """The inverse of `rows_first`: each leaf's dim 0 moved back to its batch dim."""
  leaves, treedef = jax.tree.flatten(batch)
  return jax.tree.unflatten(treedef, [jnp.moveaxis(x, 0, a) for x, a in zip(leaves, axes)])


def loss_on_rows_first(loss_fn: Callable, axes: Sequence[int]) -> Callable:
  """`loss_fn` taking the rows-first batch: it still sees the batch as the user gave it."""
  return lambda params, batch, *state: loss_fn(params, as_given(batch, axes), *state)


def spec_as_given(spec: P, axis: int) -> P:
  """A rows-first leaf's spec in the user's layout: entry 0 moved to the batch dim."""
  entries = list(spec)
  if not entries:
    return spec
  entries += [None] * max(0, axis + 1 - len(entries))
  entries.insert(axis, entries.pop(0))
  return P(*entries)


def spec_rows_first(spec: P, axis: int) -> P:
  """The user's spec of a leaf in the rows-first layout: the batch dim's entry moved to 0."""
  entries = list(spec) + [None] * max(0, axis + 1 - len(spec))
  entries.insert(0, entries.pop(axis))
  return P(*entries)


def specs_rows_first(batch_specs, axes: Sequence[int]):
  """`spec_rows_first` over a tree of specs (flattened order matching `axes`)."""
  flat, treedef = jax.tree.flatten(batch_specs, is_leaf=lambda x: isinstance(x, P))
  return treedef.unflatten([spec_rows_first(s, a) for s, a in zip(flat, axes)])


def rows_first_program(loss_fn: Callable, batch_specs, axes: Sequence[int] | None):
  """(loss, batch specs, wrap) for a program that runs rows first: the loss and specs in that
  layout, and `wrap(fn, position)` giving a function built from them the batch as the user
  lays it out (argument `position` moved rows first). Unchanged where `axes` is None."""
  if axes is None:
    return loss_fn, batch_specs, lambda fn, position: fn

  def wrap(fn: Callable, position: int) -> Callable:
    def given(*args):
      args = list(args)
      args[position] = rows_first(args[position], axes)
      return fn(*args)

    return given

  return loss_on_rows_first(loss_fn, axes), specs_rows_first(batch_specs, axes), wrap
