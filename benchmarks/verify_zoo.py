"""Prediction vs compiled truth for small zoo models and every plan family, on 8 virtual devices.

For each model and strategy (the planner's own choice on h100-sxm, and each baseline family
forced onto all 8 devices) this plans, then `plan.verify()` compiles the emitted step for the
plan's mesh and reads FLOPs, communicated bytes and peak memory per device. Writes
`benchmarks/results/verify_zoo.json` and `verify_zoo.md`.

    python benchmarks/verify_zoo.py            # about 2-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import optax

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.fmt import human_bytes, percent

DEVICES = 8
PROFILE = "h100-sxm"
MODELS = {"gpt-tiny": {}, "gpt2-small": {"seq_len": 256}, "mlp": {}, "cnn": {}}
STRATEGIES = ("auto", "dp", "fsdp", "zero1", "tp", "dp_tp")
FIGURES = ("flops", "comm_bytes", "comm_time", "peak_memory")
RESULTS = Path(__file__).parent / "results"


def run_case(model: str, overrides: dict, strategy: str) -> dict:
  ex = examples.get_example(model, **overrides)
  case = {"model": model, "overrides": overrides, "requested": strategy, "profile": PROFILE}
  t0 = time.perf_counter()
  try:
    plan = wap.plan(
      ex.loss_fn,
      ex.params,
      ex.batch,
      optimizer=optax.adamw(1e-3),
      devices=DEVICES,
      profile=PROFILE,
      strategy=strategy,
      all_devices=strategy != "auto",
    )
  except wap.WaparError as e:
    case["error"] = f"{type(e).__name__}: {e}"
    return case
  case["plan_seconds"] = time.perf_counter() - t0
  workload = dict(example=model, optimizer="adamw", lr=1e-3, **overrides)
  v = plan.verify(workload=workload)
  terms = {
    k: float(getattr(plan.chosen, k))
    for k in ("param_memory", "opt_state_memory", "activation_memory")
    if hasattr(plan.chosen, k)
  }
  case.update(
    strategy=plan.strategy,
    mesh_shape=dict(plan.mesh_shape),
    devices=plan.num_devices,
    model_split=list(plan.model_split),
    predicted_memory_terms=terms,
    verification=v.to_dict(),
  )
  return case


def markdown(cases: list[dict]) -> str:
  lines = [
    f"# Prediction vs compiled truth ({DEVICES} virtual CPU devices, priced on {PROFILE})",
    "",
    "Error = (predicted - compiled) / compiled, per device per step. Compiled FLOPs are XLA's "
    "`cost_analysis()` count corrected for loop trip counts; they include the sums inside "
    "all-reduces (column *red.*), which the planner does not model. Comm = bytes each device "
    "sends (ring formulas of `cost.collective_traffic`) over every collective in the compiled "
    "module; *comm as RS* counts the all-reduces whose result each device only slices as the "
    "reduce-scatters XLA's GPU/TPU pipelines make of them (the CPU pipeline does not), the "
    "figure to hold a GPU prediction against; peak = arguments + outputs - aliased + "
    "temporaries (`memory_analysis()`).",
    "",
    "| model | strategy | mesh | FLOPs pred | FLOPs compiled | err | red. | comm pred | "
    "comm compiled | err | comm as RS | err | comm time err | peak pred | peak compiled | err | "
    "verify s |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for c in cases:
    label = c["requested"] if c["requested"] != "auto" else f"auto ({c.get('strategy', '-')})"
    if "error" in c:
      lines.append(f"| {c['model']} | {label} | - | {c['error'][:90]} |" + " |" * 14)
      continue
    v = c["verification"]
    p, k, e = v["predicted"], v["compiled"], v["errors"]
    mesh = "x".join(f"{n}={s}" for n, s in c["mesh_shape"].items())
    red = v["reduction_flops"] / k["flops"] if k["flops"] else 0.0
    lines.append(
      f"| {c['model']} | {label} | {mesh} | {p['flops']:.4g} | {k['flops']:.4g} | "
      f"{percent(e['flops'])} | {100 * red:.1f}% | {human_bytes(p['comm_bytes'])} | "
      f"{human_bytes(k['comm_bytes'])} | {percent(e['comm_bytes'])} | "
      f"{human_bytes(v['comm_bytes_scattered'])} | {percent(v['comm_bytes_scattered_error'])} | "
      f"{percent(e['comm_time'])} | "
      f"{human_bytes(p['peak_memory'])} | {human_bytes(k['peak_memory'])} | "
      f"{percent(e['peak_memory'])} | {v['verify_seconds']:.1f} |"
    )
  lines += [
    "",
    "## Peak memory by term",
    "",
    "Predicted parameter + optimizer-state memory against the compiled arguments, and "
    "the predicted activation term (batch and temporaries) against the compiled "
    "temporaries (`temp_size_in_bytes`).",
    "",
    "| model | strategy | pred params+opt | compiled arguments | pred activations | "
    "compiled temp | temp err |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for c in cases:
    terms = c.get("predicted_memory_terms")
    if "error" in c or not terms:
      continue
    m = c["verification"]["memory"]
    state = terms.get("param_memory", 0.0) + terms.get("opt_state_memory", 0.0)
    act = terms.get("activation_memory", 0.0)
    temp_err = (act - m["temp"]) / m["temp"] if m["temp"] else None
    lines.append(
      f"| {c['model']} | {c['requested']} | {human_bytes(state)} | "
      f"{human_bytes(m['argument'])} | {human_bytes(act)} | {human_bytes(m['temp'])} | "
      f"{percent(temp_err)} |"
    )
  lines += [
    "",
    "## Collectives XLA emitted, per case",
    "",
    "kind / mesh axes / group size: instructions, executions per step, full-buffer bytes "
    "per step, bytes sent per device per step.",
    "",
  ]
  for c in cases:
    if "error" in c:
      continue
    rows = c["verification"]["collective_summary"]
    text = (
      "; ".join(
        f"{r['kind']} {','.join(r['axes']) or '-'} n={r['group_size']}: {r['instructions']} ops, "
        f"{r['executions']:.0f} runs, {human_bytes(r['nbytes'])} buffer, "
        f"{human_bytes(r['sent_bytes'])} sent"
        for r in rows
      )
      or "none"
    )
    lines.append(f"- **{c['model']} {c['requested']}** ({c['strategy']}): {text}")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="*", default=list(MODELS))
  parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  if jax.device_count() < DEVICES:
    print(
      f"needs {DEVICES} devices; run with XLA_FLAGS=--xla_force_host_platform_device_count="
      f"{DEVICES}",
      file=sys.stderr,
    )
    return 2
  cases = []
  for model in args.models:
    for strategy in args.strategies:
      case = run_case(model, MODELS.get(model, {}), strategy)
      cases.append(case)
      if "error" in case:
        print(f"{model:11s} {strategy:6s} {case['error'][:100]}", flush=True)
      else:
        e = case["verification"]["errors"]
        print(
          f"{model:11s} {strategy:6s} {case['strategy']:8s} "
          + "  ".join(f"{f} {percent(e[f]):>8s}" for f in FIGURES)
          + f"  verify {case['verification']['verify_seconds']:.1f} s",
          flush=True,
        )
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {
    "jax": jax.__version__,
    "python": platform.python_version(),
    "devices": DEVICES,
    "profile": PROFILE,
    "cpu_count": os.cpu_count(),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  (out / "verify_zoo.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=1))
  (out / "verify_zoo.md").write_text(markdown(cases))
  print(f"wrote {out / 'verify_zoo.json'} and {out / 'verify_zoo.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
