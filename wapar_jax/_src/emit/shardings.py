"""Arrays onto a mesh: NamedShardings from specs, copies that never alias, per-process data."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wapar_jax._src.tree import path_keys


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


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def opt_state_specs(optimizer: optax.GradientTransformation, params, param_specs):
  """Specs for the optimizer state, read off the state's own structure.

  A subtree of the state laid out like the parameters (where `optax.masked` may leave a
  `MaskedNode` in place of a parameter or a whole branch) gives each leaf its parameter's spec
  when it has the parameter's shape; every other leaf (step counts, hyperparameters, factored or
  stacked statistics) is replicated. `tx.init` compiles to single-device outputs (zeros do not
  depend on the parameters), so the shardings must be stated. Not `optax.tree_map_params`: it
  maps the specs over MaskedNode (a structure error), gives adafactor's factored rows the rank of
  their parameter, and runs `init` on a placeholder that L-BFGS's init cannot take.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  shapes = {path_keys(p): tuple(x.shape) for p, x in flat_params}
  specs = dict(zip(shapes, jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))))
  under = collections.Counter(k[:n] for k in shapes for n in range(len(k) + 1))

  def like_params(node) -> bool:
    covered = 0
    for p, leaf in jax.tree_util.tree_flatten_with_path(node, is_leaf=_is_masked)[0]:
      keys = path_keys(p)
      n = under[keys] if _is_masked(leaf) else int(keys in shapes)
      if not n:
        return False
      covered += n
    return covered == len(shapes)

  def spec_of(p, leaf):
    if _is_masked(leaf):
      return leaf
    keys = path_keys(p)
    return specs[keys] if tuple(leaf.shape) == shapes[keys] else P()

  def specs_of(node):
    if not like_params(node):
      return P()
    return jax.tree_util.tree_map_with_path(spec_of, node, is_leaf=_is_masked)

  state = jax.eval_shape(optimizer.init, params)
  nodes, treedef = jax.tree_util.tree_flatten(state, is_leaf=like_params)
  return treedef.unflatten([specs_of(node) for node in nodes])
