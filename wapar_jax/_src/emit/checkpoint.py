"""Train state to and from disk with orbax-checkpoint, laid out by a plan's shardings.

Restoring reads each array straight into the target plan's sharding (orbax's `StandardRestore`
of `ShapeDtypeStruct`s that carry a sharding), so a checkpoint written under one mesh and
strategy restores onto another without a full copy on any host. orbax is imported only here,
when a checkpoint is used: it is an optional dependency.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from wapar_jax.errors import CheckpointNotFoundError, MissingDependencyError


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise MissingDependencyError(
      "checkpoints need orbax-checkpoint: pip install 'wapar_jax[checkpoint]' (or "
      f"orbax-checkpoint>=0.11). Got ImportError: {e}."
    ) from e
  return ocp


def _manager(target):
  """(CheckpointManager, whether this call made it): a directory gets a manager of its own."""
  ocp = _orbax()
  if isinstance(target, ocp.CheckpointManager):
    return target, False
  return ocp.CheckpointManager(os.path.abspath(os.fspath(target))), True


def save(target, step: int, state: dict[str, Any]) -> bool:
  """Writes `state` (a dict of trees) as checkpoint `step`; whether the manager saved it (a
  manager's `save_interval_steps` skips the steps off its interval)."""
  ocp = _orbax()
  manager, owned = _manager(target)
  try:
    return manager.save(step, args=ocp.args.StandardSave(state))
  finally:
    if owned:  # a manager of the caller's keeps saving asynchronously
      manager.wait_until_finished()
      manager.close()


def restore(target, step: int | None, shardings: dict[str, Any], like: dict[str, Any]):
  """(step, state): checkpoint `step` (default: the latest) read into `shardings`, each tree
  shaped and typed like the same key of `like`."""
  ocp = _orbax()
  manager, owned = _manager(target)
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise CheckpointNotFoundError(
        f"no checkpoint {'at all' if step is None else f'of step {step}'} in "
        f"{manager.directory}: save one with plan.save_checkpoint(directory, step, params, "
        f"opt_state), or pass one of the steps there. Got steps {list(manager.all_steps())}."
      )
    targets = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s), like, shardings
    )
    return step, manager.restore(step, args=ocp.args.StandardRestore(targets))
  finally:
    if owned:
      manager.close()
