"""Arrays onto a mesh: NamedShardings from specs, copies that never alias, per-process data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def from_process_local(tree, shardings):
  """A global array per leaf from this process's rows (`jax.make_array_from_process_local_data`)."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), tree, shardings
  )


def from_host_copy(tree, shardings):
  """A global array per leaf from a full host copy that every process holds (same values)."""

  def put(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def named(mesh: Mesh, spec_tree):
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), spec_tree, is_leaf=lambda x: isinstance(x, P)
  )


def copy_to(tree, shardings):
  """device_put that never aliases the caller's buffers.

  On jax 0.10.2 `device_put(..., may_alias=False)` still hands a replicated shard the source
  buffer, and the donating train step would then delete the caller's array.
  """

  def fresh(x):
    return jnp.array(x, copy=True) if isinstance(x, jax.Array) else x

  return jax.device_put(jax.tree.map(fresh, tree), shardings)


def opt_state_specs(optimizer: optax.GradientTransformation, params, param_specs):
  """Specs for the optimizer state: each per-parameter leaf follows its parameter.

  `tx.init` compiles to single-device outputs (zeros do not depend on the parameters), so the
  shardings must be stated; scalars such as step counts are replicated.
  """
  abstract_state = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(
    optimizer,
    lambda _, spec: spec,
    abstract_state,
    param_specs,
    transform_non_params=lambda _: P(),
    is_leaf=lambda x: isinstance(x, P),
  )
