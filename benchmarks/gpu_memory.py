"""Predicted peak memory against GPU XLA's compiled memory, for every row of the suite.

The suite compiles each plan and baseline on virtual CPU devices. XLA:CPU partitions like GPU
XLA but allocates differently in places: it has no select-and-scatter emitter and expands every
max-pool gradient into a scatter over s32 index arrays, buffers a GPU never allocates. This
script compiles the same rows with GPU XLA for the rows' real device counts on a machine with a
single GPU: JAX's mock GPU client (`mock_num_gpu_processes`) presents N devices, one per mocked
process, that compile an N-device SPMD module (NCCL mocked) and are never run. Each compile is
a plain `lowered.compile()`, what a GPU user gets (no XLA options, remat barriers as GPU XLA
treats them), but for the row's card: GPU XLA's scheduler may spend memory up to a limit taken
from the compiling GPU (80% of it, times `xla_gpu_memory_limit_slop_factor`); the slop factor
scales that limit to the row's card. Measured, it moves three rows of 113 (GPT-7B's FSDP plan
with dots-saving remat 78.6 -> 71.3 GiB, GPT-1.3B's per-layer remat plan 12.23 -> 12.95, GPT-7B
16-way tensor parallel 244.8 -> 241.3): what those remat plans keep beyond the prediction is
GPU XLA's order of the backward pass, not the limit.

    python benchmarks/gpu_memory.py prepare               # on CPU: plan every suite row
    python benchmarks/gpu_memory.py compile --workers 4   # on a GPU machine
    python benchmarks/gpu_memory.py compile --dump alexnet@8xp100:tp --dump-to DIR
    python benchmarks/gpu_memory.py report                # tables from the compiled parts
    python benchmarks/gpu_memory.py reprice               # on CPU: the current model's figures

`prepare` plans each row as `suite.py` does and keeps the plan (specs, remat, micro-batches),
its predicted peak and the suite's XLA:CPU peak in `results/gpu_memory_plans.json`, so the GPU
machine only compiles. `compile` writes `results/gpu_memory_part<k>.jsonl` line by line (a
run cut short keeps what it compiled); `report` writes `results/gpu_memory.{json,md}`.
`--dump` keeps GPU XLA's buffer assignment (live ranges, the buffers at the peak) of the named
rows in `DIR/<case>_<row>/`, to see what a prediction missed. `reprice` prices each compiled
row's kept step again with the memory model as it is now
(`results/gpu_memory_repriced.json`, which `report` then uses), so the comparison follows the
model without another GPU session.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
PLANS = RESULTS / "gpu_memory_plans.json"
REPRICED = RESULTS / "gpu_memory_repriced.json"
TARGET = 0.15  # the suite's memory target: |predicted / compiled - 1| <= 15%
# GPU XLA rematerialises a module that exceeds the compiling GPU's memory until it fits (its
# `hlo_rematerialization` pass, at about 100 GiB on an H200): such a compile is another
# program, not a check. Compiles disable the pass; rows compiled with it (or clamped by it)
# are kept out of the comparison.
CLAMPED_AT = 95 * 2**30
# Cases in the order they are compiled: a run cut short has the CNN rows (the ones XLA:CPU
# allocates differently) and one case per model family first.
ORDER = (
  "alexnet@8xp100",
  "alexnet@4xtitanxp",
  "alexnet-b16@4xtitanxp",
  "vgg16@4xtitanxp",
  "vgg16@8xp100",
  "resnet50@8xa100-pcie",
  "gpt2-small@8xh100",
  "vit-b16@8xa100-pcie",
  "bert-large@8xh100",
  "t5-base@8xh100",
  "moe-gpt@8xh100",
  "gpt2-small-scan@8xh100",
  "gpt-1.3b@4xtitanxp",
  "gpt2-medium@8xh100",
  "gpt2-small@8xa100-pcie",
  "gpt2-large@8xa100-pcie",
  "gpt-1.3b@8xh100",
  "gpt2-small@2x8xh100",
  "gpt2-small@v5e-16",
  "gpt-7b@8xh100",
  "gpt-7b@2x8xh100",
)


def prepare(cases: list[str] | None) -> None:
  sys.path.insert(0, str(HERE))
  import optax
  import suite

  import wapar_jax as wap
  from wapar_jax._src.compilers import XLA_CPU
  from wapar_jax._src.verify.predicted_memory import peak_under

  entries = []
  for case in sorted(suite.CASES, key=lambda c: ORDER.index(c.name) if c.name in ORDER else 99):
    if cases and case.name not in cases:
      continue
    setting = suite.SETTINGS[case.setting]
    profile = wap.load_profile(setting.profile)
    ex, kwargs = suite._example(case)
    tx = optax.adamw(1e-3)
    cpu = _cpu_peaks(case.name)
    for strategy in ("auto",) + suite.BASELINES:
      forced = strategy != "auto"
      name = strategy if forced else "plan"
      try:
        plan = suite.plan_for(ex, tx, profile, strategy, setting.devices)
      except wap.WaparError as e:
        print(f"{case.name:24s} {name:6s} no plan: {e}", flush=True)
        continue
      data = json.loads(plan.to_json())
      data["candidates"] = []  # the compile needs the chosen layout only
      data.pop("details", None)
      entries.append(
        {
          "case": case.name,
          "row": name,
          "model": case.model,
          "example": kwargs,
          "plan": data,
          "predicted_peak": plan.predicted.peak_memory,
          "predicted_peak_xla_cpu": peak_under(plan, XLA_CPU, profile),
          "cpu_peak": cpu.get(name),
        }
      )
      print(
        f"{case.name:24s} {name:6s} {plan.strategy:6s} {dict(plan.mesh_shape)} "
        f"predicted {plan.predicted.peak_memory / 2**30:.2f} GiB",
        flush=True,
      )
  RESULTS.mkdir(exist_ok=True)
  from wapar_jax._src.files import write_text_atomic

  write_text_atomic(PLANS, json.dumps(entries) + "\n")
  print(f"{len(entries)} rows -> {PLANS}")


def _cpu_peaks(case: str) -> dict:
  path = RESULTS / "suite_cases" / f"{case}.json"
  if not path.exists():
    return {}
  rows = json.loads(path.read_text())["rows"]
  return {r["name"]: r["compiled"]["peak_memory"] for r in rows if "compiled" in r}


def compile_rows(
  workers: int,
  budget_s: float,
  mock_devices: int,
  only: list[str],
  dump: list[str],
  dump_to: str | None,
) -> None:
  """Starts `workers` processes, each with its own mock client, taking every workers-th row;
  the rows in `dump` are dumped under `dump_to`."""
  # Compiles only: no worker takes GPU memory up front, and none autotunes kernels on the GPU
  # (a timing run may share it); cuBLAS / cuDNN then run their default algorithms.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
    " --xla_disable_hlo_passes=rematerialization"
  ).strip()
  if dump:
    if not dump_to:
      raise SystemExit("--dump needs --dump-to DIR")
    env["GPU_MEMORY_DUMP"] = json.dumps({"rows": dump, "to": str(Path(dump_to).resolve())})
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        __file__,
        "worker",
        str(k),
        str(workers),
        str(budget_s),
        str(mock_devices),
        *only,
      ],
      env=env,
    )
    for k in range(workers)
  ]
  codes = [p.wait() for p in procs]
  print(f"workers exited {codes}")


def worker(index: int, workers: int, budget_s: float, mock_devices: int, only: list[str]) -> None:
  import jax

  # Before the backend starts: N mocked processes with one GPU each (this machine's GPU).
  jax.config.update("mock_num_gpu_processes", mock_devices)
  import optax

  from wapar_jax import examples, load_profile
  from wapar_jax._src.plan import Plan
  from wapar_jax._src.verify import lower_plan_step
  from wapar_jax._src.verify.compiled import memory_breakdown

  entries = [
    e for e in json.loads(PLANS.read_text()) if not only or f"{e['case']}:{e['row']}" in only
  ][index::workers]
  compiling_gpu_bytes = _gpu_memory_bytes()
  dump = json.loads(os.environ.get("GPU_MEMORY_DUMP", '{"rows": []}'))
  devices = jax.devices()
  out = RESULTS / f"gpu_memory_part{index}.jsonl"
  started = time.perf_counter()
  with open(out, "w") as f:
    for e in entries:
      if time.perf_counter() - started > budget_s:
        print(f"worker {index}: budget spent, {e['case']} {e['row']} and later not compiled")
        break
      record = {
        k: e.get(k) for k in ("case", "row", "predicted_peak", "predicted_peak_xla_cpu", "cpu_peak")
      }
      plan = Plan.from_json(json.dumps(e["plan"]))
      record.update(
        mesh=dict(plan.mesh_shape),
        strategy=plan.strategy,
        remat=plan.chosen.remat,
        microbatches=plan.chosen.microbatches,
      )
      t0 = time.perf_counter()
      try:
        ex = examples.get_example(e["model"], **e["example"])
        lowered = lower_plan_step(
          plan, devices[: plan.num_devices], ex.loss_fn, optax.adamw(1e-3), ex.params, ex.batch
        )
        # As a GPU user with the row's card compiles it (dumping changes nothing compiled).
        row = f"{e['case']}:{e['row']}"
        options = _scheduler_limit_for(
          load_profile(e["plan"]["profile"]).memory_bytes, compiling_gpu_bytes
        )
        if row in dump["rows"]:
          options.update(
            xla_dump_to=f"{dump['to']}/{row.replace(':', '_').replace('@', '_')}",
            xla_dump_hlo_module_re="train_step",
          )
        compiled = lowered.compile(compiler_options=options or None)
        record["scheduler_slop"] = options.get("xla_gpu_memory_limit_slop_factor")
        memory, notes = memory_breakdown(compiled)
        record.update(
          gpu_peak=memory.peak,
          argument=memory.argument,
          output=memory.output,
          alias=memory.alias,
          temp=memory.temp,
          notes=notes,
        )
      except Exception as err:  # one failing row is reported, the rest still compile
        record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
      record["compile_seconds"] = time.perf_counter() - t0
      f.write(json.dumps(record) + "\n")
      f.flush()
      peak = record.get("gpu_peak")
      print(
        f"[{index}] {e['case']:24s} {e['row']:6s} "
        + (
          f"gpu {peak / 2**30:7.2f} GiB predicted {e['predicted_peak'] / 2**30:7.2f} "
          f"({e['predicted_peak'] / peak - 1:+.1%})"
          if peak
          else record.get("error", "")
        )
        + f"  {record['compile_seconds']:.0f} s",
        flush=True,
      )
  meta = {
    "jax": jax.__version__,
    "device": jax.local_devices()[0].device_kind,
    "platform": devices[0].platform,
    "mock_devices": len(devices),
  }
  (RESULTS / f"gpu_memory_meta{index}.json").write_text(json.dumps(meta) + "\n")


def _gpu_memory_bytes() -> float | None:
  """The compiling GPU's memory (the mock devices report none of their own)."""
  try:
    out = subprocess.run(
      ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
      capture_output=True,
      text=True,
      check=True,
    ).stdout
    return float(out.split()[0]) * 2**20
  except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
    return None


def _scheduler_limit_for(card_bytes: float, compiling_gpu_bytes: float | None) -> dict:
  """XLA options that give the scheduler the row's card's memory limit, not the compiling
  GPU's (GPU XLA's default slop factor is 95%; it takes an integer percentage)."""
  if not compiling_gpu_bytes or card_bytes >= compiling_gpu_bytes:
    return {}
  return {"xla_gpu_memory_limit_slop_factor": max(1, round(95 * card_bytes / compiling_gpu_bytes))}


def _compiled_rows() -> tuple[list[dict], dict]:
  """The compiled rows and their machine: from the workers' parts, or, where this checkout has
  none (they stay on the GPU machine's copy), from the last report."""
  rows, meta = [], {}
  for part in sorted(RESULTS.glob("gpu_memory_part*.jsonl")):
    for line in part.read_text().splitlines():
      with contextlib.suppress(ValueError):  # a worker stopped mid-line
        rows.append(json.loads(line))
  for m in sorted(RESULTS.glob("gpu_memory_meta*.json")):
    meta = json.loads(m.read_text())
  if not rows and (RESULTS / "gpu_memory.json").exists():
    last = json.loads((RESULTS / "gpu_memory.json").read_text())
    rows, meta = last["rows"], last["meta"]
  return rows, meta


def reprice() -> None:
  """The predicted peaks of every compiled row's step under the current memory model."""
  import dataclasses

  import optax

  import wapar_jax as wap
  from wapar_jax import examples
  from wapar_jax._src import compilers, search
  from wapar_jax._src.cost.xla import CostCache, step_costs
  from wapar_jax._src.files import write_text_atomic
  from wapar_jax._src.trace import trace_train_step
  from wapar_jax._src.tree import abstract, leaf_paths, path_str

  kept = {(e["case"], e["row"]): e for e in json.loads(PLANS.read_text())}
  ranked, out = {}, []
  for r in _compiled_rows()[0]:
    if "gpu_peak" not in r or r["gpu_peak"] >= CLAMPED_AT:
      continue
    e = kept[(r["case"], r["row"])]
    chosen = e["plan"]["chosen"]
    key = (r["case"], chosen["remat"], chosen["microbatches"])
    if key not in ranked:
      ex = examples.get_example(e["model"], **e["example"])
      params, batch = abstract(ex.params), abstract(ex.batch)
      traced, _ = trace_train_step(
        ex.loss_fn, params, batch, optax.adamw(1e-3), remat=key[1], microbatches=key[2]
      )
      paths = [path_str(k) for k in leaf_paths(params)]
      costs = step_costs(traced, CostCache())
      profile = dataclasses.replace(wap.load_profile(e["plan"]["profile"]), memory_bytes=1e18)
      ranked[key] = [
        search.search(
          search.build_space(traced, costs, paths, rules=rules, remat=key[1], microbatches=key[2]),
          profile,
          e["plan"]["devices_offered"],
        )
        for rules in (compilers.for_profile(profile.kind), compilers.XLA_CPU)
      ]

    def same(candidates, chosen=chosen, r=r):
      return [
        c
        for c in candidates
        if c.strategy == chosen["strategy"]
        and c.mesh_shape == r["mesh"]
        and list(c.model_groups) == chosen["model_groups"]
      ]

    target, cpu = (same(c) for c in ranked[key])
    if not target:
      print(f"{r['case']:24s} {r['row']:6s} its step is no longer a candidate", flush=True)
      continue
    out.append(
      {
        "case": r["case"],
        "row": r["row"],
        "predicted_peak": target[0].peak_memory,
        "predicted_peak_xla_cpu": cpu[0].peak_memory,
      }
    )
    print(
      f"{r['case']:24s} {r['row']:6s} predicted {target[0].peak_memory / 2**30:7.2f} GiB, "
      f"GPU compiled {r['gpu_peak'] / 2**30:7.2f} "
      f"({target[0].peak_memory / r['gpu_peak'] - 1:+.1%})",
      flush=True,
    )
  write_text_atomic(REPRICED, json.dumps(out, indent=1) + "\n")
  print(f"{len(out)} rows -> {REPRICED}")


def report() -> None:
  import numpy as np

  from wapar_jax._src.files import write_text_atomic
  from wapar_jax._src.fmt import human_bytes

  rows, meta = _compiled_rows()
  repriced = {}
  if REPRICED.exists():
    repriced = {(p["case"], p["row"]): p for p in json.loads(REPRICED.read_text())}
  for r in rows:
    r.update(
      {
        k: v
        for k, v in repriced.get((r["case"], r["row"]), {}).items()
        if k.startswith("predicted")
      }
    )
  order = {c: i for i, c in enumerate(ORDER)}
  names = ("plan", "dp", "fsdp", "zero1", "tp", "dp_tp")
  rows.sort(key=lambda r: (order.get(r["case"], 99), names.index(r["row"])))
  for r in rows:
    if "gpu_peak" in r:
      r["gpu_error"] = r["predicted_peak"] / r["gpu_peak"] - 1
      if r.get("cpu_peak"):
        # XLA:CPU's compile against the prediction under XLA:CPU's rules (older files: one
        # prediction for both).
        r["cpu_error"] = (r.get("predicted_peak_xla_cpu") or r["predicted_peak"]) / r[
          "cpu_peak"
        ] - 1
  clamped = [r for r in rows if r.get("gpu_peak", 0) >= CLAMPED_AT]
  done = [r for r in rows if "gpu_error" in r and r.get("gpu_peak", 0) < CLAMPED_AT]
  within = [r for r in done if abs(r["gpu_error"]) <= TARGET]
  cpu_missed = [r for r in done if "cpu_error" in r and abs(r["cpu_error"]) > TARGET]
  summary = {
    "rows_compiled": len(done),
    "rows_clamped": len(clamped),
    "rows_failed": len(rows) - len(done) - len(clamped),
    "within_15pct_gpu": len(within),
    "median_abs_error_gpu": float(np.median([abs(r["gpu_error"]) for r in done])) if done else None,
    "cpu_misses_within_on_gpu": sum(abs(r["gpu_error"]) <= TARGET for r in cpu_missed),
    "cpu_misses_compiled": len(cpu_missed),
  }
  RESULTS.mkdir(exist_ok=True)
  write_text_atomic(
    RESULTS / "gpu_memory.json",
    json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n",
  )
  dry_run = meta.get("platform", "gpu") != "gpu"
  lines = [
    "# Predicted peak memory vs GPU XLA's compiled memory",
    "",
    *(
      ["**Dry run on CPU devices: these are XLA:CPU compiles, not GPU ones.**", ""]
      if dry_run
      else []
    ),
    f"GPU XLA (jax {meta.get('jax', '?')}, {meta.get('device', '?')}) compiling each suite row "
    f"for its mesh on mock GPU devices ({meta.get('mock_devices', '?')} mocked, one real GPU; "
    "compiled, never run). Peak = `memory_analysis()` arguments + outputs - aliases + "
    "temporaries, per device. Error = predicted / compiled - 1. *predicted*: the plan's peak, "
    "under GPU XLA's buffer rules; the XLA:CPU columns: the same row predicted under "
    "XLA:CPU's rules and compiled by the suite."
    + (
      " Each compile's scheduler had the memory limit of the row's card "
      "(`xla_gpu_memory_limit_slop_factor`), not the compiling GPU's."
      if any(r.get("scheduler_slop") for r in rows)
      else ""
    )
    + (
      " Predictions re-priced by the memory model as of the last `reprice` (same steps as "
      "compiled)."
      if repriced
      else ""
    ),
    "",
    "| case | row | mesh | remat, micro-batches | predicted | GPU compiled | err | "
    "predicted (XLA:CPU) | XLA:CPU compiled | err |",
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items())
    levers = f"{r['remat']}, {r['microbatches']}"
    if "gpu_peak" not in r:
      lines.append(
        f"| {r['case']} | {r['row']} | {mesh} | {levers} | "
        f"{human_bytes(r['predicted_peak'])} | {r.get('error', '')[:100]} | | | | |"
      )
      continue
    cpu_predicted = r.get("predicted_peak_xla_cpu") or r["predicted_peak"]
    cpu = (
      f"{human_bytes(cpu_predicted)} | {human_bytes(r['cpu_peak'])} | {100 * r['cpu_error']:+.1f}%"
      if "cpu_error" in r
      else "- | - | -"
    )
    flag = "" if abs(r["gpu_error"]) <= TARGET else " **"
    if r["gpu_peak"] >= CLAMPED_AT:
      flag = " (clamped)"
    lines.append(
      f"| {r['case']} | {r['row']} | {mesh} | {levers} | "
      f"{human_bytes(r['predicted_peak'])} | {human_bytes(r['gpu_peak'])} | "
      f"{100 * r['gpu_error']:+.1f}%{flag} | {cpu} |"
    )
  med = summary["median_abs_error_gpu"]
  lines += [
    "",
    f"Rows compiled: {len(done)} ({summary['rows_failed']} failed or not reached, "
    f"{len(clamped)} at or over {CLAMPED_AT / 2**30:.0f} GiB left out: *(clamped)*, GPU "
    "XLA's memory-limit rematerialisation may have rewritten them); "
    f"within 15% of the GPU compile: {len(within)} of {len(done)}"
    + (f", median |error| {100 * med:.1f}%" if med is not None else "")
    + f". Rows outside 15% on XLA:CPU that the GPU compile covers: "
    f"{len(cpu_missed)}, of which within 15% on GPU: "
    f"{summary['cpu_misses_within_on_gpu']}.",
    "",
  ]
  write_text_atomic(RESULTS / "gpu_memory.md", "\n".join(lines))
  print("\n".join(lines[-2:]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="plan every suite row here (CPU) and keep the plans")
  p.add_argument("--cases", nargs="*", help="suite case names (default: all)")
  c = sub.add_parser("compile", help="compile the kept plans on mock GPU devices")
  c.add_argument("--workers", type=int, default=4, help="compiling processes")
  c.add_argument(
    "--budget-s",
    type=float,
    default=300.0,
    help="seconds after which a worker starts no new compile",
  )
  c.add_argument("--mock-devices", type=int, default=16, help="mock GPU devices per worker")
  c.add_argument(
    "--only",
    nargs="*",
    default=[],
    help="CASE:ROW pairs to compile, e.g. resnet50@8xa100-pcie:dp (default: all)",
  )
  c.add_argument(
    "--dump",
    nargs="*",
    default=[],
    help="CASE:ROW pairs whose compiled buffer assignment is dumped",
  )
  c.add_argument("--dump-to", help="folder for --dump, one sub-folder per row")
  sub.add_parser("report", help="tables from the compiled parts")
  sub.add_parser("reprice", help="price the compiled rows' steps with the current model (CPU)")
  w = sub.add_parser("worker")
  for name in ("index", "workers", "budget_s", "mock_devices"):
    w.add_argument(name, type=float if name == "budget_s" else int)
  w.add_argument("only", nargs="*")
  args = parser.parse_args(argv)
  if args.command == "prepare":
    prepare(args.cases)
  elif args.command == "compile":
    compile_rows(args.workers, args.budget_s, args.mock_devices, args.only, args.dump, args.dump_to)
    report()
  elif args.command == "report":
    report()
  elif args.command == "reprice":
    reprice()
    report()
  else:
    worker(args.index, args.workers, args.budget_s, args.mock_devices, args.only)
  return 0


if __name__ == "__main__":
  sys.exit(main())
