"""The sections `explain` renders as text and as HTML, and the pipeline's, which only a plan with
a stage axis has."""

from __future__ import annotations

import dataclasses

from wapar_jax._src.fmt import human_bytes, human_seconds


@dataclasses.dataclass(frozen=True)
class Section:
  title: str
  notes: tuple[str, ...] = ()
  header: tuple[str, ...] = ()
  rows: tuple[tuple[str, ...], ...] = ()


# Where a stage keeps its layers' weights, by (storage, StageLayout.gather_once).
_STAGE_WEIGHTS = {
  ("fsdp", False): "split over its data axis (FSDP): each iteration gathers its chunk's",
  ("fsdp", True): "split over its data axis (FSDP), gathered once before the loop",
}


def pipeline_section(plan) -> Section:
  """Which layers each stage holds, the schedule's bubble, and the step per stage."""
  layout, c = plan.pipeline, plan.chosen
  kind = "GPipe" if layout.repeats == 1 else f"circular, {layout.repeats} repeats"
  notes = (
    f"{layout.layers} layers in {layout.stages} stages x {layout.repeats} chunks of "
    f"{layout.per_chunk} ({kind}); {layout.microbatches} micro-batches; "
    f"{layout.repeats * layout.microbatches + layout.stages - 1} pipeline iterations, bubble "
    f"{f'{100 * c.bubble:.0f}%'} of the step.",
    "every stage computes each iteration, the bubble's too (a scan of fixed length); the "
    "embedding, head and loss run data-parallel over the data and stage axes.",
    "a stage's layer weights: "
    + _STAGE_WEIGHTS.get((c.storage, layout.gather_once), "whole on each of its devices"),
    f"per device: {human_bytes(c.param_memory)} parameters, {human_bytes(c.opt_state_memory)} "
    f"optimizer state, {human_bytes(c.activation_memory)} activations and gradients; step "
    f"{human_seconds(c.step_time)} ({human_seconds(c.compute_time)} compute).",
  )
  rows = tuple(
    (str(s), "; ".join(f"{chunk[0]}-{chunk[-1]}" for chunk in layout.chunk_layers(s)))
    for s in range(layout.stages)
  )
  return Section("pipeline", notes, ("stage", "layers (per repeat)"), rows)
