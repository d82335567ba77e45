"""The `wapar` command. Argument parsing and printing only; the work is in wapar_jax."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

import jax
from rich import progress as rich_progress
from rich.console import Console

import wapar_jax as wap
from wapar_jax._src import bench as bench_lib
from wapar_jax._src import calibrate, compilers, optimizers
from wapar_jax._src import workload as workload_lib
from wapar_jax._src.search import SEQUENCE_PARALLEL, STRATEGIES

_EPILOG = """examples:
  wapar plan gpt2-small --devices 8 --profile h100-sxm
  wapar plan gpt-7b --devices 8 --profile h100-sxm --dtype bfloat16 --out plan.json
  wapar plan alexnet --devices 4 --profile titanxp-pcie --batch-size 8 --strategy dp
  wapar plan mypkg.train:workload --devices 16     # workload() -> (loss_fn, params, batch)
  wapar plan mypkg.train:workload --batch-size 64  # passed as workload(batch_size=64)
  wapar verify gpt2-small --devices 8 --profile h100-sxm --seq-len 256
  wapar bench gpt-tiny --devices 8 --profile cpu            # auto vs dp, fsdp, tp, ..., compiled
  wapar explain gpt2-small --devices 8 --profile h100-sxm   # why this plan, and what it costs
  wapar explain --plan plan.json --maxtext                  # export a saved plan's rules
  wapar profiles                                            # list; `wapar profiles show h100-sxm`
  wapar calibrate --out me.json && wapar plan mlp --profile me.json   # this machine's figures
"""

_EXPLAIN_EPILOG = """examples:
  wapar explain gpt-tiny --devices 8 --profile cpu          # plan, then explain
  wapar explain alexnet --devices 4 --profile titanxp-pcie --batch-size 4 --plots figs/
  wapar plan gpt2-small --out plan.json && wapar explain --plan plan.json
  wapar explain --plan plan.json --rules                    # flax logical_axis_rules
  wapar explain --plan plan.json --maxtext > rules.yml      # MaxText mesh and rules YAML

The explanation shows the mesh, the device count chosen and the margin to every other count,
the parameter groups with their specs and bytes per device, the step split into compute and
communication, memory by term, the closest alternatives, and the costliest equations with the
source line that produced them.
"""

_BENCH_EPILOG = """examples:
  wapar bench gpt-tiny --devices 8 --profile cpu            # every family, compiled
  wapar bench gpt2-small --devices 8 --profile h100-sxm --no-compile   # predictions only
  wapar bench mlp --devices 4 --families dp fsdp --json     # auto, dp and fsdp as JSON rows

A row per family: the mesh it plans, its predicted step time and peak memory and whether it
fits, and, compiled for its mesh on virtual CPU devices, the step priced from the compiled
module and the compiled peak. Each baseline family uses all --devices devices, as it would be
run by hand; auto picks its own (all of them with --all-devices). A
family with no plan says why. * marks the planner's choice (auto, and any family that plans the
same).
"""

_PROFILES_EPILOG = """examples:
  wapar profiles                      # list the built-in device profiles
  wapar profiles show titanxp-pcie    # one profile in full, with its sources
  wapar profiles h100-sxm             # the same, shorter
  wapar plan mlp --profile my-gpu.json   # a profile of your own: same fields as `show` prints
"""


def _workload(args) -> workload_lib.Workload:
  return workload_lib.load(
    args.model,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    dtype=args.dtype,
    optimizer=args.optimizer,
    lr=args.lr,
  )


def _make_plan(args, workload=None, strategy=None, all_devices=None, progress=True):
  workload = workload or _workload(args)
  headroom = {} if args.memory_headroom is None else {"memory_headroom": args.memory_headroom}
  return wap.plan(
    workload.loss_fn,
    workload.params,
    workload.batch,
    optimizer=workload.optimizer,
    devices=args.devices,
    profile=args.profile,
    objective=args.objective,
    strategy=strategy or args.strategy,
    all_devices=args.all_devices if all_devices is None else all_devices,
    cache=not args.no_cache,
    progress=_progress(args) if progress else None,
    remat=args.remat,
    microbatches=args.microbatches,
    stages=args.stages,
    memory_rules=args.memory_rules,
    max_seconds=args.max_seconds,
    sequence_parallel=SEQUENCE_PARALLEL[args.sequence_parallel],
    **headroom,
  )


def _use_cpu_devices(n: int) -> None:
  # Enough CPU devices here spares a child process; too late once jax has started.
  with contextlib.suppress(RuntimeError, AttributeError):
    jax.config.update("jax_num_cpu_devices", max(n, jax.config.jax_num_cpu_devices))


def _progress(args):
  """Progress bars on stderr for tracing, cost analysis and search: on a terminal or when
  asked with --progress, never with --json (scripts read stdout, and bars would clutter logs)."""
  if getattr(args, "json", False) or not (getattr(args, "progress", False) or sys.stderr.isatty()):
    return None
  console = Console(stderr=True)

  def bar(phase, items):
    items = list(items)
    with rich_progress.Progress(
      rich_progress.SpinnerColumn(),
      rich_progress.TextColumn("{task.description:<14}"),
      rich_progress.BarColumn(),
      rich_progress.MofNCompleteColumn(),
      rich_progress.TimeElapsedColumn(),
      console=console,
    ) as progress:
      task = progress.add_task(phase, total=len(items))
      for item in items:
        yield item
        progress.advance(task)

  return bar


def _cmd_explain(args) -> int:
  if args.plan:
    plan = wap.Plan.load(args.plan)
  elif args.model:
    plan = _make_plan(args)
  else:
    raise wap.errors.InvalidArgumentError(
      "explain needs a model to plan or --plan FILE, e.g. "
      "`wapar explain gpt-tiny` or `wapar explain --plan plan.json`. "
      "Got neither."
    )
  if args.json:
    details = plan.details.to_dict() if plan.details is not None else None
    print(
      json.dumps(
        {
          "mesh_shape": dict(plan.mesh_shape),
          "strategy": plan.strategy,
          "predicted": dataclasses.asdict(plan.predicted),
          "logical_axis_rules": plan.logical_axis_rules() if details else None,
          "details": details,
        },
        indent=1,
      )
    )
  elif args.rules:
    for name, axis in plan.logical_axis_rules():
      print(f"({name!r}, {axis!r}),")
  elif args.maxtext:
    print(plan.to_maxtext_yaml(), end="")
  else:
    print(plan.explain(top=args.top))
  if args.plots:
    os.makedirs(args.plots, exist_ok=True)
    figures = {
      "sweep": plan.plot_sweep(),
      "breakdown": plan.plot_breakdown(),
      "layout": plan.plot_layout(),
    }
    for name, fig in figures.items():
      fig.savefig(os.path.join(args.plots, f"{name}.png"), dpi=120)
    if not args.json:
      print(
        f"plots written to {args.plots}/: " + ", ".join(f"{n}.png" for n in figures),
        file=sys.stderr,
      )
  return 0


def _cmd_plan(args) -> int:
  plan = _make_plan(args)
  if args.out:
    plan.save(args.out)
  if args.json:
    print(plan.to_json())
  else:
    print(plan.summary())
    stats = plan.stats
    print(
      f"\nplanned in {stats['total_seconds']:.2f} s: {stats['ops']:.0f} equations, "
      f"{stats['unique_ops']:.0f} unique ({stats['lowered_ops']:.0f} costed by XLA now), "
      f"{stats['candidates_evaluated']:.0f} candidates"
    )
    if args.out:
      print(f"plan written to {args.out}")
  return 0


def _cmd_verify(args) -> int:
  _use_cpu_devices(args.devices)
  workload = _workload(args)
  result = _make_plan(args, workload).verify(
    workload=workload.child, timeout=args.timeout, compiler=args.compiler
  )
  print(json.dumps(result.to_dict(), indent=1) if args.json else result.table())
  return 0


def _cmd_bench(args) -> int:
  if not args.no_compile:
    _use_cpu_devices(args.devices)
  workload = _workload(args)
  families = args.families or STRATEGIES
  rows = bench_lib.bench(
    # A baseline runs on every device offered, as one written by hand would.
    lambda strategy: _make_plan(
      args, workload, strategy, args.all_devices or strategy != "auto", progress=False
    ),
    None
    if args.no_compile
    else lambda plan: plan.verify(workload=workload.child, timeout=args.timeout),
    families=("auto", *(f for f in families if f != "auto")),
    progress=_progress(args),
  )
  if args.json:
    print(json.dumps([r.to_dict() for r in rows], indent=1))
  else:
    print(f"{args.model} on up to {args.devices} {args.profile} devices, per device and step:")
    print(bench_lib.table(rows))
  return 0


def _cmd_profiles(args) -> int:
  words = list(args.name)
  if words[:1] in (["list"], ["ls"]):
    words = words[1:]
  elif words[:1] == ["show"]:
    words = words[1:]
    if not words:
      raise wap.errors.InvalidArgumentError(
        "`wapar profiles show` needs a profile name, e.g. `wapar profiles show h100-sxm`. Got none."
      )
  if len(words) > 1:
    raise wap.errors.InvalidArgumentError(f"show one profile at a time. Got {words}.")
  if words:
    print(json.dumps(wap.load_profile(words[0]).to_dict(), indent=2))
    return 0
  for name in wap.list_profiles():
    p = wap.load_profile(name)
    print(
      f"{name:16s} {p.kind:4s} {p.flops_per_second('bfloat16') / 1e12:7.1f} TFLOP/s bf16  "
      f"{p.memory_bytes / 2**30:6.1f} GiB  {p.devices_per_node:5d} per node"
    )
  return 0


def _cmd_calibrate(args) -> int:
  sizes = calibrate.TINY_SIZES if args.quick else None
  profile = calibrate.calibrate(args.out, name=args.name, sizes=sizes, base=args.base)
  if args.json:
    print(json.dumps(profile.to_dict(), indent=2))
  else:
    print(
      f"{profile.name}: float32 {profile.flops_per_second('float32') / 1e9:.1f} GFLOP/s, "
      f"bfloat16 {profile.flops_per_second('bfloat16') / 1e9:.1f} GFLOP/s, memory "
      f"{profile.memory_bandwidth / 1e9:.2f} GB/s, kernel overhead "
      f"{profile.kernel_overhead * 1e6:.2f} us, link {profile.intra_node.bandwidth / 1e9:.2f} "
      f"GB/s + {profile.intra_node.latency * 1e6:.1f} us per step "
      f"({profile.devices_per_node} local device(s))"
    )
    print(f"profile written to {args.out}; use it as `wapar plan MODEL --profile {args.out}`")
  return 0


def _add_plan_arguments(p, model_nargs=None, strategy=True) -> None:
  """The workload, device and search arguments shared by `plan`, `verify`, `explain` and
  `bench` (which plans every strategy, so takes no --strategy)."""
  p.add_argument(
    "model",
    nargs=model_nargs,
    help="a built-in example (mlp, cnn, gpt-tiny, gpt2-small, gpt-7b, "
    "alexnet, vgg16, ...) or module:function returning (loss_fn, params, batch[, optimizer])",
  )
  p.add_argument(
    "--devices",
    type=int,
    default=8,
    help="devices offered (default 8); every count up to it is considered",
  )
  p.add_argument(
    "--profile", default="h100-sxm", help="device profile name or .json file (see `wapar profiles`)"
  )
  p.add_argument("--objective", choices=("time", "energy"), default="time")
  if strategy:
    p.add_argument(
      "--strategy",
      default="auto",
      choices=STRATEGIES,
      help="auto, or restrict to one family (for baselines; `wapar bench` compares them all)",
    )
  p.add_argument("--all-devices", action="store_true", help="only plans that use every device")
  p.add_argument(
    "--memory-headroom",
    type=float,
    help="fraction of device memory kept free (default: wap.plan's, for "
    "fragmentation, runtime buffers and the memory model's error)",
  )
  p.add_argument(
    "--memory-rules",
    default="profile",
    choices=("profile", *compilers.REGISTRY),
    help="whose buffer rules decide the fit: the profile's compiler (default), "
    "or a compiler's, e.g. xla:cpu so that `verify` on CPU devices checks it",
  )
  p.add_argument("--sequence-parallel", choices=tuple(SEQUENCE_PARALLEL), default="searched")
  p.add_argument(
    "--remat",
    choices=("none", "layers", "layers_dots"),
    help="force per-layer rematerialisation (default: searched when memory decides)",
  )
  p.add_argument(
    "--microbatches",
    type=int,
    help="force gradient-accumulation micro-batches (default: searched likewise)",
  )
  p.add_argument(
    "--stages",
    type=int,
    help="pipeline stages: 1 for none, k for exactly k (default: searched)",
  )
  p.add_argument(
    "--max-seconds",
    type=float,
    help="bound planning time: past it the search stops and the best plan so far is kept, "
    "with a warning (tracing the step always finishes; default: no limit)",
  )
  p.add_argument(
    "--batch-size",
    type=int,
    help="override the global batch size (module:function: passed as batch_size=)",
  )
  p.add_argument(
    "--seq-len", type=int, help="override the sequence length (module:function: seq_len=)"
  )
  p.add_argument("--dtype", help="parameter/compute dtype, e.g. bfloat16 (module:function: dtype=)")
  p.add_argument(
    "--optimizer",
    choices=tuple(optimizers.OPTIMIZERS),
    help=f"default {workload_lib.DEFAULT_OPTIMIZER}, or the one module:function returns",
  )
  p.add_argument(
    "--lr", type=float, help=f"--optimizer's learning rate (default {workload_lib.DEFAULT_LR})"
  )
  p.add_argument("--no-cache", action="store_true", help="do not use the on-disk op-cost cache")
  p.add_argument(
    "--progress",
    action="store_true",
    help="progress bars on stderr even when it is not a terminal (never with --json)",
  )


# `verify`'s and `bench`'s bound on a child process.
_TIMEOUT = {"type": float, "default": 300.0, "help": "seconds a child-process compile may take"}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="wapar",
    description="Plan how to shard a JAX train step: device count, mesh shape "
    "and a PartitionSpec for every parameter, optimizer-state and batch leaf.",
    epilog=_EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser(
    "plan",
    help="plan a built-in example or module:function",
    epilog=_EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _add_plan_arguments(p)
  p.add_argument("--out", help="write the plan as JSON to this file (atomically)")
  p.add_argument("--json", action="store_true", help="print the plan as JSON")
  p.set_defaults(run=_cmd_plan)

  p = sub.add_parser(
    "verify",
    help="plan, then compile the step for the plan's mesh on "
    "virtual CPU devices: predicted vs compiled FLOPs, bytes, memory",
  )
  _add_plan_arguments(p)
  p.add_argument("--timeout", **_TIMEOUT)
  p.add_argument("--json", action="store_true", help="print the comparison as JSON")
  p.add_argument(
    "--compiler",
    choices=("cpu", "gpu"),
    default="cpu",
    help="cpu: XLA:CPU on virtual CPU devices (bf16 memory checked through a float32 twin); "
    "gpu: GPU XLA on mock GPU devices, needs one GPU",
  )
  p.set_defaults(run=_cmd_verify)

  p = sub.add_parser(
    "bench",
    help="the plan against every baseline family (dp, zero1, fsdp, tp, ...): predicted "
    "and compiled step time and peak memory, as a table",
    epilog=_BENCH_EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _add_plan_arguments(p, strategy=False)
  p.add_argument(
    "--families",
    nargs="+",
    choices=STRATEGIES,
    metavar="FAMILY",
    help=f"the families to compare with auto (default all: {', '.join(STRATEGIES[1:])})",
  )
  p.add_argument(
    "--no-compile", action="store_true", help="predictions only: compile no family's step"
  )
  p.add_argument("--timeout", **_TIMEOUT)
  p.add_argument("--json", action="store_true", help="print the rows as JSON")
  p.set_defaults(run=_cmd_bench)

  p = sub.add_parser(
    "explain",
    help="why a plan: device sweep, parameter groups, step and "
    "memory breakdown, alternatives, costliest equations; export rules",
    epilog=_EXPLAIN_EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _add_plan_arguments(p, model_nargs="?")
  p.add_argument("--plan", metavar="FILE", help="explain a saved plan instead of planning")
  p.add_argument("--top", type=int, default=10, help="rows per table (default 10)")
  what = p.add_mutually_exclusive_group()
  what.add_argument("--json", action="store_true", help="the explanation's data as JSON")
  what.add_argument("--rules", action="store_true", help="print flax logical_axis_rules")
  what.add_argument(
    "--maxtext", action="store_true", help="print MaxText-style mesh and rules YAML"
  )
  p.add_argument(
    "--plots",
    metavar="DIR",
    help="also write sweep.png, breakdown.png and layout.png (needs matplotlib)",
  )
  p.set_defaults(run=_cmd_explain)

  p = sub.add_parser(
    "profiles",
    help="list built-in device profiles, or show one",
    epilog=_PROFILES_EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("name", nargs="*", metavar="[show] NAME", help="a profile to show in full")
  p.set_defaults(run=_cmd_profiles)

  p = sub.add_parser(
    "calibrate",
    help="measure this machine's devices (matmul, memory, "
    "kernel overhead, collectives) and write a device profile",
  )
  p.add_argument(
    "--out", default="calibrated.json", help="profile file to write (default calibrated.json)"
  )
  p.add_argument("--name", help="profile name (default calibrated-<device kind>)")
  p.add_argument(
    "--base",
    help="built-in profile (or file) for what one machine cannot "
    "measure: inter-node link, power (default: nearest to the device kind)",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="tiny sizes: a smoke test in about a second, not figures to plan with",
  )
  p.add_argument("--json", action="store_true", help="print the profile as JSON")
  p.set_defaults(run=_cmd_calibrate)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.run(args)
  except wap.WaparError as e:
    print(f"wapar: error: {type(e).__name__}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
