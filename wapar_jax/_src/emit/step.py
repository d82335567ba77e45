"""The jitted, sharded train step: in / out shardings, donation, FSDP weights gathered at use."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wapar_jax._src.emit.shardings import named
from wapar_jax._src.step import make_train_step

# Mesh axes that store state split, never compute on it: a weight is gathered over them.
_STORAGE_AXES = frozenset({"data", "fsdp"})


def _compute_spec(spec: P) -> P:
  """The layout a parameter is used in: its storage spec without the data / fsdp split."""

  def drop(entry):
    if isinstance(entry, tuple):
      kept = tuple(a for a in entry if a not in _STORAGE_AXES)
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
    return jax.lax.with_sharding_constraint(value, NamedSharding(mesh, spec))

  return hook


def _batch_pinned(loss_fn: Callable, mesh: Mesh, batch_specs) -> Callable:
  """`loss_fn` with the batch held to its split: with weights gathered, the activations must
  follow the batch, not the weights' storage split."""
  split = named(mesh, batch_specs)
  return lambda params, batch: loss_fn(params, jax.lax.with_sharding_constraint(batch, split))


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
  grad_specs=None,
):
  """The jitted step with in/out shardings; params and opt state are donated. `grad_specs`
  (per parameter) keeps accumulated gradients split, as ZeRO stores the optimizer state."""
  p_sh, o_sh, b_sh = named(mesh, param_specs), named(mesh, opt_specs), named(mesh, batch_specs)
  hook = _gather_hook(mesh, param_specs)
  if hook is not None:
    loss_fn = _batch_pinned(loss_fn, mesh, batch_specs)
  hold = None
  if grad_specs is not None:
    split = named(mesh, grad_specs)
    hold = lambda grads: jax.lax.with_sharding_constraint(grads, split)  # noqa: E731
  step = make_train_step(
    loss_fn, optimizer, remat=remat, microbatches=microbatches, gather=hook, hold_grads=hold
  )
  return jax.jit(
    step,
    in_shardings=(p_sh, o_sh, b_sh),
    out_shardings=(p_sh, o_sh, NamedSharding(mesh, P())),
    donate_argnums=(0, 1),
  )
