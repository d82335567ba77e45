"""Whether a plan fits the trees it is applied to: every leaf's path, shape and dtype."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from wapar_jax._src.plan_details import BATCH, Leaf, PlanDetails
from wapar_jax._src.tree import path_keys, path_str
from wapar_jax.errors import PlanMismatchError


def describe_tree(tree) -> list[Leaf]:
  """Path, shape and dtype of every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(int(d) for d in getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", None)
    out.append(
      Leaf(path_keys(path), shape, str(dtype) if dtype is not None else type(x).__name__, ())
    )
  return out


def differences(
  planned: Sequence[Leaf], actual: Sequence[Leaf], *, check_batch_dim: bool = True
) -> list[str]:
  """Lines naming each leaf that is missing, extra, or differs in shape or dtype."""
  want = {leaf.path: leaf for leaf in planned}
  got = {leaf.path: leaf for leaf in actual}
  lines = []
  for p in want:
    if p not in got:
      lines.append(
        f"missing: {path_str(p)} {list(want[p].shape)} {want[p].dtype} (planned, not in the tree)"
      )
  for p in got:
    if p not in want:
      lines.append(
        f"extra: {path_str(p)} {list(got[p].shape)} {got[p].dtype} (in the tree, "
        "no spec in the plan)"
      )
  for p in want:
    if p in got:
      a, b = want[p], got[p]
      shape_a, shape_b = a.shape, b.shape
      if not check_batch_dim and shape_a and shape_b:
        d = a.dims.index(BATCH) if BATCH in a.dims else 0
        shape_a, shape_b = _without(shape_a, d), _without(shape_b, d)
      if shape_a != shape_b:
        lines.append(f"shape: {path_str(p)} planned {list(a.shape)}, got {list(b.shape)}")
      if a.dtype != b.dtype:
        lines.append(f"dtype: {path_str(p)} planned {a.dtype}, got {b.dtype}")
  return lines


def _without(shape: tuple, d: int) -> tuple:
  return shape[:d] + shape[d + 1 :]


def check_fits(details: PlanDetails, params=None, batch=None) -> None:
  """Raises PlanMismatchError naming every leaf of params / batch that differs from the plan."""
  lines = []
  if params is not None:
    lines += ["params " + s for s in differences(details.params, describe_tree(params))]
  if batch is not None:
    # A different global batch size is allowed (it must still divide the data axis).
    lines += [
      "batch " + s for s in differences(details.batch, describe_tree(batch), check_batch_dim=False)
    ]
  if lines:
    kinds = ("missing", "extra", "shape", "dtype")
    by_kind = {k: [s for s in lines if s.split(" ", 2)[1] == k + ":"] for k in kinds}
    counts = (
      f"{len(by_kind['missing'])} planned leaves missing from the tree, "
      f"{len(by_kind['extra'])} extra leaves with no spec in the plan, "
      f"{len(by_kind['shape'])} with another shape, {len(by_kind['dtype'])} with another "
      "dtype"
    )
    shown = []
    for k in kinds:  # a few of each kind, so one long list does not hide the others
      shown += by_kind[k][:6] + (
        [f"... {len(by_kind[k]) - 6} more {k}"] if len(by_kind[k]) > 6 else []
      )
    raise PlanMismatchError(
      "the plan was made for another model: plan again for this one (wapar_jax.plan), or "
      f"apply the plan to the model it was made for. {counts}:\n  "
      + "\n  ".join(shown)
      + f"\nGot {len(lines)} differing leaves."
    )
