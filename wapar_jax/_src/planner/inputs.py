"""What `plan()` accepts, made uniform: NNX modules, linen parameters, device arguments."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from wapar_jax._src.tree import abstract
from wapar_jax.errors import InvalidArgumentError


def is_nnx_module(x) -> bool:
  return isinstance(x, nnx.Module)


def from_nnx(loss_fn: Callable, model):
  """An NNX model becomes (loss over its Param state, abstract Param state)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_over_params(params, batch):
    return loss_fn(nnx.merge(graphdef, params, rest), batch)

  return loss_over_params, params


def device_count(devices) -> tuple[int, list | None]:
  if devices is None:
    return jax.device_count(), None
  if isinstance(devices, int) and not isinstance(devices, bool):
    if devices < 1:
      raise InvalidArgumentError(f"devices must be at least 1. Got {devices}.")
    return devices, None
  try:
    device_list = list(devices)
  except TypeError:
    raise InvalidArgumentError(
      f"devices must be an int or a list of jax devices. Got {type(devices).__name__}."
    ) from None
  if not device_list:
    raise InvalidArgumentError("devices is an empty list. Got [].")
  return len(device_list), device_list


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
