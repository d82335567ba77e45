"""The jitted, sharded train step: in / out shardings, donation, the plan's layout pinned."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wapar_jax._src.emit.shardings import named
from wapar_jax._src.step import make_train_step


def _compute_spec(spec: P) -> P:
  """The layout a parameter is used in: its storage spec without the data (FSDP) split."""

  def drop(entry):
    if isinstance(entry, tuple):
      kept = tuple(a for a in entry if a != "data")
      return kept if len(kept) > 1 else (kept[0] if kept else None)
    return None if entry == "data" else entry

  return P(*(drop(e) for e in spec))


def _pinned(loss_fn: Callable, mesh: Mesh, param_specs, batch_specs) -> Callable:
  """`loss_fn` with its inputs held to the plan's compute layout.

  In/out shardings alone leave XLA free to propagate differently: an FSDP step then gathers
  activations or splits the logits matmul instead of gathering weights, sending about ten
  times the bytes. Constraining the parameters to their gathered layout and the batch to its
  split at the top of the loss makes the compiled step the planned one.
  """
  is_spec = lambda x: isinstance(x, P)
  use = named(mesh, jax.tree.map(_compute_spec, param_specs, is_leaf=is_spec))
  split = named(mesh, batch_specs)

  def pinned(params, batch):
    params = jax.lax.with_sharding_constraint(params, use)
    batch = jax.lax.with_sharding_constraint(batch, split)
    return loss_fn(params, batch)

  return pinned


def sharded_train_step(
  loss_fn: Callable,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  param_specs,
  opt_specs,
  batch_specs,
  *,
  remat: str = "none",
  microbatches: int = 1,
):
  """The jitted step with in/out shardings; params and opt state are donated."""
  p_sh, o_sh, b_sh = named(mesh, param_specs), named(mesh, opt_specs), named(mesh, batch_specs)
  step = make_train_step(
    _pinned(loss_fn, mesh, param_specs, batch_specs),
    optimizer,
    remat=remat,
    microbatches=microbatches,
  )
  return jax.jit(
    step,
    in_shardings=(p_sh, o_sh, b_sh),
    out_shardings=(p_sh, o_sh, NamedSharding(mesh, P())),
    donate_argnums=(0, 1),
  )
