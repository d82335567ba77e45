"""The plan's mesh over real devices: Auto axes, nodes / slices laid out as the search priced."""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from wapar_jax.errors import InvalidArgumentError, NotEnoughDevicesError, PlanMismatchError


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh of Auto axes (Explicit axes make sharded gathers and matmuls raise on jax 0.10).

  Devices of several nodes (processes under `jax.distributed`, or TPU slices) are laid out with
  `mesh_utils.create_hybrid_device_mesh`: the innermost (model) axis inside a node, the outer
  (data) axis across nodes, as the search priced it. One process: as before.
  """
  names = tuple(mesh_shape)
  shape = tuple(mesh_shape[n] for n in names)
  needed = math.prod(shape)
  devices = jax.devices() if devices is None else distinct_devices(devices)
  if len(devices) < needed:
    raise NotEnoughDevicesError(
      f"the plan's mesh {dict(mesh_shape)} needs {needed} devices but {len(devices)} are "
      "available. Run on more devices (for CPU testing set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} before importing jax), or "
      f"plan again with devices={len(devices)}. Got {len(devices)} devices."
    )
  devices = devices[:needed]
  granules = _granules(devices)
  if len(granules) > 1:
    return Mesh(hybrid_grid(shape, granules), names, axis_types=(AxisType.Auto,) * len(names))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):  # topologies mesh_utils can't lay out
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def distinct_devices(devices: Iterable[Any]) -> list[Any]:
  """`devices` as a list of distinct jax devices; anything else is an InvalidArgumentError
  saying what to pass (a string is iterable too: "16" would read as two devices)."""
  if isinstance(devices, (str, bytes, Mapping)) or not isinstance(devices, Iterable):
    raise InvalidArgumentError(
      "devices must be a device count (a positive int) or a list of distinct jax devices, "
      f"e.g. jax.devices()[:4]. Got {type(devices).__name__} {devices!r}."
    )
  device_list = list(devices)
  if not device_list:
    raise InvalidArgumentError(
      "devices is empty: pass a device count (a positive int) or a non-empty list of jax "
      "devices, e.g. jax.devices()[:4]. Got []."
    )
  not_devices = [d for d in device_list if not isinstance(d, jax.Device)]
  if not_devices:
    raise InvalidArgumentError(
      f"devices must be jax devices (from jax.devices()), not {type(not_devices[0]).__name__}: "
      f"to plan for a count pass devices={len(device_list)}, to use given devices pass them, "
      f"e.g. [jax.devices()[i] for i in (0, 1, 2, 3)]. Got {device_list[:8]!r}."
    )
  repeated = [d for d, n in collections.Counter(device_list).items() if n > 1]
  if repeated:
    raise InvalidArgumentError(
      "devices lists the same device more than once, and a device holds one place of the "
      f"mesh: pass each device once, e.g. jax.devices()[:{len(set(device_list))}]. Got "
      f"{len(device_list)} devices, {len(set(device_list))} distinct; repeated: {repeated[:4]}."
    )
  return device_list


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


def hybrid_shapes(
  shape: Sequence[int], per_granule: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
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


def hybrid_grid(shape: tuple[int, ...], granules: list[list[Any]]) -> np.ndarray:
  """The device grid of a mesh spanning several granules: slow-network axes outermost."""
  sizes = {len(g) for g in granules}
  shapes = hybrid_shapes(shape, sizes.pop()) if len(sizes) == 1 else None
  if shapes is None:
    raise PlanMismatchError(
      f"the mesh {tuple(shape)} cannot be laid out over {len(granules)} nodes / slices of "
      f"{[len(g) for g in granules]} devices: each node must hold the same number of the "
      "mesh's devices and the inner axes must tile it. Use whole nodes of equal size, or plan "
      f"again for a device count that fits. Got node sizes {[len(g) for g in granules]}."
    )
  ici, dcn = shapes
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
