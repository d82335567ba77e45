"""Plans for several nodes: 2 x 8, 4 x 8 and 16 x 8 H100s, and a TPU v5e-256 slice.

For GPT-2 small, GPT 1.3B and GPT 6.6B (bfloat16, global batch = 2 sequences per device) this
plans with every device in use (`all_devices=True`, strategy "auto") and records the chosen
mesh, which mesh axes the planner laid across nodes, and the predicted step time, compute and
communication time and memory per device, with the planning time.

The 2 x 8 H100 plans of the smaller models are then checked against the compiled module
(`plan.verify()`, 16 virtual CPU devices in a child process): FLOPs, bytes each device sends,
communication time and peak memory. These are planned in float32, because XLA's CPU pipeline
runs bfloat16 collectives and much bfloat16 arithmetic in float32, which would double the
compiled bytes for reasons no GPU shares. `verify` prices the compiled collectives that span
nodes two-level on the same node layout, as the planner does.

Writes `benchmarks/results/multinode.json` and `multinode.md`.

    python benchmarks/multinode.py                   # planning ~1 min; verify adds ~1-2 min
    python benchmarks/multinode.py --verify-models   # planning only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import optax

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import search
from wapar_jax._src.fmt import human_bytes, human_seconds, percent

# (label, devices, profile): H100 nodes of 8 GPUs; a v5e-256 slice is one ICI domain.
SETTINGS = (
  ("2x8 H100", 16, "h100-sxm"),
  ("4x8 H100", 32, "h100-sxm"),
  ("16x8 H100", 128, "h100-sxm"),
  ("TPU v5e-256", 256, "tpu-v5e"),
)
MODELS = ("gpt2-small", "gpt-1.3b", "gpt-7b")
DTYPE = "bfloat16"
PER_DEVICE_BATCH = 2
VERIFY_SETTING = "2x8 H100"
VERIFY_MODELS = ("gpt2-small", "gpt-1.3b")
VERIFY_DTYPE = "float32"
# Besides the planner's choice, the data-parallel baseline is verified too: its only collective
# is the gradient all-reduce over the data axis that crosses the two nodes.
VERIFY_BASELINES = ("dp",)
RESULTS = Path(__file__).parent / "results"


def _workload(model: str, devices: int, dtype: str) -> dict:
  return {"example": model, "batch_size": PER_DEVICE_BATCH * devices, "dtype": dtype}


def plan_case(
  label: str, devices: int, profile: str, model: str, strategy: str = "auto", dtype: str = DTYPE
):
  """(case record, plan or None)."""
  w = _workload(model, devices, dtype)
  case = {
    "setting": label,
    "devices": devices,
    "profile": profile,
    "model": model,
    "requested": strategy,
    "global_batch": w["batch_size"],
    "dtype": dtype,
  }
  ex = examples.get_example(model, batch_size=w["batch_size"], dtype=dtype)
  t0 = time.perf_counter()
  try:
    plan = wap.plan(
      ex.loss_fn,
      ex.params,
      ex.batch,
      optimizer=optax.adamw(1e-3),
      devices=devices,
      profile=profile,
      strategy=strategy,
      all_devices=True,
    )
  except wap.WaparError as e:
    case.update(error=f"{type(e).__name__}: {e}", plan_seconds=time.perf_counter() - t0)
    return case, None
  c = plan.chosen
  per_node = wap.load_profile(profile).devices_per_node
  case.update(
    plan_seconds=time.perf_counter() - t0,
    stats=dict(plan.stats),
    strategy=plan.strategy,
    mesh_shape=dict(plan.mesh_shape),
    nodes=math.ceil(devices / per_node),
    devices_per_node=per_node,
    cross_node_axes=list(c.cross_node_axes),
    axis_spans={a: list(s) for a, s in search.axis_spans(c.data, c.model, per_node).items()},
    model_split=list(plan.model_split),
    remat=c.remat,
    microbatches=c.microbatches,
    step_time=c.step_time,
    compute_time=c.compute_time,
    comm_time=c.comm_time,
    comm_bytes=c.comm_bytes,
    peak_memory=c.peak_memory,
    param_memory=c.param_memory,
    opt_state_memory=c.opt_state_memory,
    activation_memory=c.activation_memory,
    # The best kept plan whose collectives cross nodes on other axes: what the chosen
    # layout is worth against the alternatives.
    alternative=_alternative(plan),
  )
  return case, plan


def _alternative(plan) -> dict | None:
  for c in plan.candidates:
    if c.fits and c.cross_node_axes != plan.chosen.cross_node_axes:
      return {
        "mesh_shape": c.mesh_shape,
        "strategy": c.strategy,
        "step_time": c.step_time,
        "comm_time": c.comm_time,
        "cross_node_axes": list(c.cross_node_axes),
      }
  return None


def verify_case(case: dict, plan) -> None:
  w = dict(_workload(case["model"], case["devices"], case["dtype"]), optimizer="adamw", lr=1e-3)
  try:
    case["verification"] = plan.verify(workload=w, timeout=600).to_dict()
  except wap.WaparError as e:
    case["verification_error"] = f"{type(e).__name__}: {e}"


def _name(case: dict) -> str:
  notes = [
    n for n in (case.get("requested", "auto"), case.get("dtype", DTYPE)) if n not in ("auto", DTYPE)
  ]
  return case["model"] + (f" ({', '.join(notes)})" if notes else "")


def markdown(cases: list[dict]) -> str:
  lines = [
    "# Multi-node plans",
    "",
    f'strategy "auto", every device used, {DTYPE}, global batch = {PER_DEVICE_BATCH} '
    "sequences per device, AdamW. Times and memory are per device per step. *Across nodes*: "
    "mesh axes whose collectives leave a node, with the mesh laid out as "
    "`mesh_utils.create_hybrid_device_mesh` does (model innermost, so tensor parallelism "
    "stays inside a node unless it is wider than one); such collectives are priced two-level "
    "(reduce-scatter in the node, all-reduce across nodes on 1/n of the buffer, all-gather in "
    "the node). *Layout*: per mesh axis, its devices inside one node x the nodes it spans. "
    "A v5e-256 slice is one ICI domain (`devices_per_node` 256), so nothing "
    "crosses.",
    "",
    "| setting | model | mesh | strategy | across nodes | step | compute | comm | peak mem | "
    "layout (in node x nodes) | plan s |",
    "|---|---|---|---|---|---:|---:|---:|---:|---|---:|",
  ]
  for c in cases:
    if "error" in c:
      lines.append(
        f"| {c['setting']} | {_name(c)} | - | {c['error'][:120]} | | | | | | | "
        f"{c['plan_seconds']:.1f} |"
      )
      continue
    mesh = " x ".join(f"{n}={s}" for n, s in c["mesh_shape"].items())
    alt_text = ", ".join(
      f"{a} {c['axis_spans'][a][0]}x{c['axis_spans'][a][1]}"
      for a in c["mesh_shape"]
      if a in c["axis_spans"]
    )
    lines.append(
      f"| {c['setting']} | {_name(c)} | {mesh} | {c['strategy']} | "
      f"{', '.join(c['cross_node_axes']) or 'none'} | {human_seconds(c['step_time'])} | "
      f"{human_seconds(c['compute_time'])} | {human_seconds(c['comm_time'])} | "
      f"{human_bytes(c['peak_memory'])} | {alt_text} | {c['plan_seconds']:.1f} |"
    )
  verified = [c for c in cases if "verification" in c or "verification_error" in c]
  if verified:
    lines += [
      "",
      "## Predicted vs compiled (virtual CPU devices, one per planned device)",
      "",
      "Planned in float32 (see the module docstring). Error = (predicted - compiled) / "
      "compiled. *comm as RS*: compiled bytes with the all-reduces each device only slices "
      "counted as reduce-scatters (what XLA GPU emits). *comm time*: the compiled collectives "
      "priced as the planner prices them (two-level once a group spans nodes).",
      "",
      "| setting | model | mesh | FLOPs err | comm pred | comm compiled | err | comm as RS err | "
      "comm time pred | comm time compiled | err | peak pred | peak compiled | err | verify s |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in verified:
      mesh = " x ".join(f"{n}={s}" for n, s in c["mesh_shape"].items())
      if "verification_error" in c:
        lines.append(
          f"| {c['setting']} | {_name(c)} | {mesh} | {c['verification_error'][:120]} |" + " |" * 11
        )
        continue
      v = c["verification"]
      p, k, e = v["predicted"], v["compiled"], v["errors"]
      lines.append(
        f"| {c['setting']} | {_name(c)} | {mesh} | {percent(e['flops'])} | "
        f"{human_bytes(p['comm_bytes'])} | "
        f"{human_bytes(k['comm_bytes'])} | {percent(e['comm_bytes'])} | "
        f"{percent(v['comm_bytes_scattered_error'])} | {human_seconds(p['comm_time'])} | "
        f"{human_seconds(k['comm_time'])} | {percent(e['comm_time'])} | "
        f"{human_bytes(p['peak_memory'])} | "
        f"{human_bytes(k['peak_memory'])} | {percent(e['peak_memory'])} | "
        f"{v['verify_seconds']:.1f} |"
      )
    lines += ["", "Collectives XLA emitted (kind, mesh axes, group size, across nodes?):", ""]
    for c in verified:
      if "verification" not in c:
        continue
      rows = c["verification"]["collective_summary"]
      lines.append(
        f"- **{_name(c)}**: "
        + "; ".join(
          f"{r['kind']} {','.join(r['axes']) or '-'} n={r['group_size']} "
          f"{'inter' if r['crosses_nodes'] else 'intra'}: {r['executions']:.0f} runs, "
          f"{human_bytes(r['sent_bytes'])} sent"
          for r in rows
        )
      )
  return "\n".join(lines) + "\n"


def _run(label, devices, profile, model, strategy, verified) -> dict:
  dtype = VERIFY_DTYPE if verified else DTYPE
  case, plan = plan_case(label, devices, profile, model, strategy, dtype)
  if plan is not None and verified:
    verify_case(case, plan)
  name = _name(case)
  if "error" in case:
    print(f"{label:12s} {name:16s} {case['error'][:110]}", flush=True)
    return case
  extra = ""
  if "verification" in case:
    e = case["verification"]["errors"]
    extra = (
      f"  verify: flops {percent(e['flops'])} comm {percent(e['comm_bytes'])} "
      f"comm time {percent(e['comm_time'])} "
      f"peak {percent(e['peak_memory'])}"
    )
  print(
    f"{label:12s} {name:16s} {str(case['mesh_shape']):28s} {case['strategy']:12s} "
    f"across {','.join(case['cross_node_axes']) or '-':10s} "
    f"step {human_seconds(case['step_time']):>9s} comm {human_seconds(case['comm_time']):>9s} "
    f"mem {human_bytes(case['peak_memory']):>9s} plan {case['plan_seconds']:.1f} s{extra}",
    flush=True,
  )
  return case


def _git_state() -> dict:
  """The commit the figures come from, and the tracked files that differed from it."""
  import subprocess

  root = Path(__file__).resolve().parent.parent
  try:
    head = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "diff", "--name-only", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
  except (OSError, subprocess.CalledProcessError):
    return {}
  return {"git_head": head, "modified_files": dirty}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="*", default=list(MODELS))
  parser.add_argument("--settings", nargs="*", default=[s[0] for s in SETTINGS])
  parser.add_argument(
    "--verify-models",
    nargs="*",
    default=list(VERIFY_MODELS),
    help="models whose 2x8 plan is compiled and compared (none: skip)",
  )
  parser.add_argument(
    "--verify-settings",
    nargs="*",
    default=[VERIFY_SETTING],
    help="settings whose plans are compiled and compared",
  )
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  cases = []
  for label, devices, profile in SETTINGS:
    if label not in args.settings:
      continue
    for model in args.models:
      cases.append(_run(label, devices, profile, model, "auto", False))
      if label in args.verify_settings and model in args.verify_models:
        for strategy in ("auto",) + VERIFY_BASELINES:
          cases.append(_run(label, devices, profile, model, strategy, True))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {
    "jax": jax.__version__,
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    **_git_state(),
  }
  (out / "multinode.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=1))
  (out / "multinode.md").write_text(markdown(cases))
  print(f"wrote {out / 'multinode.json'} and {out / 'multinode.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
