"""The jaxpr walk: a train step's ClosedJaxpr -> `TracedStep`, with dims unioned into classes.

Calls (jit, remat, custom jvp/vjp) are inlined, aliasing their variables to the caller's; scan
and while bodies appear once with their trip count as multiplicity; each branch of a `cond` is
walked with a (cond id, branch) tag. Every other equation is a leaf: an `Op`, its dims linked by
its primitive's rule from `dim_rules`.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.extend as jex
import numpy as np

from wapar_jax._src.compat import scan_operand_counts
from wapar_jax._src.gathers import GATHERED
from wapar_jax._src.trace.dim_rules import dim_rules
from wapar_jax._src.trace.graph import Op, TracedStep
from wapar_jax._src.trace.source import UNKNOWN, source_line

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


def _aval_shape(v):
  return tuple(int(d) for d in v.aval.shape)


def _itemsize(aval) -> int:
  return _dtype_itemsize(getattr(aval, "dtype", None))


@functools.lru_cache(maxsize=64)
def _dtype_itemsize(dtype) -> int:
  try:
    return int(np.dtype(dtype).itemsize)
  except TypeError:  # PRNG key and other extended dtypes
    return 8


def _cost_key(eqn, in_shapes) -> str:
  items = tuple(sorted(eqn.params.items()))
  try:
    params = _params_text(items)
  except TypeError:  # a param that does not hash
    params = _params_text.__wrapped__(items)
  ins = []
  for v, shape in zip(eqn.invars, in_shapes):
    if isinstance(v, _Literal):
      ins.append(f"lit({np.asarray(v.val).tolist()!r}:{v.aval.dtype})")
    else:
      ins.append(f"{_dtype_text(v.aval.dtype)}{list(shape)}")
  return f"{eqn.primitive.name}[{params}]({', '.join(ins)})"


@functools.lru_cache(maxsize=64)
def _dtype_text(dtype) -> str:
  return str(dtype)  # numpy builds a dtype's name anew each time


@functools.lru_cache(maxsize=4096)
def _params_text(items) -> str:
  """An equation's params as text; many equations share them, and repr is costly."""
  return ", ".join(f"{k}={v!r}" for k, v in items)


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
    # Parameters and scan slices of them, by variable: the parameter's index.
    self.owner: dict[int, int] = {}
    # Gathered uses of parameters (`gathers.mark`) and the copies a loop stacks or slices of
    # them: variable -> (parameter index, times the use runs per step; 0 for a stacked copy, -1
    # for a slice of one).
    self.gathered: dict[int, tuple[int, float]] = {}
    self.marked: dict[int, int] = {}  # variable -> its marked use
    # Values a scan stacks into its outputs, and stacks a later scan slices again: XLA copies
    # each slice into / out of the stack in a kernel of its own. (op index, bytes moved per run).
    self.loop_copies: list[tuple[int, float]] = []
    self.stacks: list[tuple[int, int]] = []
    self.stacked: set[int] = set()
    # The researcher's line of the call or loop being walked (`source_line`'s `outer`).
    self.outer_source = UNKNOWN

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
    outer = self.outer_source
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == GATHERED:
        self.gathered_use(eqn, env, mult)
        continue
      region = (name in _CALL_JAXPR_PARAM and _CALL_JAXPR_PARAM[name] in eqn.params) or name in (
        "scan",
        "while",
        "cond",
      )
      if not region:
        self.leaf(eqn, env, mult, branch)
        continue
      # The equations inside are named by this line where their own tracebacks, cut short at
      # a jit (jax.random's, jnp's), hold no frame of the researcher's.
      self.outer_source = source_line(eqn, outer)
      if name == "scan":
        self.scan(eqn, env, mult, branch)
      elif name == "while":
        self.while_loop(eqn, env, mult, branch)
      elif name == "cond":
        self.cond(eqn, env, mult)
      else:
        self.inline_call(eqn, env, mult, branch)
      self.outer_source = outer

  def nbytes(self, vid) -> float:
    return float(math.prod(self.var_shape[vid]) * self.var_itemsize[vid])

  def copy_stacks(self, outer_in, inner_in, first_sliced, start, end):
    """Slices of an earlier scan's stack are copied out of it before their first reader."""
    for k in range(first_sliced, len(outer_in)):
      if outer_in[k] not in self.stacked:
        continue
      inner = inner_in[k]
      reader = next((i for i in range(start, end + 1) if inner in self.ops[i].in_vars), None)
      if reader is not None:  # read and written
        self.loop_copies.append((reader, 2 * self.nbytes(inner)))

  def gathered_use(self, eqn, env, mult):
    """A marked use of a parameter (`gathers.mark`): a variable of its own, which an FSDP step
    gathers there, but no op (the mark costs nothing and moves no program point)."""
    vid = self.read(env, eqn.invars[0])
    if vid in self.marked:  # XLA merges the same gather of the same value (CSE): one copy
      self.bind_outer(env, eqn.outvars[0], self.marked[vid])
      return
    out = self.new_var(eqn.outvars[0].aval, len(self.ops))
    self.marked[vid] = out
    if vid >= 0:
      self.union_vars(out, vid)
      if vid in self.owner:
        self.gathered[out] = (self.owner[vid], float(mult))
    self.bind_outer(env, eqn.outvars[0], out)

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
    n_consts, n_carry = scan_operand_counts(p)
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
          self.stacks.append((vid, inner))
          if vid in self.owner:
            self.owner[inner] = self.owner[vid]
          if vid in self.gathered:
            self.gathered[inner] = (self.gathered[vid][0], -1.0)
      inner_in.append(inner)
    _, sub = self.sub_env(closed, inner_in)
    self.walk(jaxpr, sub, mult * length, branch)
    end = len(self.ops) - 1
    self.copy_stacks(outer_in, inner_in, n_consts + n_carry, start, end)
    for k, (iv, ovid) in enumerate(zip(jaxpr.outvars, outer_out)):
      inner = self.inner_out(sub, iv)
      if k < n_carry:
        self.union_vars(inner, ovid)
        carry_in = inner_in[n_consts + k]
        self.union_vars(inner, carry_in)
      else:
        self.union_vars(inner, ovid, 0, 1)
        self.loop_dims.append(self.dim(ovid, 0))
        if start <= self.def_pos[inner] <= end:
          # Made in the body, so copied into the stack (read and written), which the loop
          # first fills with zeros (written once over: a slice's worth per iteration).
          self.loop_copies.append((self.def_pos[inner], 3 * self.nbytes(inner)))
          self.stacked.add(ovid)
          self.stacks.append((ovid, inner))
        if inner in self.gathered:  # the layers' gathered copies, kept for the backward pass
          self.gathered[ovid] = (self.gathered[inner][0], 0.0)
      self.last_use[inner] = max(self.last_use[inner], end)
    # The loop state is one set of buffers, updated in place: the initial carry becomes it
    # (so it is not kept alive through the loop) and the final carry is it, bound outside
    # only once the loop ends.
    self.after_loop(outer_out[:n_carry], end)
    self.close_region(eqn, env, outer_in[:n_consts] + outer_in[n_consts + n_carry :], outer_out)

  def while_loop(self, eqn, env, mult, branch):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    trips = _while_trip_count(eqn)
    if trips is None:
      warnings.warn(
        f"while loop at {self.outer_source} has no static trip count; costed as 1 "
        "iteration. Use lax.scan or a fori_loop with literal bounds for an exact cost.",
        stacklevel=4,
      )
      trips = 1
    start = len(self.ops)
    outer_in = [self.read(env, v) for v in eqn.invars]
    cond_consts, body_consts, carry = outer_in[:nc], outer_in[nc : nc + nb], outer_in[nc + nb :]
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
    rule = dim_rules(eqn, in_shapes, out_shapes)
    if not rule.known:
      self.unknown.add(eqn.primitive.name)

    def node(ref):
      kind, k, d = ref
      vid = in_ids[k] if kind == "i" else out_ids[k]
      return None if vid < 0 else self.dim(vid, d)

    for a, b in rule.links:
      na, nb = node(a), node(b)
      if na is not None and nb is not None:
        self.uf.union(na, nb)
    self.ops.append(
      Op(
        index=pos,
        primitive=eqn.primitive.name,
        cost_key=_cost_key(eqn, in_shapes),
        eqn=eqn,
        in_vars=in_ids,
        out_vars=out_ids,
        multiplicity=float(mult),
        branch=branch,
        reduce_dims=tuple((k, d) for k, d in rule.reduce_dims if in_ids[k] >= 0),
        gather_dims=tuple((k, d) for k, d in rule.gather_dims if in_ids[k] >= 0),
        source=source_line(eqn, self.outer_source),
      )
    )
    if eqn.primitive.name == "optimization_barrier":  # per-layer remat passes residuals through
      for i, o in zip(in_ids, out_ids):
        if i in self.owner:
          self.owner[o] = self.owner[i]
    for ov, vid in zip(eqn.outvars, out_ids):
      self.bind_outer(env, ov, vid)


def trace_jaxpr(
  closed_jaxpr,
  num_params: int,
  num_opt_state: int,
  num_batch: int,
  loss_output: int,
  num_state: int = 0,
) -> TracedStep:
  """Flattens a train step's ClosedJaxpr whose inputs are params, opt state, batch and a model's
  state (in order)."""
  b = _Builder()
  jaxpr = closed_jaxpr.jaxpr
  env = {}
  for cv, c in zip(jaxpr.constvars, closed_jaxpr.consts):
    env[cv] = b.new_var(jax.typeof(c), -1)
  arg_ids = [b.new_var(v.aval, -1) for v in jaxpr.invars]
  for v, vid in zip(jaxpr.invars, arg_ids):
    env[v] = vid
  b.owner.update((vid, i) for i, vid in enumerate(arg_ids[:num_params]))
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
  n3 = n2 + num_batch
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
    batch_vars=tuple(arg_ids[n2:n3]),
    state_vars=tuple(arg_ids[n3 : n3 + num_state]),
    output_vars=tuple(out_ids),
    loss_var=out_ids[loss_output],
    unknown_primitives=tuple(sorted(b.unknown)),
    gathered=tuple((v, i, runs) for v, (i, runs) in sorted(b.gathered.items())),
    loop_copies=tuple(b.loop_copies),
    stacks=tuple(b.stacks),
  )
