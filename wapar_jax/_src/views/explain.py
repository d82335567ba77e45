"""Views of a Plan: what was chosen, why, what it costs, what else was close.

`summary` is the short text; `explain` the full story as text and `html` the same as tables
for notebooks (`Plan._repr_html_`). Both are rendered from one list of sections, so they never
disagree.
"""

from __future__ import annotations

import html as html_lib
import math
import os
import re

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from wapar_jax._src.fmt import human_bytes, human_seconds
from wapar_jax._src.fmt import table as _table
from wapar_jax._src.plan_details import BATCH
from wapar_jax._src.search.sweep import divisors, in_sweep
from wapar_jax._src.tree import path_keys, path_str
from wapar_jax._src.views import levers
from wapar_jax._src.views.sections import Section, pipeline_section

# Skipped device counts named in a note; the rest are counted.
_SKIPPED_SHOWN = 8


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
  if plan.chosen.sequence_parallel:
    lines.append(levers.SEQUENCE_PARALLEL_NOTE)
  lines += [
    "",
    "predicted per step, per device:",
    f"  step time      {human_seconds(p.step_time)}  (compute {human_seconds(p.compute_time)}, "
    f"communication {human_seconds(p.comm_time)}, {human_seconds(p.exposed_comm)} of it "
    "exposed: not hidden behind independent compute)",
    f"  FLOPs          {p.flops:.4g}",
    f"  communicated   {human_bytes(p.comm_bytes)}",
    f"  peak memory    {human_bytes(p.peak_memory)} of {human_bytes(p.memory_budget)} budget"
    + f" (under the rules of {plan.profile}'s compiler)",
    f"  energy         {p.energy:.4g} J per step (all {plan.num_devices} devices)",
    "",
  ]
  shapes = {}
  if plan._abstract_params is not None:
    shapes = {
      path_keys(k): tuple(v.shape)
      for k, v in jax.tree_util.tree_flatten_with_path(plan._abstract_params)[0]
    }
  items = sorted(plan.flat_param_specs.items(), key=lambda kv: -_size(shapes.get(kv[0], ())))
  rows = [[path_str(k), str(shapes.get(k, "?")), _spec_str(s)] for k, s in items[:max_params]]
  lines.append(f"parameter specs (largest {min(max_params, len(items))} of {len(items)}):")
  lines.append(_table(["parameter", "shape", "spec"], rows))
  batch_rows = [[path_str(k), _spec_str(s)] for k, s in plan.flat_batch_specs.items()]
  lines += ["", "batch specs:", _table(["leaf", "spec"], batch_rows), ""]

  lines.append("best plan per device count (the WAP sweep):")
  per_count = {}
  for c in plan.candidates:
    per_count.setdefault(c.devices, c)
  rows = [
    [
      str(c.devices),
      str(c.mesh_shape),
      c.strategy,
      human_seconds(c.step_time),
      human_seconds(c.compute_time),
      human_seconds(c.comm_time),
      human_seconds(c.exposed_comm),
      human_bytes(c.peak_memory),
      f"{c.energy:.3g} J",
      "yes" if c.fits else "NO",
    ]
    for _, c in sorted(per_count.items())
  ]
  lines.append(
    _table(
      ["devices", "mesh", "strategy", "step", "compute", "comm", "exposed", "memory", "energy"]
      + ["fits"],
      rows,
    )
  )
  return "\n".join(lines)


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= d
  return n


# --- explain -------------------------------------------------------------------------------


def _short_source(source: str) -> str:
  """Paths relative to the working directory when under it: what a user sees in their editor."""
  path, sep, rest = source.partition(":")
  try:
    rel = os.path.relpath(path)
    path = rel if not rel.startswith("..") else path
  except ValueError:  # another drive on Windows
    pass
  return path + sep + rest


def _pattern(keys) -> str:
  """block_3/mlp/kernel -> block_*/mlp/kernel, blocks/3/... -> blocks/*/...: repeated layers."""
  parts = []
  for k in keys:
    k = str(k)
    parts.append("*" if k.isdigit() else re.sub(r"_\d+$", "_*", k))
  return "/".join(parts)


def _itemsize(dtype: str) -> int:
  try:
    return int(np.dtype(dtype).itemsize)
  except TypeError:
    return 4


def _split(spec: P, mesh_shape) -> int:
  n = 1
  for entry in spec:
    for axis in entry if isinstance(entry, tuple) else (entry,):
      if axis is not None:
        n *= int(mesh_shape.get(axis, 1))
  return n


def _pct(x: float, of: float) -> str:
  return f"{100 * x / of:.0f}%" if of > 0 else "-"


def _margin(c, best, objective: str) -> str:
  a, b = (c.step_time, best.step_time) if objective == "time" else (c.energy, best.energy)
  if b <= 0:
    return "-"
  d = (a - b) / b
  return "chosen" if c == best else f"{d * 100:+.1f}%"


def _listed(counts) -> str:
  shown = ", ".join(map(str, counts[:_SKIPPED_SHOWN]))
  more = len(counts) - _SKIPPED_SHOWN
  return shown + (f" and {more} more" if more > 0 else "")


def skipped_counts(plan) -> str | None:
  """Why device counts up to the offered one have no plan, as a sentence; None if all have.

  The search (`search.sweep`) uses a count only as data x model degrees, the data degree
  dividing the batch and the model degree a parameter dimension; past 64 devices it also
  thins the counts out. The model degrees here are those of every parameter dimension, a
  superset of the search's, so a count said not to split truly does not.
  """
  counts = {c.devices for c in plan.candidates}
  n = plan.devices_offered
  if 1 not in counts or plan.details is None:  # all_devices: one count was asked for
    return None
  batch = plan.details.batch_size
  sizes = sorted({g.size for g in plan.details.groups if g.name != BATCH and g.param_bytes > 0})
  data = [k for k in divisors(batch) if k <= n]
  model = {t for size in sizes for t in divisors(size) if t <= n}
  splits = {dp * tp for dp in data for tp in model if dp * tp <= n}
  missing = [k for k in range(1, n + 1) if k not in counts]
  thinned = [k for k in missing if not in_sweep(k, n, False)]
  unsplit = [k for k in missing if k not in splits and k not in thinned]
  other = [k for k in missing if k in splits and k not in thinned]
  notes = []
  if unsplit:
    notes.append(
      f"no plan on {_listed(unsplit)} devices: a count is used only as data x model, the data "
      f"degree dividing the batch ({batch}) and the model degree a parameter dimension "
      f"({', '.join(map(str, sizes[:6]))}{' ...' if len(sizes) > 6 else ''}); these split "
      "neither way."
    )
  if thinned:
    notes.append(
      f"{_listed(thinned)} devices are not swept: above 64 only multiples of 8 up to 1024, "
      "and beyond that 2^k times 1, 5/4, 3/2 or 7/4, each within 25% of the next."
    )
  if other:
    notes.append(
      f"no candidate kept on {_listed(other)} devices (the strategy asked for rules them out, "
      "or the search stopped at max_seconds)."
    )
  return " ".join(notes) or None


def param_groups(plan) -> list[tuple[str, int, tuple, str, P, float]]:
  """Parameter leaves grouped by (layer-pattern, shape, dtype, spec), largest first.

  Returns (pattern, count, shape, dtype, spec, bytes per device of one leaf) per group.
  """
  groups: dict[tuple, list] = {}
  for leaf in plan.details.params:
    spec = plan.flat_param_specs.get(leaf.path, P())
    key = (_pattern(leaf.path), leaf.shape, leaf.dtype, spec)
    groups.setdefault(key, [0])[0] += 1
  out = []
  for (pattern, shape, dtype, spec), (count,) in groups.items():
    per_device = math.prod(shape) * _itemsize(dtype) / _split(spec, plan.mesh_shape)
    out.append((pattern, count, shape, dtype, spec, per_device))
  out.sort(key=lambda g: -g[1] * g[5])
  return out


def _batch_note(plan, batch: int) -> list[str]:
  """Why the batch narrowed the plan, when it does not split over every device offered: a data
  axis must divide it, so other device counts need a model axis (or do not exist)."""
  offered = plan.devices_offered
  fits = [k for k in divisors(batch) if k <= offered]
  if fits[-1] == offered or plan.chosen.context > 1:  # a context axis splits beyond the rows
    return []
  chosen = plan.mesh_shape.get("data", 1) * plan.mesh_shape.get("fsdp", 1)
  return [
    f"the batch ({batch} rows) splits over {fits} data-parallel devices only, not all "
    f"{offered}: a data axis must divide it. The chosen data axis is {chosen}; a batch of "
    f"{offered * max(1, -(-batch // offered))} rows would let data parallelism use every device."
  ]


def _sections(plan, top: int) -> list[Section]:
  p, c, d = plan.predicted, plan.chosen, plan.details
  batch = d.batch_size
  per_count = {}
  for cand in plan.candidates:
    per_count.setdefault(cand.devices, cand)
  value = (lambda x: x.step_time) if plan.objective == "time" else (lambda x: x.energy)
  fitting = [x for _, x in sorted(per_count.items()) if x.fits]
  why = [
    f"objective: {plan.objective}; {plan.stats.get('candidates_evaluated', 0):.0f} candidates "
    f"priced; plans exist for {len(per_count)} device counts up to {plan.devices_offered}."
  ]
  more = [x for x in fitting if x.devices > plan.num_devices]
  fewer = [x for x in fitting if x.devices < plan.num_devices]
  if more:
    nxt = min(more, key=value)
    why.append(
      f"more devices do not pay: the best with more ({nxt.devices}, {nxt.strategy}) is "
      f"{_margin(nxt, c, plan.objective)} ({human_seconds(nxt.compute_time)} compute + "
      f"{human_seconds(nxt.comm_time)} communication vs {human_seconds(c.compute_time)} + "
      f"{human_seconds(c.comm_time)})."
    )
  if fewer:
    prev = min(fewer, key=value)
    why.append(
      f"fewer devices are slower: the best with fewer ({prev.devices}) is "
      f"{_margin(prev, c, plan.objective)}."
    )
  unfit = sorted(k for k, x in per_count.items() if not x.fits)
  if unfit:
    why.append(f"no plan fits device memory on {unfit} devices.")
  skipped = skipped_counts(plan)
  if skipped:
    why.append(skipped)
  why += _batch_note(plan, batch)
  if c.sequence_parallel:
    why.append(levers.sequence_parallel_line(plan))
  if c.expert > 1:
    why.append(levers.expert_parallel_line(plan))
  if c.context > 1:
    why.append(levers.context_parallel_line(plan))
  sweep = tuple(
    (
      str(x.devices),
      str(x.mesh_shape),
      x.strategy,
      human_seconds(x.step_time),
      human_seconds(x.comm_time),
      human_seconds(x.exposed_comm),
      f"{x.energy / batch:.3g} J",
      human_bytes(x.peak_memory),
      "yes" if x.fits else "NO",
      _margin(x, c, plan.objective),
    )
    for _, x in sorted(per_count.items())
  )
  sections = [
    Section(
      f"mesh {dict(plan.mesh_shape)}: {plan.num_devices} of {plan.devices_offered} "
      f"{plan.profile} devices, strategy {plan.strategy}",
      tuple(why) + ("best plan per device count, margin to the chosen one:",),
      ("devices", "mesh", "strategy", "step", "comm", "exposed", "energy/sample", "memory")
      + ("fits", "margin"),
      sweep,
    ),
  ]
  split = d.compute_bound_seconds + d.memory_bound_seconds
  notes = (
    f"step {human_seconds(p.step_time)} = compute {human_seconds(p.compute_time)} "
    f"({_pct(p.compute_time, p.step_time)}) + communication {human_seconds(p.comm_time)} "
    f"({_pct(p.comm_time, p.step_time)}), {human_bytes(p.comm_bytes)} sent per device; by the "
    f"overlap model {human_seconds(p.comm_time - p.exposed_comm)} of the collectives could "
    f"hide behind independent compute, leaving {human_seconds(p.exposed_comm)} exposed (not "
    "ranked by: `search.candidate.step_seconds`).",
    f"compute: {human_seconds(d.compute_bound_seconds)} limited by FLOP/s "
    f"({_pct(d.compute_bound_seconds, split)}), {human_seconds(d.memory_bound_seconds)} by "
    f"memory bandwidth ({_pct(d.memory_bound_seconds, split)}); {p.flops:.4g} FLOPs per device.",
    f"energy {p.energy:.4g} J per step, {p.energy / batch:.4g} J per sample "
    f"(batch {batch}, {plan.num_devices} devices).",
  )
  remat, micro = getattr(c, "remat", "none"), getattr(c, "microbatches", 1)
  if plan.memory_decision:  # names the memory term that ruled out the fastest option
    notes += (plan.memory_decision,)
  elif remat != "none" or micro > 1:
    notes += (
      f"the step runs with remat={remat!r} and {micro} micro-batch(es) of gradient accumulation.",
    )
  sections.append(Section("predicted step, per device", notes))
  if plan.pipeline is not None:
    sections.append(pipeline_section(plan))
  total = sum(v for _, v in d.memory) or 1.0
  dominant = max(d.memory, key=lambda kv: kv[1])
  sections.append(
    Section(
      "memory per device",
      (
        f"peak {human_bytes(p.peak_memory)} of {human_bytes(p.memory_budget)} budget; "
        f"dominated by {dominant[0]} ({_pct(dominant[1], total)}).",
      ),
      ("term", "bytes", "share"),
      tuple((k, human_bytes(v), _pct(v, total)) for k, v in d.memory),
    )
  )
  groups = param_groups(plan)
  rows = tuple(
    (
      f"{n} x {pat}" if n > 1 else pat,
      str(shape),
      dtype,
      _spec_str(spec),
      human_bytes(b),
      human_bytes(n * b),
    )
    for pat, n, shape, dtype, spec, b in groups[: top * 2]
  )
  sections.append(
    Section(
      f"parameter groups (largest {len(rows)} of {len(groups)})",
      (),
      ("parameters", "shape", "dtype", "spec", "per device", "all, per device"),
      rows,
    )
  )
  sections.append(
    Section(
      "logical axes (dimension groups found in the program)",
      (("split on 'model': " + "; ".join(plan.model_split)),) if plan.model_split else (),
      ("name", "size", "mesh axes", "occurs in"),
      tuple(
        (
          g.name,
          str(g.size),
          ", ".join(g.mesh_axes) or "-",
          ", ".join(g.where[:3]) + (" ..." if len(g.where) > 3 else ""),
        )
        for g in d.groups[: top * 2]
      ),
    )
  )
  alternatives, seen = [], {(c.mesh_shape.items().__repr__(), c.strategy, human_seconds(value(c)))}
  for x in plan.candidates:  # candidates differing only in what the rows cannot show look alike
    key = (x.mesh_shape.items().__repr__(), x.strategy, human_seconds(value(x)))
    if key not in seen and len(alternatives) < top:
      seen.add(key)
      alternatives.append(x)
  sections.append(
    Section(
      "top alternatives",
      (),
      ("devices", "mesh", "strategy", "step", "compute", "comm", "exposed", "memory", "fits")
      + ("margin",),
      tuple(
        (
          str(x.devices),
          str(x.mesh_shape),
          x.strategy,
          human_seconds(x.step_time),
          human_seconds(x.compute_time),
          human_seconds(x.comm_time),
          human_seconds(x.exposed_comm),
          human_bytes(x.peak_memory),
          "yes" if x.fits else "NO",
          _margin(x, c, plan.objective),
        )
        for x in alternatives
      ),
    )
  )
  hot = d.hotspots[:top]
  sections.append(
    Section(
      "largest costs by equation (per device, all repeats)",
      (
        f"the top {len(hot)} account for {_pct(sum(h.seconds for h in hot), p.compute_time)} of "
        "compute time.",
      ),
      ("time", "share", "primitive", "x", "bound", "shapes", "source"),
      tuple(
        (
          human_seconds(h.seconds),
          _pct(h.seconds, p.compute_time),
          h.primitive,
          str(h.count),
          h.bound,
          h.shapes,
          _short_source(h.source),
        )
        for h in hot
      ),
    )
  )
  if d.unknown_primitives:
    sections.append(
      Section(
        "warnings",
        (f"no sharding rule for {', '.join(d.unknown_primitives)}: costed conservatively.",),
      )
    )
  return sections


def explain(plan, top: int = 10) -> str:
  """The plan's full story as text (see `Plan.explain`)."""
  if plan.details is None:
    return summary(plan) + "\n\n(a version-1 plan file: plan again for the full explanation)"
  out = []
  for sec in _sections(plan, top):
    out.append(sec.title)
    out += ["  " + n for n in sec.notes]
    if sec.header:
      out += [
        "  " + line for line in _table(list(sec.header), [list(r) for r in sec.rows]).split("\n")
      ]
    out.append("")
  return "\n".join(out).rstrip() + "\n"


def html(plan, top: int = 10) -> str:
  """The explanation as HTML tables, for notebooks."""
  if plan.details is None:
    return f"<pre>{html_lib.escape(summary(plan))}</pre>"
  e = html_lib.escape
  parts = ['<div class="wapar-plan">']
  for i, sec in enumerate(_sections(plan, top)):
    parts.append(f"<{'h3' if i == 0 else 'h4'}>{e(sec.title)}</{'h3' if i == 0 else 'h4'}>")
    parts += [f"<p>{e(n)}</p>" for n in sec.notes]
    if sec.header:
      parts.append(
        "<table><thead><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in sec.header)
        + "</tr></thead><tbody>"
      )
      for r in sec.rows:
        parts.append("<tr>" + "".join(f"<td><code>{e(x)}</code></td>" for x in r) + "</tr>")
      parts.append("</tbody></table>")
  parts.append("</div>")
  return "\n".join(parts)
