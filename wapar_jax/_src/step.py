"""The single-device train step that is planned, traced and emitted: one definition for all three."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax


def make_train_step(loss_fn: Callable[[Any, Any], jax.Array],
                    optimizer: optax.GradientTransformation) -> Callable:
  """`(params, opt_state, batch) -> (params, opt_state, loss)`, with no sharding in it."""

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def abstract(tree: Any) -> Any:
  """Leaves as bare `ShapeDtypeStruct`s: no values, no device, no sharding.

  `jax.eval_shape` results carry a single-device sharding that fails to lower for a mesh.
  """

  def strip(x):
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)

  return jax.tree.map(strip, tree)
