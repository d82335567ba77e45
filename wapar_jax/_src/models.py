"""Conveniences for Flax models: planning needs only abstract parameters."""

from __future__ import annotations

import jax

from wapar_jax._src.step import abstract


def linen_params(module, *init_args, rng=None, collection: str = "params", **init_kwargs):
  """Abstract parameters of a linen module, without materialising any weight.

  `jax.eval_shape(module.init, ...)` under the hood: a 7B model costs nothing here.

  Example:
    >>> params = wapar_jax.linen_params(model, jnp.zeros((8, 1024), jnp.int32))
    >>> def loss_fn(params, batch):
    ...   return loss(model.apply({"params": params}, batch["inputs"]), batch["targets"])
    >>> plan = wapar_jax.plan(loss_fn, params, batch, optimizer=optax.adamw(1e-3))
  """
  rng = jax.random.key(0) if rng is None else rng
  variables = jax.eval_shape(lambda r: module.init(r, *init_args, **init_kwargs), rng)
  return abstract(variables[collection])
