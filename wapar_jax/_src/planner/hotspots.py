"""The chosen plan's costliest equations by source line, and its memory by term."""

from __future__ import annotations

import numpy as np

from wapar_jax._src.cost import roofline
from wapar_jax._src.plan_details import Hotspot
from wapar_jax._src.search.aggregates import data_divisors, model_split

# Equations kept on a plan, costliest first (after merging repeats of one source line).
TOP_HOTSPOTS = 20


def op_divisors(space, c) -> np.ndarray:
  """How many ways the chosen candidate splits each equation's work (as `pricing.price` does)."""
  on_model = model_split(space, c.model_groups, c.sequence_parallel)[3]
  data_div = np.array(data_divisors(c.data, c.storage, c.fsdp), dtype=float)
  return data_div[space.op_data_cat] * np.where(on_model, c.model, 1)


def hotspots(space, c, profile) -> tuple[tuple[Hotspot, ...], float, float]:
  traced = space.traced
  flop_seconds, memory_seconds = roofline.op_roofline(traced, space.costs, profile, space.traffic)
  seconds = np.maximum(flop_seconds, memory_seconds)
  div = op_divisors(space, c)
  per_device = seconds / div
  compute_bound = float(per_device[flop_seconds >= seconds].sum())
  # Ops of one source line and cost key (primitive, params, operand types) share a hot spot:
  # summed with numpy, then formatted once per kind, not once per op (270,000 ops of 10,000
  # tiny parameters: 5.7 s -> well under a second).
  kinds: dict[tuple[str, str], int] = {}
  costly = np.flatnonzero(per_device > 0)
  kind = np.array(
    [kinds.setdefault((traced.ops[i].source, traced.ops[i].cost_key), len(kinds)) for i in costly],
    dtype=np.int64,
  )
  first = costly[np.unique(kind, return_index=True)[1]]  # kinds count up from 0 as they appear
  sums = [
    np.bincount(kind, weights=w, minlength=len(kinds))
    for w in (
      np.ones(len(costly)),
      space.costs.flops[costly] / div[costly],
      per_device[costly],
      flop_seconds[costly] / div[costly],
    )
  ]
  merged: dict[tuple, list] = {}
  for k, i in enumerate(first):
    op = traced.ops[i]
    entry = merged.setdefault((op.primitive, op.source, _shapes(op)), [0, 0.0, 0.0, 0.0])
    for j, total in enumerate(sums):
      entry[j] += total[k]
  top = sorted(merged.items(), key=lambda kv: -kv[1][2])[:TOP_HOTSPOTS]
  hot = tuple(
    Hotspot(
      prim, src, shapes, int(n), float(f), float(s), "compute" if fs >= 0.999 * s else "memory"
    )
    for (prim, src, shapes), (n, f, s, fs) in top
  )
  return hot, compute_bound, float(per_device.sum()) - compute_bound


def _shapes(op) -> str:
  def one(v):
    aval = v.aval
    dtype = getattr(aval, "dtype", None)
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int32": "i32"}.get(
      str(dtype), str(dtype)
    )
    return f"{short}[{','.join(map(str, getattr(aval, 'shape', ())))}]"

  return (
    f"{', '.join(one(v) for v in op.eqn.invars)} -> {', '.join(one(v) for v in op.eqn.outvars)}"
  )


def memory_terms(space, c) -> tuple[tuple[str, float], ...]:
  """Per-device peak memory by term, from the terms the search priced."""
  batch = space.batch_bytes / c.data
  activations = max(c.activation_memory - batch, 0.0)
  return (
    ("parameters", c.param_memory),
    ("optimizer state", c.opt_state_memory),
    ("batch", batch),
    ("activations", activations),
  )
