"""Megatron-style sequence parallelism (SP) in the emitted step, found from dimension classes.

With tensor parallelism alone every device holds the whole residual stream: the norms, residual
adds and the embedding run replicated over the model axis, and each row-parallel matmul ends in
an all-reduce. With SP those activations are split on the sequence over the model axis, so a
tensor-parallel region is entered by an all-gather and left by a reduce-scatter (the same ring
bytes as the all-reduce) and the activations outside the regions take 1/tp of the memory.

No names are read: the loss is traced on its own, and an equation's output is split on the
sequence when its dims hold the batch class, a sequence class (a non-batch dim of a batch leaf
that no weight has: the T of `tokens [B, T]`, not an MLP's input features) and no class the
plan splits on the model axis (a TP region's heads or MLP hidden); an output with the batch
class and a model-split class (inside a region) is held to its split on that class. XLA then
gathers each region's input and reduce-scatters its output, since the neighbours on both sides
are constrained.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.extend as jex
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wapar_jax._src import gathers
from wapar_jax._src.step import loss_program
from wapar_jax._src.trace.builder import trace_jaxpr

MODEL = "model"


def _axes(entry) -> tuple:
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def sequence_specs(closed, param_specs: list, batch_specs: list, n_state: int, model: int):
  """{id of an equation: the PartitionSpec its output is constrained to}: split on the
  sequence outside the tensor-parallel regions, on the model-split class inside them. The
  equations are the loss's own and those of the scans in it (a loop over layers), at any
  depth; those inside other calls (jnp's jitted helpers, remat) are left to XLA.

  `param_specs` / `batch_specs`: one spec per leaf, in the order of the loss's inputs (params,
  batch, then `n_state` model-state leaves). The batch dim keeps its batch leaves' split; the
  first sequence dim is split on the model axis where it divides by `model`.
  """
  n_params, n_batch = len(param_specs), len(batch_specs)
  traced = trace_jaxpr(closed, n_params, 0, n_batch, loss_output=0, num_state=n_state)
  classes = traced.var_classes
  model_split = {
    classes[v][d]
    for v, spec in zip(traced.param_vars, param_specs)
    for d, entry in enumerate(spec)
    if MODEL in _axes(entry)
  }
  batch_classes = traced.batch_classes
  sequence = traced.sequence_classes
  batch_entry = next((spec[0] for spec in batch_specs if len(spec)), None)
  specs = {}
  for op in traced.ops:
    if len(op.out_vars) != 1:
      continue
    (out,) = op.out_vars
    dims, shape = classes[out], traced.var_shape[out]
    # Attention's scores and their softmax (the sequence twice) are left to XLA, which splits
    # them on the heads from q and k: pinned inside a scan over layers, they made XLA keep a
    # third [T, T] stack for the backward pass (compiled: gpt2-small-scan, data 4 x model 2,
    # 15.24 GiB against 12.99 GiB left free, and a 9% slower step).
    if not (batch_classes & set(dims)) or sum(c in sequence for c in dims) > 1:
      continue
    # A region's activation is held to its own split (heads, MLP hidden): left free, XLA
    # resolves the two splits meeting at a region's edge by splitting the attention's backward
    # on the sequence and all-reducing whole weight gradients (compiled: GPT-2 medium, TP 8,
    # 1.6x the bytes of TP alone and 28% more peak memory than with the regions pinned).
    split = next((d for d, c in enumerate(dims) if c in model_split), None)
    if split is None:
      split = next((d for d, c in enumerate(dims) if c in sequence and shape[d] % model == 0), None)
    if split is None:
      continue
    entries = [batch_entry if c in batch_classes else None for c in dims]
    entries[split] = MODEL
    specs[id(op.eqn)] = P(*entries)
  return specs


def sequence_split(loss_fn: Callable, mesh: Mesh, param_specs, batch_specs) -> Callable:
  """`loss_fn(params, batch, *state)` with the activations outside the tensor-parallel regions
  constrained to a split on the sequence over the mesh's model axis (see the module doc)."""
  flat_params = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  flat_batch = jax.tree.leaves(batch_specs, is_leaf=lambda x: isinstance(x, P))
  model = mesh.shape[MODEL]
  return constrained(
    loss_fn,
    mesh,
    lambda closed, n_state: sequence_specs(closed, flat_params, flat_batch, n_state, model),
  )


def constrained(loss_fn: Callable, mesh: Mesh, specs_of: Callable, into_calls: bool = False):
  """`loss_fn(params, batch, *state)` traced on its own and evaluated with the outputs that
  `specs_of(closed loss, model-state leaves)` names ({id of an equation: spec}; a key
  (id of an equation, operand position) constrains that operand where the equation reads it)
  constrained. `into_calls`: inside jitted helpers too (jnp's einsum), inlined."""

  def run(params, batch, *state):
    closed, out_tree = loss_program(loss_fn, (params, batch, *state))
    specs = specs_of(closed, len(jax.tree.leaves(state)))
    args = jax.tree.leaves((params, batch, *state))
    outs = evaluate_constrained(closed.jaxpr, closed.consts, args, specs, mesh, into_calls)
    return jax.tree.unflatten(out_tree, outs)

  return run


_CALLS = frozenset({"pjit", "jit"})


def evaluate_constrained(
  jaxpr, consts, args, specs: dict, mesh: Mesh, into_calls: bool = False
) -> list:
  """Evaluates `jaxpr` with the output (or operand) of each equation in `specs` constrained to
  its spec, inside the bodies of its scans too (and of its jitted calls, `into_calls`)."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  hold = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  for eqn in jaxpr.eqns:
    params = eqn.params
    name = eqn.primitive.name
    ins = [read(v) for v in eqn.invars]
    ins = [hold(x, specs[id(eqn), i]) if (id(eqn), i) in specs else x for i, x in enumerate(ins)]
    if into_calls and name in _CALLS and constrains(params["jaxpr"].jaxpr, specs, into_calls):
      body = params["jaxpr"]
      outs = evaluate_constrained(body.jaxpr, body.consts, ins, specs, mesh, into_calls)
      env.update(zip(eqn.outvars, outs))
      continue
    if name == "scan" and constrains(params["jaxpr"].jaxpr, specs, into_calls):
      body = params["jaxpr"]
      body_fn = lambda *xs, body=body: evaluate_constrained(
        body.jaxpr, body.consts, xs, specs, mesh, into_calls
      )
      params = {**params, "jaxpr": jax.make_jaxpr(body_fn)(*[v.aval for v in body.jaxpr.invars])}
    outs = gathers.rebind(eqn, ins, params)
    if id(eqn) in specs:
      outs = hold(outs, specs[id(eqn)])
    env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
  return [read(v) for v in jaxpr.outvars]


def constrains(jaxpr, specs: dict, into_calls: bool = False) -> bool:
  """Whether `specs` names an equation of `jaxpr` (or of a scan or, `into_calls`, a jitted
  call in it) or one of its operands."""
  inner = ("scan", *_CALLS) if into_calls else ("scan",)
  return any(
    id(e) in specs or any((id(e), i) in specs for i in range(len(e.invars))) for e in jaxpr.eqns
  ) or any(
    constrains(e.params["jaxpr"].jaxpr, specs, into_calls)
    for e in jaxpr.eqns
    if e.primitive.name in inner
  )
