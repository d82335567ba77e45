"""Train step + abstract arguments -> a flat, frozen graph of equations with dimension classes.

This is the only package that walks jaxprs. Nested jaxprs are inlined: calls (jit, remat, custom
jvp/vjp) alias their variables to the caller's, loop bodies appear once with a multiplicity equal
to their trip count (XLA's cost analysis counts a body once), and each branch of a `cond` is kept
with a tag so the cost stage can keep only the most expensive one.

Dimension classes: every tensor dimension is a node of a union-find; an equation unions the
dimensions that must share a sharding for it to run without communication (the batch dims of a
dot, the operands of an elementwise op, the kept dims of a reshape, ...). A class is a logical
axis found in the program itself — no parameter-name patterns. Dimensions whose sharding forces
communication are recorded per equation: `reduce_dims` (a partial result, then an all-reduce of
the output) and `gather_dims` (the operand must be all-gathered first).

Modules: `graph` (`Op`, `TracedStep`), `dim_rules` (the per-primitive registry of those links),
`builder` (the jaxpr walk and the union-find), `source` (an equation's line of user code).
"""

from __future__ import annotations

import jax

from wapar_jax._src import gathers
from wapar_jax._src.step import make_train_step
from wapar_jax._src.trace import sharded_loss
from wapar_jax._src.trace.builder import trace_jaxpr
from wapar_jax._src.trace.dim_rules import ELEMENTWISE
from wapar_jax._src.trace.graph import Op, TracedStep
from wapar_jax._src.tree import abstract
from wapar_jax.errors import InvalidArgumentError, NonScalarLossError

__all__ = ["ELEMENTWISE", "Op", "TracedStep", "trace_jaxpr", "trace_train_step"]


def trace_train_step(
  loss_fn,
  params,
  batch,
  optimizer,
  *,
  remat: str = "none",
  microbatches: int = 1,
  jaxpr_cache: dict | None = None,
  state=None,
):
  """Traces `make_train_step(loss_fn, optimizer, remat=..., microbatches=...)` on abstract values,
  with every use of a parameter marked (`gathers.mark`): where an FSDP step gathers it. With a
  model's `state`, `loss_fn(params, batch, state) -> (loss, new state)`.

  Returns (TracedStep, abstract opt_state). Nothing is materialised: a 7B model traces in
  seconds and a few hundred MB.
  """
  params, batch = abstract(params), abstract(batch)
  opt_state = abstract(jax.eval_shape(optimizer.init, params))
  state_args = () if state is None else (abstract(state),)
  try:
    step = make_train_step(
      loss_fn,
      optimizer,
      remat=remat,
      microbatches=microbatches,
      gather=gathers.mark,
      jaxpr_cache=jaxpr_cache,
      with_state=state is not None,
    )
    closed = jax.make_jaxpr(step)(params, opt_state, batch, *state_args)
  except Exception as e:  # diagnose with a forward trace only: the model is traced once if fine
    _check_loss(loss_fn, params, batch, state_args, e)
    raise
  # The step traced for planning adds no sharding of its own: any found came from loss_fn.
  sharded_loss.refuse_sharding_calls(closed.jaxpr)
  n_params = len(jax.tree.leaves(params))
  n_opt = len(jax.tree.leaves(opt_state))
  n_batch = len(jax.tree.leaves(batch))
  n_state = len(jax.tree.leaves(state_args))
  traced = trace_jaxpr(
    closed, n_params, n_opt, n_batch, loss_output=n_params + n_opt, num_state=n_state
  )
  return traced, opt_state


def _check_loss(loss_fn, params, batch, state_args: tuple, step_error: Exception) -> None:
  """Names the error when tracing the train step failed because of the loss function."""
  signature = "loss_fn(params, batch, model_state)" if state_args else "loss_fn(params, batch)"
  try:
    out = jax.eval_shape(loss_fn, params, batch, *state_args)
  except Exception as e:
    sharded_loss.refuse_failed_sharding_call(e)
    raise InvalidArgumentError(
      f"{signature} failed when traced with abstract arguments. It must be a pure function of "
      "its arguments (no use of concrete values). "
      f"Got {type(e).__name__}: {e}"
    ) from e
  if state_args:
    _check_state_out(out, state_args[0], step_error)
    loss = out[0]
  else:
    loss = out
  if not (hasattr(loss, "shape") and tuple(loss.shape) == ()):
    shape = getattr(loss, "shape", None)
    got = f"a {type(loss).__name__}" if shape is None else f"shape {tuple(shape)}"
    raise NonScalarLossError(
      f"{signature} must return a scalar (reduce the per-example losses with "
      f"jnp.mean or jnp.sum). Got {got}."
    ) from step_error


def _check_state_out(out, state, step_error: Exception) -> None:
  """A stateful loss returns (loss, new state) with the state's structure, shapes and dtypes."""
  ok = isinstance(out, tuple) and len(out) == 2
  if ok:
    new = jax.tree_util.tree_structure(out[1])
    ok = new == jax.tree_util.tree_structure(state) and all(
      (tuple(a.shape), a.dtype) == (tuple(b.shape), b.dtype)
      for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(state))
    )
  if not ok:
    raise InvalidArgumentError(
      "with model_state, loss_fn(params, batch, model_state) must return (loss, new_model_state), "
      "the new state shaped like model_state (same tree, shapes and dtypes): the step carries "
      f"it to the next call. Got {jax.tree_util.tree_structure(out)}."
    ) from step_error
