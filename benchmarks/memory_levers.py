"""Models that do not fit with data parallelism: what the planner does instead, checked by XLA.

For each case the planner runs three times: the data-parallel baseline (`strategy="dp"`, every
device; where none fits, its closest option), the free search fitting the profile's compiler
(GPU XLA's buffer rules for these GPU profiles; its compile of such steps: `gpu_memory.py`),
and the free search fitting XLA:CPU's rules (`memory_rules="xla:cpu"`), whose fit a compile
here can check. Each chosen step is then compiled for its mesh on virtual CPU devices (in a
child process with enough devices) and the compiled module's memory (arguments + temporaries
+ outputs - aliases) is put next to the prediction under XLA:CPU's buffer rules.

The compile keeps XLA:CPU from expanding optimization barriers before CSE (as GPU and TPU
compilers do), so a remat plan's compiled memory includes its remat saving.

    python benchmarks/memory_levers.py            # 1.3B on 4 x titanxp-pcie, 7B on 8 x a100-40g
    python benchmarks/memory_levers.py --no-compile
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = [
  # (name, example, overrides, devices, profile)
  ("gpt-1.3b on 4 x titanxp-pcie", "gpt-1.3b", {}, 4, "titanxp-pcie"),
  (
    "gpt-7b, batch 64 x 2048, on 8 x a100-40g-pcie",
    "gpt-7b",
    {"batch_size": 64, "seq_len": 2048},
    8,
    "a100-40g-pcie",
  ),
]

_COMPILE = """
import json, sys, optax
import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import verify
from wapar_jax._src.verify.compiled import memory_breakdown
name, overrides, plan_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
ex = examples.get_example(name, **overrides)
plan = wap.Plan.load(plan_file)
lowered = verify.lower_plan_step(plan, None, ex.loss_fn, optax.adamw(1e-3), ex.params, ex.batch)
memory, _ = memory_breakdown(verify.compile_like_target(lowered))
print(json.dumps({"compiled_peak": memory.peak}))
"""


def compiled_peak(example, overrides, plan, devices, timeout):
  env = dict(
    os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu"
  )
  with tempfile.TemporaryDirectory(prefix="wapar-memory-levers-") as tmp:
    plan_file = os.path.join(tmp, "plan.json")
    plan.save(plan_file)
    proc = subprocess.run(
      [sys.executable, "-c", _COMPILE, example, json.dumps(overrides), plan_file],
      capture_output=True,
      text=True,
      env=env,
      timeout=timeout,
      check=False,
    )
  if proc.returncode:
    return None, proc.stderr.strip().splitlines()[-1][:200]
  return json.loads(proc.stdout.strip().splitlines()[-1])["compiled_peak"], ""


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--no-compile", action="store_true")
  parser.add_argument("--timeout", type=int, default=1200)
  args = parser.parse_args()
  import optax

  import wapar_jax as wap
  from wapar_jax import examples
  from wapar_jax._src.compilers import XLA_CPU
  from wapar_jax._src.search import DEFAULT_MEMORY_HEADROOM
  from wapar_jax._src.verify.predicted_memory import peak_under

  rows = []
  for title, example, overrides, devices, profile in CASES:
    ex = examples.get_example(example, **overrides)
    device_profile = wap.load_profile(profile)
    # Compiled memory fits within 90% of the device (fragmentation, runtime buffers); the
    # planner's own budget keeps 15% free, the rest for its memory model's error.
    fits_at = device_profile.memory_bytes * 0.9
    budget = device_profile.memory_bytes * (1 - DEFAULT_MEMORY_HEADROOM)
    # The levers are measured without pipelines (`stages=1`): benchmarks/pipeline.py has those.
    for label, kwargs in (
      ("dp baseline", {"strategy": "dp", "all_devices": True}),
      ("planner", {"stages": 1}),
      ("planner, XLA:CPU rules", {"memory_rules": "xla:cpu", "stages": 1}),
    ):
      t0 = time.perf_counter()
      notes = "no plan of this family fits: its closest option, compiled"
      try:
        plan = wap.plan(
          ex.loss_fn,
          ex.params,
          ex.batch,
          optimizer=optax.adamw(1e-3),
          devices=devices,
          profile=device_profile,
          **kwargs,
        )
        notes = plan.memory_decision
      except wap.errors.NoFeasiblePlanError as e:
        # Compile the closest option too, so "does not fit" is measured, not only predicted.
        c = e.closest
        unbounded = dataclasses.replace(device_profile, memory_bytes=1e18)
        plan = wap.plan(
          ex.loss_fn,
          ex.params,
          ex.batch,
          optimizer=optax.adamw(1e-3),
          devices=devices,
          profile=unbounded,
          remat=c.remat,
          microbatches=c.microbatches,
          **kwargs,
        )
      row = {
        "case": title,
        "plan": label,
        "fits": plan.predicted.peak_memory <= budget,
        "strategy": plan.strategy,
        "mesh": dict(plan.mesh_shape),
        "remat": plan.chosen.remat,
        "microbatches": plan.chosen.microbatches,
        "predicted_gib": plan.predicted.peak_memory / 2**30,
        "predicted_xla_cpu_gib": peak_under(plan, XLA_CPU, device_profile) / 2**30,
        "budget_gib": budget / 2**30,
        "fits_at_gib": fits_at / 2**30,
        "compiled_gib": None,
        "planning_s": time.perf_counter() - t0,
        "step_s": plan.predicted.step_time,
        "notes": notes,
      }
      if not args.no_compile:
        peak, err = compiled_peak(example, overrides, plan, plan.num_devices, args.timeout)
        row["compiled_gib"] = None if peak is None else peak / 2**30
        row["fits_compiled"] = peak is not None and peak <= fits_at
        if err:
          row["notes"] += f" compile failed: {err}"
      rows.append(row)
      print(json.dumps(row))

  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "memory_levers.json").write_text(json.dumps(rows, indent=1))
  fmt = lambda x: "-" if x is None else f"{x:.2f}"
  lines = [
    "# Fitting what data parallelism cannot",
    "",
    "| case | plan | fits (predicted) | fits (compiled) | strategy | mesh | remat | "
    "micro-batches | predicted GiB (the rules it fits) | planner budget GiB | predicted GiB "
    "(XLA:CPU) | compiled GiB (XLA:CPU; fits within 90% of the device) | step s | "
    "planning s | notes |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    fits_compiled = {True: "yes", False: "no"}.get(r.get("fits_compiled"), "-")
    lines.append(
      f"| {r['case']} | {r['plan']} | {'yes' if r['fits'] else 'no'} | {fits_compiled} "
      f"| {r['strategy']} "
      f"| {r['mesh']} | {r['remat']} | {r['microbatches']} | {fmt(r['predicted_gib'])} "
      f"| {fmt(r['budget_gib'])} | {fmt(r['predicted_xla_cpu_gib'])} "
      f"| {fmt(r['compiled_gib'])} | {r['step_s']:.2f} | "
      f"{r['planning_s']:.1f} | {r['notes']} |"
    )
  (RESULTS / "memory_levers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
