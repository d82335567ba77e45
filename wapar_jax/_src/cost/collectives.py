"""Collectives over mesh axes: ring alpha-beta formulas, flat and two-level (across nodes)."""

from __future__ import annotations

from collections.abc import Iterable

# XLA combines independent collectives (weight gradients, FSDP gathers) up to this many bytes
# (XLA GPU's all-reduce combine threshold); one combined collective pays latency once.
COMBINE_BYTES = 30 * 2**20


def combined_launches(sizes: Iterable[float], threshold: float = COMBINE_BYTES) -> int:
  """Collectives left after XLA's combiner merges independent ones of these sizes, in program
  order: each joins the open group while the group stays within `threshold`; one larger than
  the threshold is never combined, and never split either (it is one launch of its own)."""
  launches, open_bytes = 0, 0.0
  for size in sizes:
    if size <= 0:
      continue
    if size > threshold:
      launches += 1
    elif open_bytes and open_bytes + size <= threshold:
      open_bytes += size
    else:
      launches += 1
      open_bytes = size
  return launches


# Collectives over one mesh axis of n devices, ring algorithms (as NCCL and XLA's CPU/TPU runtime
# use for large messages). `nbytes` is the per-device size of the full (unsplit) buffer.


def collective_traffic(kind: str, nbytes, n: int):
  """Bytes each device sends."""
  if n <= 1:
    return 0.0 * nbytes
  frac = (n - 1) / n
  return {
    "all-reduce": 2 * frac,
    "all-gather": frac,
    "reduce-scatter": frac,
    "all-to-all": frac,
    "permute": 1.0,
  }[kind] * nbytes


def collective_steps(kind: str, n: int) -> int:
  """Latency terms (alpha) of the ring algorithm."""
  if n <= 1:
    return 0
  return {
    "all-reduce": 2 * (n - 1),
    "all-gather": n - 1,
    "reduce-scatter": n - 1,
    "all-to-all": n - 1,
    "permute": 1,
  }[kind]


def collective_time(kind: str, nbytes, n: int, bandwidth: float, latency: float):
  """alpha-beta time of one collective: steps * latency + traffic / bandwidth."""
  return collective_steps(kind, n) * latency + collective_traffic(kind, nbytes, n) / bandwidth


# Two-level collectives over an axis that spans n_outer nodes of n_inner devices each, as NCCL
# and XLA run them across nodes: reduce-scatter inside each node, then n_inner independent rings
# across nodes, each on 1/n_inner of the buffer and each on its own device's NIC, then
# all-gather inside the node. Only the middle phase touches the slow link, and it carries
# 1/n_inner of the bytes a flat ring would push through it. With n_outer == 1 (or n_inner == 1)
# these are exactly the flat ring formulas above on the one link used.
_HIERARCHICAL_PHASES = {  # kind -> (inner kinds, kind across nodes)
  "all-reduce": (("reduce-scatter", "all-gather"), "all-reduce"),
  "reduce-scatter": (("reduce-scatter",), "reduce-scatter"),
  "all-gather": (("all-gather",), "all-gather"),
}


def hierarchical_collective_traffic(kind: str, nbytes, n_inner: int, n_outer: int):
  """(bytes each device sends inside its node, bytes it sends across nodes).

  `nbytes` is the per-device size of the full (unsplit) buffer, as in `collective_traffic`.
  Kinds without a two-level algorithm (all-to-all, permute) run as one flat ring whose every
  step may cross nodes, so all their traffic is counted across nodes.
  """
  if kind not in _HIERARCHICAL_PHASES:
    if n_outer <= 1:
      return collective_traffic(kind, nbytes, n_inner), 0.0 * nbytes
    return 0.0 * nbytes, collective_traffic(kind, nbytes, n_inner * n_outer)
  inner_kinds, outer_kind = _HIERARCHICAL_PHASES[kind]
  inner = sum(collective_traffic(k, nbytes, n_inner) for k in inner_kinds)
  return inner, collective_traffic(outer_kind, nbytes / max(n_inner, 1), n_outer)


def hierarchical_collective_steps(kind: str, n_inner: int, n_outer: int) -> tuple[int, int]:
  """(latency terms on the link inside a node, latency terms on the link across nodes)."""
  if kind not in _HIERARCHICAL_PHASES:
    if n_outer <= 1:
      return collective_steps(kind, n_inner), 0
    return 0, collective_steps(kind, n_inner * n_outer)
  inner_kinds, outer_kind = _HIERARCHICAL_PHASES[kind]
  return (
    sum(collective_steps(k, n_inner) for k in inner_kinds),
    collective_steps(outer_kind, n_outer),
  )


def hierarchical_collective_time(
  kind: str,
  nbytes,
  n_inner: int,
  n_outer: int,
  inner_bandwidth: float,
  inner_latency: float,
  outer_bandwidth: float,
  outer_latency: float,
):
  """alpha-beta time of one two-level collective over n_outer nodes x n_inner devices.

  Args:
    kind: "all-reduce", "reduce-scatter", "all-gather" (two-level), or "all-to-all" /
      "permute" (flat ring, priced on the link across nodes once it spans several).
    nbytes: per-device size of the full (unsplit) buffer.
    n_inner: devices of the axis inside one node; n_outer: nodes the axis spans.
    inner_bandwidth, inner_latency: the link inside a node (NVLink / ICI), bytes/s and s/step.
    outer_bandwidth, outer_latency: the link across nodes (InfiniBand / DCN), per device.

  Returns:
    Seconds. Equals `collective_time` on the inner link when n_outer == 1 and on the outer link
    when n_inner == 1.

  Examples:
    >>> # 16 devices as 2 nodes x 8: only 2 * (1/2) * (1/8) of the buffer crosses nodes.
    >>> hierarchical_collective_traffic("all-reduce", 1.0, 8, 2)
    (1.75, 0.125)
  """
  inner_steps, outer_steps = hierarchical_collective_steps(kind, n_inner, n_outer)
  inner_bytes, outer_bytes = hierarchical_collective_traffic(kind, nbytes, n_inner, n_outer)
  return (
    inner_steps * inner_latency
    + outer_steps * outer_latency
    + inner_bytes / inner_bandwidth
    + outer_bytes / outer_bandwidth
  )
