"""Context parallelism (CP) in the emitted step: every activation split on its sequence, the
keys and values gathered where attention reads them (MaxText's all-gather context parallelism).

The batch leaves are split on the batch over the mesh's data axis and on the sequence over its
context axis. Inside the loss (and the jitted helpers and scans in it: the einsums of
attention are jnp's), each output holding the batch is constrained to that split on its first
sequence dim (a query's row of the scores `[B, H, Tq, Tk]`), and each operand that attention
reads whole (`trace.context`: the keys in `q . k`, the values in `probs . v`) is constrained
whole on the sequence where it is read: XLA all-gathers it over the context axis there, and
the backward pass reduce-scatters its cotangent. Without the constraints XLA is free to split
the scores on the keys and reduce the softmax across devices.
"""

from __future__ import annotations

from collections.abc import Callable

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from wapar_jax._src.emit.sequence import constrained
from wapar_jax._src.trace.builder import trace_jaxpr
from wapar_jax._src.trace.context import find_attention

CONTEXT, DATA = "context", "data"


def context_specs(closed, n_params: int, n_batch: int, n_state: int, cp: int) -> dict:
  """{id of an equation: the spec of its output; (id, operand position): the spec of that
  operand} for the loss's outputs holding the batch and the operands attention reads whole."""
  traced = trace_jaxpr(closed, n_params, 0, n_batch, loss_output=0, num_state=n_state)
  attention = find_attention(traced)
  classes, shapes = traced.var_classes, traced.var_shape
  batch = traced.batch_classes

  def spec(v, split: bool):
    entries = [None] * len(classes[v])
    lead = next(d for d, c in enumerate(classes[v]) if c in batch)
    entries[lead] = DATA
    if split:
      d = next(
        (d for d, c in enumerate(classes[v]) if c in attention.sequence and shapes[v][d] % cp == 0),
        None,
      )
      if d is not None:
        entries[d] = CONTEXT
    return P(*entries)

  specs = {}
  for op in traced.ops:
    if len(op.out_vars) == 1 and batch & set(classes[op.out_vars[0]]):
      specs[id(op.eqn)] = spec(op.out_vars[0], split=True)
  for index, pos in attention.operands:
    op = traced.ops[index]
    specs[id(op.eqn), pos] = spec(op.in_vars[pos], split=False)
  return specs


def context_split(loss_fn: Callable, mesh: Mesh, n_params: int, n_batch: int) -> Callable:
  """`loss_fn(params, batch, *state)` with its activations split on the sequence over the
  mesh's context axis and attention's keys and values gathered (see the module doc)."""
  cp = mesh.shape[CONTEXT]
  return constrained(
    loss_fn,
    mesh,
    lambda closed, n_state: context_specs(closed, n_params, n_batch, n_state, cp),
    into_calls=True,
  )
