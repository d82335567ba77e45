"""Matplotlib pictures of a Plan: the WAP curve, time per candidate, a parameter on the mesh.

matplotlib is optional (`pip install 'wapar_jax[plots]'`) and imported only here, when a plot
is asked for. Each function returns a Figure and draws nothing on screen by itself.

Example:
  >>> fig = plan.plot_sweep()
  >>> fig.savefig("sweep.png")
"""

from __future__ import annotations

import collections
import math
import textwrap

import numpy as np
from jax.sharding import PartitionSpec as P

from wapar_jax._src.tree import path_str
from wapar_jax._src.views.explain import skipped_counts
from wapar_jax.errors import InvalidArgumentError


def _pyplot():
  try:
    import matplotlib
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError("plots need matplotlib: pip install 'wapar_jax[plots]'") from e
  del matplotlib
  return Figure


def _per_count(plan):
  best = {}
  for c in plan.candidates:
    best.setdefault(c.devices, c)
  return [best[k] for k in sorted(best)]


def _batch_size(plan) -> int:
  return plan.details.batch_size if plan.details is not None else 1


def _runs(counts: list[int], skipped: set[int]) -> list[list[int]]:
  """`counts` cut into runs with no skipped count between neighbours: one line per run, so no
  segment suggests a figure for a count that has no plan."""
  runs: list[list[int]] = []
  for k in counts:
    if runs and not any(runs[-1][-1] < s < k for s in skipped):
      runs[-1].append(k)
    else:
      runs.append([k])
  return runs


def plot_sweep(plan):
  """Step time and energy per sample of the best plan for every device count (the WAP curve).

  Lines join only neighbouring counts with plans; the caption says why the others have none.
  The legend sits above the axes, where it cannot cover a curve.
  """
  Figure = _pyplot()
  sweep = {c.devices: c for c in _per_count(plan)}
  batch = _batch_size(plan)
  x = sorted(sweep)
  skipped = set(range(1, plan.devices_offered + 1)) - set(x)
  fig = Figure(figsize=(6.4, 4.4), layout="constrained")
  ax = fig.add_subplot()
  ax2 = ax.twinx()
  for i, run in enumerate(_runs(x, skipped)):
    first = i == 0  # one legend entry per curve
    ax.plot(
      run,
      [sweep[k].step_time * 1e3 for k in run],
      "o-",
      color="tab:blue",
      label="step time" if first else None,
    )
    ax2.plot(
      run,
      [sweep[k].energy / batch for k in run],
      "s--",
      color="tab:orange",
      label="energy per sample" if first else None,
    )
  ax.set_xlabel("devices")
  ax.set_ylabel("step time (ms)", color="tab:blue")
  ax2.set_ylabel("energy per sample (J)", color="tab:orange")
  unfit = [k for k in x if not sweep[k].fits]
  if unfit:
    ax.plot(
      unfit,
      [sweep[k].step_time * 1e3 for k in unfit],
      "x",
      color="red",
      markersize=10,
      label="does not fit",
    )
  ax.axvline(plan.num_devices, color="gray", linestyle=":", label=f"chosen ({plan.num_devices})")
  ax.set_xticks(x)
  ax.set_title(f"{plan.profile}: best plan per device count ({plan.objective})")
  handles, labels = ax.get_legend_handles_labels()
  more = ax2.get_legend_handles_labels()
  fig.legend(
    handles + more[0],
    labels + more[1],
    loc="outside upper center",
    ncols=4,
    fontsize="small",
    frameon=False,
  )
  note = skipped_counts(plan)
  if note:
    fig.supxlabel(textwrap.fill(note, 100), fontsize="x-small", ha="left", x=0.01)
  return fig


def _candidate_labels(cands) -> list[str]:
  """Mesh and strategy, and what else tells candidates apart (remat, micro-batches, pipeline
  repeats and micro-batches); candidates alike in all of these are numbered."""
  labels = []
  for c in cands:
    parts = ["x".join(f"{k[0]}{v}" for k, v in c.mesh_shape.items()), c.strategy]
    if c.remat != "none":
      parts.append(f"remat {c.remat}")
    if c.microbatches > 1:
      parts.append(f"{c.microbatches} micro")
    if c.stages > 1:
      parts.append(f"{c.repeats}r x {c.stage_microbatches}m")
    labels.append("\n".join(parts))
  alike = collections.Counter(labels)
  seen: collections.Counter = collections.Counter()
  for i, label in enumerate(labels):
    if alike[label] > 1:  # they differ in what no label shows: which dims are split, say
      seen[label] += 1
      labels[i] = f"{label} #{seen[label]}"
  return labels


def plot_breakdown(plan, max_candidates: int = 12):
  """Compute and communication time per step of the kept candidates, as stacked bars."""
  Figure = _pyplot()
  cands = list(plan.candidates[:max_candidates])
  fig = Figure(figsize=(max(6.4, 0.55 * len(cands) + 2), 4.4), layout="constrained")
  ax = fig.add_subplot()
  x = np.arange(len(cands))
  compute = np.array([c.compute_time for c in cands]) * 1e3
  comm = np.array([c.exposed_comm for c in cands]) * 1e3
  hidden = np.array([c.comm_time - c.exposed_comm for c in cands]) * 1e3
  ax.bar(x, compute, label="compute", color="tab:blue")
  ax.bar(x, comm, bottom=compute, label="exposed communication", color="tab:red")
  # Hidden behind independent compute: drawn apart from the step, on top of it.
  ax.bar(x, hidden, bottom=compute + comm, label="hidden communication", color="mistyrose")
  ax.set_xticks(x, _candidate_labels(cands), fontsize="x-small", rotation=60)
  ax.set_ylabel("time per step (ms)")
  ax.set_title("predicted step per candidate (best first)")
  for i, c in enumerate(cands):
    if c == plan.chosen:
      ax.annotate("chosen", (i, compute[i] + comm[i]), ha="center", va="bottom", fontsize="small")
    if not c.fits:
      ax.annotate(
        "no fit", (i, compute[i] + comm[i]), ha="center", va="bottom", color="red", fontsize="small"
      )
  ax.legend(fontsize="small")
  return fig


def device_blocks(shape, spec: P, mesh_shape) -> tuple[list[int], list[str], dict]:
  """Which devices hold which block of a tensor with `spec` on a mesh of `mesh_shape`.

  Devices are numbered in the mesh's row-major order. Returns (the dims split, the axes of
  each, {block index tuple over those dims: [device numbers]}).
  """
  axes = list(mesh_shape)
  sizes = [int(mesh_shape[a]) for a in axes]
  entries = list(spec) + [None] * (len(shape) - len(spec))
  split_dims, split_axes = [], []
  for d, e in enumerate(entries):
    names = tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a is not None)
    if names:
      split_dims.append(d)
      split_axes.append(names)
  blocks: dict[tuple, list[int]] = {}
  for dev in range(math.prod(sizes)):
    coords = dict(zip(axes, np.unravel_index(dev, sizes)))
    index = []
    for names in split_axes:
      i = 0
      for a in names:
        i = i * int(mesh_shape[a]) + int(coords[a])
      index.append(i)
    blocks.setdefault(tuple(index), []).append(dev)
  return split_dims, ["+".join(n) for n in split_axes], blocks


def plot_layout(plan, param_path: str | None = None):
  """A parameter as a grid of blocks, each labelled with the devices that hold it."""
  Figure = _pyplot()
  if plan.details is None:
    raise InvalidArgumentError(
      "this plan has no leaf shapes (a version-1 plan file): plan "
      "again to draw layouts. Got plan.details = None."
    )
  leaves = {path_str(leaf.path): leaf for leaf in plan.details.params}
  if param_path is None:
    param_path = max(leaves, key=lambda p: math.prod(leaves[p].shape))
  if param_path not in leaves:
    raise InvalidArgumentError(
      f"no parameter {param_path!r} in this plan; paths look like "
      f"{sorted(leaves)[:3]}. Got {param_path!r}."
    )
  leaf = leaves[param_path]
  spec = plan.flat_param_specs.get(leaf.path, P())
  split_dims, split_axes, blocks = device_blocks(leaf.shape, spec, plan.mesh_shape)
  # Draw the tensor as rows x columns: its last dim runs across, the others down.
  last = len(leaf.shape) - 1
  col_k = next((k for k, d in enumerate(split_dims) if d == last and last > 0), None)
  row_k = next((k for k in range(len(split_dims)) if k != col_k), None)
  if col_k is None and row_k is not None and len(split_dims) > 1:
    col_k = 1 - row_k
  rows_n = max(i[row_k] for i in blocks) + 1 if row_k is not None else 1
  cols_n = max(i[col_k] for i in blocks) + 1 if col_k is not None else 1
  fig = Figure(figsize=(5.5, 4.2), layout="constrained")
  ax = fig.add_subplot()
  import matplotlib
  from matplotlib.patches import Rectangle

  cmap = matplotlib.colormaps["tab20"]
  for k, (index, devs) in enumerate(sorted(blocks.items())):
    r = index[row_k] if row_k is not None else 0
    c = index[col_k] if col_k is not None else 0
    ax.add_patch(Rectangle((c, rows_n - 1 - r), 1, 1, facecolor=cmap(k % 20), edgecolor="black"))
    shown = ", ".join(map(str, devs[:8])) + (" ..." if len(devs) > 8 else "")
    ax.text(
      c + 0.5, rows_n - 1 - r + 0.5, f"devices\n{shown}", ha="center", va="center", fontsize="small"
    )
  ax.set_xlim(0, cols_n)
  ax.set_ylim(0, rows_n)
  ax.set_xticks([])
  ax.set_yticks([])

  def note(k):
    d = split_dims[k]
    return f"dim {d} ({leaf.shape[d]}) split over '{split_axes[k]}'"

  ax.set_ylabel(note(row_k) if row_k is not None else "not split")
  ax.set_xlabel(note(col_k) if col_k is not None else "not split")
  mesh = ", ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
  ax.set_title(
    f"{param_path} {list(leaf.shape)}\nP{tuple(spec)} on mesh ({mesh})", fontsize="medium"
  )
  return fig
