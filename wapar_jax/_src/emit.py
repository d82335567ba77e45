"""Plan -> mesh, shardings, a jitted sharded train step, sharded initialisation."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from wapar_jax.errors import NotEnoughDevicesError, PlanMismatchError
from wapar_jax._src.step import make_train_step

PathKeys = tuple  # a leaf's path as plain str / int keys, stable across pytree containers


def path_keys(path) -> PathKeys:
  keys = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        keys.append(getattr(entry, attr))
        break
    else:
      keys.append(str(entry))
  return tuple(k if isinstance(k, int) else str(k) for k in keys)


def path_str(keys: PathKeys) -> str:
  return "/".join(str(k) for k in keys)


def leaf_paths(tree) -> list[PathKeys]:
  return [path_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def specs_like(tree, flat_specs: Mapping[PathKeys, P], what: str):
  """A tree of PartitionSpecs shaped like `tree`, looked up by leaf path."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  missing = [path_str(path_keys(p)) for p, _ in leaves if path_keys(p) not in flat_specs]
  extra = set(flat_specs) - {path_keys(p) for p, _ in leaves}
  if missing or extra:
    raise PlanMismatchError(
        f"the plan's {what} do not match the tree it is applied to: "
        f"{len(missing)} leaves have no spec (first: {missing[:5]}), "
        f"{len(extra)} specs have no leaf (first: {[path_str(k) for k in sorted(extra, key=str)[:5]]}). "
        "Plan again for this model, or pass the tree the plan was made for.")
  return jax.tree_util.tree_unflatten(treedef, [flat_specs[path_keys(p)] for p, _ in leaves])


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh of Auto axes (Explicit axes make sharded gathers and matmuls raise on jax 0.10).

  Devices of several nodes (processes under `jax.distributed`, or TPU slices) are laid out with
  `mesh_utils.create_hybrid_device_mesh`: the innermost (model) axis inside a node, the outer
  (data) axis across nodes, as the search priced it. One process: as before.
  """
  names = tuple(mesh_shape)
  shape = tuple(mesh_shape[n] for n in names)
  needed = math.prod(shape)
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < needed:
    raise NotEnoughDevicesError(
        f"the plan's mesh {dict(mesh_shape)} needs {needed} devices but {len(devices)} are "
        "available. Run on more devices (for CPU testing set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} before importing jax), or "
        f"plan again with devices={len(devices)}. Got {len(devices)} devices.")
  devices = devices[:needed]
  granules = _granules(devices)
  if len(granules) > 1:
    return Mesh(_hybrid_grid(shape, granules), names, axis_types=(AxisType.Auto,) * len(names))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):  # topologies mesh_utils can't lay out
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def _granules(devices: Sequence[Any]) -> list[list[Any]]:
  """Devices grouped by what the slow network (DCN / InfiniBand) joins: slices, else processes.

  A TPU slice is one ICI domain however many hosts drive it, so TPU devices group by
  `slice_index`; other devices have no such link between processes and group by process (one
  process per node is the usual GPU launch). One group means a single-node mesh.
  """
  if len({getattr(d, "slice_index", None) for d in devices}) > 1:
    attr = "slice_index"
  elif devices and getattr(devices[0], "platform", "") == "tpu":
    return [list(devices)]
  else:
    attr = "process_index"
  groups: dict[Any, list[Any]] = {}
  for d in devices:
    groups.setdefault(getattr(d, attr), []).append(d)
  return [groups[k] for k in sorted(groups)]


def hybrid_shapes(shape: Sequence[int], per_granule: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """(ICI shape, DCN shape) that keeps the innermost axes inside one granule (node / slice).

  The search prices the mesh this way (model innermost, so tensor parallelism crosses nodes only
  when it is wider than a node); `jax.experimental.mesh_utils.create_hybrid_device_mesh` builds
  it. None if the axes do not tile a granule.
  """
  ici = [1] * len(shape)
  left = per_granule
  for i in reversed(range(len(shape))):
    ici[i] = math.gcd(shape[i], left)
    left //= ici[i]
  if left != 1:
    return None
  return tuple(ici), tuple(s // i for s, i in zip(shape, ici))


def _hybrid_grid(shape: tuple[int, ...], granules: list[list[Any]]) -> np.ndarray:
  """The device grid of a mesh spanning several granules: slow-network axes outermost."""
  sizes = {len(g) for g in granules}
  shapes = hybrid_shapes(shape, sizes.pop()) if len(sizes) == 1 else None
  if shapes is None:
    raise PlanMismatchError(
        f"the mesh {tuple(shape)} cannot be laid out over {len(granules)} nodes / slices of "
        f"{[len(g) for g in granules]} devices: each node must hold the same number of the "
        "mesh's devices and the inner axes must tile it. Use whole nodes of equal size, or plan "
        f"again for a device count that fits. Got node sizes {[len(g) for g in granules]}.")
  ici, dcn = shapes
  from jax.experimental import mesh_utils
  flat = [d for g in granules for d in g]
  try:
    by_slice = len({getattr(d, "slice_index", None) for d in flat}) > 1
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, flat, process_is_granule=not by_slice)
  except (ValueError, NotImplementedError, AssertionError):
    # Same layout by hand: each granule's devices in order, as a block of the ICI shape.
    blocks = np.empty(dcn, dtype=object)
    for i, idx in enumerate(np.ndindex(*dcn)):
      blocks[idx] = np.asarray(granules[i], dtype=object).reshape(ici)
    return np.block(blocks.tolist())


def from_process_local(tree, shardings):
  """A global array per leaf from this process's rows (`jax.make_array_from_process_local_data`)."""
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
                      tree, shardings)


def from_host_copy(tree, shardings):
  """A global array per leaf from a full host copy that every process holds (same values)."""
  def put(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def named(mesh: Mesh, spec_tree):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree,
                      is_leaf=lambda x: isinstance(x, P))


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
      optimizer, lambda _, spec: spec, abstract_state, param_specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P))


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
  activations or splits the logits matmul instead of gathering weights (measured on GPT-2:
  8.9 GiB sent per step against 0.8 GiB). Constraining the parameters to their gathered layout
  and the batch to its split at the top of the loss makes the compiled step the planned one.
  """
  is_spec = lambda x: isinstance(x, P)
  use = named(mesh, jax.tree.map(_compute_spec, param_specs, is_leaf=is_spec))
  split = named(mesh, batch_specs)

  def pinned(params, batch):
    params = jax.lax.with_sharding_constraint(params, use)
    batch = jax.lax.with_sharding_constraint(batch, split)
    return loss_fn(params, batch)

  return pinned


def sharded_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh,
                       param_specs, opt_specs, batch_specs, *, remat: str = "none",
                       microbatches: int = 1):
  """The jitted step with in/out shardings; params and opt state are donated."""
  p_sh, o_sh, b_sh = named(mesh, param_specs), named(mesh, opt_specs), named(mesh, batch_specs)
  step = make_train_step(_pinned(loss_fn, mesh, param_specs, batch_specs), optimizer,
                         remat=remat, microbatches=microbatches)
  return jax.jit(step,
                 in_shardings=(p_sh, o_sh, b_sh),
                 out_shardings=(p_sh, o_sh, NamedSharding(mesh, P())),
                 donate_argnums=(0, 1))
