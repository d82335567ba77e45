"""A low-precision step's float32 twin: the same program with every bf16 / f16 value in float32.

XLA:CPU cannot emit bf16 or f16 dots: it upcasts them and keeps their temporaries in float32,
so a bf16 step compiled on CPU devices takes about twice the memory a GPU compile does, and
nothing in the planner's bf16 figures can be held against it. The float32 twin is a program
XLA:CPU compiles as it is written. Casting the parameters alone would not make it: a Flax
module with `dtype=bfloat16` casts them back inside the loss. So the loss is traced (for each
set of shapes the twin is called with) and its equations bound again on float32 values, with
every low-precision dtype in their parameters (`convert_element_type`'s `new_dtype`, a dot's
`preferred_element_type`, ...) made float32; calls are inlined and loops / remat rebuilt around
twin bodies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from wapar_jax._src.gathers import rebind
from wapar_jax._src.tree import abstract

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
TWIN_DTYPE = jnp.dtype(jnp.float32)
# Calls whose sub-jaxpr computes the outputs from the same inputs: inlined. A custom rule's
# derivative is then JAX's own of the forward computation: the same shapes, near enough the
# same buffers for a memory check.
_INLINED = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
}
# Parameters that name the dtype an equation makes.
_DTYPE_PARAMS = ("new_dtype", "preferred_element_type", "dtype")
# Equations whose result depends on the exact bit width of their operand's dtype.
_EXACT = {"bitcast_convert_type", "reduce_precision"}


def low_precision_dtype(*trees) -> str:
  """The name of the first bf16 / f16 leaf's dtype in `trees` ("" when there is none)."""
  for leaf in jax.tree.leaves(trees):
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) in LOW_PRECISION:
      return jnp.dtype(dtype).name
  return ""


def twin_tree(tree):
  """`tree` abstract, with each low-precision floating leaf float32."""
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, TWIN_DTYPE) if a.dtype in LOW_PRECISION else a,
    abstract(tree),
  )


def float32_twin(loss_fn: Callable, args: Sequence) -> tuple[Callable, tuple]:
  """(the twin of `loss_fn`, its abstract arguments) for `loss_fn(*args)`.

  The twin takes `args` with each bf16 / f16 leaf float32 and computes in float32 where
  `loss_fn` computed in low precision, with the same outputs' tree. It traces `loss_fn` for
  the shapes it is called with (a micro-batch, a pipeline stage's slice of the batch).
  """
  args = tuple(abstract(a) for a in args)
  leaves, treedef = jax.tree.flatten(args)
  dtypes = [a.dtype for a in leaves]
  programs = {}

  def twin(*twin_args):
    flat = jax.tree.leaves(twin_args)
    shapes = tuple(tuple(x.shape) for x in flat)
    if shapes not in programs:
      planned = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes, strict=True)]
      programs[shapes] = jax.make_jaxpr(loss_fn, return_shape=True)(
        *jax.tree.unflatten(treedef, planned)
      )
    closed, out_shape = programs[shapes]
    outs = _run(closed.jaxpr, closed.consts, flat)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return twin, tuple(twin_tree(a) for a in args)


def twin_plan(plan, loss_fn: Callable, params, batch, model_state=None):
  """`plan` for the twin's trees: the same specs and candidate, its leaves' dtypes float32
  where they were bf16 / f16 (so the plan's own check that a tree fits it passes)."""
  details = plan.details
  if details is not None:
    names = {d.name for d in LOW_PRECISION}

    def up(leaves):
      return tuple(
        dataclasses.replace(x, dtype=TWIN_DTYPE.name) if x.dtype in names else x for x in leaves
      )

    details = dataclasses.replace(details, params=up(details.params), batch=up(details.batch))
  return dataclasses.replace(
    plan,
    details=details,
    _loss_fn=loss_fn,
    _abstract_params=params,
    _abstract_batch=batch,
    _abstract_model_state=model_state,
  )


def _up(x):
  """`x` in float32 where it is low precision."""
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jnp.dtype(dtype) in LOW_PRECISION:
    # A literal stays a numpy value (bound as a constant), a traced value is cast in the program.
    return (
      np.asarray(x, TWIN_DTYPE) if isinstance(x, np.ndarray | np.generic) else x.astype(TWIN_DTYPE)
    )
  return x


def _twin_params(params: dict) -> dict:
  return {
    k: TWIN_DTYPE if k in _DTYPE_PARAMS and v is not None and jnp.dtype(v) in LOW_PRECISION else v
    for k, v in params.items()
  }


def _run(jaxpr, consts, args) -> list:
  """Evaluates `jaxpr` on twin values (float32 where the original was low precision)."""
  env = dict(zip(jaxpr.constvars, [_up(c) for c in consts], strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))

  def read(v):
    return _up(np.asarray(v.val, v.aval.dtype)) if isinstance(v, jex.core.Literal) else env[v]

  for eqn in jaxpr.eqns:
    outs = _eval(eqn, [read(v) for v in eqn.invars])
    env.update(zip(eqn.outvars, outs, strict=True))
  return [read(v) for v in jaxpr.outvars]


def _eval(eqn, vals) -> list:
  name, p = eqn.primitive.name, eqn.params
  if name in _INLINED:
    sub = p[_INLINED[name]]
    return _run(sub.jaxpr, sub.consts, vals)
  if name in ("checkpoint", "remat2"):
    body = lambda *a: _run(p["jaxpr"], (), list(a))
    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*vals))
  if name == "scan":
    return _scan(p, vals)
  if name == "while":
    return _while(p, vals)
  if name == "cond":
    return _cond(p, vals)
  if name in _EXACT or any(callable(v) or hasattr(v, "jaxpr") for v in p.values()):
    # Kept as written, on its own dtypes: bit-level ops, and calls this module cannot rebuild.
    originals = [
      x.astype(v.aval.dtype) if hasattr(x, "astype") else x
      for x, v in zip(vals, eqn.invars, strict=True)
    ]
    outs = rebind(eqn, originals)
  else:
    outs = rebind(eqn, vals, _twin_params(p))
  outs = outs if eqn.primitive.multiple_results else [outs]
  return [_up(o) for o in outs]


def _scan(p, vals) -> list:
  body, nc, ncarry = p["jaxpr"], p["num_consts"], p["num_carry"]
  consts, carry, xs = vals[:nc], vals[nc : nc + ncarry], vals[nc + ncarry :]

  def step(c, x):
    outs = _run(body.jaxpr, body.consts, [*consts, *c, *x])
    return outs[:ncarry], outs[ncarry:]

  carry, ys = lax.scan(
    step, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
  )
  return [*carry, *ys]


def _while(p, vals) -> list:
  cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = vals[:nc], vals[nc : nc + nb], vals[nc + nb :]
  cond = lambda c: _run(cj.jaxpr, cj.consts, [*cconsts, *c])[0]
  body = lambda c: _run(bj.jaxpr, bj.consts, [*bconsts, *c])
  return list(lax.while_loop(cond, body, list(init)))


def _cond(p, vals) -> list:
  index, operands = vals[0], vals[1:]
  branches = [(lambda *a, b=b: _run(b.jaxpr, b.consts, list(a))) for b in p["branches"]]
  return list(lax.switch(index, branches, *operands))
