"""The collectives of a compiled module: found in its HLO text, sized, placed and priced.

Each collective is sized per device, mapped to the plan's mesh axes through its replica groups,
priced with the planner's alpha-beta formulas (`cost.collectives`) on a device profile, and
checked for all-reduces read only in slices (which GPU / TPU XLA would emit as reduce-scatter).
`target_comm_time` prices them as GPU / TPU XLA would combine them.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping, Sequence

from wapar_jax._src.cost.collectives import (
  combined_launches,
  hierarchical_collective_time,
  hierarchical_collective_traffic,
)
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.verify.hlo import (
  COLLECTIVE_OPCODES,
  ELEMENTWISE_OPCODES,
  HloModule,
  Instr,
  buffer_bytes,
  element_count,
  multiplicities,
  operand_names,
  parse_hlo,
  type_size,
)
from wapar_jax._src.verify.replica_groups import (
  group_axes,
  group_span,
  node_size,
  parse_replica_groups,
  replica_groups_text,
)
from wapar_jax._src.verify.results import Collective

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# A kind as `cost.collectives`' formulas name it, where that differs.
_COST_KIND = {"collective-permute": "permute"}


def _only_sliced(
  module: HloModule,
  comp: str,
  value: str,
  elements: float,
  n: int,
  users: Mapping[str, Mapping[str, list[Instr]]],
  depth: int = 0,
) -> bool:
  """Whether every use of `value` in `comp` is a dynamic slice of 1/n of its elements.

  Looks through bitcasts, copies and elementwise ops of the same size, and into fusions (at
  the fused parameter `value` feeds).
  """
  uses = users[comp].get(value, [])
  if not uses or depth > 8:
    return False
  for use in uses:
    if use.opcode == "dynamic-slice":
      if operand_names(use)[0] != value or element_count(use.type) * n != elements:
        return False
    elif use.opcode in ("bitcast", "copy") or (
      use.opcode in ELEMENTWISE_OPCODES and element_count(use.type) == elements
    ):
      if not _only_sliced(module, comp, use.name, elements, n, users, depth + 1):
        return False
    elif use.opcode == "fusion":
      callee = re.search(r"\bcalls=%?([\w.\-]+)", use.rest)
      if not callee or callee.group(1) not in module.computations:
        return False
      fused = callee.group(1)
      params = {
        int(re.match(r"\s*(\d+)", i.rest).group(1)): i.name
        for i in module.computations[fused]
        if i.opcode == "parameter"
      }
      positions = [k for k, name in enumerate(operand_names(use)) if name == value]
      if not positions or any(
        k not in params or not _only_sliced(module, fused, params[k], elements, n, users, depth + 1)
        for k in positions
      ):
        return False
    else:
      return False
  return True


def _users(module: HloModule) -> dict[str, dict[str, list[Instr]]]:
  users: dict[str, dict[str, list[Instr]]] = {}
  for comp, instrs in module.computations.items():
    table: dict[str, list[Instr]] = {}
    for instr in instrs:
      if instr.opcode in ("parameter", "constant"):
        continue
      for name in set(operand_names(instr)):
        table.setdefault(name, []).append(instr)
    users[comp] = table
  return users


def _scattered_bytes(module: HloModule, comp: str, instr: Instr, n: int, users) -> float:
  """Bytes of an all-reduce's result used only as each device's 1/n slice."""
  if n <= 1:
    return 0.0
  if not instr.type.startswith("("):
    nbytes, elements = type_size(instr.type)
    return nbytes if _only_sliced(module, comp, instr.name, elements, n, users) else 0.0
  total = 0.0
  for use in users[comp].get(instr.name, []):
    if use.opcode != "get-tuple-element":
      continue
    nbytes, elements = type_size(use.type)
    if _only_sliced(module, comp, use.name, elements, n, users):
      total += nbytes
  return total


def collectives(
  text: str,
  mesh_shape: Mapping[str, int],
  profile: DeviceProfile,
  module: HloModule | None = None,
  mult: Mapping[str, float] | None = None,
  notes: list[str] | None = None,
) -> tuple[Collective, ...]:
  """Every collective of a compiled module's text, sized, placed on mesh axes and priced.

  A replica-group form this parser does not know is priced as one group of all devices and
  named in `notes` (when given) rather than failing the whole verification.
  """
  module = module or parse_hlo(text)
  if mult is None:
    mult = multiplicities(module)[0]
  num = module.num_partitions or math.prod(mesh_shape.values())
  per_node = node_size(num, profile.devices_per_node)
  inner_link, outer_link = profile.intra_node, profile.inter_node
  done_type: dict[str, str] = {}
  for instrs in module.computations.values():
    for instr in instrs:
      if instr.opcode.endswith("-done"):
        src = re.match(r"\s*%?([\w.\-]+)", instr.rest)
        if src:
          done_type[src.group(1)] = instr.type
  found = []
  users = _users(module)
  for comp in module.order:
    count = mult.get(comp, 0.0)
    depth: dict[str, int] = {}
    for instr in module.computations[comp]:
      opcode = instr.opcode
      base = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
      kind = COLLECTIVE_OPCODES.get(base)
      before = max((depth.get(o, 0) for o in operand_names(instr)), default=0)
      depth[instr.name] = before + (1 if kind is not None else 0)
      if opcode.endswith("-done") or kind is None:
        continue
      type_text = done_type.get(instr.name, instr.type) if opcode.endswith("-start") else instr.type
      try:
        if kind == "collective-permute":
          pairs_text = replica_groups_text(instr.rest, "source_target_pairs") or "{}"
          groups = (
            [g for g in parse_replica_groups(pairs_text, num) if len(set(g)) > 1]
            if pairs_text != "{}"
            else []
          )
          n = 2 if groups else 1
        else:
          groups = parse_replica_groups(replica_groups_text(instr.rest) or "{}", num)
          n = len(groups[0]) if groups else 1
      except ValueError as e:
        if notes is not None:
          notes.append(f"{instr.name}: {e}; priced as one group of all {num} devices")
        groups, n = [list(range(num))], num
      result_bytes, result_elements = type_size(type_text)
      scale = n if kind == "reduce-scatter" else 1
      nbytes = result_bytes * scale
      reduces = kind in ("all-reduce", "reduce-scatter") and n > 1
      n_inner, n_outer = group_span(groups, per_node) if n > 1 else (n, 1)
      cost_kind = _COST_KIND.get(kind, kind)
      sent = sum(hierarchical_collective_traffic(cost_kind, nbytes, n_inner, n_outer))
      seconds = hierarchical_collective_time(
        cost_kind,
        nbytes,
        n_inner,
        n_outer,
        inner_link.bandwidth,
        inner_link.latency,
        outer_link.bandwidth,
        outer_link.latency,
      )
      op_name = re.search(r'op_name="([^"]*)"', instr.rest)
      found.append(
        Collective(
          kind=kind,
          name=instr.name,
          nbytes=nbytes,
          group_size=n,
          num_groups=len(groups),
          axes=group_axes(groups, mesh_shape),
          crosses_nodes=n_outer > 1,
          count=count,
          sent_bytes=float(sent) * count,
          time=float(seconds) * count,
          shape=_short(type_text),
          op_name=op_name.group(1) if op_name else "",
          reduction_flops=result_elements * scale * count if reduces else 0.0,
          scattered_bytes=_scattered_bytes(module, comp, instr, n, users)
          if kind == "all-reduce"
          else 0.0,
          nodes=n_outer,
          computation=comp,
          depth=depth[instr.name],
          buffers=tuple(b * scale for b in buffer_bytes(type_text)),
        )
      )
  return tuple(found)


def target_comm_time(found: Sequence[Collective], profile: DeviceProfile) -> float:
  """Seconds per step of the compiled collectives as GPU / TPU XLA would run them.

  XLA:CPU's pipeline differs from the accelerators' in two ways that change time, not bytes:
  it merges every gradient all-reduce of a step into one instruction but leaves all-gathers
  apart, and it all-reduces where only a slice is read. GPU / TPU XLA combines independent
  collectives of one kind and replica groups up to a size threshold
  (`cost.collectives.COMBINE_BYTES`), and emits reduce-scatter for an all-reduce read only in
  slices. So: collectives of one computation at the same dependency depth, kind and groups
  are pooled and sent in the launches XLA's combiner leaves (`combined_launches`: merged up to
  COMBINE_BYTES, a larger one alone and whole), each paying the ring latency once; sliced
  all-reduce bytes are priced as reduce-scatter.
  """
  pools: dict[tuple, list[float]] = collections.defaultdict(list)
  for c in found:
    if c.group_size <= 1:
      continue
    key = (c.computation, c.depth, c.group_size, c.num_groups, c.nodes, c.axes, c.count)
    buffers = c.buffers or (c.nbytes,)  # each buffer of a merged tuple collective on its own
    if c.kind == "all-reduce" and c.scattered_bytes:
      sliced = c.scattered_bytes / c.nbytes
      pools[("reduce-scatter",) + key] += [b * sliced for b in buffers]
      if sliced < 1:
        pools[("all-reduce",) + key] += [b * (1 - sliced) for b in buffers]
    else:
      pools[(c.kind,) + key] += buffers
  inner, outer = profile.intra_node, profile.inter_node
  total = 0.0
  for (kind, _, _, n, _, nodes, _, count), sizes in pools.items():
    nbytes = sum(sizes)
    launches = max(1, combined_launches(sizes))
    n_inner = max(n // nodes, 1)
    one = hierarchical_collective_time(
      _COST_KIND.get(kind, kind),
      nbytes / launches,
      n_inner,
      nodes,
      inner.bandwidth,
      inner.latency,
      outer.bandwidth,
      outer.latency,
    )
    total += count * launches * float(one)
  return total


def _short(type_text: str, limit: int = 120) -> str:
  text = re.sub(r"/\*.*?\*/", "", type_text)
  text = re.sub(r"\{[^{}]*\}", "", text)
  return text if len(text) <= limit else text[: limit - 3] + "..."
