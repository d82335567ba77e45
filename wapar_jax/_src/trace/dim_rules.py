"""Per-primitive dimension rules: which dims of one equation must share a sharding, and which
force communication when split.

A registry in the spirit of jax's `mlir.register_lowering`: `RULES` maps a primitive's name to a
small function `rule(eqn, in_shapes, out_shapes) -> DimLinks`, and `dim_rules` looks the
primitive up, falling back to `elementwise_rule` (operands line up element by element; anything
else of the same shape is guessed at the same way and marked unknown). Adding a primitive is one
entry: a new name on an existing rule, or a decorated function:

  @register("my_primitive")
  def _my_primitive(eqn, in_shapes, out_shapes):
    return DimLinks(links=((("i", 0, 0), ("o", 0, 0)),), gather_dims=((0, 1),))

A dim is named ("i" | "o", position, dim): dim `dim` of input or output `position`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

# Elementwise primitives: operands and result line up element by element.
ELEMENTWISE = frozenset(
  {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "max",
    "min",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "tanh",
    "logistic",
    "sqrt",
    "rsqrt",
    "cbrt",
    "pow",
    "integer_pow",
    "abs",
    "sign",
    "select_n",
    "clamp",
    "convert_element_type",
    "eq",
    "ne",
    "gt",
    "ge",
    "lt",
    "le",
    "and",
    "or",
    "not",
    "xor",
    "is_finite",
    "stop_gradient",
    "add_any",
    "erf",
    "erfc",
    "erf_inv",
    "square",
    "floor",
    "ceil",
    "one_minus_square",  # jax >= 0.11: the derivative of tanh
    "round",
    "rem",
    "sin",
    "cos",
    "tan",
    "atan2",
    "copy",
    "copy_p",
    "reduce_precision",
    "nextafter",
    "imag",
    "real",
  }
)
# Primitives the fallback rule knows: its dim-by-dim lining up is right for them. A primitive
# outside this set that reaches the fallback is reported as unknown.
ELEMENTWISE_LIKE = ELEMENTWISE | frozenset(
  {
    "expand_dims",
    "iota",
    "rng_bit_generator",
    "random_bits",
    "random_seed",
    "random_wrap",
    "random_unwrap",
    "random_fold_in",
    "random_split",
    "threefry2x32",
    "clz",
    "population_count",
    "shift_left",
    "shift_right_logical",
    "shift_right_arithmetic",
    "lgamma",
    "digamma",
    "igamma",
    "custom_lin",
  }
)

Dim = tuple[str, int, int]  # ("i" | "o", position, dim)
Shapes = Sequence[tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class DimLinks:
  """How one equation relates its dims.

  Attributes:
    links: pairs of dims that must share a sharding for the equation to run without
      communication; they are unioned into one dimension class.
    reduce_dims: (input position, dim) whose sharding makes the output a partial result.
    gather_dims: (input position, dim) whose sharding forces an all-gather of that input.
    known: False for a primitive only guessed at.
  """

  links: tuple[tuple[Dim, Dim], ...] = ()
  reduce_dims: tuple[tuple[int, int], ...] = ()
  gather_dims: tuple[tuple[int, int], ...] = ()
  known: bool = True


Rule = Callable[[Any, Shapes, Shapes], DimLinks]
# Primitive name -> its rule. Fill it with `register`.
RULES: dict[str, Rule] = {}


def register(*primitive_names: str) -> Callable[[Rule], Rule]:
  """Decorator: `rule(eqn, in_shapes, out_shapes) -> DimLinks` is the rule of these primitives."""

  def decorate(rule: Rule) -> Rule:
    for name in primitive_names:
      if name in RULES:
        raise ValueError(f"primitive {name!r} already has a dim rule: {RULES[name].__name__}")
      RULES[name] = rule
    return rule

  return decorate


def dim_rules(eqn, in_shapes: Shapes, out_shapes: Shapes) -> DimLinks:
  """The dim rule of `eqn`'s primitive applied to it; `elementwise_rule` if none is registered."""
  return RULES.get(eqn.primitive.name, elementwise_rule)(eqn, in_shapes, out_shapes)


def _result(links, reduce_dims=(), gather_dims=(), known=True) -> DimLinks:
  return DimLinks(tuple(links), tuple(reduce_dims), tuple(gather_dims), known)


def elementwise_rule(eqn, in_shapes: Shapes, out_shapes: Shapes) -> DimLinks:
  """Elementwise and anything unknown of the same shape: dims line up position by position."""
  links, gather_dims = [], []
  shapes = [("i", k, s) for k, s in enumerate(in_shapes)] + [
    ("o", k, s) for k, s in enumerate(out_shapes)
  ]
  full = [x for x in shapes if len(x[2]) > 0]
  known = eqn.primitive.name in ELEMENTWISE_LIKE
  if full:
    ref = max(full, key=lambda x: math.prod(x[2]))
    for other in full:
      if len(other[2]) == len(ref[2]) and all(a == b or a == 1 for a, b in zip(other[2], ref[2])):
        for d in range(len(ref[2])):  # size-1 dims broadcast implicitly, as jnp emits them
          if other[2][d] == ref[2][d]:
            links.append(((ref[0], ref[1], d), (other[0], other[1], d)))
      else:
        known = False
        gather_dims.extend((other[1], d) for d in range(len(other[2])) if other[0] == "i")
  return _result(links, (), gather_dims, known)


@register("dot_general")
def _dot_general(eqn, in_shapes, out_shapes):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  links, reduce_dims = [], []
  for a, b in zip(lc, rc):
    links.append((("i", 0, a), ("i", 1, b)))
    reduce_dims.append((0, a))
  for k, (a, b) in enumerate(zip(lb, rb)):
    links.append((("i", 0, a), ("i", 1, b)))
    links.append((("i", 0, a), ("o", 0, k)))
  out = len(lb)
  for operand, (contract, batch) in enumerate(((lc, lb), (rc, rb))):
    for d in range(len(in_shapes[operand])):
      if d not in contract and d not in batch:
        links.append((("i", operand, d), ("o", 0, out)))
        out += 1
  return _result(links, reduce_dims)


@register("conv_general_dilated")
def _conv_general_dilated(eqn, in_shapes, out_shapes):
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  links = [
    (("i", 0, lhs_spec[0]), ("o", 0, out_spec[0])),  # batch
    (("i", 1, rhs_spec[0]), ("o", 0, out_spec[1])),
  ]  # output features
  reduce_dims = []
  if p.get("feature_group_count", 1) == 1 and p.get("batch_group_count", 1) == 1:
    links.append((("i", 0, lhs_spec[1]), ("i", 1, rhs_spec[1])))
    reduce_dims.append((0, lhs_spec[1]))
  # Spatial dims: a halo exchange if split; costed as a gather.
  gather_dims = [(0, d) for d in lhs_spec[2:]] + [(1, d) for d in rhs_spec[2:]]
  return _result(links, reduce_dims, gather_dims)


# Primitives that pass each operand through unchanged: each keeps its own layout, so one of them
# touching a tensor-parallel region reads nothing in the region's layout.
PASS_THROUGH = frozenset({"optimization_barrier", "sharding_constraint"})


@register(*PASS_THROUGH)
def _identity(eqn, in_shapes, out_shapes):
  """Identity on each operand."""
  return _result(
    (("i", k, d), ("o", k, d)) for k in range(len(in_shapes)) for d in range(len(in_shapes[k]))
  )


@register("broadcast_in_dim")
def _broadcast_in_dim(eqn, in_shapes, out_shapes):
  return _result(
    (("i", 0, i), ("o", 0, d))
    for i, d in enumerate(eqn.params["broadcast_dimensions"])
    if in_shapes[0][i] == out_shapes[0][d]
  )


def reshape_links(in_shape, out_shape):
  """Pairs (in dim, out dim) a reshape keeps together, plus input dims it breaks.

  Dims are grouped into runs with equal products. Inside a run the major (first non-1) dims are
  linked: sharding [B, T, D] -> [B*T, D] on B keeps contiguous blocks, so B*T inherits it. Minor
  dims of a merge or split cannot keep a sharding without a reshuffle.
  """
  links, broken = [], []
  i = j = 0
  while i < len(in_shape) and j < len(out_shape):
    gi, gj = [i], [j]
    pi, pj = in_shape[i], out_shape[j]
    while pi != pj:
      if pi < pj:
        i += 1
        if i >= len(in_shape):
          return links, broken
        gi.append(i)
        pi *= in_shape[i]
      else:
        j += 1
        if j >= len(out_shape):
          return links, broken
        gj.append(j)
        pj *= out_shape[j]
    major_in = [d for d in gi if in_shape[d] != 1]
    major_out = [d for d in gj if out_shape[d] != 1]
    if major_in and major_out:
      links.append((major_in[0], major_out[0]))
      broken.extend(major_in[1:])
    i += 1
    j += 1
  return links, broken


@register("reshape")
def _reshape(eqn, in_shapes, out_shapes):
  pairs, broken = reshape_links(in_shapes[0], out_shapes[0])
  return _result(((("i", 0, a), ("o", 0, b)) for a, b in pairs), (), ((0, d) for d in broken))


@register("transpose")
def _transpose(eqn, in_shapes, out_shapes):
  return _result(
    (("i", 0, in_d), ("o", 0, out_d)) for out_d, in_d in enumerate(eqn.params["permutation"])
  )


@register(
  "reduce_sum",
  "reduce_max",
  "reduce_min",
  "reduce_prod",
  "reduce_and",
  "reduce_or",
  "reduce_xor",
  "argmax",
  "argmin",
)
def _reduction(eqn, in_shapes, out_shapes):
  axes = set(eqn.params["axes"])
  kept = [d for d in range(len(in_shapes[0])) if d not in axes]
  links = [
    (("i", 0, in_d), ("o", k, out_d))
    for out_d, in_d in enumerate(kept)
    for k in range(len(out_shapes))
  ]
  return _result(links, ((0, d) for d in axes))


@register("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort", "top_k")
def _along_one_axis(eqn, in_shapes, out_shapes):
  """Scans, sorts and top_k: the whole axis they run along, the other dims kept."""
  p = eqn.params
  # sort names its axis "dimension"; top_k had no axis param in older jax (the last dim).
  axis = p.get("axis", p.get("dimension", len(in_shapes[0]) - 1))
  links, gather_dims = [], []
  for pos, shape in enumerate(in_shapes):
    for d in range(len(shape)):
      if d != axis:
        for k in range(len(out_shapes)):
          links.append((("i", pos, d), ("o", k, d)))
    gather_dims.append((pos, axis))
  return _result(links, (), gather_dims)


@register("bitcast_convert_type")
def _bitcast_convert_type(eqn, in_shapes, out_shapes):
  """Same shape when the widths are equal; a narrower result gains a trailing dim of the
  widths' ratio, a wider one loses it: the leading dims line up, the trailing one stays whole."""
  shared = min(len(in_shapes[0]), len(out_shapes[0]))
  links = ((("i", 0, d), ("o", 0, d)) for d in range(shared))
  # The input's trailing dim that a wider result folds away must be whole on each device.
  whole = ((0, d) for d in range(shared, len(in_shapes[0])))
  return _result(links, (), whole)


@register("squeeze")
def _squeeze(eqn, in_shapes, out_shapes):
  removed = {d % len(in_shapes[0]) for d in eqn.params["dimensions"]}
  kept = [d for d in range(len(in_shapes[0])) if d not in removed]
  return _result((("i", 0, in_d), ("o", 0, out_d)) for out_d, in_d in enumerate(kept))


@register("concatenate", "split")
def _concatenate_or_split(eqn, in_shapes, out_shapes):
  p = eqn.params
  axis = p.get("dimension", p.get("axis"))
  links, gather_dims = [], []
  for pos in range(len(in_shapes)):
    for d in range(len(in_shapes[pos])):
      if d != axis:
        links.append((("i", pos, d), ("o", 0, d)))
    gather_dims.append((pos, axis))
  for k in range(1, len(out_shapes)):
    for d in range(len(out_shapes[k])):
      if d != axis:
        links.append((("o", 0, d), ("o", k, d)))
  return _result(links, (), gather_dims)


def _same_size_dims(in_shape, out_shape, whole=frozenset()):
  """Dims that keep their size keep their sharding; the others (and `whole`) need the whole dim."""
  links, gather_dims = [], []
  for d, (a, b) in enumerate(zip(in_shape, out_shape)):
    if a == b and d not in whole:
      links.append((("i", 0, d), ("o", 0, d)))
    else:
      gather_dims.append((0, d))
  return links, gather_dims


@register(
  "pad",
  "slice",
  "dynamic_slice",
  "reduce_window_sum",
  "reduce_window_max",
  "reduce_window_min",
  "reduce_window",
  "select_and_gather_add",
)
def _windowed(eqn, in_shapes, out_shapes):
  links, gather_dims = _same_size_dims(in_shapes[0], out_shapes[0])
  return _result(links, (), gather_dims)


@register("rev")
def _rev(eqn, in_shapes, out_shapes):
  # Only the dims it reverses need to be whole (a transposed convolution flips the kernel's
  # spatial dims, not its channels).
  whole = set(eqn.params.get("dimensions", ()))
  links, gather_dims = _same_size_dims(in_shapes[0], out_shapes[0], whole)
  return _result(links, (), gather_dims)


@register("select_and_scatter_add")
def _select_and_scatter_add(eqn, in_shapes, out_shapes):
  links, gather_dims = _same_size_dims(in_shapes[0], out_shapes[0])
  # Operand 1 is the pooling input, shaped like the output.
  links.extend((("i", 1, d), ("o", 0, d)) for d in range(len(in_shapes[1])))
  return _result(links, (), gather_dims)


@register("dynamic_update_slice")
def _dynamic_update_slice(eqn, in_shapes, out_shapes):
  links, gather_dims = [], []
  for d in range(len(in_shapes[0])):
    links.append((("i", 0, d), ("o", 0, d)))
    if in_shapes[1][d] == in_shapes[0][d]:
      links.append((("i", 1, d), ("o", 0, d)))
    else:
      gather_dims.append((1, d))
  return _result(links, (), gather_dims)


@register("gather")
def _gather(eqn, in_shapes, out_shapes):
  p = eqn.params
  dn = p["dimension_numbers"]
  operand_shape, idx_shape = in_shapes[0], in_shapes[1]
  links, gather_dims = [], []
  skipped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
  window_dims = [d for d in range(len(operand_shape)) if d not in skipped]
  for out_d, op_d in zip(dn.offset_dims, window_dims):
    if p["slice_sizes"][op_d] == operand_shape[op_d]:
      links.append((("i", 0, op_d), ("o", 0, out_d)))
    else:
      gather_dims.append((0, op_d))
  batch_out = [d for d in range(len(out_shapes[0])) if d not in dn.offset_dims]
  idx_dims = list(range(len(idx_shape) - 1))  # the last dim holds the index vector
  for out_d, i_d in zip(batch_out, idx_dims):
    links.append((("i", 1, i_d), ("o", 0, out_d)))
  for a, b in zip(dn.operand_batching_dims, dn.start_indices_batching_dims):
    links.append((("i", 0, a), ("i", 1, b)))
  # A looked-up dim split over devices: each device gathers its rows, masked, then all-reduce.
  return _result(links, ((0, d) for d in dn.collapsed_slice_dims), gather_dims)


def _scattered_update_dims(eqn, upd_shape):
  window = eqn.params["dimension_numbers"].update_window_dims
  return [d for d in range(len(upd_shape)) if d not in window]


@register("scatter", "scatter-sub", "scatter-mul", "scatter-min", "scatter-max")
def _scatter(eqn, in_shapes, out_shapes):
  dn = eqn.params["dimension_numbers"]
  operand_shape, idx_shape, upd_shape = in_shapes[0], in_shapes[1], in_shapes[2]
  links = [(("i", 0, d), ("o", 0, d)) for d in range(len(operand_shape))]
  gather_dims = []
  skipped = set(dn.inserted_window_dims) | set(dn.operand_batching_dims)
  window_dims = [d for d in range(len(operand_shape)) if d not in skipped]
  for u_d, op_d in zip(dn.update_window_dims, window_dims):
    if upd_shape[u_d] == operand_shape[op_d]:
      links.append((("i", 2, u_d), ("i", 0, op_d)))
    else:
      gather_dims.append((2, u_d))
  for u_d, i_d in zip(_scattered_update_dims(eqn, upd_shape), range(len(idx_shape) - 1)):
    links.append((("i", 2, u_d), ("i", 1, i_d)))
  return _result(links, (), gather_dims)


@register("scatter-add")
def _scatter_add(eqn, in_shapes, out_shapes):
  # Updates split along a scattered dim sum into partial results.
  scattered = _scattered_update_dims(eqn, in_shapes[2])
  return dataclasses.replace(
    _scatter(eqn, in_shapes, out_shapes), reduce_dims=tuple((2, d) for d in scattered)
  )
