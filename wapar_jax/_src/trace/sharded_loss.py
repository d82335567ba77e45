"""A loss that already shards or communicates is refused by name: wapar_jax plans single-device
code and adds the sharding constraints and collectives itself.

jax reports such calls in one of two ways. A call that traces (a constraint to a NamedSharding, a
shard_map given its mesh) leaves its primitive in the jaxpr. A call that needs a mesh or a
shard_map around it (a constraint to a bare PartitionSpec, a psum outside shard_map) fails to
trace with jax's own message, which is recognised here by its words.
"""

from __future__ import annotations

import re

import jax.extend as jex

from wapar_jax._src.trace.source import source_line
from wapar_jax.errors import ShardedLossError

# Primitive in the traced loss -> the call the user wrote. Collectives trace only inside a
# shard_map (elsewhere they fail, see below), so the shard_map is what shows.
SHARDING_PRIMITIVES = {
  "sharding_constraint": "jax.lax.with_sharding_constraint",
  "shard_map": "jax.shard_map",
  "reshard": "jax.sharding.reshard",
}
# Words of jax's tracing errors -> what the loss used; the first match names it.
TRACE_FAILURES = (
  (
    re.compile(r"unbound axis name"),
    "a collective over a named axis (psum, pmean, all_gather, ppermute, axis_index, ...)",
  ),
  (re.compile(r"with_sharding_constraint"), "jax.lax.with_sharding_constraint"),
  (
    re.compile(r"mesh context|context mesh|mesh in context"),
    "a call that needs a mesh (jax.shard_map, with_sharding_constraint or reshard to a "
    "PartitionSpec, ...)",
  ),
)
_FIX = (
  "wapar_jax plans the sharding of a single-device loss and adds the constraints and "
  "collectives itself: remove it from loss_fn (a psum or pmean over the batch becomes a mean "
  "over the whole batch), plan, and run plan.train_step()"
)


def refuse_sharding_calls(jaxpr) -> None:
  """Raises ShardedLossError at the first equation of `jaxpr` (nested ones included) that
  shards or communicates."""
  for eqn in jaxpr.eqns:
    call = SHARDING_PRIMITIVES.get(eqn.primitive.name)
    if call is not None:
      raise ShardedLossError(
        f"loss_fn already shards the step: it calls {call} at {source_line(eqn)}. {_FIX}. "
        f"Got the primitive {eqn.primitive.name!r} in the traced loss."
      )
    for sub in jex.core.jaxprs_in_params(eqn.params):
      refuse_sharding_calls(sub)


def refuse_failed_sharding_call(error: Exception) -> None:
  """Raises ShardedLossError if tracing the loss failed on a sharding call or a collective."""
  for words, call in TRACE_FAILURES:
    if words.search(str(error)):
      raise ShardedLossError(
        f"loss_fn uses {call}, which cannot run in a single-device step. {_FIX}. "
        f"Got {type(error).__name__}: {error}"
      ) from error
