"""Expert parallelism (EP) against FSDP, ZeRO-1 and TP on mixture-of-experts models, by XLA.

For each case (a MoE of the zoo, a batch, 8 or 2 x 8 h100-sxm devices) the planner plans the
step as it chooses (`strategy="auto"`), as the best EP plan (`strategy="ep"`, where auto chose
none) and as the best EP plan with FSDP storage (`ep+fsdp`); each is
compiled for its mesh on virtual CPU devices (`plan.verify()`), prediction beside compiled
truth. The baselines are written by hand with `jax.jit` + `jax.sharding` as a researcher writes
them, on all of the case's devices, compiled and read back (`verify.read_compiled`):

- ZeRO-1: parameters replicated, each optimizer-state leaf split on its first dim that divides;
- FSDP: every weight split on its largest dim that divides, the batch held to its split inside
  the loss, so that XLA gathers the weights where they are used;
- TP (Megatron-style, one node's devices): q / k / v, the MLP's and the experts' first matmuls
  split on their outputs, the output projections on their inputs, the vocabulary split; batch
  replicated (data over the nodes where there are two);
- EP by weight specs alone: the expert weights split on E, nothing constrained inside the
  loss, as `jax.jit` of the same in / out shardings (what the planner's constraints add).

Step time is the compiled kernels' roofline plus the compiled collectives priced on the profile;
bytes sent count XLA:CPU's sliced all-reduces as the reduce-scatters GPU XLA emits. Predicted
peak under XLA:CPU's buffer rules (what the compile can check).

    python benchmarks/expert_parallel.py                       # every case, ~15 min
    python benchmarks/expert_parallel.py --cases moe-gpt@8
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import wapar_jax as wap  # noqa: E402
from wapar_jax import examples  # noqa: E402
from wapar_jax._src import verify  # noqa: E402
from wapar_jax._src.cost.collectives import hierarchical_collective_traffic  # noqa: E402
from wapar_jax._src.search import sweep  # noqa: E402
from wapar_jax._src.tree import abstract  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TX = optax.adamw(1e-4)
PROFILE = "h100-sxm"
FIGURES = ("flops", "comm_bytes", "comm_time", "compute_time", "step_time", "peak_memory")
# name -> (example, batch size, devices)
CASES = {
  "moe-gpt@8": ("moe-gpt", 8, 8),
  "moe-gpt-16e@8": ("moe-gpt-16e", 16, 8),
  "moe-gpt@16": ("moe-gpt", 16, 16),
  "moe-gpt-16e@16": ("moe-gpt-16e", 16, 16),
}
# Megatron's column- and row-split weights of the zoo's MoE GPT, by module (kernel dims).
_COLUMN = ("query", "key", "value")
_ROW = ("attn_out",)


def _mesh(shape: dict) -> Mesh:
  n = int(np.prod(list(shape.values())))
  grid = np.asarray(jax.devices()[:n], dtype=object).reshape(tuple(shape.values()))
  return Mesh(grid, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


def _scattered(read) -> float:
  """Bytes sent, sliced all-reduces as reduce-scatters (`Verification.comm_bytes_scattered`)."""

  def sent(kind, c):
    n_inner = max(c.group_size // c.nodes, 1)
    return sum(hierarchical_collective_traffic(kind, c.scattered_bytes, n_inner, c.nodes))

  saved = sum(
    (sent("all-reduce", c) - sent("reduce-scatter", c)) * c.count
    for c in read.collectives
    if c.scattered_bytes
  )
  return read.figures.comm_bytes - saved


def _kinds(collectives) -> dict:
  out: dict = {}
  for c in collectives:
    k = out.setdefault(c.kind, {"ops": 0, "runs": 0.0, "buffer_bytes": 0.0})
    k["ops"] += 1
    k["runs"] += c.count
    k["buffer_bytes"] += c.nbytes * c.count
  return out


def _first_dividing(x, n: int, largest: bool = False) -> P:
  dims = [d for d, size in enumerate(x.shape) if size % n == 0]
  if not dims:
    return P()
  d = max(dims, key=lambda d: x.shape[d]) if largest else dims[0]
  return P(*([None] * d + ["data"]))


def _tp_spec(path, x, n: int) -> P:
  names = [getattr(k, "key", str(k)) for k in path]
  module, leaf = ([""] + names)[-2], names[-1]
  split = lambda d: P(*([None] * d + ["tensor"])) if x.shape[d] % n == 0 else P()  # noqa: E731
  if module in _COLUMN:
    return split(x.ndim - 1)
  if module in _ROW and leaf == "kernel":
    return split(0)
  if leaf == "w_in":
    return split(2)
  if leaf == "w_out":
    return split(1)
  if module == "wte":
    return split(0)
  return P()


def _by_hand(name, ex, mesh_shape, p_specs, b_specs, profile, hold_batch=False, o_specs=None):
  """A baseline's train step with jax and optax only, jitted, compiled and read back."""
  t0 = time.perf_counter()
  mesh = _mesh(mesh_shape)
  named = lambda specs: jax.tree.map(  # noqa: E731
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
  )
  params, batch = abstract(ex.params), abstract(ex.batch)
  opt_abstract = jax.eval_shape(TX.init, params)
  if o_specs is None:
    o_specs = optax.tree_map_params(
      TX,
      lambda _, s: s,
      opt_abstract,
      p_specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P),
    )

  def loss_fn(p, b):
    if hold_batch:
      b = jax.lax.with_sharding_constraint(b, named(b_specs))
    return ex.loss_fn(p, b)

  def train_step(p, o, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, o = TX.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  step = jax.jit(
    train_step,
    in_shardings=(named(p_specs), named(o_specs), named(b_specs)),
    out_shardings=(named(p_specs), named(o_specs), NamedSharding(mesh, P())),
    donate_argnums=(0, 1),
  )
  lowered = step.lower(params, abstract(opt_abstract), batch)
  read = verify.read_compiled(verify.compile_like_target(lowered), mesh_shape, profile)
  return {
    "name": name,
    "mesh": mesh_shape,
    "compiled": {f: getattr(read.figures, f) for f in FIGURES},
    "compiled_comm_bytes_as_gpu": _scattered(read),
    "collectives": _kinds(read.collectives),
    "seconds": time.perf_counter() - t0,
  }


def _baselines(ex, devices: int, profile) -> list[dict]:
  nodes = max(1, devices // profile.devices_per_node)
  per_node = devices // nodes
  params, batch = abstract(ex.params), abstract(ex.batch)
  data = {"data": devices}
  b_data = jax.tree.map(lambda _: P("data"), batch)
  replicated = jax.tree.map(lambda _: P(), params)
  zero1_state = optax.tree_map_params(
    TX,
    lambda x, _: _first_dividing(x, devices),
    jax.eval_shape(TX.init, params),
    replicated,
    transform_non_params=lambda _: P(),
    is_leaf=lambda x: isinstance(x, P),
  )
  rows = [
    _by_hand("zero1 (by hand)", ex, data, replicated, b_data, profile, o_specs=zero1_state),
    _by_hand(
      "fsdp (by hand)",
      ex,
      data,
      jax.tree.map(lambda x: _first_dividing(x, devices, largest=True), params),
      b_data,
      profile,
      hold_batch=True,
    ),
  ]
  tp_mesh = {"data": nodes, "tensor": per_node} if nodes > 1 else {"tensor": per_node}
  tp_specs = jax.tree_util.tree_map_with_path(lambda p, x: _tp_spec(p, x, per_node), params)
  b_tp = jax.tree.map(lambda _: P("data") if nodes > 1 else P(), batch)
  rows.append(_by_hand("tp (by hand)", ex, tp_mesh, tp_specs, b_tp, profile))
  experts = jax.tree.leaves(params)  # the experts: the leading dim of w_in, found by name here
  e = next(x.shape[0] for x in experts if x.ndim == 3)
  ep = int(np.gcd(e, devices))
  ep_mesh = {"data": devices // ep, "expert": ep} if devices > ep else {"expert": ep}
  axes = tuple(ep_mesh) if len(ep_mesh) > 1 else "expert"
  ep_specs = jax.tree_util.tree_map_with_path(
    lambda p, x: P("expert") if getattr(p[-1], "key", "") in ("w_in", "w_out") else P(), params
  )
  b_ep = jax.tree.map(lambda _: P(axes), batch)
  rows.append(_by_hand("ep, weight specs only (by hand)", ex, ep_mesh, ep_specs, b_ep, profile))
  return rows


def _planned(ex, devices: int, strategy: str, storages=None) -> dict:
  """The planner's plan, verified; `storages`: the EP storages searched (default all)."""
  t0 = time.perf_counter()
  with contextlib.ExitStack() as stack:
    if storages is not None:  # no public lever picks EP's storage: the search's set, narrowed
      stack.enter_context(_storages(storages))
    plan = wap.plan(
      ex.loss_fn,
      ex.params,
      ex.batch,
      optimizer=TX,
      devices=devices,
      strategy=strategy,
      profile=PROFILE,
      memory_rules="xla:cpu",
    )
  planned = time.perf_counter() - t0
  v = plan.verify()
  return {
    "name": f"planner, strategy={strategy!r}" + (f", {'/'.join(storages)}" if storages else ""),
    "strategy": plan.strategy,
    "mesh": dict(plan.mesh_shape),
    "expert": plan.chosen.expert,
    "experts_read": list(plan.details.experts),
    "plan_seconds": planned,
    "verify_seconds": v.verify_seconds,
    "predicted": {f: getattr(v.predicted, f) for f in FIGURES},
    "compiled": {f: getattr(v.compiled, f) for f in FIGURES},
    "compiled_comm_bytes_as_gpu": v.comm_bytes_scattered,
    "collectives": _kinds(v.collectives),
  }


@contextlib.contextmanager
def _storages(storages):
  saved = sweep.EXPERT_STORAGES
  sweep.EXPERT_STORAGES = frozenset(storages)
  try:
    yield
  finally:
    sweep.EXPERT_STORAGES = saved


def _family_predictions(ex, devices: int) -> dict:
  """The planner's best plan of each family on all the devices: strategy and predicted step."""
  out = {}
  for family in ("zero1", "fsdp", "tp", "dp_tp", "ep"):
    try:
      plan = wap.plan(
        ex.loss_fn,
        ex.params,
        ex.batch,
        optimizer=TX,
        devices=devices,
        all_devices=True,
        strategy=family,
        profile=PROFILE,
        memory_rules="xla:cpu",
      )
    except wap.WaparError as e:  # no plan of the family on all the devices: said so
      out[family] = {"strategy": f"none ({type(e).__name__})", "step_time": float("nan")}
      continue
    out[family] = {"strategy": plan.strategy, "step_time": plan.predicted.step_time}
  return out


def run_case(name: str) -> dict:
  model, batch_size, devices = CASES[name]
  ex = examples.get_example(model, batch_size=batch_size)
  profile = wap.load_profile(PROFILE)
  rows = [_planned(ex, devices, "auto")]
  if rows[0]["expert"] == 1:
    rows.append(_planned(ex, devices, "ep"))
  rows.append(_planned(ex, devices, "ep", storages=("fsdp",)))
  for row in rows:
    print(name, row["name"], row["strategy"], json.dumps(row["compiled"]), flush=True)
  for row in _baselines(ex, devices, profile):
    print(name, row["name"], json.dumps(row["compiled"]), flush=True)
    rows.append(row)
  return {
    "model": model,
    "batch_size": batch_size,
    "devices": devices,
    "rows": rows,
    "predicted_by_family": _family_predictions(ex, devices),
  }


def _err(p: float, c: float) -> str:
  return f"{(p - c) / c:+.1%}" if c else "-"


def markdown(cases: dict) -> str:
  gib, ms = 2**30, 1e3
  lines = [
    "# Expert parallelism on mixture-of-experts models",
    "",
    f"AdamW, float32, {PROFILE}; compiled on virtual CPU devices. Step time: compiled kernels' "
    "roofline + compiled collectives priced on the profile. Bytes sent: XLA:CPU's sliced "
    "all-reduces counted as the reduce-scatters GPU XLA emits. Baselines written by hand with "
    "jax.jit + jax.sharding (see the script's docstring). Generated by "
    "`benchmarks/expert_parallel.py`.",
    "",
  ]
  for name, case in cases.items():
    rows = case["rows"]
    lines += [
      f"## {name}: {case['model']}, batch {case['batch_size']} x 1024 tokens, "
      f"{case['devices']} devices",
      "",
      "| plan | mesh | step compiled | sent compiled | peak compiled | step predicted | err "
      "| FLOPs err | sent predicted | err | peak predicted | err |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      k, sent = r["compiled"], r["compiled_comm_bytes_as_gpu"]
      label = f"{r['name']} -> {r['strategy']}" if "strategy" in r else r["name"]
      cells = [
        label,
        str(r["mesh"]),
        f"{k['step_time'] * ms:.2f} ms",
        f"{sent / gib:.3f} GiB",
        f"{k['peak_memory'] / gib:.2f} GiB",
      ]
      if "predicted" in r:
        p = r["predicted"]
        cells += [
          f"{p['step_time'] * ms:.2f} ms",
          _err(p["step_time"], k["step_time"]),
          _err(p["flops"], k["flops"]),
          f"{p['comm_bytes'] / gib:.3f} GiB",
          _err(p["comm_bytes"], sent),
          f"{p['peak_memory'] / gib:.2f} GiB",
          _err(p["peak_memory"], k["peak_memory"]),
        ]
      else:
        cells += ["-"] * 7
      lines.append("| " + " | ".join(cells) + " |")
    # The planner's EP plan: its choice where that is EP, else its best EP plan.
    ep = [r for r in rows if r.get("expert", 1) > 1]
    others = [r for r in rows if "by hand" in r["name"] and not r["name"].startswith("ep")]
    if ep and others:
      best = min(others, key=lambda r: r["compiled"]["step_time"])
      t = ep[0]["compiled"]["step_time"]
      lines += [
        "",
        f"EP ({ep[0]['strategy']}, {ep[0]['mesh']}) compiled {t * ms:.2f} ms against the best "
        f"of ZeRO-1 / FSDP / TP, {best['name']}, {best['compiled']['step_time'] * ms:.2f} ms: "
        f"{1 - t / best['compiled']['step_time']:+.1%} faster. Planner's choice: "
        f"{rows[0]['strategy']}. Routing read from the program (E, C, T, k): "
        f"{rows[0]['experts_read']}.",
      ]
    if "predicted_by_family" in case:
      lines += [
        "",
        "The planner's best plan of each family on all the devices, predicted step: "
        + ", ".join(
          f"{f} -> {x['strategy']} {x['step_time'] * ms:.2f} ms"
          for f, x in case["predicted_by_family"].items()
        )
        + ".",
      ]
    lines += ["", "Compiled collectives (instructions, runs, buffer bytes over the runs):", ""]
    lines += ["| plan | kind | ops | runs | buffers |", "|---|---|---|---|---|"]
    for r in rows:
      for kind, c in sorted(r["collectives"].items()):
        lines.append(
          f"| {r['name']} | {kind} | {c['ops']} | {c['runs']:.0f} "
          f"| {c['buffer_bytes'] / gib:.3f} GiB |"
        )
    lines.append("")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
  args = parser.parse_args()
  RESULTS.mkdir(exist_ok=True)
  path = RESULTS / "expert_parallel.json"
  cases = json.loads(path.read_text())["cases"] if path.exists() else {}
  for name in args.cases:
    cases[name] = run_case(name)
    path.write_text(json.dumps({"cases": cases}, indent=1) + "\n")  # kept case by case
  (RESULTS / "expert_parallel.md").write_text(markdown(cases))
  print(markdown(cases))


if __name__ == "__main__":
  main()
