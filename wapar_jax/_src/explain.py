"""Plain-text views of a Plan: what was chosen, what it costs, what else was close."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from wapar_jax._src import emit


def human_bytes(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def human_seconds(s: float) -> str:
  if s >= 1:
    return f"{s:.3f} s"
  if s >= 1e-3:
    return f"{s * 1e3:.2f} ms"
  return f"{s * 1e6:.1f} us"


def _table(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _spec_str(spec: P) -> str:
  return "P(" + ", ".join(repr(e) for e in spec) + ")"


def summary(plan, max_params: int = 12) -> str:
  """The chosen mesh, parameter specs, predicted costs and the device sweep, as text."""
  p = plan.predicted
  lines = [
      f"mesh {dict(plan.mesh_shape)}: {plan.num_devices} of {plan.devices_offered} devices "
      f"({plan.profile}), strategy {plan.strategy}, objective {plan.objective}",
  ]
  if plan.model_split:
    lines.append("split on 'model': " + "; ".join(plan.model_split))
  lines += [
      "",
      "predicted per step, per device:",
      f"  step time      {human_seconds(p.step_time)}  (compute {human_seconds(p.compute_time)}, "
      f"communication {human_seconds(p.comm_time)})",
      f"  FLOPs          {p.flops:.4g}",
      f"  communicated   {human_bytes(p.comm_bytes)}",
      f"  peak memory    {human_bytes(p.peak_memory)} of {human_bytes(p.memory_budget)} budget",
      f"  energy         {p.energy:.4g} J per step (all {plan.num_devices} devices)",
      "",
  ]
  shapes = {}
  if plan.abstract_params is not None:
    shapes = {emit.path_keys(k): tuple(v.shape) for k, v in
              jax.tree_util.tree_flatten_with_path(plan.abstract_params)[0]}
  items = sorted(plan.flat_param_specs.items(),
                 key=lambda kv: -_size(shapes.get(kv[0], ())))
  rows = [[emit.path_str(k), str(shapes.get(k, "?")), _spec_str(s)] for k, s in items[:max_params]]
  lines.append(f"parameter specs (largest {min(max_params, len(items))} of {len(items)}):")
  lines.append(_table(["parameter", "shape", "spec"], rows))
  batch_rows = [[emit.path_str(k), _spec_str(s)] for k, s in plan.flat_batch_specs.items()]
  lines += ["", "batch specs:", _table(["leaf", "spec"], batch_rows), ""]

  lines.append("best plan per device count (the WAP sweep):")
  per_count = {}
  for c in plan.candidates:
    per_count.setdefault(c.devices, c)
  rows = [[str(c.devices), str(c.mesh_shape), c.strategy, human_seconds(c.step_time),
           human_seconds(c.compute_time), human_seconds(c.comm_time), human_bytes(c.peak_memory),
           f"{c.energy:.3g} J", "yes" if c.fits else "NO"]
          for _, c in sorted(per_count.items())]
  lines.append(_table(["devices", "mesh", "strategy", "step", "compute", "comm", "memory",
                       "energy", "fits"], rows))
  return "\n".join(lines)


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= d
  return n
