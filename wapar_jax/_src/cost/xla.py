"""Per-equation FLOPs / bytes / transcendentals from XLA's cost analysis.

Each unique equation (primitive, params, input types) is lowered on its own and costed by XLA;
results are cached in memory and on disk, keyed by content, so a model's repeated layers and a
second planning run cost nothing.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.extend as jex
import numpy as np

from wapar_jax._src.compat import analysis_dict
from wapar_jax._src.cost.cache import CostCache, is_cost
from wapar_jax._src.trace import ELEMENTWISE, TracedStep

_COST_FIELDS = ("flops", "bytes accessed", "transcendentals")
# Lowered-module cost analysis undercounts these: the compiler expands them into loops whose
# work the unexpanded op does not report (max-pool gradients: 8.5x more FLOPs once compiled).
_COSTED_COMPILED = {"select_and_scatter_add", "select_and_gather_add"}
# A matmul's 2MNK is under E**1.5 for its E = MK + KN + MN operand and result elements, a
# convolution exceeds that by about its window's side and expansions such as igamma reach 2,500
# bytes per element: a cached figure over 1e4 * (E + 1)**1.5 is a corrupt entry, not a cost.
_CEILING_FACTOR = 1e4


@dataclasses.dataclass(frozen=True)
class StepCosts:
  """Unsharded cost of every op of a TracedStep, already multiplied by its multiplicity.

  Non-chosen branches of a `cond` have zero cost. `out_bytes[i]` is the bytes of op i's outputs
  (one execution), used to price the collectives its sharding causes.
  """

  flops: np.ndarray
  bytes_accessed: np.ndarray
  transcendentals: np.ndarray
  multiplicity: np.ndarray  # runs per step; 0 for a cond branch that is not costed
  unique_ops: int
  lowered_ops: int

  @property
  def total_flops(self) -> float:
    return float(self.flops.sum())


def _fallback_cost(eqn) -> tuple[float, float, float]:
  """Cost of an op XLA could not lower alone: one FLOP per output element, all bytes moved."""
  out_elems = sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
  nbytes = 0
  for v in list(eqn.invars) + list(eqn.outvars):
    aval = v.aval
    if hasattr(aval, "shape") and hasattr(aval, "dtype"):
      try:
        nbytes += math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
      except TypeError:
        nbytes += math.prod(aval.shape) * 8
  return float(out_elems), float(nbytes), 0.0


def _is_identity(eqn) -> bool:
  """Ops XLA's algebraic simplifier deletes from the whole program (x**1, x*1, x+0, x/1)."""
  name = eqn.primitive.name
  if name == "integer_pow":
    return eqn.params["y"] == 1
  if name in ("mul", "div", "add", "sub") and len(eqn.invars) == 2:
    lit = (
      eqn.invars[1]
      if name in ("div", "sub")
      else next((v for v in eqn.invars if isinstance(v, jex.core.Literal)), None)
    )
    if isinstance(lit, jex.core.Literal) and np.ndim(lit.val) == 0:
      neutral = 1 if name in ("mul", "div") else 0
      return bool(np.asarray(lit.val) == neutral)
  return False


def _xla_cost(eqn) -> tuple[float, float, float]:
  avals = [v.aval for v in eqn.invars if not isinstance(v, jex.core.Literal)]
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]

  def single(*xs):
    it = iter(xs)
    full = [v.val if isinstance(v, jex.core.Literal) else next(it) for v in eqn.invars]
    return eqn.primitive.bind(*full, **eqn.params)

  try:
    lowered = jax.jit(single).lower(*args)
    if eqn.primitive.name in _COSTED_COMPILED:
      lowered = lowered.compile()
    analysis = analysis_dict(lowered.cost_analysis())
  except Exception:  # any primitive XLA refuses on its own is costed by the fallback
    return _fallback_cost(eqn)
  cost = tuple(float(analysis.get(k, 0.0)) for k in _COST_FIELDS) if analysis else None
  return cost if is_cost(cost) else _fallback_cost(eqn)


def _cost_ceiling(eqn, scale: int) -> float:
  """The most `eqn`'s cached cost may be, per `scale` elements (see the constant)."""
  elements = sum(math.prod(getattr(v.aval, "shape", ())) for v in (*eqn.invars, *eqn.outvars))
  return _CEILING_FACTOR * (elements / scale + 1) ** 1.5


def _elementwise_key(op) -> tuple[str, int] | None:
  """(key, element count) of an elementwise op whose operands all have the output's shape.

  XLA's cost of such an op is linear in its element count, so one lowering per primitive,
  params and dtypes serves every shape (and every literal value, which only sets a constant).
  """
  eqn = op.eqn
  if eqn.primitive.name not in ELEMENTWISE or len(eqn.outvars) != 1:
    return None
  shape = tuple(eqn.outvars[0].aval.shape)
  parts = []
  for v in eqn.invars:
    if isinstance(v, jex.core.Literal):
      parts.append(f"lit:{v.aval.dtype}")
    elif tuple(v.aval.shape) == shape:
      parts.append(str(v.aval.dtype))
    else:
      return None
  params = ", ".join(f"{k}={v!r}" for k, v in sorted(eqn.params.items()))
  return f"per-element {eqn.primitive.name}[{params}]({', '.join(parts)})", max(math.prod(shape), 1)


def step_costs(traced: TracedStep, cache: CostCache | None = None, progress=None) -> StepCosts:
  """XLA's cost of each op of `traced`, deduplicated by content and cached."""
  cache = cache if cache is not None else CostCache()
  unique: dict[str, int] = {}
  for op in traced.ops:
    unique.setdefault(op.cost_key, op.index)
  values: dict[str, tuple[float, float, float]] = {}
  lowered = 0
  keys = list(unique)
  iterator = progress(keys) if progress is not None else keys
  for key in iterator:
    op = traced.ops[unique[key]]
    if _is_identity(op.eqn):
      values[key] = (0.0, 0.0, 0.0)
      continue
    scalable = _elementwise_key(op)
    cache_key, scale = scalable if scalable else (key, 1)
    hit = cache.get(cache_key, ceiling=_cost_ceiling(op.eqn, scale))
    if hit is None:
      hit = [x / scale for x in _xla_cost(op.eqn)]
      cache.put(cache_key, hit)
      lowered += 1
    values[key] = tuple(x * scale for x in hit)
  cache.save()

  n = len(traced.ops)
  per = np.zeros((n, 3))
  mult = np.empty(n)
  for op in traced.ops:
    per[op.index] = values[op.cost_key]
    mult[op.index] = op.multiplicity
  per *= mult[:, None]
  kept = _costliest_branches(traced, per)
  for op in traced.ops:
    if op.branch is not None and op.branch not in kept:
      mult[op.index] = 0.0
      per[op.index] = 0.0
  return StepCosts(
    flops=per[:, 0],
    bytes_accessed=per[:, 1],
    transcendentals=per[:, 2],
    multiplicity=mult,
    unique_ops=len(unique),
    lowered_ops=lowered,
  )


def _costliest_branches(traced: TracedStep, per: np.ndarray) -> set[tuple[int, int]]:
  """A `cond` runs one branch: the one with most FLOPs (then bytes) is the one costed."""
  totals: dict[tuple[int, int], np.ndarray] = {}
  for op in traced.ops:
    if op.branch is not None:
      totals.setdefault(op.branch, np.zeros(3))
      totals[op.branch] += per[op.index]
  best: dict[int, tuple[int, int]] = {}
  for (cond_id, b), t in totals.items():
    if cond_id not in best or tuple(t[:2]) > tuple(totals[best[cond_id]][:2]):
      best[cond_id] = (cond_id, b)
  return set(best.values())
