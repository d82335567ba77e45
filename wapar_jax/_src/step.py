"""The single-device train step that is planned, traced and emitted: one definition for all three.

Two memory levers are applied here, so the planner traces and costs exactly what it emits:

- rematerialisation (`remat`): "none"; "weights" recomputes only the gathered weights of an FSDP
  step (`gathers.REGATHER_POLICY`: each layer's weights are gathered again in the backward pass
  instead of kept from the forward pass); "layers" checkpoints every layer — the body of each scan
  in the loss (the layer loop of an `nn.scan` model) and each repetition of a repeated block of
  equations (the layers of a Python loop) — saving only what crosses layer boundaries;
  "layers_dots" also keeps each layer's matmul outputs without batch dims (the attention score
  matrices are still recomputed). Checkpointing the loss as a whole saves nothing: its forward
  is recomputed in one piece, with the same peak, so remat is per layer or not at all.
- gradient accumulation (`microbatches` = k): the batch is split into k micro-batches and a
  `lax.scan` sums their gradients; the loss must be a mean over the batch for the result to be
  the full-batch gradient (the usual case). Micro-batch j holds rows j, j+k, j+2k, ...: a split
  that keeps each device's rows on that device when dim 0 is sharded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from wapar_jax._src import gathers
from wapar_jax.errors import InvalidArgumentError

# Per-layer rematerialisation policies: what a checkpointed layer keeps for the backward pass.
_POLICIES = {
  "weights": gathers.REGATHER_POLICY,
  "layers": jax.checkpoint_policies.nothing_saveable,
  "layers_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none", "weights", "layers", "layers_dots")
# A repeated block shorter than this many equations is an elementwise run, not a layer.
_MIN_BLOCK_EQNS = 8


def _signature(eqn) -> tuple:
  avals = lambda vs: tuple(
    (tuple(getattr(v.aval, "shape", ())), str(getattr(v.aval, "dtype", ""))) for v in vs
  )
  return eqn.primitive.name, avals(eqn.invars), avals(eqn.outvars)


def repeated_blocks(eqns) -> list[tuple[int, int]]:
  """[start, end) of each repetition of the longest run of identical equation blocks.

  Layers of a model written as a Python loop trace to the same equations (same primitives and
  shapes) one after the other; finding the tandem repeat needs no module names, so linen, NNX
  and plain jnp models are all covered. Ties go to the shortest period: one block per layer.
  """
  if len(eqns) < 2 * _MIN_BLOCK_EQNS:
    return []
  ids: dict[tuple, int] = {}
  codes = np.array([ids.setdefault(_signature(e), len(ids)) for e in eqns])
  best = (0, 0, 0)  # (covered equations, start, period)
  for period in range(_MIN_BLOCK_EQNS, len(codes) // 2 + 1):
    same = np.concatenate([[False], codes[:-period] == codes[period:], [False]])
    edges = np.flatnonzero(np.diff(same.astype(np.int8)))
    starts, stops = edges[::2], edges[1::2]
    if not len(starts):
      continue
    runs = stops - starts
    k = int(np.argmax(runs))
    repeats = runs[k] // period + 1
    covered = repeats * period
    if repeats >= 2 and covered > best[0]:
      best = (covered, int(starts[k]), period)
  covered, start, period = best
  if not covered:
    return []
  return [(start + i * period, start + (i + 1) * period) for i in range(covered // period)]


def _layer_remat(fn: Callable, policy) -> Callable:
  """`fn` recomputed in the backward pass, but only once the cotangent from above arrives.

  Plain `jax.checkpoint` leaves XLA free to schedule every layer's recomputation as early as it
  likes — on an unrolled model it hoists them all and the peak does not drop. Tying the saved
  residuals to the incoming cotangent with an optimization barrier orders each layer's
  recomputation right before its own backward.
  """
  checkpointed = jax.checkpoint(fn, policy=policy)

  @jax.custom_vjp
  def layer(*xs):
    return fn(*xs)

  def forward(*xs):
    outs, pullback = jax.vjp(checkpointed, *xs)
    return outs, pullback

  def backward(pullback, cotangents):
    pullback, cotangents = lax.optimization_barrier((pullback, cotangents))
    return pullback(cotangents)

  layer.defvjp(forward, backward)
  return layer


def without_ambient_mesh(fn: Callable) -> Callable:
  """`fn` run with no mesh set (`jax.set_mesh(None)`), whatever mesh the caller set: the planner
  traces single-device code, and under an Explicit mesh (`jax.make_mesh`'s default axis types)
  flax and optax trace shardings into the types, with `reshard`s the planner refuses."""

  @functools.wraps(fn)
  def run(*args, **kwargs):
    with jax.set_mesh(None):
      return fn(*args, **kwargs)

  return run


def free_vars(eqns) -> list:
  """Variables a run of equations reads but does not define, in order of first read."""
  defined, free = set(), []
  for eqn in eqns:
    for v in eqn.invars:
      if isinstance(v, jex.core.Var) and v not in defined and v not in free:
        free.append(v)
    defined.update(eqn.outvars)
  return free


def _checkpointed_segment(eqns, outer_later_uses, policy, debug_info):
  """A per-layer-rematerialised function computing `eqns`, with its inputs and outputs."""
  inputs = free_vars(eqns)
  outputs = [v for eqn in eqns for v in eqn.outvars if v in outer_later_uses]
  # The loss's debug info, renamed: its argument and result names do not describe a segment.
  debug_info = debug_info._replace(arg_names=None, result_paths=None).replace_func_name(
    "wapar_layer"
  )
  jaxpr = jex.core.Jaxpr([], inputs, outputs, list(eqns), debug_info=debug_info)
  segment = jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(jaxpr, []))
  return inputs, outputs, _layer_remat(lambda *xs: tuple(segment(*xs)), policy)


def loss_program(loss_fn: Callable, args: tuple, cache: dict | None = None, tag: str = "loss"):
  """(The loss's ClosedJaxpr over the leaves of `args`, the tree of its outputs), memoised in
  `cache` by `tag` and input types (planning traces it per variant; the tag tells the user's
  loss from the same loss with gathers hooked in)."""
  key = (
    tag,
    jax.tree.structure(args),
    tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args)),
  )
  if cache is None or key not in cache:
    closed, out_shape = jax.make_jaxpr(loss_fn, return_shape=True)(*args)
    program = closed, jax.tree.structure(out_shape)
    if cache is None:
      return program
    cache[key] = program
  return cache[key]


def loss_jaxpr(loss_fn: Callable, params, batch, cache: dict | None = None, tag: str = "loss"):
  """The ClosedJaxpr of `loss_fn(params, batch)` (`loss_program`'s, memoised likewise)."""
  return loss_program(loss_fn, (params, batch), cache, tag)[0]


def _remat_layers(loss_fn: Callable, policy, cache: dict | None, tag: str) -> Callable:
  """`loss_fn` with each layer checkpointed: scan bodies, and repeated blocks of equations."""

  def rematted(*args):
    closed, out_tree = loss_program(loss_fn, args, cache, tag)
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, jax.tree.leaves(args)))
    read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
    eqns = list(jaxpr.eqns)
    blocks = dict(repeated_blocks(eqns))
    i = 0
    while i < len(eqns):
      if i in blocks:
        end = blocks[i]
        later = {v for e in eqns[end:] for v in e.invars if isinstance(v, jex.core.Var)}
        later.update(v for v in jaxpr.outvars if isinstance(v, jex.core.Var))
        inputs, outputs, fn = _checkpointed_segment(eqns[i:end], later, policy, jaxpr.debug_info)
        env.update(zip(outputs, fn(*[read(v) for v in inputs])))
        i = end
        continue
      eqn = eqns[i]
      if eqn.primitive.name == "scan" and eqn.params["length"] > 1:
        body = eqn.params["jaxpr"]
        body_fn = jax.checkpoint(jex.core.jaxpr_as_fun(body), policy=policy)
        eqn = eqn.replace(
          params={
            **eqn.params,
            "jaxpr": jax.make_jaxpr(body_fn)(*[v.aval for v in body.jaxpr.invars]),
          }
        )
      outs = gathers.rebind(eqn, [read(v) for v in eqn.invars])
      env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
      i += 1
    return jax.tree.unflatten(out_tree, [read(v) for v in jaxpr.outvars])

  return rematted


def _with_remat(loss_fn: Callable, remat: str, cache: dict | None, tag: str) -> Callable:
  if remat == "none":
    return loss_fn
  if remat in _POLICIES:
    return _remat_layers(loss_fn, _POLICIES[remat], cache, tag)
  raise InvalidArgumentError(f"remat must be one of {REMAT_CHOICES}. Got {remat!r}.")


def has_layers(loss_fn: Callable, args: tuple, cache: dict | None = None) -> bool:
  """Whether per-layer remat has anything to checkpoint in `loss_fn(*args)`: a scan or a
  repeated block."""
  eqns = loss_program(loss_fn, args, cache)[0].jaxpr.eqns
  return bool(repeated_blocks(eqns)) or any(
    e.primitive.name == "scan" and e.params["length"] > 1 for e in eqns
  )


def split_rows(x, k: int):
  """[B, ...] -> [k, B / k, ...]; micro-batch j holds rows j, j + k, ...: a split that keeps
  each device's rows on that device when dim 0 is sharded."""
  if x.shape[0] % k:
    raise InvalidArgumentError(
      f"the batch dim {x.shape[0]} does not split into {k} micro-batches; use a micro-batch "
      f"count that divides it. Got microbatches={k}."
    )
  return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)


def _split_microbatches(batch, k: int):
  return jax.tree.map(lambda x: split_rows(x, k), batch)


def planned_loss(
  loss_fn: Callable,
  *,
  remat: str = "none",
  gather: Callable | None = None,
  jaxpr_cache: dict | None = None,
) -> Callable:
  """`loss_fn` with `gather(i, x, dropped)` applied to parameter leaf i at each of its uses
  (`gathers.at_use`) and the remat policy applied per layer: the loss the step differentiates."""
  tag = "loss"
  if gather is not None:
    raw = lambda fn, args: loss_program(fn, args, jaxpr_cache)
    loss_fn = gathers.at_use(loss_fn, gather, raw)
    tag = "gathered"
  return _with_remat(loss_fn, remat, jaxpr_cache, tag)


def loss_and_grads(
  loss_fn: Callable,
  *,
  remat: str = "none",
  microbatches: int = 1,
  gather: Callable | None = None,
  hold_grads: Callable | None = None,
  jaxpr_cache: dict | None = None,
  with_state: bool = False,
) -> Callable:
  """`(params, batch) -> (loss, grads)` with the given remat policy and accumulation,
  `gather(i, x)` applied to parameter leaf i at each of its uses (`gathers.at_use`), and
  `hold_grads(tree)` to the accumulated gradients after every micro-batch (ZeRO-2: the emitted
  step keeps them split as the optimizer state is).

  `with_state`: the loss is `loss_fn(params, batch, state) -> (loss, new state)` (a model's
  batch statistics, PRNG keys) and this returns `(params, batch, state) -> ((loss, new state),
  grads)`; micro-batches see the state in turn, as consecutive steps would.
  """
  loss_fn = planned_loss(loss_fn, remat=remat, gather=gather, jaxpr_cache=jaxpr_cache)
  if with_state:
    return _accumulated(jax.value_and_grad(loss_fn, has_aux=True), microbatches, hold_grads)
  value_and_grad = jax.value_and_grad(loss_fn)
  if microbatches == 1:
    return value_and_grad

  def no_state(params, batch, state):
    loss, grads = value_and_grad(params, batch)
    return (loss, state), grads

  accumulated = _accumulated(no_state, microbatches, hold_grads)

  def accumulated_without_state(params, batch):
    (loss, _), grads = accumulated(params, batch, ())
    return loss, grads

  return accumulated_without_state


def _accumulated(value_and_grad: Callable, microbatches: int, hold_grads) -> Callable:
  """`value_and_grad(params, batch, state) -> ((loss, state), grads)` over `microbatches`
  micro-batches: gradients summed in a `lax.scan`, the state carried from one to the next."""
  if microbatches == 1:
    return value_and_grad
  if not isinstance(microbatches, int) or microbatches < 1:
    raise InvalidArgumentError(f"microbatches must be a positive int. Got {microbatches!r}.")
  hold = hold_grads or (lambda tree: tree)

  def accumulated(params, batch, state):
    def body(carry, micro):
      loss_sum, grad_sum, state = carry
      (loss, state), grads = value_and_grad(params, micro, state)
      grad_sum = hold(jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads))
      return (loss_sum + loss.astype(jnp.float32), grad_sum, state), None

    # Accumulate in float32 whatever the parameter dtype: bf16 sums of many micro-batches drift.
    zeros = hold(
      jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    )
    (loss_sum, grad_sum, state), _ = lax.scan(
      body, (jnp.zeros((), jnp.float32), zeros, state), _split_microbatches(batch, microbatches)
    )
    grads = jax.tree.map(lambda g, p: (g / microbatches).astype(p.dtype), grad_sum, params)
    return (loss_sum / microbatches, state), grads

  return accumulated


def _mean_loss(loss_fn: Callable, microbatches: int, with_state: bool) -> Callable:
  """`(params, batch[, state]) -> loss` as the step reports it: the float32 mean over the
  micro-batches (a stateful loss's state is read, not advanced: this prices other params)."""
  value = (lambda p, b, s: loss_fn(p, b, s)[0]) if with_state else loss_fn
  if microbatches == 1:
    return value

  def mean_loss(params, batch, *state):
    per_micro = lambda micro: value(params, micro, *state).astype(jnp.float32)  # noqa: E731
    return lax.map(per_micro, _split_microbatches(batch, microbatches)).mean()

  return mean_loss


def make_train_step(
  loss_fn: Callable,
  optimizer: optax.GradientTransformation,
  *,
  remat: str = "none",
  microbatches: int = 1,
  gather: Callable | None = None,
  hold_grads: Callable | None = None,
  jaxpr_cache: dict | None = None,
  with_state: bool = False,
) -> Callable:
  """`(params, opt_state, batch) -> (params, opt_state, loss)`; sharding enters only through
  `gather` and `hold_grads` (see `loss_and_grads`). An optimizer that takes extra args is given
  `value` (the loss), `grad` and `value_fn` (the loss of other params on this batch).

  `with_state`: `loss_fn(params, batch, state) -> (loss, new state)`, and the step is
  `(params, opt_state, batch, state) -> (params, opt_state, loss, new state)`.
  """
  grads_of = loss_and_grads(
    loss_fn,
    remat=remat,
    microbatches=microbatches,
    gather=gather,
    hold_grads=hold_grads,
    jaxpr_cache=jaxpr_cache,
    with_state=with_state,
  )
  value_of = _mean_loss(loss_fn, microbatches, with_state)

  def update(params, opt_state, batch, loss, grads, *state):
    extra = {}
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
      # optax's names for what line searches (L-BFGS) and plateau schedules read.
      extra = dict(value=loss, grad=grads, value_fn=lambda p: value_of(p, batch, *state))
    updates, opt_state = optimizer.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state

  if not with_state:

    def train_step(params, opt_state, batch):
      loss, grads = grads_of(params, batch)
      params, opt_state = update(params, opt_state, batch, loss, grads)
      return params, opt_state, loss

    return train_step

  def stateful_train_step(params, opt_state, batch, state):
    (loss, new_state), grads = grads_of(params, batch, state)
    params, opt_state = update(params, opt_state, batch, loss, grads, state)
    return params, opt_state, loss, new_state

  return stateful_train_step
