"""Replica groups of a collective: parsed from any form XLA prints, mapped to mesh axes and nodes.

Groups are lists of logical device (partition) ids; `group_axes` names the plan's mesh axes a
group spans, and `node_size` / `group_span` place it on nodes as the planner prices them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from wapar_jax._src.verify.hlo import balanced_end, unquote

_IOTA = re.compile(r"\[([\d,\s]*)\]\s*<=\s*\[([\d,\s]*)\](?:\s*T\(([\d,\s]*)\))?")


def _ints(text: str) -> list[int]:
  return [int(x) for x in re.findall(r"-?\d+", text)]


def _iota(dims: Sequence[int], reshape: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  if perm:
    ids = ids.transpose(perm)
  return ids.reshape(dims)


def replica_groups_text(line: str, attribute: str = "replica_groups") -> str | None:
  """The printed value of `attribute=` in an HLO instruction line, in any of XLA's forms."""
  m = re.search(rf"\b{attribute}=", line)
  if not m:
    return None
  i = m.end()
  if line.startswith("{", i):
    return line[i : balanced_end(line, i, "{", "}")]
  if line.startswith("[", i):
    it = _IOTA.match(line, i)
    if not it:
      raise ValueError(f"unrecognised replica groups {line[i : i + 80]!r}")
    return it.group(0)
  mesh = re.match(r"(maximal_)?mesh\[", line[i:])
  if mesh:
    j = balanced_end(line, i + mesh.end() - 1, "[", "]")
    ids = re.match(r",\s*device_ids=\(", line[j:])
    if ids:
      j = balanced_end(line, j + ids.end() - 1, "(", ")")
    axes = re.match(r"\s*\{", line[j:])
    if axes:
      j = balanced_end(line, j + axes.end() - 1, "{", "}")
    return line[i:j]
  raise ValueError(f"unrecognised replica groups {line[i : i + 80]!r}")


def parse_replica_groups(text: str, num_devices: int) -> list[list[int]]:
  """Replica groups from any printed form, as lists of logical device (partition) ids.

  Forms: explicit `{{0,1},{2,3}}` (`{}` is one group of all `num_devices`), iota
  `[2,4]<=[8]` and `[4,2]<=[2,4]T(1,0)`, and the mesh form
  `mesh['a'=4,'b'=2] {'a'}` (optionally `, device_ids=(...)` after the axes, holding an id
  list, an iota `[8]<=[2,4]T(1,0)` or jax 0.10.2's short iota `[2,4]T(1,0)`; sub-axes as
  `'a':(pre)size`, and `maximal_mesh[device_id=3] {}`).

  Raises:
    ValueError: the text is none of these.
  """
  text = text.strip()
  if text.startswith("{"):
    inner = text[1:-1].strip()
    if not inner:
      return [list(range(num_devices))]
    groups = [_ints(g) for g in re.findall(r"\{([^{}]*)\}", inner)]
    if not groups:
      raise ValueError(f"unrecognised replica groups {text[:80]!r}")
    return groups
  it = _IOTA.fullmatch(text)
  if it:
    dims, reshape = _ints(it.group(1)), _ints(it.group(2))
    perm = _ints(it.group(3)) if it.group(3) else None
    ids = _iota(dims, reshape, perm)
    return ids.reshape(dims[0] if dims else 1, -1).tolist()
  m = re.match(r"maximal_mesh\[device_id=(\d+)\]", text)
  if m:
    return [[int(m.group(1))]]
  if text.startswith("mesh["):
    return _mesh_groups(text)
  raise ValueError(f"unrecognised replica groups {text[:80]!r}")


def _mesh_groups(text: str) -> list[list[int]]:
  end = balanced_end(text, 4, "[", "]")
  axes = []
  for part in re.findall(r"([^,=]+)=(\d+)", text[5 : end - 1]):
    axes.append((unquote(part[0]), int(part[1])))
  sizes = [s for _, s in axes]
  rest = text[end:]
  ids = np.arange(math.prod(sizes))
  dev = re.match(r",\s*device_ids=\(", rest)
  if dev:
    close = balanced_end(rest, dev.end() - 1, "(", ")")
    body = rest[dev.end() : close - 1]
    it = _IOTA.search(body)
    short = re.fullmatch(r"\s*\[([\d,\s]*)\]\s*(?:T\(([\d,\s]*)\))?\s*", body)
    if it:
      perm = _ints(it.group(3)) if it.group(3) else None
      ids = _iota(_ints(it.group(1)), _ints(it.group(2)), perm).reshape(-1)
    elif short:  # jax 0.10.2 prints an iota as "[2,4]T(1,0)": arange reshaped, transposed
      dims = _ints(short.group(1))
      perm = _ints(short.group(2)) if short.group(2) else None
      ids = _iota([math.prod(dims)], dims, perm)
    else:
      values = _ints(body)
      if len(values) == len(sizes) + math.prod(sizes) and values[: len(sizes)] == sizes:
        values = values[len(sizes) :]  # "[4,2]0,2,4,..." prints its dims first
      ids = np.asarray(values[-math.prod(sizes) :])
    rest = rest[close:]
  brace = rest.find("{")
  group_axes = []
  if brace >= 0:
    for token in rest[brace + 1 : balanced_end(rest, brace, "{", "}") - 1].split(","):
      if not token.strip():
        continue
      sub = re.match(r"\s*(.+?)\s*:\s*\((\d+)\)\s*(\d+)\s*$", token)
      if sub:
        group_axes.append((unquote(sub.group(1)), int(sub.group(2)), int(sub.group(3))))
      else:
        group_axes.append((unquote(token), None, None))
  names = [n for n, _ in axes]
  # Split each mesh axis at every sub-axis boundary, major factor first, so each grouped
  # (sub-)axis is a run of whole dims of the reshaped device array.
  cuts: dict[int, set[int]] = {k: {1, s} for k, s in enumerate(sizes)}
  for name, pre, size in group_axes:
    k = names.index(name)
    if pre is not None:
      cuts[k].update({pre, pre * size})
  factor_dims, owner = [], {}
  for k, _s in enumerate(sizes):
    points = sorted(cuts[k])
    for a, b in zip(points, points[1:]):
      owner[(k, a)] = len(factor_dims)
      factor_dims.append(b // a)
  grouped = []
  for name, pre, size in group_axes:
    k = names.index(name)
    lo, hi = (1, sizes[k]) if pre is None else (pre, pre * size)
    grouped += [owner[(k, a)] for a in sorted(cuts[k]) if lo <= a < hi]
  arr = ids.reshape(factor_dims) if factor_dims else ids.reshape(())
  kept = [d for d in range(len(factor_dims)) if d not in grouped]
  arr = np.transpose(arr, kept + grouped)
  group_size = math.prod(factor_dims[d] for d in grouped)
  return arr.reshape(-1, group_size).tolist()


def group_axes(groups: Sequence[Sequence[int]], mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
  """The plan's mesh axes along which members of a group differ (row-major logical ids)."""
  names = list(mesh_shape)
  shape = [mesh_shape[n] for n in names]
  total = math.prod(shape)
  varying = set()
  for g in groups:
    ids = [i for i in g if 0 <= i < total]
    if len(ids) < 2:
      continue
    coords = np.array(np.unravel_index(ids, shape))
    varying.update(k for k in range(len(names)) if len(set(coords[k])) > 1)
  return tuple(names[k] for k in sorted(varying))


def node_size(num_devices: int, devices_per_node: int) -> int:
  """Logical devices per node in the layout the planner prices (`search.axis_spans`).

  The job is spread evenly over the fewest nodes that hold it, in logical (row-major mesh)
  order, so the model axis fills a node first; a job that cannot be spread evenly fills whole
  nodes.
  """
  nodes = -(-num_devices // devices_per_node)
  return num_devices // nodes if num_devices % nodes == 0 else devices_per_node


def crosses_nodes(groups: Sequence[Sequence[int]], per_node: int) -> bool:
  """Whether a group holds devices of two nodes, `per_node` consecutive ids per node."""
  return group_span(groups, per_node)[1] > 1


def group_span(groups: Sequence[Sequence[int]], per_node: int) -> tuple[int, int]:
  """(devices of a group inside one node, nodes it spans), as `search.axis_spans` gives them.

  A group spread unevenly over nodes is (1, n): a flat ring on the slow link.
  """
  inner, outer = 1, 1
  for g in groups:
    counts: dict[int, int] = {}
    for i in g:
      counts[i // per_node] = counts.get(i // per_node, 0) + 1
    if len(set(counts.values())) > 1:
      return 1, max(len(x) for x in groups)
    if len(counts) > outer or (len(counts) == outer and len(g) // len(counts) > inner):
      inner, outer = len(g) // len(counts), len(counts)
  return inner, outer
