"""Parameters taken where they are used: the hook that makes FSDP per layer (ZeRO-3).

`at_use(loss_fn, hook)` is the loss with `hook(param index, value, dims dropped)` applied to a
parameter right before each equation that reads it, and, for a parameter stacked for a `scan`
over layers, to the layer's slice inside the loop body (the stacked array itself is never
hooked). The planner traces the loss with `mark`, an identity it finds in the jaxpr; the emitted
step hooks a sharding constraint to the gathered layout at the same places, so XLA gathers each
layer's weights just before the layer runs and frees them after. `REGATHER_POLICY` makes the
backward pass gather them again instead of keeping the forward pass's copies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.extend as jex
from jax._src import source_info_util
from jax._src.interpreters import ad, batching, mlir

from wapar_jax._src.compat import scan_operand_counts

# The planner's mark of a gathered use: an identity of its own. `checkpoint_name` would not do:
# jax drops names from the recomputation of a rematerialised segment, where the emitted step
# gathers again.
GATHERED = "wapar_gathered"
gathered_p = jex.core.Primitive(GATHERED)
gathered_p.def_impl(lambda x: x)
gathered_p.def_abstract_eval(lambda x: x)
ad.deflinear2(gathered_p, lambda cotangent, _: [cotangent])
batching.defvectorized(gathered_p)
mlir.register_lowering(gathered_p, lambda ctx, x: [x])


def REGATHER_POLICY(primitive, *_, **__) -> bool:
  """A remat policy saving every residual but the gathered weights (the planner's marks, the
  emitted step's constraints), which the backward pass gathers again."""
  return primitive is not gathered_p and primitive.name != "sharding_constraint"


def mark(_, value, dropped=0):
  """The planner's hook: the value unchanged, marked so that the trace shows each gathered use."""
  return _jitted(gathered_p, (), None)(value)


def at_use(loss_fn: Callable, hook: Callable, loss_program: Callable) -> Callable:
  """`loss_fn` with `hook(i, x, dropped)` applied to parameter leaf i at each of its uses
  (`dropped`: how many leading dims of the parameter a scan sliced off to give x).

  `loss_fn(params, *rest)` may return any tree (the loss and a model's updated state);
  `loss_program(loss_fn, args)` returns its ClosedJaxpr and output tree (memoised by the caller).
  """

  def hooked(params, *rest):
    closed, out_tree = loss_program(loss_fn, (params, *rest))
    n = len(jax.tree.leaves(params))
    owners = {v: (i, 0) for i, v in enumerate(closed.jaxpr.invars[:n])}
    args = jax.tree.leaves((params, *rest))
    return jax.tree.unflatten(out_tree, _evaluate(closed.jaxpr, closed.consts, args, owners, hook))

  return hooked


def _evaluate(jaxpr, consts, args, owners: dict, hook: Callable) -> list:
  """Evaluates `jaxpr`, hooking the variables in `owners` ({var: (param index, dims dropped)})
  at each read."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    params = eqn.params
    first_sliced = len(eqn.invars)
    if eqn.primitive.name == "scan":
      n_consts, n_carry = scan_operand_counts(params)
      first_sliced = n_consts + n_carry
      params = _scan_hooked(eqn, first_sliced, owners, hook)
    for k, v in enumerate(eqn.invars[:first_sliced]):
      if isinstance(v, jex.core.Var) and v in owners:
        ins[k] = hook(*owners[v][:1], ins[k], owners[v][1])
    outs = rebind(eqn, ins, params)
    env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
  return [read(v) for v in jaxpr.outvars]


def rebind(eqn, args, params=None):
  """Binds `eqn`'s primitive again on `args`, keeping its line of user code (for hot spots)."""
  params = eqn.params if params is None else params
  names = source_info_util.current_name_stack() + eqn.source_info.name_stack
  with source_info_util.user_context(eqn.source_info.traceback, name_stack=names), eqn.ctx.manager:
    key = (eqn.primitive, tuple(sorted(params.items())), eqn.ctx)
    if _cacheable(eqn, params, key):
      return _jitted(*key)(*args)
    # custom_jvp / custom_vjp calls take their functions back through get_bind_params
    return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(params))


def _cacheable(eqn, params, key) -> bool:
  """Whether `_jitted` can bind `eqn`: not a call, loop or custom rule (jaxprs or functions in
  its params), no effects, no literal operands (a jit argument is not a literal), and a key
  that hashes."""
  if eqn.effects or any(isinstance(v, jex.core.Literal) for v in eqn.invars):
    return False
  if any(callable(p) or hasattr(p, "jaxpr") for p in params.values()):
    return False
  try:
    hash(key)
  except TypeError:
    return False
  return True


@functools.lru_cache(maxsize=4096)
def _jitted(primitive, params, ctx):
  """`primitive` bound with `params`, as a jitted function inlined where it is called.

  Rebinding a loss equation by equation makes JAX linearise every equation anew when the loss
  is differentiated; through a jitted function it linearises each kind of equation once, as it
  does for jnp's own jitted functions (10,000 float32[4] parameters: the gradient's trace 14 s
  -> 9.6 s, against 7.9 s for the user's own code).
  """
  del ctx  # in the key only: the function is traced under the context it is first called in
  kwargs = dict(params)
  return jax.jit(lambda *operands: primitive.bind(*operands, **kwargs), inline=True)


def _scan_hooked(eqn, first_sliced: int, owners: dict, hook: Callable) -> dict:
  """The scan's params with its body hooking the slices of stacked parameters."""
  body = eqn.params["jaxpr"]
  inner = {
    body.jaxpr.invars[k]: (owners[v][0], owners[v][1] + 1)
    for k, v in enumerate(eqn.invars)
    if k >= first_sliced and isinstance(v, jex.core.Var) and v in owners
  }
  if not inner:
    return eqn.params

  def body_fn(*xs):
    return _evaluate(body.jaxpr, body.consts, xs, inner, hook)

  hooked = jax.make_jaxpr(body_fn)(*[v.aval for v in body.jaxpr.invars])
  return {**eqn.params, "jaxpr": hooked}
