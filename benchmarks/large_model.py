"""A 65B GPT (Llama-2-70B's depth, width and vocabulary) planned for large meshes, and checked.

For `gpt-65b-scan` in bfloat16 (256 x 4096 tokens) on tpu-v5e x 256 and on 8 x 8 h100-sxm:
planning time and peak RSS in a fresh process with an empty cost cache, the plan and whether it
fits by its prediction, and the emitted step compiled for that many virtual CPU devices. Then a
reduced-depth float32 twin (16 layers, same width and batch; XLA:CPU upcasts bfloat16, so only
float32 memory is compiled truth on CPU) planned for tpu-v5e x 256 with the same levers, its
emitted step compiled, and its predicted peak, collective bytes and FLOPs held against the
compiled ones. Writes benchmarks/results/large_model.{json,md}.

    python benchmarks/large_model.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
OPTIMIZER = "optax.adamw(1e-4)"
CASES = [
  {"name": "gpt-65b-scan bf16 @ tpu-v5e x 256", "profile": "tpu-v5e", "devices": 256},
  {"name": "gpt-65b-scan bf16 @ 8 x 8 h100-sxm", "profile": "h100-sxm", "devices": 64},
]
TWIN_LAYERS = 16

_PLAN_AND_COMPILE = """
import json, os, resource, sys, time
case = json.loads(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={case['devices']}"
t0 = time.perf_counter()
import jax, optax
import wapar_jax as wap
from wapar_jax import examples
ex = examples.get_example("gpt-65b-scan", dtype="bfloat16")
plan = wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=OPTIMIZER, devices=case["devices"],
                profile=case["profile"])
plan_seconds = time.perf_counter() - t0
plan_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from wapar_jax._src.tree import abstract
params, batch = abstract(ex.params), abstract(ex.batch)
opt_state = abstract(jax.eval_shape(OPTIMIZER.init, params))
t1 = time.perf_counter()
compiled = plan.train_step().lower(params, opt_state, batch).compile()
compile_seconds = time.perf_counter() - t1
c = plan.chosen
print(json.dumps({
  "plan_seconds": plan_seconds, "plan_peak_rss_bytes": plan_rss,
  "strategy": plan.strategy, "mesh_shape": dict(plan.mesh_shape), "remat": c.remat,
  "microbatches": c.microbatches, "predicted_peak_bytes": c.peak_memory,
  "budget_bytes": plan.predicted.memory_budget, "fits": c.fits,
  "predicted_step_seconds": c.step_time, "cross_node_axes": list(c.cross_node_axes),
  "compiled_for_devices": case["devices"], "compile_seconds": compile_seconds,
  "compiled_xla_cpu_temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
}))
""".replace("OPTIMIZER", OPTIMIZER)

_TWIN = """
import json, os, sys, time
layers, remat, microbatches = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=256"
import jax.numpy as jnp, optax
import wapar_jax as wap
from wapar_jax.examples import _gpt
cfg = _gpt.GPTConfig(layers, 8192, 64, 32000, 4096, jnp.float32)
ex = _gpt.gpt_linen("gpt-65b-twin", "", cfg, 256, 4096, scan_layers=True)
plan = wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=OPTIMIZER, devices=256,
                profile="tpu-v5e", remat=remat, microbatches=microbatches, all_devices=True)
v = plan.verify()
print(json.dumps({
  "layers": layers, "strategy": plan.strategy, "mesh_shape": dict(plan.mesh_shape),
  "remat": remat, "microbatches": microbatches,
  "predicted_peak_bytes": v.predicted.peak_memory, "compiled_peak_bytes": v.compiled.peak_memory,
  "predicted_comm_bytes": v.predicted.comm_bytes, "compiled_comm_bytes": v.compiled.comm_bytes,
  "predicted_flops": v.predicted.flops, "compiled_flops": v.compiled.flops,
}))
""".replace("OPTIMIZER", OPTIMIZER)


def _run(code, *args):
  with tempfile.TemporaryDirectory() as cache:
    proc = subprocess.run(
      [sys.executable, "-c", code, *args],
      capture_output=True,
      text=True,
      env=dict(os.environ, WAPAR_CACHE_DIR=cache),
      check=False,
    )
  if proc.returncode != 0:
    raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _error(predicted, compiled):
  return (predicted - compiled) / compiled


def main():
  rows = [dict(case, **_run(_PLAN_AND_COMPILE, json.dumps(case))) for case in CASES]
  big = rows[0]
  twin = _run(_TWIN, str(TWIN_LAYERS), big["remat"], str(big["microbatches"]))
  for key in ("peak", "comm", "flops"):
    suffix = "" if key == "flops" else "_bytes"
    twin[f"{key}_error"] = _error(twin[f"predicted_{key}{suffix}"], twin[f"compiled_{key}{suffix}"])
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "large_model.json").write_text(json.dumps({"cases": rows, "twin": twin}, indent=2))
  gib = 2**30
  lines = [
    "# A 65B GPT on large meshes (`python benchmarks/large_model.py`)",
    "",
    "| case | plan s | RSS GiB | plan | remat / micro | peak / budget GiB | fits | "
    "compile s (devices) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['name']} | {r['plan_seconds']:.1f} | {r['plan_peak_rss_bytes'] / gib:.2f} | "
      f"{r['strategy']} {r['mesh_shape']} | {r['remat']} / {r['microbatches']} | "
      f"{r['predicted_peak_bytes'] / gib:.2f} / {r['budget_bytes'] / gib:.2f} | {r['fits']} | "
      f"{r['compile_seconds']:.1f} ({r['compiled_for_devices']}) |"
    )
  lines += [
    "",
    f"Float32 twin, {twin['layers']} layers, tpu-v5e x 256, {twin['strategy']} "
    f"{twin['mesh_shape']}, remat {twin['remat']}, {twin['microbatches']} micro-batches "
    "(compiled on 256 virtual CPU devices):",
    "",
    "| figure | predicted | compiled | error |",
    "|---|---|---|---|",
    f"| peak memory GiB | {twin['predicted_peak_bytes'] / gib:.2f} | "
    f"{twin['compiled_peak_bytes'] / gib:.2f} | {twin['peak_error']:+.1%} |",
    f"| collectives GiB sent | {twin['predicted_comm_bytes'] / gib:.2f} | "
    f"{twin['compiled_comm_bytes'] / gib:.2f} | {twin['comm_error']:+.1%} |",
    f"| FLOPs | {twin['predicted_flops']:.4g} | {twin['compiled_flops']:.4g} | "
    f"{twin['flops_error']:+.2%} |",
  ]
  (RESULTS / "large_model.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
