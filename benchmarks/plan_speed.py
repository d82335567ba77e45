"""Planning time and peak memory for GPT-2 small and a 7B GPT, cold op-cost cache.

Each model is planned by the `wapar plan` command in a fresh process with an empty cache
directory, so the figures include JAX start-up, tracing, XLA cost analysis of every unique
equation and the search. Writes benchmarks/results/plan_speed.{json,md}.

    python benchmarks/plan_speed.py
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = [
  ("gpt2-small", ["--devices", "8", "--profile", "h100-sxm"], {"seconds": 5.0}),
  ("gpt-7b", ["--devices", "8", "--profile", "h100-sxm"], {"seconds": 60.0, "rss_gib": 4.0}),
  (
    "gpt-7b",
    ["--devices", "8", "--profile", "h100-sxm", "--dtype", "bfloat16"],
    {"seconds": 60.0, "rss_gib": 4.0},
  ),
]

_DRIVER = """
import json, resource, sys, time
t0 = time.perf_counter()
from wapar_jax.cli import main
import contextlib, io
out = io.StringIO()
with contextlib.redirect_stdout(out):
  code = main(sys.argv[1:] + ["--json"])
wall = time.perf_counter() - t0
plan = json.loads(out.getvalue()) if code == 0 else None
print(json.dumps({"code": code, "wall_seconds": wall, "plan": plan,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_case(model, args):
  with tempfile.TemporaryDirectory() as cache:
    env = dict(os.environ, WAPAR_CACHE_DIR=cache)
    proc = subprocess.run(
      [sys.executable, "-c", _DRIVER, "plan", model, *args],
      capture_output=True,
      text=True,
      env=env,
      check=False,
    )
  if proc.returncode != 0:
    raise RuntimeError(f"{model} {args} failed:\n{proc.stderr[-3000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  plan = result["plan"]
  return {
    "model": model,
    "args": " ".join(args),
    "process_seconds": result["wall_seconds"],
    "planning_seconds": plan["stats"]["total_seconds"] if plan else None,
    "peak_rss_gib": result["peak_rss_bytes"] / 2**30,
    "equations": plan["stats"]["ops"] if plan else None,
    "unique_equations": plan["stats"]["unique_ops"] if plan else None,
    "mesh": plan["mesh_shape"] if plan else None,
    "strategy": plan["strategy"] if plan else None,
    "predicted_step_ms": plan["predicted"]["step_time"] * 1e3 if plan else None,
    "predicted_peak_gib": plan["predicted"]["peak_memory"] / 2**30 if plan else None,
  }


def main():
  RESULTS.mkdir(exist_ok=True)
  rows = []
  for model, args, target in CASES:
    row = run_case(model, args)
    row["target"] = target
    row["meets_target"] = row["process_seconds"] <= target["seconds"] and row[
      "peak_rss_gib"
    ] <= target.get("rss_gib", float("inf"))
    rows.append(row)
    print(f"{model} {row['args']}: {row['process_seconds']:.1f} s, {row['peak_rss_gib']:.2f} GiB")
  meta = {
    "python": sys.version.split()[0],
    "cpus": os.cpu_count(),
    "date": time.strftime("%Y-%m-%d"),
  }
  (RESULTS / "plan_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  lines = [
    "# Planning time and peak memory (cold op-cost cache)",
    "",
    f"{meta['cpus']} CPUs, Python {meta['python']}, {meta['date']}. Whole process: "
    "JAX start-up, trace, XLA cost analysis, search.",
    "",
    "| model | args | process s | planning s | peak RSS GiB | equations (unique) | "
    "mesh | strategy | predicted step ms | predicted peak GiB | target met |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['args']} | {r['process_seconds']:.2f} | "
      f"{r['planning_seconds']:.2f} | {r['peak_rss_gib']:.2f} | "
      f"{r['equations']} ({r['unique_equations']}) | {r['mesh']} | {r['strategy']} | "
      f"{r['predicted_step_ms']:.1f} | {r['predicted_peak_gib']:.1f} | "
      f"{'yes' if r['meets_target'] else 'NO'} |"
    )
  (RESULTS / "plan_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
