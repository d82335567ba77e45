"""Train step + abstract arguments -> a flat, frozen graph of equations with dimension classes.

This is the only module that walks jaxprs. Nested jaxprs are inlined: calls (jit, remat, custom
jvp/vjp) alias their variables to the caller's, loop bodies appear once with a multiplicity equal
to their trip count (XLA's cost analysis counts a body once), and each branch of a `cond` is kept
with a tag so the cost stage can keep only the most expensive one.

Dimension classes: every tensor dimension is a node of a union-find; an equation unions the
dimensions that must share a sharding for it to run without communication (the batch dims of a
dot, the operands of an elementwise op, the kept dims of a reshape, ...). A class is a logical
axis found in the program itself — no parameter-name patterns. Dimensions whose sharding forces
communication are recorded per equation: `reduce_dims` (a partial result, then an all-reduce of
the output) and `gather_dims` (the operand must be all-gathered first).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import warnings
from typing import Any

import jax
import jax.extend as jex
import numpy as np
from jax._src import source_info_util

from wapar_jax.errors import InvalidArgumentError, NonScalarLossError
from wapar_jax._src.step import abstract, make_train_step

_Var = jex.core.Var
_Literal = jex.core.Literal

# Primitives whose only job is to call a sub-jaxpr with the same inputs and outputs.
_CALL_JAXPR_PARAM = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}

_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
               "reduce_xor", "argmax", "argmin"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
# Elementwise primitives: operands and result line up element by element.
ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "abs", "sign", "select_n", "clamp",
    "convert_element_type", "eq", "ne", "gt", "ge", "lt", "le", "and", "or", "not", "xor",
    "is_finite", "stop_gradient", "add_any", "erf", "erfc", "erf_inv", "square", "floor", "ceil",
    "one_minus_square",  # jax >= 0.11: the derivative of tanh
    "round", "rem", "sin", "cos", "tan", "atan2", "copy", "copy_p", "reduce_precision", "nextafter",
    "imag", "real",
})
# Ops XLA fuses into their consumers: their outputs are rarely materialised in memory.
_FUSIBLE = ELEMENTWISE | {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose",
                          "iota"}


@dataclasses.dataclass(frozen=True)
class Op:
  """One equation of the flattened step.

  Attributes:
    index: position in program order.
    primitive: the primitive's name.
    cost_key: identity for cost deduplication (primitive, params, input types, literals).
    eqn: the jaxpr equation, kept to lower it on its own for XLA's cost analysis.
    in_vars / out_vars: variable ids (-1 for a literal input).
    multiplicity: how many times it runs per step (product of enclosing trip counts).
    branch: (cond id, branch index) inside a `cond`, else None.
    reduce_dims: (input position, dim) whose sharding makes the output a partial result.
    gather_dims: (input position, dim) whose sharding forces an all-gather of that input.
    fusible: XLA fuses it into neighbours, so its memory traffic mostly disappears.
    source: "file:line (function)" of the user code that produced it.
  """
  index: int
  primitive: str
  cost_key: str
  eqn: Any
  in_vars: tuple[int, ...]
  out_vars: tuple[int, ...]
  multiplicity: float
  branch: tuple[int, int] | None
  reduce_dims: tuple[tuple[int, int], ...]
  gather_dims: tuple[tuple[int, int], ...]
  fusible: bool
  source: str


@dataclasses.dataclass(frozen=True)
class TracedStep:
  """The flattened train step with every tensor dimension mapped to its class.

  Variables are integers; `var_shape[v]`, `var_itemsize[v]` and `var_classes[v]` (class id per
  dim) describe them. `def_pos[v]` / `last_use[v]` are op indices for liveness (-1 = argument,
  len(ops) = step output). Argument groups keep the flattened order of their pytrees.
  """
  ops: tuple[Op, ...]
  var_shape: tuple[tuple[int, ...], ...]
  var_itemsize: tuple[int, ...]
  var_classes: tuple[tuple[int, ...], ...]
  def_pos: np.ndarray
  last_use: np.ndarray
  class_size: tuple[int, ...]
  loop_classes: frozenset[int]
  param_vars: tuple[int, ...]
  opt_state_vars: tuple[int, ...]
  batch_vars: tuple[int, ...]
  output_vars: tuple[int, ...]
  loss_var: int
  unknown_primitives: tuple[str, ...]

  @property
  def num_vars(self) -> int:
    return len(self.var_shape)

  def var_bytes(self) -> np.ndarray:
    """Bytes of every variable (unsharded), as float64."""
    return np.array([math.prod(shape) * itemsize
                     for shape, itemsize in zip(self.var_shape, self.var_itemsize)], dtype=float)


class _UnionFind:

  def __init__(self):
    self.parent: list[int] = []

  def add(self, n: int) -> int:
    start = len(self.parent)
    self.parent.extend(range(start, start + n))
    return start

  def find(self, x: int) -> int:
    root = x
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[x] != root:  # path compression
      self.parent[x], x = root, self.parent[x]
    return root

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[max(ra, rb)] = min(ra, rb)


_INSTALLED = re.compile(r"[/\\](site|dist)-packages[/\\]")
_OWN_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # built-in examples


def _source(eqn) -> str:
  """The researcher's line that made `eqn`: the innermost frame outside jax and installed
  libraries (flax, optax, ...), else the innermost outside jax."""
  frames = source_info_util.user_frames(eqn.source_info.traceback)
  first = next(frames, None)
  if first is None:
    return "?"
  # jax excludes only its own files and the standard library; in a virtualenv, site-packages
  # lies outside the latter, so a flax layer would be named instead of the model's line.
  frame = next((f for f in itertools.chain([first], frames) if not _INSTALLED.search(f.file_name)
                or f.file_name.startswith(_OWN_PACKAGE)), first)
  return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"


def _reshape_links(in_shape, out_shape):
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


def _dim_rules(eqn, in_shapes, out_shapes):
  """How one equation relates its dims.

  Returns (links, reduce_dims, gather_dims, known): links are pairs of ("i"|"o", position, dim);
  `known` is False for a primitive we only guessed at.
  """
  name = eqn.primitive.name
  p = eqn.params
  links, reduce_dims, gather_dims = [], [], []

  def link(a, b):
    links.append((a, b))

  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    for a, b in zip(lc, rc):
      link(("i", 0, a), ("i", 1, b))
      reduce_dims.append((0, a))
    for k, (a, b) in enumerate(zip(lb, rb)):
      link(("i", 0, a), ("i", 1, b))
      link(("i", 0, a), ("o", 0, k))
    out = len(lb)
    for operand, (contract, batch) in enumerate(((lc, lb), (rc, rb))):
      for d in range(len(in_shapes[operand])):
        if d not in contract and d not in batch:
          link(("i", operand, d), ("o", 0, out))
          out += 1
    return links, reduce_dims, gather_dims, True

  if name == "conv_general_dilated":
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    link(("i", 0, lhs_spec[0]), ("o", 0, out_spec[0]))  # batch
    link(("i", 1, rhs_spec[0]), ("o", 0, out_spec[1]))  # output features
    if p.get("feature_group_count", 1) == 1 and p.get("batch_group_count", 1) == 1:
      link(("i", 0, lhs_spec[1]), ("i", 1, rhs_spec[1]))
      reduce_dims.append((0, lhs_spec[1]))
    for d in lhs_spec[2:]:  # spatial dims: a halo exchange if split; costed as a gather
      gather_dims.append((0, d))
    for d in rhs_spec[2:]:
      gather_dims.append((1, d))
    return links, reduce_dims, gather_dims, True

  if name in ("optimization_barrier", "sharding_constraint"):  # identity on each operand
    for k in range(len(in_shapes)):
      for d in range(len(in_shapes[k])):
        link(("i", k, d), ("o", k, d))
    return links, reduce_dims, gather_dims, True

  if name == "broadcast_in_dim":
    for i, d in enumerate(p["broadcast_dimensions"]):
      if in_shapes[0][i] == out_shapes[0][d]:
        link(("i", 0, i), ("o", 0, d))
    return links, reduce_dims, gather_dims, True

  if name == "reshape":
    pairs, broken = _reshape_links(in_shapes[0], out_shapes[0])
    for a, b in pairs:
      link(("i", 0, a), ("o", 0, b))
    gather_dims.extend((0, d) for d in broken)
    return links, reduce_dims, gather_dims, True

  if name == "transpose":
    for out_d, in_d in enumerate(p["permutation"]):
      link(("i", 0, in_d), ("o", 0, out_d))
    return links, reduce_dims, gather_dims, True

  if name in _REDUCTIONS:
    axes = set(p["axes"])
    kept = [d for d in range(len(in_shapes[0])) if d not in axes]
    for out_d, in_d in enumerate(kept):
      for k in range(len(out_shapes)):
        link(("i", 0, in_d), ("o", k, out_d))
    reduce_dims.extend((0, d) for d in axes)
    return links, reduce_dims, gather_dims, True

  if name in _CUMULATIVE or name in ("sort", "top_k"):
    # sort names its axis "dimension"; top_k had no axis param in older jax (the last dim).
    axis = p.get("axis", p.get("dimension", len(in_shapes[0]) - 1))
    for pos, shape in enumerate(in_shapes):
      for d in range(len(shape)):
        if d != axis:
          for k in range(len(out_shapes)):
            link(("i", pos, d), ("o", k, d))
      gather_dims.append((pos, axis))
    return links, reduce_dims, gather_dims, True

  if name == "squeeze":
    removed = set(d % len(in_shapes[0]) for d in p["dimensions"])
    kept = [d for d in range(len(in_shapes[0])) if d not in removed]
    for out_d, in_d in enumerate(kept):
      link(("i", 0, in_d), ("o", 0, out_d))
    return links, reduce_dims, gather_dims, True

  if name in ("concatenate", "split"):
    axis = p.get("dimension", p.get("axis"))
    for pos in range(len(in_shapes)):
      for d in range(len(in_shapes[pos])):
        if d != axis:
          link(("i", pos, d), ("o", 0, d))
      gather_dims.append((pos, axis))
    for k in range(1, len(out_shapes)):
      for d in range(len(out_shapes[k])):
        if d != axis:
          link(("o", 0, d), ("o", k, d))
    return links, reduce_dims, gather_dims, True

  if name in ("pad", "slice", "dynamic_slice", "rev", "reduce_window_sum", "reduce_window_max",
              "reduce_window_min", "reduce_window", "select_and_scatter_add",
              "select_and_gather_add"):
    # Dims that keep their size keep their sharding; the others need the whole dim. rev needs
    # only the dims it reverses whole (a transposed convolution flips the kernel's spatial dims,
    # not its channels).
    reversed_dims = set(p.get("dimensions", ())) if name == "rev" else set()
    for d, (a, b) in enumerate(zip(in_shapes[0], out_shapes[0])):
      if a == b and d not in reversed_dims:
        link(("i", 0, d), ("o", 0, d))
      else:
        gather_dims.append((0, d))
    if name == "select_and_scatter_add":  # operand 1 is the pooling input, shaped like the output
      for d in range(len(in_shapes[1])):
        link(("i", 1, d), ("o", 0, d))
    return links, reduce_dims, gather_dims, True

  if name == "dynamic_update_slice":
    for d in range(len(in_shapes[0])):
      link(("i", 0, d), ("o", 0, d))
      if in_shapes[1][d] == in_shapes[0][d]:
        link(("i", 1, d), ("o", 0, d))
      else:
        gather_dims.append((1, d))
    return links, reduce_dims, gather_dims, True

  if name == "gather":
    dn = p["dimension_numbers"]
    operand_shape, idx_shape = in_shapes[0], in_shapes[1]
    skipped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    window_dims = [d for d in range(len(operand_shape)) if d not in skipped]
    for out_d, op_d in zip(dn.offset_dims, window_dims):
      if p["slice_sizes"][op_d] == operand_shape[op_d]:
        link(("i", 0, op_d), ("o", 0, out_d))
      else:
        gather_dims.append((0, op_d))
    batch_out = [d for d in range(len(out_shapes[0])) if d not in dn.offset_dims]
    idx_dims = list(range(len(idx_shape) - 1))  # the last dim holds the index vector
    for out_d, i_d in zip(batch_out, idx_dims):
      link(("i", 1, i_d), ("o", 0, out_d))
    for a, b in zip(dn.operand_batching_dims, dn.start_indices_batching_dims):
      link(("i", 0, a), ("i", 1, b))
    # A looked-up dim split over devices: each device gathers its rows, masked, then all-reduce.
    reduce_dims.extend((0, d) for d in dn.collapsed_slice_dims)
    return links, reduce_dims, gather_dims, True

  if name.startswith("scatter"):
    dn = p["dimension_numbers"]
    operand_shape, idx_shape, upd_shape = in_shapes[0], in_shapes[1], in_shapes[2]
    for d in range(len(operand_shape)):
      link(("i", 0, d), ("o", 0, d))
    skipped = set(dn.inserted_window_dims) | set(dn.operand_batching_dims)
    window_dims = [d for d in range(len(operand_shape)) if d not in skipped]
    for u_d, op_d in zip(dn.update_window_dims, window_dims):
      if upd_shape[u_d] == operand_shape[op_d]:
        link(("i", 2, u_d), ("i", 0, op_d))
      else:
        gather_dims.append((2, u_d))
    scatter_upd = [d for d in range(len(upd_shape)) if d not in dn.update_window_dims]
    for u_d, i_d in zip(scatter_upd, range(len(idx_shape) - 1)):
      link(("i", 2, u_d), ("i", 1, i_d))
    if name == "scatter-add":  # updates split along a scattered dim sum into partial results
      reduce_dims.extend((2, d) for d in scatter_upd)
    return links, reduce_dims, gather_dims, True

  # Elementwise and anything unknown of the same shape: dims line up position by position.
  shapes = [("i", k, s) for k, s in enumerate(in_shapes)] + [("o", k, s) for k, s in enumerate(out_shapes)]
  full = [x for x in shapes if len(x[2]) > 0]
  known = name in _FUSIBLE or name in ("iota", "rng_bit_generator", "random_bits", "random_seed",
                                        "random_wrap", "random_unwrap", "threefry2x32", "erf_inv",
                                        "clz", "population_count", "shift_left",
                                        "shift_right_logical", "shift_right_arithmetic",
                                        "optimization_barrier", "lgamma", "digamma", "igamma",
                                        "random_fold_in", "random_split", "custom_lin")
  if full:
    ref = max(full, key=lambda x: math.prod(x[2]))
    for other in full:
      if len(other[2]) == len(ref[2]) and all(a == b or a == 1 for a, b in zip(other[2], ref[2])):
        for d in range(len(ref[2])):  # size-1 dims broadcast implicitly, as jnp emits them
          if other[2][d] == ref[2][d]:
            link((ref[0], ref[1], d), (other[0], other[1], d))
      else:
        known = False
        gather_dims.extend((other[1], d) for d in range(len(other[2])) if other[0] == "i")
  return links, reduce_dims, gather_dims, known


def _aval_shape(v):
  return tuple(int(d) for d in v.aval.shape)


def _itemsize(aval) -> int:
  dtype = getattr(aval, "dtype", None)
  try:
    return int(np.dtype(dtype).itemsize)
  except TypeError:  # PRNG key and other extended dtypes
    return 8


def _cost_key(eqn, in_shapes) -> str:
  params = ", ".join(f"{k}={v!r}" for k, v in sorted(eqn.params.items()))
  ins = []
  for v, shape in zip(eqn.invars, in_shapes):
    if isinstance(v, _Literal):
      ins.append(f"lit({np.asarray(v.val).tolist()!r}:{v.aval.dtype})")
    else:
      ins.append(f"{v.aval.dtype}{list(shape)}")
  return f"{eqn.primitive.name}[{params}]({', '.join(ins)})"


def _scan_operand_counts(params) -> tuple[int, int]:
  """(constants, carries) among a scan's operands; the rest are the scanned inputs.

  jax 0.10 names the counts; later versions describe the operands as flat trees instead
  (and move carries the body leaves unchanged into the constants).
  """
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  consts, carry, _ = params["ft_in"].unpack()
  return len(consts), len(carry)


def _while_trip_count(eqn) -> int | None:
  """Trip count of a `fori_loop`-shaped while: cond is `i < N` with N a literal, i from 0."""
  cond = eqn.params["cond_jaxpr"].jaxpr
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
    return None
  lhs, rhs = cond.eqns[0].invars
  if not isinstance(rhs, _Literal):
    return None
  return max(int(rhs.val), 0)


class _Builder:

  def __init__(self):
    self.uf = _UnionFind()
    self.var_shape: list[tuple[int, ...]] = []
    self.var_itemsize: list[int] = []
    self.var_base: list[int] = []
    self.def_pos: list[int] = []
    self.last_use: list[int] = []
    self.ops: list[Op] = []
    self.loop_dims: list[int] = []
    self.unknown: set[str] = set()
    self.num_conds = 0

  def new_var(self, aval, def_pos) -> int:
    shape = tuple(int(d) for d in getattr(aval, "shape", ()))
    vid = len(self.var_shape)
    self.var_shape.append(shape)
    self.var_itemsize.append(_itemsize(aval))
    self.var_base.append(self.uf.add(len(shape)))
    self.def_pos.append(def_pos)
    self.last_use.append(def_pos)
    return vid

  def dim(self, vid, d) -> int:
    return self.var_base[vid] + d

  def union_vars(self, a, b, offset_a=0, offset_b=0):
    n = len(self.var_shape[a]) - offset_a
    for d in range(n):
      self.uf.union(self.dim(a, d + offset_a), self.dim(b, d + offset_b))

  def read(self, env, v) -> int:
    if isinstance(v, _Literal):
      return -1
    vid = env[v]
    self.last_use[vid] = max(self.last_use[vid], len(self.ops))
    return vid

  def bind_outer(self, env, outer_var, inner_var_id):
    if not isinstance(outer_var, jex.core.DropVar):
      env[outer_var] = inner_var_id

  def walk(self, jaxpr, env, mult, branch):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name in _CALL_JAXPR_PARAM and _CALL_JAXPR_PARAM[name] in eqn.params:
        self.inline_call(eqn, env, mult, branch)
      elif name == "scan":
        self.scan(eqn, env, mult, branch)
      elif name == "while":
        self.while_loop(eqn, env, mult, branch)
      elif name == "cond":
        self.cond(eqn, env, mult)
      else:
        self.leaf(eqn, env, mult, branch)

  def sub_env(self, closed, outer_ids):
    """Env for a sub-jaxpr whose invars alias the given outer variable ids."""
    jaxpr = closed.jaxpr if hasattr(closed, "jaxpr") else closed
    env = {}
    consts = getattr(closed, "consts", ())
    for cv, c in zip(jaxpr.constvars, consts):
      env[cv] = self.new_var(jax.typeof(c), len(self.ops))
    for v, vid in zip(jaxpr.invars, outer_ids):
      if vid < 0:  # literal passed into a call: a fresh constant variable
        vid = self.new_var(v.aval, len(self.ops))
      env[v] = vid
    return jaxpr, env

  def inner_out(self, env, v):
    if isinstance(v, _Literal):
      return self.new_var(v.aval, len(self.ops))
    return env[v]

  def inline_call(self, eqn, env, mult, branch):
    closed = eqn.params[_CALL_JAXPR_PARAM[eqn.primitive.name]]
    outer_ids = [self.read(env, v) for v in eqn.invars]
    jaxpr, sub = self.sub_env(closed, outer_ids)
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
      return self.leaf(eqn, env, mult, branch)
    self.walk(jaxpr, sub, mult, branch)
    for ov, iv in zip(eqn.outvars, jaxpr.outvars):
      self.bind_outer(env, ov, self.inner_out(sub, iv))

  def scan(self, eqn, env, mult, branch):
    p = eqn.params
    closed, length = p["jaxpr"], int(p["length"])
    n_consts, n_carry = _scan_operand_counts(p)
    start = len(self.ops)
    outer_in = [self.read(env, v) for v in eqn.invars]
    outer_out = [self.new_var(v.aval, start) for v in eqn.outvars]
    jaxpr = closed.jaxpr
    inner_in = []
    for k, (v, vid) in enumerate(zip(jaxpr.invars, outer_in)):
      if k < n_consts and vid >= 0:
        inner_in.append(vid)
        continue
      inner = self.new_var(v.aval, start)
      if vid >= 0:
        self.union_vars(inner, vid, 0, 1 if k >= n_consts + n_carry else 0)
        if k >= n_consts + n_carry:
          self.loop_dims.append(self.dim(vid, 0))
      inner_in.append(inner)
    _, sub = self.sub_env(closed, inner_in)
    self.walk(jaxpr, sub, mult * length, branch)
    end = len(self.ops) - 1
    for k, (iv, ovid) in enumerate(zip(jaxpr.outvars, outer_out)):
      inner = self.inner_out(sub, iv)
      if k < n_carry:
        self.union_vars(inner, ovid)
        carry_in = inner_in[n_consts + k]
        self.union_vars(inner, carry_in)
      else:
        self.union_vars(inner, ovid, 0, 1)
        self.loop_dims.append(self.dim(ovid, 0))
      self.last_use[inner] = max(self.last_use[inner], end)
    # The loop state is one set of buffers, updated in place: the initial carry becomes it
    # (so it is not kept alive through the loop) and the final carry is it, bound outside
    # only once the loop ends.
    self.after_loop(outer_out[:n_carry], end)
    self.close_region(eqn, env, outer_in[:n_consts] + outer_in[n_consts + n_carry:], outer_out)

  def while_loop(self, eqn, env, mult, branch):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    trips = _while_trip_count(eqn)
    if trips is None:
      warnings.warn(f"while loop at {_source(eqn)} has no static trip count; costed as 1 "
                    "iteration. Use lax.scan or a fori_loop with literal bounds for an exact cost.",
                    stacklevel=4)
      trips = 1
    start = len(self.ops)
    outer_in = [self.read(env, v) for v in eqn.invars]
    cond_consts, body_consts, carry = outer_in[:nc], outer_in[nc:nc + nb], outer_in[nc + nb:]
    outer_out = [self.new_var(v.aval, start) for v in eqn.outvars]
    inner_carry = []
    body_carry_vars = p["body_jaxpr"].jaxpr.invars[nb:]
    for var, vid, ovid in zip(body_carry_vars, carry, outer_out):
      inner = self.new_var(var.aval, start)
      if vid >= 0:
        self.union_vars(inner, vid)
      self.union_vars(inner, ovid)
      inner_carry.append(inner)
    body, sub = self.sub_env(p["body_jaxpr"], body_consts + inner_carry)
    self.walk(body, sub, mult * trips, branch)
    for iv, inner in zip(body.outvars, inner_carry):
      self.union_vars(self.inner_out(sub, iv), inner)
    cond, csub = self.sub_env(p["cond_jaxpr"], cond_consts + inner_carry)
    self.walk(cond, csub, mult * (trips + 1), branch)
    self.after_loop(outer_out, len(self.ops) - 1)  # as for scan: the carry is the loop state
    self.close_region(eqn, env, cond_consts + body_consts + inner_carry, outer_out)

  def after_loop(self, carry_out, end):
    for vid in carry_out:
      self.def_pos[vid] = end + 1
      self.last_use[vid] = max(self.last_use[vid], end + 1)

  def cond(self, eqn, env, mult):
    outer_in = [self.read(env, v) for v in eqn.invars[1:]]
    start = len(self.ops)
    outer_out = [self.new_var(v.aval, start) for v in eqn.outvars]
    cond_id = self.num_conds
    self.num_conds += 1
    for b, closed in enumerate(eqn.params["branches"]):
      jaxpr, sub = self.sub_env(closed, outer_in)
      self.walk(jaxpr, sub, mult, (cond_id, b))
      for iv, ovid in zip(jaxpr.outvars, outer_out):
        inner = self.inner_out(sub, iv)
        self.union_vars(inner, ovid)
    self.close_region(eqn, env, outer_in, outer_out)

  def close_region(self, eqn, env, live_throughout, outer_out):
    """Ends a loop or cond: its inputs stay alive to its last op; its outputs bind outside."""
    end = len(self.ops) - 1
    for vid in live_throughout:
      if vid >= 0:
        self.last_use[vid] = max(self.last_use[vid], end)
    for ov, vid in zip(eqn.outvars, outer_out):
      self.bind_outer(env, ov, vid)

  def leaf(self, eqn, env, mult, branch):
    in_ids = tuple(self.read(env, v) for v in eqn.invars)
    in_shapes = [_aval_shape(v) for v in eqn.invars]
    pos = len(self.ops)
    out_ids = tuple(self.new_var(v.aval, pos) for v in eqn.outvars)
    out_shapes = [self.var_shape[o] for o in out_ids]
    links, reduce_dims, gather_dims, known = _dim_rules(eqn, in_shapes, out_shapes)
    if not known:
      self.unknown.add(eqn.primitive.name)

    def node(ref):
      kind, k, d = ref
      vid = in_ids[k] if kind == "i" else out_ids[k]
      return None if vid < 0 else self.dim(vid, d)

    for a, b in links:
      na, nb = node(a), node(b)
      if na is not None and nb is not None:
        self.uf.union(na, nb)
    self.ops.append(Op(
        index=pos, primitive=eqn.primitive.name, cost_key=_cost_key(eqn, in_shapes), eqn=eqn,
        in_vars=in_ids, out_vars=out_ids, multiplicity=float(mult), branch=branch,
        reduce_dims=tuple((k, d) for k, d in reduce_dims if in_ids[k] >= 0),
        gather_dims=tuple((k, d) for k, d in gather_dims if in_ids[k] >= 0),
        fusible=eqn.primitive.name in _FUSIBLE, source=_source(eqn)))
    for ov, vid in zip(eqn.outvars, out_ids):
      self.bind_outer(env, ov, vid)


def trace_jaxpr(closed_jaxpr, num_params: int, num_opt_state: int, num_batch: int,
                loss_output: int) -> TracedStep:
  """Flattens a train step's ClosedJaxpr whose inputs are params, opt state, batch (in order)."""
  b = _Builder()
  jaxpr = closed_jaxpr.jaxpr
  env = {}
  for cv, c in zip(jaxpr.constvars, closed_jaxpr.consts):
    env[cv] = b.new_var(jax.typeof(c), -1)
  arg_ids = [b.new_var(v.aval, -1) for v in jaxpr.invars]
  for v, vid in zip(jaxpr.invars, arg_ids):
    env[v] = vid
  b.walk(jaxpr, env, 1.0, None)
  end = len(b.ops)
  out_ids = []
  for v in jaxpr.outvars:
    vid = b.read(env, v) if not isinstance(v, _Literal) else b.new_var(v.aval, end)
    b.last_use[vid] = end
    out_ids.append(vid)

  # Canonical class ids: 0..K-1 in order of first appearance.
  roots, class_size, var_classes = {}, [], []
  for vid, shape in enumerate(b.var_shape):
    cls = []
    for d, size in enumerate(shape):
      r = b.uf.find(b.dim(vid, d))
      if r not in roots:
        roots[r] = len(class_size)
        class_size.append(size)
      else:  # a reshape links B with B*T: what divides the class must divide every member
        class_size[roots[r]] = math.gcd(class_size[roots[r]], size)
      cls.append(roots[r])
    var_classes.append(tuple(cls))
  loop_classes = frozenset(roots[b.uf.find(x)] for x in b.loop_dims)

  n1, n2 = num_params, num_params + num_opt_state
  return TracedStep(
      ops=tuple(b.ops),
      var_shape=tuple(b.var_shape),
      var_itemsize=tuple(b.var_itemsize),
      var_classes=tuple(var_classes),
      def_pos=np.asarray(b.def_pos, dtype=np.int64),
      last_use=np.asarray(b.last_use, dtype=np.int64),
      class_size=tuple(class_size),
      loop_classes=loop_classes,
      param_vars=tuple(arg_ids[:n1]),
      opt_state_vars=tuple(arg_ids[n1:n2]),
      batch_vars=tuple(arg_ids[n2:n2 + num_batch]),
      output_vars=tuple(out_ids),
      loss_var=out_ids[loss_output],
      unknown_primitives=tuple(sorted(b.unknown)),
  )


def trace_train_step(loss_fn, params, batch, optimizer, *, remat: str = "none",
                     microbatches: int = 1, jaxpr_cache: dict | None = None):
  """Traces `make_train_step(loss_fn, optimizer, remat=..., microbatches=...)` on abstract values.

  Returns (TracedStep, abstract opt_state). Nothing is materialised: a 7B model traces in
  seconds and a few hundred MB.
  """
  params, batch = abstract(params), abstract(batch)
  opt_state = abstract(jax.eval_shape(optimizer.init, params))
  try:
    step = make_train_step(loss_fn, optimizer, remat=remat, microbatches=microbatches,
                           jaxpr_cache=jaxpr_cache)
    closed = jax.make_jaxpr(step)(params, opt_state, batch)
  except Exception as e:  # diagnose with a forward trace only: the model is traced once if fine
    _check_loss(loss_fn, params, batch, e)
    raise
  n_params = len(jax.tree.leaves(params))
  n_opt = len(jax.tree.leaves(opt_state))
  n_batch = len(jax.tree.leaves(batch))
  traced = trace_jaxpr(closed, n_params, n_opt, n_batch, loss_output=n_params + n_opt)
  return traced, opt_state


def _check_loss(loss_fn, params, batch, step_error: Exception) -> None:
  """Names the error when tracing the train step failed because of the loss function."""
  try:
    loss = jax.eval_shape(loss_fn, params, batch)
  except Exception as e:
    raise InvalidArgumentError(
        "loss_fn(params, batch) failed when traced with abstract params and batch. It must be a "
        "pure function of its two arguments (no use of concrete values). "
        f"Got {type(e).__name__}: {e}") from e
  if not (hasattr(loss, "shape") and tuple(loss.shape) == ()):
    shape = getattr(loss, "shape", None)
    got = f"a {type(loss).__name__}" if shape is None else f"shape {tuple(shape)}"
    raise NonScalarLossError(
        "loss_fn(params, batch) must return a scalar (reduce the per-example losses with "
        f"jnp.mean or jnp.sum). Got {got}.") from step_error
