"""The layer stack of a loss: the run of identical layers a pipeline splits into stages.

Found from the loss's jaxpr, with no module names: the longest `scan` over layers (an `nn.scan`
/ `nnx.scan` model, whose parameters are stacked), or else the longest run of identical equation
blocks (the layers of a Python loop, `step.repeated_blocks`). Either way the stack becomes one
layer function `body(consts, carry, layer params) -> carry` applied `length` times: what flows
from layer to layer is the carry (the residual stream), what every layer reads alike the
consts (a mask, position biases, an encoder's output), and each layer's own parameters one
slice of a stacked array.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend as jex

from wapar_jax._src import gathers
from wapar_jax._src.compat import scan_operand_counts
from wapar_jax._src.step import free_vars, repeated_blocks


@dataclasses.dataclass(frozen=True)
class LayerStack:
  """`length` layers computing equations [start, stop) of the loss's top-level jaxpr.

  Attributes:
    body: `(*consts, *carry, *layer_params) -> carry` of one layer.
    consts: the loss's variables (or literals) every layer reads.
    carry: the loss's variables that enter the first layer.
    params: per layer parameter of the body, the flat indices of the loss's parameter leaves
      that hold it: one stacked leaf (`stacked`, a scan) or one leaf per layer (a Python loop).
    outputs: the loss's variables the last layer's carry becomes.
  """

  start: int
  stop: int
  length: int
  body: jex.core.ClosedJaxpr
  consts: tuple
  carry: tuple
  params: tuple[tuple[int, ...], ...]
  outputs: tuple
  stacked: bool


class NoLayerStack(ValueError):
  """Why a loss has no layer stack a pipeline can split (the message says what was found)."""


def find(jaxpr: jex.core.Jaxpr, n_params: int) -> LayerStack:
  """The loss's layer stack; raises NoLayerStack saying why there is none."""
  scans = [
    (i, e)
    for i, e in enumerate(jaxpr.eqns)
    if e.primitive.name == "scan" and e.params["length"] > 1
  ]
  if scans:
    i, eqn = max(scans, key=lambda s: (s[1].params["length"], len(s[1].params["jaxpr"].eqns)))
    return _from_scan(jaxpr, i, eqn, n_params)
  blocks = repeated_blocks(jaxpr.eqns)
  if blocks:
    return _from_blocks(jaxpr, blocks, n_params)
  raise NoLayerStack("the loss has no scan over layers and no repeated block of equations")


def same_stack(jaxpr: jex.core.Jaxpr, n_params: int, like: LayerStack) -> LayerStack:
  """The stack of `jaxpr` at the equations where `like` (the same loss traced for other shapes)
  has its own; a tandem repeat found afresh could start at another equation of the period."""
  names = [e.primitive.name for e in jaxpr.eqns]
  if len(names) < like.stop:
    raise NoLayerStack("the loss traces to other equations for a micro-batch")
  if like.stacked:
    eqn = jaxpr.eqns[like.start]
    if eqn.primitive.name != "scan":
      raise NoLayerStack("the loss traces to other equations for a micro-batch")
    return _from_scan(jaxpr, like.start, eqn, n_params)
  period = (like.stop - like.start) // like.length
  blocks = [(like.start + i * period, like.start + (i + 1) * period) for i in range(like.length)]
  first = names[blocks[0][0] : blocks[0][1]]
  if any(names[a:b] != first for a, b in blocks):
    raise NoLayerStack("the loss traces to other equations for a micro-batch")
  return _from_blocks(jaxpr, blocks, n_params)


def _param_index(jaxpr, n_params: int) -> dict:
  return {v: k for k, v in enumerate(jaxpr.invars[:n_params])}


def _read_outside(jaxpr, start: int, stop: int) -> set:
  """Variables read by equations outside [start, stop) and by the loss's outputs."""
  read = {
    v
    for k, e in enumerate(jaxpr.eqns)
    if not start <= k < stop
    for v in e.invars
    if isinstance(v, jex.core.Var)
  }
  return read | {v for v in jaxpr.outvars if isinstance(v, jex.core.Var)}


def _from_scan(jaxpr, i: int, eqn, n_params: int) -> LayerStack:
  n_consts, n_carry = scan_operand_counts(eqn.params)
  if eqn.params["reverse"]:
    raise NoLayerStack("the scan over layers runs in reverse")
  owner = _param_index(jaxpr, n_params)
  xs = eqn.invars[n_consts + n_carry :]
  if not all(isinstance(v, jex.core.Var) and v in owner for v in xs):
    raise NoLayerStack("the scan over layers slices arrays that are not parameters")
  outside = _read_outside(jaxpr, i, i + 1)
  if any(v in outside for v in eqn.outvars[n_carry:]):
    raise NoLayerStack("the scan over layers stacks per-layer outputs the loss reads")
  if any(v in outside for v in xs):
    raise NoLayerStack("a stacked layer parameter is also read outside the layer loop")
  body = eqn.params["jaxpr"]
  # The body without its per-layer outputs: only the carry flows between stages.
  inner = body.jaxpr.replace(outvars=body.jaxpr.outvars[:n_carry])
  return LayerStack(
    start=i,
    stop=i + 1,
    length=eqn.params["length"],
    body=jex.core.ClosedJaxpr(inner, body.consts),
    consts=tuple(eqn.invars[:n_consts]),
    carry=tuple(eqn.invars[n_consts : n_consts + n_carry]),
    params=tuple((owner[v],) for v in xs),
    outputs=tuple(eqn.outvars[:n_carry]),
    stacked=True,
  )


def _from_blocks(jaxpr, blocks: list[tuple[int, int]], n_params: int) -> LayerStack:
  """The stack of a Python loop of layers: block k's inputs are, position by position, the same
  variable in every block (a const), an output of block k - 1 (the carry), or a parameter of
  its own (one leaf per layer)."""
  owner = _param_index(jaxpr, n_params)
  runs = [jaxpr.eqns[a:b] for a, b in blocks]
  made = [[v for e in run for v in e.outvars] for run in runs]
  position = [{v: p for p, v in enumerate(m)} for m in made]
  frees = [free_vars(run) for run in runs]
  if len({len(f) for f in frees}) != 1:
    raise NoLayerStack("the repeated blocks read different numbers of inputs")
  consts, carry_in, carry_from, params, param_pos = [], [], [], [], []
  for j, first in enumerate(frees[0]):
    column = [f[j] for f in frees]
    if all(v is first for v in column):
      consts.append(j)
    elif all(column[k] in position[k - 1] for k in range(1, len(runs))):
      sources = {position[k - 1][column[k]] for k in range(1, len(runs))}
      if len(sources) != 1:
        raise NoLayerStack("the repeated blocks pass their outputs on in different orders")
      carry_in.append(j)
      carry_from.append(sources.pop())
    elif all(v in owner for v in column) and len(set(column)) == len(column):
      params.append(tuple(owner[v] for v in column))
      param_pos.append(j)
    else:
      raise NoLayerStack(
        "a repeated block reads a value that is neither shared, passed on by "
        "the block before, nor a parameter of its own"
      )
  start, stop = blocks[0][0], blocks[-1][1]
  outside = _read_outside(jaxpr, start, stop)
  finals = [made[-1][p] for p in carry_from]
  for k, m in enumerate(made):
    leaked = [v for v in m if v in outside and not (k == len(made) - 1 and v in finals)]
    if leaked:
      raise NoLayerStack("a layer's output other than what it passes on is read after the layers")
  if any(leaf in {owner[v] for v in outside if v in owner} for p in params for leaf in p):
    raise NoLayerStack("a layer parameter is also read outside the layers")
  free0 = frees[0]
  inputs = [free0[j] for j in consts] + [free0[j] for j in carry_in] + [free0[j] for j in param_pos]
  # The loss's debug info, renamed: its argument and result names do not describe a layer.
  debug_info = jaxpr.debug_info._replace(arg_names=None, result_paths=None)
  body = jex.core.Jaxpr(
    [], inputs, [made[0][p] for p in carry_from], list(runs[0]), debug_info=debug_info
  )
  return LayerStack(
    start=start,
    stop=stop,
    length=len(blocks),
    body=jex.core.ClosedJaxpr(body, []),
    consts=tuple(free0[j] for j in consts),
    carry=tuple(free0[j] for j in carry_in),
    params=tuple(params),
    outputs=tuple(finals),
    stacked=False,
  )


def evaluate_around(closed: jex.core.ClosedJaxpr, args: list, stack: LayerStack, run_stack):
  """The loss's outputs with the stack's equations replaced by `run_stack(consts, carry) ->
  final carry`; `args` are the flat (params, batch) leaves, None where only the stack reads one."""
  jaxpr = closed.jaxpr
  env = dict(zip(jaxpr.constvars, closed.consts))
  env.update((v, x) for v, x in zip(jaxpr.invars, args) if x is not None)
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]  # noqa: E731
  for k, eqn in enumerate(jaxpr.eqns):
    if k == stack.start:
      outs = run_stack([read(v) for v in stack.consts], [read(v) for v in stack.carry])
      env.update(zip(stack.outputs, outs))
    if stack.start <= k < stack.stop:
      continue
    outs = gathers.rebind(eqn, [read(v) for v in eqn.invars])
    env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
  return [read(v) for v in jaxpr.outvars]


def without_stack(loss_fn, params, batch):
  """(`rest_loss(rest_leaves, batch)`, stack, flat indices of the rest leaves): the loss with
  its layers skipped (each passes its input on unchanged), over the parameter leaves the layers
  do not own. The planner prices a pipeline's embedding, head and loss with it."""
  closed = jax.make_jaxpr(loss_fn)(params, batch)
  n_params = len(jax.tree.leaves(params))
  stack = find(closed.jaxpr, n_params)
  owned = {leaf for p in stack.params for leaf in p}
  rest = tuple(k for k in range(n_params) if k not in owned)

  def rest_loss(rest_leaves, batch):
    args: list = [None] * n_params
    for k, x in zip(rest, rest_leaves):
      args[k] = x
    skip = lambda consts, carry: carry  # noqa: E731
    return evaluate_around(closed, args + jax.tree.leaves(batch), stack, skip)[0]

  return rest_loss, stack, rest
