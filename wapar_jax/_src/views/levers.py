"""What a plan's levers do, in words, for `explain` and `summary`: sequence parallelism."""

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
  if not same:
    return SEQUENCE_PARALLEL_NOTE + "."
  x = same[0]
  return (
    f"{SEQUENCE_PARALLEL_NOTE}; without it ({x.strategy}): {human_seconds(x.step_time)} per "
    f"step and {human_bytes(x.peak_memory)} peak, against {human_seconds(c.step_time)} and "
    f"{human_bytes(c.peak_memory)}."
  )
