"""Pipeline plans against the best plans without a pipeline, predicted and compiled.

For each case (a zoo GPT in float32, a batch, a setting of slow links or several nodes) this
plans three times: the families without a pipeline (`stages=1`), pipelines only
(`strategy="pp"`), and the planner's own choice (everything). Each plan's emitted step is
compiled for its mesh on virtual CPU devices and priced on the case's profile (`plan.verify`):
step time, collectives, peak memory. The question the planner must answer right: is a pipeline
the fastest by compiled truth, and does the planner choose one exactly then? Writes
benchmarks/results/pipeline.{json,md}.

    python benchmarks/pipeline.py                 # every case, about 15 min on 2 cores
    python benchmarks/pipeline.py --cases gpt-7b@8xa100-pcie

The stage-storage case also plans pipelines of 4 stages with the stages' storage held to one
(ZeRO-1, FSDP with per-iteration gathers, and FSDP gathered once before the loop, MaxText's
`pipeline_fsdp_ag_once`, which the search does not price: its prediction is left out).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import jax
import optax

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.files import write_text_atomic
from wapar_jax._src.fmt import human_bytes, human_seconds
from wapar_jax._src.search import pipeline as stage_pricing

RESULTS = Path(__file__).parent / "results"
# (model, profile, devices, batch, seq_len): the 7B case, and the suite's transformer
# cases on slow links and across nodes.
CASES = {
  "gpt-7b@8xa100-pcie": ("gpt-7b", "a100-40g-pcie", 8, 64, 2048),
  "gpt-1.3b@4xtitanxp": ("gpt-1.3b", "titanxp-pcie", 4, 8, 1024),
  "gpt2-small@2x8xh100": ("gpt2-small", "h100-sxm", 16, 64, 1024),
  "gpt2-medium@8xa100-pcie": ("gpt2-medium", "a100-40g-pcie", 8, 32, 1024),
  "gpt2-small@8xa100-pcie": ("gpt2-small", "a100-40g-pcie", 8, 32, 1024),
  "gpt2-large@8xa100-pcie": ("gpt2-large", "a100-40g-pcie", 8, 16, 1024),
  "vit-b16@8xa100-pcie": ("vit-b16", "a100-40g-pcie", 8, 256, None),
  "gpt-7b@2x8xh100": ("gpt-7b", "h100-sxm", 16, 32, 2048),
  # A small batch: the stages' state, not their activations, is most of a device's memory.
  "gpt-1.3b@8xtitanxp-stages": ("gpt-1.3b", "titanxp-pcie", 8, 8, 256),
  # Devices of 3 GiB (CASE_MEMORY_GIB): of the pipelines, only FSDP stages fit by the model.
  "gpt-1.3b@2x8xh100-3gib": ("gpt-1.3b", "h100-sxm", 16, 16, 512),
}
CASE_MEMORY_GIB = {"gpt-1.3b@2x8xh100-3gib": 3.0}
RUNS = {"no pipeline": {"stages": 1}, "pipeline": {"strategy": "pp"}, "plan": {}}
# Pipelines of 4 stages with the stages' storage held to one: (storage, gathered once).
STAGE_STORAGES = {
  "pipeline, ZeRO-1 stages": ("zero1", False),
  "pipeline, FSDP stages": ("fsdp", False),
  "pipeline, FSDP stages gathered once": ("fsdp", True),
}
CASE_RUNS = {"gpt-1.3b@8xtitanxp-stages": {**RUNS, **{k: {"stages": 4} for k in STAGE_STORAGES}}}


def _plan_held(name: str, **kwargs):
  """`wap.plan`, with the stages' storage held to run `name`'s (if it holds one)."""
  if name not in STAGE_STORAGES:
    return wap.plan(**kwargs)
  storage, once = STAGE_STORAGES[name]
  searched = stage_pricing.PIPELINE_STORAGES
  stage_pricing.PIPELINE_STORAGES = frozenset({storage})
  try:
    plan = wap.plan(**kwargs)
  finally:
    stage_pricing.PIPELINE_STORAGES = searched
  layout = dataclasses.replace(plan.pipeline, gather_once=once)
  return dataclasses.replace(plan, pipeline=layout)


def _run(name: str, ex, profile, devices: int, kwargs: dict) -> dict:
  tx = optax.adamw(1e-3)
  t0 = time.perf_counter()
  try:
    plan = _plan_held(
      name,
      loss_fn=ex.loss_fn,
      params=ex.params,
      batch=ex.batch,
      optimizer=tx,
      devices=devices,
      profile=profile,
      **kwargs,
    )
  except wap.errors.WaparError as e:
    return {"run": name, "error": f"{type(e).__name__}: {e}"}
  plan_seconds = time.perf_counter() - t0
  v = plan.verify(profile=profile)
  c = plan.chosen
  row = {
    "run": name,
    "strategy": plan.strategy,
    "mesh": dict(plan.mesh_shape),
    "remat": c.remat,
    "microbatches": c.microbatches,
    "stages": c.stages,
    "repeats": c.repeats,
    "stage_microbatches": c.stage_microbatches,
    "plan_seconds": plan_seconds,
    "predicted": dataclasses.asdict(v.predicted),
    "compiled": dataclasses.asdict(v.compiled),
    "predicted_peak": c.peak_memory,
    "budget": plan.predicted.memory_budget,
    "priced": not (plan.pipeline and plan.pipeline.gather_once),
  }
  return row


def run_case(key: str) -> dict:
  model, name, devices, batch, seq = CASES[key]
  profile = wap.load_profile(name)
  if key in CASE_MEMORY_GIB:
    profile = dataclasses.replace(profile, memory_bytes=CASE_MEMORY_GIB[key] * 2**30)
  ex = examples.get_example(model, batch_size=batch, seq_len=seq)
  rows = [_run(name, ex, profile, devices, kw) for name, kw in CASE_RUNS.get(key, RUNS).items()]
  ok = [r for r in rows if "error" not in r and r["run"] != "plan"]
  fastest = min(ok, key=lambda r: r["compiled"]["step_time"]) if ok else None
  plan = next((r for r in rows if r["run"] == "plan" and "error" not in r), None)
  return {
    "case": key,
    "rows": rows,
    "fastest_compiled": fastest and fastest["run"],
    "plan_chose_pipeline": bool(plan and plan["stages"] > 1),
    "plan_right": bool(plan and fastest and (plan["stages"] > 1) == (fastest["stages"] > 1)),
  }


def _err(p, c):
  return f"{100 * (p - c) / c:+.1f}%" if c and p is not None else "-"


def _figure(fmt, value) -> str:
  return "not priced" if value is None else fmt(value)


def markdown(cases: list[dict], meta: dict) -> str:
  lines = [
    "# Pipelines: plans with and without a stage axis, predicted vs compiled",
    "",
    f"jax {meta['jax']}, {meta['date']}. Each plan's emitted step compiled for its mesh on "
    "virtual CPU devices (float32) and priced on the case's profile. `python "
    "benchmarks/pipeline.py`.",
    "",
  ]
  right = sum(c["plan_right"] for c in cases)
  lines += [
    f"- the planner's choice (pipeline or not) matches the compiled fastest in {right} of "
    f"{len(cases)} cases.",
    "",
  ]
  for case in cases:
    lines += [f"## {case['case']}", ""]
    lines += [
      "| run | strategy | mesh | schedule | step predicted | step compiled | error | "
      "peak predicted | peak compiled | error | plan s |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in case["rows"]:
      if "error" in r:
        lines.append(f"| {r['run']} | {r['error'][:120]} |")
        continue
      p, c = r["predicted"], r["compiled"]
      schedule = (
        f"S{r['stages']} R{r['repeats']} M{r['stage_microbatches']}"
        if r["stages"] > 1
        else f"remat {r['remat']}, {r['microbatches']} micro"
      )
      priced = r.get("priced", True)  # absent from rows written before the field
      step, peak = (p["step_time"], r["predicted_peak"]) if priced else (None, None)
      lines.append(
        f"| {r['run']} | {r['strategy']} | {r['mesh']} | {schedule} | "
        f"{_figure(human_seconds, step)} | {human_seconds(c['step_time'])} | "
        f"{_err(step, c['step_time'])} | {_figure(human_bytes, peak)} | "
        f"{human_bytes(c['peak_memory'])} | {_err(peak, c['peak_memory'])} | "
        f"{r['plan_seconds']:.1f} |"
      )
    lines += [
      "",
      f"compiled fastest: {case['fastest_compiled']}; the planner chose "
      f"{'a pipeline' if case['plan_chose_pipeline'] else 'no pipeline'}.",
      "",
    ]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="*", default=list(CASES))
  args = parser.parse_args()
  out_json = RESULTS / "pipeline.json"
  kept = {}
  if out_json.exists():
    kept = {c["case"]: c for c in json.loads(out_json.read_text())["cases"]}
  for key in args.cases:
    t0 = time.perf_counter()
    kept[key] = run_case(key)
    print(
      f"{key:28s} fastest {kept[key]['fastest_compiled']}, plan right "
      f"{kept[key]['plan_right']}  {time.perf_counter() - t0:.0f} s",
      flush=True,
    )
  cases = [kept[k] for k in CASES if k in kept]
  meta = {
    "jax": jax.__version__,
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "machine": platform.machine(),
  }
  write_text_atomic(out_json, json.dumps({"meta": meta, "cases": cases}, indent=1))
  write_text_atomic(RESULTS / "pipeline.md", markdown(cases, meta))
  print(f"wrote {out_json} and {RESULTS / 'pipeline.md'}")


if __name__ == "__main__":
  main()
