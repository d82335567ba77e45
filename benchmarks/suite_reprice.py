"""The suite's predictions again, without compiling: has the planner's model of a row moved?

For every kept suite row that the planner priced (the plan, the forced baselines, the device
sweep) this plans the step again exactly as `suite.py` does and sets the new predicted figures
(peak memory as XLA:CPU compiles the step, as `verify` reports it) beside the ones stored with
the row. With the emitted step unchanged, the compiled figures are unchanged too, so equal
predictions mean equal prediction errors: a 30-minute suite run is not needed to show that.

    python benchmarks/suite_reprice.py            # every kept case (about 5 min on 2 cores)
    python benchmarks/suite_reprice.py --cases gpt2-small@8xh100
    python benchmarks/suite_reprice.py --report   # the tables again from suite_reprice.json
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")

import argparse
import json
import math
import statistics
import sys
import time

import jax
import optax
import suite

import wapar_jax as wap
from wapar_jax._src.compilers import XLA_CPU
from wapar_jax._src.files import write_text_atomic
from wapar_jax._src.verify import FIGURES
from wapar_jax._src.verify.predicted_memory import peak_under

OUT_JSON = suite.RESULTS / "suite_reprice.json"
OUT_MD = suite.RESULTS / "suite_reprice.md"
# Summing the same costs in another order moves only the last digits.
RTOL = 1e-6


def _predicted(ex, tx, profile, strategy: str, devices: int) -> dict | None:
  try:
    plan = suite.plan_for(ex, tx, profile, strategy, devices)
  except wap.WaparError:
    return None
  p = plan.predicted
  figures = {f: getattr(p, f) for f in FIGURES}
  peak = peak_under(plan, XLA_CPU, profile)  # None for a pipeline: its own figure then
  figures["peak_memory"] = p.peak_memory if peak is None else peak
  # Beside the figures compared: the overlap model's exposed part, to rank by it against the
  # compiled module's own.
  figures["exposed_comm_time"] = p.exposed_comm_time
  return {
    "figures": figures,
    "mesh": dict(plan.mesh_shape),
    "strategy": plan.strategy,
    "model_split": list(plan.model_split),
  }


def _rows(case_result: dict):
  """(row name, strategy, devices, stored row, of the device sweep) of every row the planner
  priced."""
  for row in case_result["rows"]:
    if "predicted" in row:
      yield (
        row["name"],
        "auto" if row["name"] == "plan" else row["name"],
        case_result["devices"],
        row,
        False,
      )
  for row in case_result.get("sweep", []):
    if "predicted" in row:
      yield row["name"], "dp", row["devices"], row, True


def reprice_case(case: suite.Case, stored: dict) -> list[dict]:
  ex, _ = suite._example(case)
  profile = wap.load_profile(suite.SETTINGS[case.setting].profile)
  tx = optax.adamw(1e-3)
  out = []
  for name, strategy, devices, row, in_sweep in _rows(stored):
    new = _predicted(ex, tx, profile, strategy, devices)
    entry = {
      "case": case.name,
      "row": name,
      "stored": row["predicted"],
      "compiled": row["compiled"],
      "in_sweep": in_sweep,
      "repriced": None if new is None else new["figures"],
      "same_plan": new is not None
      and new["mesh"] == row["mesh"]
      and new["strategy"] == row["strategy"]
      and new["model_split"] == row.get("model_split", new["model_split"]),
    }
    changes = {}
    if new is not None:
      for f in FIGURES:
        a, b = row["predicted"][f], new["figures"][f]
        if not math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12):
          changes[f] = (b - a) / a if a else float("inf")
    entry["changes"] = changes
    out.append(entry)
  return out


def _compute(figures: dict) -> float:
  return figures["compute_time"]


def _median_error(rows: list[dict], of, which: str) -> str:
  errs = [abs(of(e[which]) / of(e["compiled"]) - 1) for e in rows if of(e["compiled"])]
  return f"{statistics.median(errs):.1%}" if errs else "-"


def _summed(figures: dict) -> float:
  return figures["compute_time"] + figures["comm_time"]


def _overlapped(figures: dict) -> float | None:
  """Compute + the exposed collectives; None for a row compiled before they were read."""
  exposed = figures.get("exposed_comm_time")
  return None if exposed is None else figures["compute_time"] + exposed


def accuracy_table(entries: list[dict]) -> list[str]:
  """Per case, against the stored compiled truth (rows whose plan is unchanged): Kendall tau of
  compute + every collective on both sides (how the search ranks), stored predictions beside
  repriced ones; the tau with the overlap model on both sides (compute + exposed collectives);
  and the median errors of compute and of that sum."""
  lines = [
    "| case | rows | tau stored | tau repriced | tau overlapped, repriced | median compute err "
    "stored | repriced | median step err stored | repriced |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  taus: dict[str, list[float]] = {"stored": [], "repriced": [], "overlapped": []}
  for case in dict.fromkeys(e["case"] for e in entries):
    rows = [
      e
      for e in entries
      if e["case"] == case and e["same_plan"] and not e["in_sweep"] and e["repriced"]
    ]
    summed = [_summed(e["compiled"]) for e in rows]
    found = {
      "stored": suite.kendall_tau([_summed(e["stored"]) for e in rows], summed),
      "repriced": suite.kendall_tau([_summed(e["repriced"]) for e in rows], summed),
      "overlapped": None
      if any(_overlapped(e["compiled"]) is None for e in rows)
      else suite.kendall_tau(
        [_overlapped(e["repriced"]) for e in rows], [_overlapped(e["compiled"]) for e in rows]
      ),
    }
    for which, tau in found.items():
      if tau is not None:
        taus[which].append(tau)
    cells = ["-" if found[w] is None else f"{found[w]:.2f}" for w in found]

    errors = [
      _median_error(rows, of, which)
      for of in (_compute, _summed)
      for which in ("stored", "repriced")
    ]
    lines.append(f"| {case} | {len(rows)} | {' | '.join(cells + errors)} |")
  lines.append("")
  for which, found in taus.items():
    if found:
      lines.append(
        f"- {which}: Kendall tau >= 0.9 in {sum(t >= 0.9 for t in found)} of {len(found)} "
        f"cases, mean {statistics.mean(found):.2f}"
      )
  return lines


def markdown(entries: list[dict], meta: dict) -> str:
  moved = [e for e in entries if e["changes"] or not e["same_plan"]]
  lines = [
    "# Suite predictions, repriced",
    "",
    f"jax {meta['jax']}, {meta['date']}. Every suite row the planner priced, planned again "
    "and compared with the predicted figures stored with the row (`suite.json`); peak memory "
    "as XLA:CPU compiles the step. `python benchmarks/suite_reprice.py`.",
    "",
    f"- rows repriced: {len(entries)}",
    "- rows whose chosen mesh, strategy and model split are the same: "
    f"{sum(e['same_plan'] for e in entries)}",
    f"- rows with every figure within {RTOL:g} relative: "
    f"{sum(not e['changes'] and e['same_plan'] for e in entries)}",
    "",
  ]
  if moved:
    lines += ["| case | row | changed figures |", "|---|---|---|"]
    for e in moved:
      what = ", ".join(f"{f} {c:+.2%}" for f, c in e["changes"].items()) or "another plan"
      lines.append(f"| {e['case']} | {e['row']} | {what} |")
  else:
    lines.append("No row moved.")
  lines += ["", "## Against the stored compiled truth", ""] + accuracy_table(entries)
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="*", help="case names (model@setting); default all kept")
  parser.add_argument("--report", action="store_true", help="only rebuild the table from JSON")
  args = parser.parse_args(argv)
  if args.report:
    kept = json.loads(OUT_JSON.read_text())
    write_text_atomic(OUT_MD, markdown(kept["rows"], kept["meta"]))
    print(f"wrote {OUT_MD}")
    return 0
  if jax.device_count() < max(s.devices for s in suite.SETTINGS.values()):
    print(
      "needs 16 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=16", file=sys.stderr
    )
    return 2
  kept = {c["case"]: c for c in json.loads((suite.RESULTS / "suite.json").read_text())["cases"]}
  cases = [c for c in suite.CASES if c.name in kept and (not args.cases or c.name in args.cases)]
  entries = []
  for case in cases:
    t0 = time.perf_counter()
    found = reprice_case(case, kept[case.name])
    entries += found
    moved = sum(bool(e["changes"]) or not e["same_plan"] for e in found)
    print(
      f"{case.name:28s} {len(found)} rows, {moved} moved, {time.perf_counter() - t0:.0f} s",
      flush=True,
    )
  meta = {"jax": jax.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  write_text_atomic(OUT_JSON, json.dumps({"meta": meta, "rows": entries}, indent=1))
  write_text_atomic(OUT_MD, markdown(entries, meta))
  print(f"wrote {OUT_JSON} and {OUT_MD}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
