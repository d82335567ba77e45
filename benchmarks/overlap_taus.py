"""Kendall tau of predicted vs compiled step time, with and without the overlap model.

Reads suite case files written by `suite.py` on this branch (each row carries compute, comm
and exposed-comm time, predicted and compiled) and ranks every case's priced rows four ways:
before (both step times compute + comm), after (both compute + exposed comm: the planner's
windows and the compiled module's dataflow), and the two mixes. Writes
benchmarks/results/overlap.{json,md}.

    XLA_FLAGS=--xla_force_host_platform_device_count=16 python benchmarks/suite.py \\
      --cases gpt2-small@8xh100 vgg16@4xtitanxp --fresh --out /tmp/suite_overlap
    python benchmarks/overlap_taus.py /tmp/suite_overlap
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import kendalltau

RESULTS = Path(__file__).parent / "results"


def _summed(figures: dict) -> float:
  return figures["compute_time"] + figures["comm_time"]


def case_taus(case: dict) -> dict:
  rows = [r for r in case["rows"] if "error" not in r and "predicted" in r]
  p_before = [_summed(r["predicted"]) for r in rows]
  p_after = [r["predicted"]["step_time"] for r in rows]
  c_before = [_summed(r["compiled"]) for r in rows]
  c_after = [r["compiled"]["step_time"] for r in rows]
  tau = lambda x, y: float(kendalltau(x, y).statistic) if len(x) >= 3 else None
  return {
    "case": case["case"],
    "rows": len(rows),
    "before": tau(p_before, c_before),
    "after": tau(p_after, c_after),
    "ranking_unchanged_vs_compiled_overlap": tau(p_before, c_after),
    "plan": next((f"{r['strategy']} {r['mesh']}" for r in rows if r["name"] == "plan"), "-"),
    "exposed": {
      r["name"]: {
        "predicted": r["predicted"].get("exposed_comm_time"),
        "compiled": r["compiled"].get("exposed_comm_time"),
        "comm_predicted": r["predicted"]["comm_time"],
        "comm_compiled": r["compiled"]["comm_time"],
      }
      for r in rows
    },
  }


def markdown(taus: list[dict]) -> str:
  f = lambda x: "-" if x is None else f"{x:.2f}"
  lines = [
    "# The overlap model against compiled truth",
    "",
    "Kendall tau of predicted vs compiled step time over each suite case's priced rows (the "
    "plan and the forced baselines). *before*: both sides compute + comm; *after*: both "
    "compute + exposed comm (the planner's windows on the traced step, the compiled module's "
    "own dataflow); *old ranking*: the planner without overlap against compiled truth with it.",
    "",
    "| case | rows | plan | before | after | old ranking vs compiled with overlap |",
    "|---|---:|---|---:|---:|---:|",
  ]
  for t in taus:
    lines.append(
      f"| {t['case']} | {t['rows']} | {t['plan']} | {f(t['before'])} | {f(t['after'])} | "
      f"{f(t['ranking_unchanged_vs_compiled_overlap'])} |"
    )
  known = [t for t in taus if t["before"] is not None and t["after"] is not None]
  if known:
    mean = lambda k: sum(t[k] for t in known) / len(known)
    lines += [
      "",
      f"Mean over {len(known)} cases: before {mean('before'):.2f}, after {mean('after'):.2f}, "
      f"old ranking vs compiled with overlap {mean('ranking_unchanged_vs_compiled_overlap'):.2f}; "
      f">= 0.9 before in {sum(t['before'] >= 0.9 for t in known)}, after in "
      f"{sum(t['after'] >= 0.9 for t in known)}.",
    ]
  lines += ["", "## Exposed communication per row (ms)", ""]
  lines += ["| case | row | comm pred | exposed pred | comm compiled | exposed compiled |"]
  lines += ["|---|---|---:|---:|---:|---:|"]
  ms = lambda x: "-" if x is None else f"{x * 1e3:.2f}"
  for t in taus:
    for name, e in t["exposed"].items():
      lines.append(
        f"| {t['case']} | {name} | {ms(e['comm_predicted'])} | {ms(e['predicted'])} | "
        f"{ms(e['comm_compiled'])} | {ms(e['compiled'])} |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("suite_out", help="the --out folder of a suite.py run")
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  files = sorted((Path(args.suite_out) / "suite_cases").glob("*.json"))
  taus = [case_taus(json.loads(p.read_text())) for p in files]
  out = Path(args.out)
  (out / "overlap.json").write_text(json.dumps(taus, indent=1))
  (out / "overlap.md").write_text(markdown(taus))
  print(markdown(taus).split("## Exposed")[0])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
