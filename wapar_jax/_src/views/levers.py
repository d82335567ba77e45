"""What a plan's levers do, in words, for `explain` and `summary`: sequence, expert and
context parallelism."""

from __future__ import annotations

from wapar_jax._src.fmt import human_bytes, human_seconds

SEQUENCE_PARALLEL_NOTE = (
  "sequence parallel: the activations outside the tensor-parallel regions (norms, residual "
  "adds, embedding, logits) are split on the sequence over 'model'; each region is entered by "
  "an all-gather and left by a reduce-scatter instead of an all-reduce"
)


def sequence_parallel_line(plan) -> str:
  """The note, and how the best candidate on the same mesh without sequence parallelism
  compares (when the search priced one)."""
  c = plan.chosen
  same = [
    x
    for x in plan.candidates
    if not x.sequence_parallel and (x.data, x.model, x.storage) == (c.data, c.model, c.storage)
  ]
  return _against(SEQUENCE_PARALLEL_NOTE, c, same)


def expert_parallel_line(plan) -> str:
  """What the expert axis does, the routing it read from the program, and how the best
  candidate on the same devices without it compares."""
  c = plan.chosen
  experts = plan.details.experts if plan.details is not None else ()
  line = (
    f"expert parallel: the experts of every MoE layer split {c.expert} ways over 'expert' "
    f"(the batch's devices reused, {c.data // c.expert} x {c.expert} = data x expert), "
    "tokens sent to their experts' devices and back by all-to-all (dispatch and combine, "
    "forward and backward: 4 per layer and step); the experts' gradients are reduced over "
    "'data' only"
  )
  if experts:
    e, capacity, tokens, k = experts
    line += f"; {e} experts of {capacity} slots per routing group"
    if tokens and k:
      line += f" of {tokens} tokens, top-{k}: capacity factor C x E / (k x T) = "
      line += f"{capacity * e / (k * tokens):.3g}"
  same = [x for x in plan.candidates if x.expert == 1 and x.devices == c.devices and x.model == 1]
  return _against(line, c, same)


def context_parallel_line(plan) -> str:
  """What the context axis does, and how the best candidate on the same devices without it
  compares."""
  c = plan.chosen
  line = (
    f"context parallel: every activation split on its sequence {c.context} ways over "
    f"'context' (the batch's devices reused, {c.data // c.context} x {c.context} = data x "
    "context, so a micro-batch splits beyond its rows); attention gathers each layer's keys "
    "and values over 'context' and reduce-scatters their gradients, and each device computes "
    "its queries' rows of the scores, masked ones too (no causal imbalance)"
  )
  same = [x for x in plan.candidates if x.context == 1 and x.devices == c.devices]
  return _against(line, c, same)


def _against(line: str, chosen, without) -> str:
  """`line`, then the best of `without` (the chosen plan's devices without the lever), if any."""
  if not without:
    return line + "."
  x = without[0]
  return (
    f"{line}; without it ({x.strategy}): {human_seconds(x.step_time)} per step and "
    f"{human_bytes(x.peak_memory)} peak, against {human_seconds(chosen.step_time)} and "
    f"{human_bytes(chosen.peak_memory)}."
  )
