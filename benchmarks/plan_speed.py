"""Planning time and peak memory for GPT-2 small and a 7B GPT, cold op-cost cache; how the
time grows with the device count offered (8 to 10**6), and with many tiny parameters.

Each case is planned by the `wapar plan` command in a fresh process with an empty cache
directory, so the figures include JAX start-up, tracing, XLA cost analysis of every unique
equation and the search. Writes benchmarks/results/plan_speed.{json,md}.

    python benchmarks/plan_speed.py
    python benchmarks/plan_speed.py --baseline /tmp/orig   # also time an older checkout

`--baseline DIR` runs every case again with DIR (a checkout, e.g. `git worktree add --detach
/tmp/orig main`) first on PYTHONPATH and records its times beside these, a case that runs
past `--timeout` seconds (default 600) as "more than".
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent  # the checkout whose wapar_jax is timed
# The device counts offered to GPT-2 small: the search's cost should not grow with them.
DEVICE_COUNTS = (8, 1024, 65_536, 131_072, 1_000_000)
# Many tiny parameters: this module's `tiny_params`, 10,000 float32[4] leaves summed into a loss.
TINY_LEAVES = 10_000
CASES = [
  *(
    ("gpt2-small", ["--devices", str(n), "--profile", "h100-sxm"], {"seconds": 10.0})
    for n in DEVICE_COUNTS
  ),
  (
    "gpt2-small",
    ["--devices", str(DEVICE_COUNTS[-1]), "--profile", "h100-sxm", "--batch-size", "65536"],
    {"seconds": 10.0},
  ),
  ("plan_speed:tiny_params", ["--devices", "8", "--profile", "h100-sxm"], {"seconds": 30.0}),
  # Without the pipeline search: the sum's repeated blocks look like a layer stack to it.
  (
    "plan_speed:tiny_params",
    ["--devices", "8", "--profile", "h100-sxm", "--stages", "1"],
    {"seconds": 30.0},
  ),
  ("gpt-7b", ["--devices", "8", "--profile", "h100-sxm"], {"seconds": 60.0, "rss_gib": 4.0}),
  # The pipeline issue's cases: memory levers and pipelines both searched; a 65B model in 64.
  (
    "gpt-7b",
    ["--devices", "8", "--profile", "a100-40g-pcie", "--batch-size", "64", "--seq-len", "2048"],
    {"seconds": 30.0, "rss_gib": 4.0},
  ),
  (
    "gpt-65b-scan",
    ["--devices", "64", "--profile", "h100-sxm", "--dtype", "bfloat16"],
    {"seconds": 60.0, "rss_gib": 4.0},
  ),
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


def tiny_params():
  """(loss_fn, params, batch): TINY_LEAVES float32[4] parameters summed into a loss."""
  import jax
  import jax.numpy as jnp

  params = {f"p{i:05d}": jax.ShapeDtypeStruct((4,), jnp.float32) for i in range(TINY_LEAVES)}
  batch = {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
  return (lambda p, b: sum(jnp.sum(b["x"] * v) for v in p.values())), params, batch


def run_case(model, args, baseline=None, timeout=None):
  """The case's figures with this checkout's wapar_jax; with `baseline` (another checkout),
  only its process seconds (None past `timeout`)."""
  with tempfile.TemporaryDirectory() as cache:
    env = dict(os.environ, WAPAR_CACHE_DIR=cache)
    env["PYTHONPATH"] = os.pathsep.join([baseline or str(ROOT), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, "plan", model, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent,  # for `plan_speed:tiny_params`
        check=False,
        timeout=timeout,
      )
    except subprocess.TimeoutExpired:
      return None
    wall = time.perf_counter() - t0
  if baseline and proc.returncode == 0:
    return wall
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
    "search_seconds": plan["stats"]["search_seconds"] if plan else None,
    "device_counts_searched": plan["stats"].get("device_counts_in_sweep") if plan else None,
  }


def _commit(checkout) -> str:
  out = subprocess.run(
    ["git", "-C", checkout, "log", "-1", "--format=%h %s"], capture_output=True, text=True
  )
  return out.stdout.strip() or checkout


def _seconds(row) -> str:
  if "baseline_seconds" not in row:
    return ""
  if row["baseline_seconds"] is None:
    return f"> {row['baseline_timeout']:.0f}"
  return f"{row['baseline_seconds']:.2f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--baseline", help="an older checkout to time the same cases with")
  parser.add_argument("--timeout", type=float, default=600.0, help="per baseline case, seconds")
  opts = parser.parse_args()
  RESULTS.mkdir(exist_ok=True)
  rows = []
  for model, args, target in CASES:
    row = run_case(model, args)
    row["target"] = target
    row["meets_target"] = row["process_seconds"] <= target["seconds"] and row[
      "peak_rss_gib"
    ] <= target.get("rss_gib", float("inf"))
    if opts.baseline:
      row["baseline_seconds"] = run_case(model, args, opts.baseline, opts.timeout)
      row["baseline_timeout"] = opts.timeout
    rows.append(row)
    print(
      f"{model} {row['args']}: {row['process_seconds']:.1f} s, {row['peak_rss_gib']:.2f} GiB"
      + (f" (baseline {_seconds(row)} s)" if opts.baseline else "")
    )
  meta = {
    "python": sys.version.split()[0],
    "cpus": os.cpu_count(),
    "date": time.strftime("%Y-%m-%d"),
    "commit": _commit(str(ROOT)),
    "baseline": opts.baseline,
    "baseline_commit": _commit(opts.baseline) if opts.baseline else None,
  }
  (RESULTS / "plan_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  lines = [
    "# Planning time and peak memory (cold op-cost cache)",
    "",
    f"{meta['cpus']} CPUs, Python {meta['python']}, {meta['date']}, commit {meta['commit']}. "
    "Whole process: JAX start-up, trace, XLA cost analysis, search."
    + (
      f" Baseline: the same cases on commit {meta['baseline_commit']} (process seconds; "
      f"'> {opts.timeout:.0f}': still running when stopped)."
      if opts.baseline
      else ""
    ),
    "",
    "| model | args | process s | baseline process s | planning s | search s | "
    "device counts searched | peak RSS GiB | equations (unique) | "
    "mesh | strategy | predicted step ms | predicted peak GiB | target met |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['args']} | {r['process_seconds']:.2f} | {_seconds(r)} | "
      f"{r['planning_seconds']:.2f} | {r['search_seconds']:.2f} | "
      f"{r['device_counts_searched']} | {r['peak_rss_gib']:.2f} | "
      f"{r['equations']} ({r['unique_equations']}) | {r['mesh']} | {r['strategy']} | "
      f"{r['predicted_step_ms']:.1f} | {r['predicted_peak_gib']:.1f} | "
      f"{'yes' if r['meets_target'] else 'NO'} |"
    )
  (RESULTS / "plan_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
