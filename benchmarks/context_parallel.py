"""Context parallelism (CP) for long sequences, checked by XLA.

Two cases, float32, AdamW, 8 x h100-sxm, compiled on 8 virtual CPU devices:

- `long`: GPT 1.3B at 8 x 32768 tokens. The zoo's GPT materialises the scores (16 heads x
  32k x 32k per sequence: 64 GiB a layer), so what splits them decides the fit. Rows: the
  planner's own plan ("auto"), the planner restricted to each family without a context axis
  (it may still accumulate micro-batches and remat), and the families written by hand with
  plain `jax.jit` + specs as a researcher writes them (MaxText rules, every block
  rematerialised, the whole batch in one step): DP, FSDP, Megatron TP and TP + SP.
- `mid`: GPT-2 medium at 2 x 8192 tokens, 8 devices (4 x the rows): the CP plan of each state
  storage compiled against its prediction (FLOPs, bytes sent, peak).

    python benchmarks/context_parallel.py                # both cases (~10 min on 2 cores)
    python benchmarks/context_parallel.py --cases mid
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import suite  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import wapar_jax as wap  # noqa: E402
from wapar_jax import examples  # noqa: E402
from wapar_jax._src.search import sweep  # noqa: E402
from wapar_jax._src.tree import abstract  # noqa: E402
from wapar_jax.examples._registry import handwritten_example  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FIGURES = ("flops", "comm_bytes", "comm_time", "compute_time", "step_time", "peak_memory")
PROFILE = "h100-sxm"
DEVICES = 8
CASES = {
  "long": {"example": "gpt-1.3b", "batch_size": 8, "seq_len": 32768},
  "mid": {"example": "gpt2-medium", "batch_size": 2, "seq_len": 8192},
}
TX = optax.adamw(1e-4)
# The families the planner is asked for beside "auto" on the long case (no context axis).
PLANNED = ("fsdp", "dp_tp", "tp")
BY_HAND = ("dp", "fsdp", "tp", "tp+sp")


def _planned(case: dict, strategy: str, storages=None) -> dict:
  """The plan of `strategy` (CP restricted to `storages`), compiled by `plan.verify()`."""
  ex = examples.get_example(case["example"], batch_size=case["batch_size"], seq_len=case["seq_len"])
  saved = sweep.CONTEXT_STORAGES
  if storages is not None:
    sweep.CONTEXT_STORAGES = frozenset(storages)
  t0 = time.perf_counter()
  try:
    plan = wap.plan(
      ex.loss_fn,
      ex.params,
      ex.batch,
      optimizer=TX,
      devices=DEVICES,
      all_devices=True,
      strategy=strategy,
      profile=PROFILE,
    )
  finally:
    sweep.CONTEXT_STORAGES = saved
  planned = time.perf_counter() - t0
  v = plan.verify(workload={**case, "optimizer": "adamw", "lr": 1e-4})
  c = plan.chosen
  return {
    "row": f"planner, strategy {strategy!r}" + (f" ({storages[0]})" if storages else ""),
    "strategy": plan.strategy,
    "mesh_shape": dict(plan.mesh_shape),
    "remat": c.remat,
    "microbatches": c.microbatches,
    "predicted_fits": c.fits,
    "plan_seconds": planned,
    "verify_seconds": v.verify_seconds,
    "predicted": {f: getattr(v.predicted, f) for f in FIGURES},
    "compiled": {f: getattr(v.compiled, f) for f in FIGURES},
    # Sliced-only all-reduces counted as the reduce-scatters GPU / TPU XLA makes of them.
    "compiled_comm_bytes_as_gpu": v.comm_bytes_scattered,
  }


def _by_hand(case: dict, family: str) -> dict:
  """A family written by hand (MaxText rules, every block rematerialised), compiled."""
  t0 = time.perf_counter()
  axes = {"dp": ("data", "fsdp"), "fsdp": ("data", "fsdp"), "tp": ("fsdp", "tensor")}
  names = axes["tp" if family.startswith("tp") else family]
  sizes = (1, DEVICES) if family != "dp" else (DEVICES, 1)
  mesh_shape = dict(zip(names, sizes))
  mesh = Mesh(np.asarray(jax.devices()[:DEVICES], dtype=object).reshape(sizes), names)
  rows = {"dp": "data", "fsdp": "fsdp"}.get(family)
  residual = P(rows, "tensor" if family == "tp+sp" else None, None)
  ex, _ = handwritten_example(
    case["example"],
    case["batch_size"],
    case["seq_len"],
    "float32",
    hold=lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, residual)),
    remat_blocks=True,
  )
  params, batch = abstract(ex.params), abstract(ex.batch)
  if family == "dp":
    p_specs = jax.tree.map(lambda _: P(), params)
  elif family == "fsdp":
    p_specs = suite.hand_rules_specs(params, DEVICES)
  else:
    p_specs = suite.expert_specs(params, mesh_shape)
  b_specs = jax.tree.map(lambda _: P(rows), batch)
  row = suite._compiled_by_hand(
    f"by hand: {family}",
    ex.loss_fn,
    TX,
    mesh,
    mesh_shape,
    params,
    batch,
    p_specs,
    b_specs,
    wap.load_profile(PROFILE),
    t0,
  )
  return {
    "row": f"by hand: {family} (remat blocks, whole batch)",
    "strategy": family,
    "mesh_shape": mesh_shape,
    "compiled": {f: row["compiled"][f] for f in FIGURES},
    "compile_seconds": row.get("compile_seconds", time.perf_counter() - t0),
  }


def run(name: str) -> list[dict]:
  case = CASES[name]
  if name == "long":
    jobs = [("planner, strategy 'auto'", lambda: _planned(case, "auto"))]
    jobs += [(f"planner, strategy {s!r}", lambda s=s: _planned(case, s)) for s in PLANNED]
    jobs += [(f"by hand: {f}", lambda f=f: _by_hand(case, f)) for f in BY_HAND]
  else:
    jobs = [(f"cp ({s})", lambda s=s: _planned(case, "cp", (s,))) for s in ("zero1", "fsdp")]
    jobs.append(("planner, strategy 'auto'", lambda: _planned(case, "auto")))
  rows = []
  for label, job in jobs:
    try:
      row = job()
    except Exception as e:  # a family with no plan here says why, as `wapar bench` does
      row = {"row": label, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    rows.append(row)
    print(
      name,
      json.dumps({k: v for k, v in row.items() if k in ("row", "strategy", "error")}),
      json.dumps(row.get("compiled", {})),
      flush=True,
    )
  return rows


def _err(p: float, c: float) -> str:
  return f"{(p - c) / c:+.1%}" if c else "-"


def markdown(meta: dict, results: dict) -> str:
  gib = 2**30
  memory = wap.load_profile(PROFILE).memory_bytes
  lines = [
    "# Context parallelism for long sequences",
    "",
    f"float32, AdamW, {DEVICES} x {PROFILE} ({memory / gib:.1f} GiB each); compiled on virtual "
    "CPU devices. Bytes sent count XLA:CPU's sliced-only all-reduces as the reduce-scatters "
    "GPU / TPU XLA emits. Fits: compiled peak <= the device's memory. Generated by "
    f"`benchmarks/context_parallel.py` on {meta['date']}.",
  ]
  for name, rows in results.items():
    case = CASES[name]
    lines += [
      "",
      f"## {name}: {case['example']}, {case['batch_size']} x {case['seq_len']} tokens",
      "",
      "| row | plan | mesh | remat, micro-batches | peak predicted | peak compiled | err "
      "| fits | step compiled | step err | FLOPs err | sent predicted | sent compiled | err |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      if "error" in r:
        lines.append(f"| {r['row']} | {r['error']} |" + " |" * 12)
        continue
      k, p = r["compiled"], r.get("predicted")
      fits = "yes" if k["peak_memory"] <= memory else "no"
      levers = f"{r['remat']}, {r['microbatches']}" if "remat" in r else "blocks, 1"
      if p is None:
        lines.append(
          f"| {r['row']} | {r['strategy']} | {r['mesh_shape']} | {levers} | - "
          f"| {k['peak_memory'] / gib:.2f} GiB | - | {fits} | {k['step_time']:.3f} s | - | - "
          f"| - | {k['comm_bytes'] / gib:.2f} GiB | - |"
        )
        continue
      sent = r["compiled_comm_bytes_as_gpu"]
      lines.append(
        f"| {r['row']} | {r['strategy']} | {r['mesh_shape']} | {levers} "
        f"| {p['peak_memory'] / gib:.2f} GiB | {k['peak_memory'] / gib:.2f} GiB "
        f"| {_err(p['peak_memory'], k['peak_memory'])} | {fits} | {k['step_time']:.3f} s "
        f"| {_err(p['step_time'], k['step_time'])} | {_err(p['flops'], k['flops'])} "
        f"| {p['comm_bytes'] / gib:.2f} GiB | {sent / gib:.2f} GiB "
        f"| {_err(p['comm_bytes'], sent)} |"
      )
  lines.append("")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  args = parser.parse_args()
  path = RESULTS / "context_parallel.json"
  saved = json.loads(path.read_text()) if path.exists() else {"results": {}}
  for name in args.cases:
    saved["results"][name] = run(name)
  saved["meta"] = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__}
  RESULTS.mkdir(exist_ok=True)
  path.write_text(json.dumps(saved, indent=1) + "\n")
  (RESULTS / "context_parallel.md").write_text(markdown(saved["meta"], saved["results"]))
  print(markdown(saved["meta"], saved["results"]))


if __name__ == "__main__":
  main()
