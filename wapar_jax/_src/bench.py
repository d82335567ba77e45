"""The plan against the baseline families for one workload and machine, predicted and compiled.

`bench` plans the workload with strategy "auto" and with each baseline family
(`search.STRATEGIES`), and for each plan sets the predicted step time and peak memory beside
the compiled truth: the emitted step compiled for the plan's mesh on virtual CPU devices
(`Plan.verify`), its step priced from the compiled module on the same profile. A family
without a plan becomes a row that says why.

Example:
  >>> rows = bench(lambda strategy: wap.plan(..., strategy=strategy), lambda p: p.verify())
  >>> print(table(rows))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from wapar_jax._src.fmt import human_bytes, human_seconds
from wapar_jax._src.fmt import table as text_table
from wapar_jax._src.search import STRATEGIES
from wapar_jax.errors import NoFeasiblePlanError, WaparError

# The first sentence of a reason is kept under the table; --json has it whole.
_SHORT_REASON = 140


@dataclasses.dataclass(frozen=True)
class BenchRow:
  """One family's plan, predicted and compiled (per device, per step).

  Attributes:
    family: the strategy asked for ("auto" is the planner's own choice).
    strategy: what the plan is (a family can end up on one device: "single").
    chosen: this row is the planner's choice (the "auto" row, and families that plan the same).
    fits: the prediction fits device memory; None without a plan.
    compiled_step / compiled_peak: from the compiled module (None: not compiled).
    predicted_peak_as_compiled: the plan's peak predicted under the buffer rules of the
      compiler verified with (XLA:CPU on CPU devices), the figure compiled_peak checks.
    note: why a family has no plan or no compile, or that it planned the same as another.
  """

  family: str
  strategy: str | None = None
  chosen: bool = False
  devices: int | None = None
  mesh_shape: dict[str, int] | None = None
  predicted_step: float | None = None
  predicted_peak: float | None = None
  fits: bool | None = None
  compiled_step: float | None = None
  compiled_peak: float | None = None
  predicted_peak_as_compiled: float | None = None
  compile_seconds: float | None = None
  note: str = ""

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def bench(
  make_plan: Callable,
  verify: Callable | None,
  families: Sequence[str] = STRATEGIES,
  progress: Callable | None = None,
) -> list[BenchRow]:
  """A row per family: `make_plan(family)` -> Plan, then `verify(plan)` -> Verification.

  Args:
    make_plan: plans the workload for one strategy (the command line's plans a baseline on
      every device offered, as it would be run by hand, and auto on the count it picks).
    verify: compiles a plan (`Plan.verify`); None: predictions only.
    families: strategies to plan, "auto" first.
    progress: `progress(phase, items)` yielding items, as `wapar_jax.plan` takes it.

  Returns:
    One BenchRow per family, in `families` order. Errors of one family (no plan fits, no plan
    of that family exists, the compile failed) become its row's note.
  """
  rows, verified, auto = [], {}, None
  for family in progress("bench", families) if progress else families:
    try:
      plan = make_plan(family)
    except NoFeasiblePlanError as e:
      c = e.closest
      rows.append(
        BenchRow(
          family,
          strategy=getattr(c, "strategy", None),
          devices=getattr(c, "devices", None),
          mesh_shape=getattr(c, "mesh_shape", None),
          predicted_step=getattr(c, "step_time", None),
          predicted_peak=getattr(c, "peak_memory", None),
          fits=False,
          note=f"{type(e).__name__}: {e}",
        )
      )
      continue
    except WaparError as e:
      rows.append(BenchRow(family, note=f"{type(e).__name__}: {e}"))
      continue
    if family == "auto":
      auto = plan.chosen
    same = plan.chosen == auto
    note = "the same plan as auto" if same and family != "auto" else ""
    compiled = None
    if verify is not None:
      # Families that plan alike compile alike: one compile per distinct plan.
      if plan.chosen not in verified:
        try:
          verified[plan.chosen] = verify(plan)
        except WaparError as e:
          verified[plan.chosen] = e
      compiled = verified[plan.chosen]
      if isinstance(compiled, WaparError):
        note = f"not compiled: {type(compiled).__name__}: {compiled}"
        compiled = None
    rows.append(
      BenchRow(
        family,
        strategy=plan.strategy,
        chosen=same,
        devices=plan.num_devices,
        mesh_shape=dict(plan.mesh_shape),
        predicted_step=plan.predicted.step_time,
        predicted_peak=plan.predicted.peak_memory,
        fits=plan.chosen.fits,
        compiled_step=compiled.compiled.step_time if compiled else None,
        compiled_peak=compiled.compiled.peak_memory if compiled else None,
        predicted_peak_as_compiled=compiled.predicted.peak_memory if compiled else None,
        compile_seconds=compiled.compile_seconds if compiled else None,
        note=note,
      )
    )
  return rows


def _short(note: str) -> str:
  first = note.split(". ")[0].split("\n")[0]
  return first if len(first) <= _SHORT_REASON else first[: _SHORT_REASON - 3] + "..."


def table(rows: Sequence[BenchRow]) -> str:
  """The rows as text, `*` marking the planner's choice; each note's first sentence, and what
  "compiled" means, below."""

  def fig(x, human):
    return "-" if x is None else human(x)

  body = [
    [
      r.family + (" *" if r.chosen else ""),
      fig(r.devices, str),
      fig(r.mesh_shape, lambda m: ", ".join(f"{k}={v}" for k, v in m.items())),
      r.strategy or "-",
      fig(r.predicted_step, human_seconds),
      fig(r.compiled_step, human_seconds),
      fig(r.predicted_peak, human_bytes),
      fig(r.compiled_peak, human_bytes),
      fig(r.fits, lambda f: "yes" if f else "NO"),
    ]
    for r in rows
  ]
  header = [
    "family",
    "devices",
    "mesh",
    "strategy",
    "predicted step",
    "compiled step",
    "predicted peak",
    "compiled peak",
    "fits",
  ]
  notes = [f"  {r.family}: {_short(r.note)}" for r in rows if r.note]
  notes.append("* the planner's choice")
  if any(r.compiled_step is not None for r in rows):
    notes.append(
      "compiled: the emitted step compiled by XLA for the plan's mesh on virtual CPU devices; "
      "its step priced on the plan's profile, its peak from XLA:CPU's memory analysis"
    )
  return "\n".join([text_table(header, body), *notes])
