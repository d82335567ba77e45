"""What `plan()` accepts, made uniform: NNX modules, linen parameters, device arguments."""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from wapar_jax._src.emit.mesh import distinct_devices
from wapar_jax._src.tree import abstract, path_keys, path_str
from wapar_jax.errors import InvalidArgumentError


def is_nnx_module(x) -> bool:
  return isinstance(x, nnx.Module)


def from_nnx(loss_fn: Callable, model):
  """An NNX model becomes (loss over its Param state, abstract Param state, the rest of its
  state or None).

  The rest (BatchNorm statistics, the counters and keys of `nnx.Rngs` that dropout draws from)
  is model state the step carries: the loss is then `(params, batch, state) -> (loss, new
  state)`, so statistics are updated and every step draws new dropout masks. The model is merged
  with copies of its variables inside the traced function: merging the caller's variables would
  mutate them from another trace level.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if not jax.tree.leaves(rest):

    def loss_over_params(params, batch):
      return loss_fn(nnx.merge(graphdef, params, rest, copy=True), batch)

    return loss_over_params, params, None

  def loss_with_state(params, batch, state):
    merged = nnx.merge(graphdef, params, state, copy=True)
    loss = loss_fn(merged, batch)
    return loss, nnx.split(merged, nnx.Param, ...)[2]

  return loss_with_state, params, rest


def device_count(devices) -> tuple[int, list | None]:
  """(How many devices to plan for, the given devices or None) from `plan`'s `devices`."""
  if devices is None:
    return jax.device_count(), None
  # numpy integers count too (np.int64(8) from an array of sizes); bools are not counts.
  if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
    if devices < 1:
      raise InvalidArgumentError(
        f"devices must be a positive device count or a list of jax devices. Got {devices}."
      )
    return int(devices), None
  device_list = distinct_devices(devices)
  return len(device_list), device_list


def positive_seconds(seconds) -> float:
  """`max_seconds` as a float: a positive, finite real number of seconds."""
  if (
    isinstance(seconds, bool)
    or not isinstance(seconds, numbers.Real)
    or not math.isfinite(seconds)
    or seconds <= 0
  ):
    raise InvalidArgumentError(
      "max_seconds must be a positive number of seconds, or None for no limit, e.g. "
      f"max_seconds=30. Got {seconds!r}."
    )
  return float(seconds)


def check_leaves(params, batch, model_state=None) -> None:
  """Every leaf an array (or ShapeDtypeStruct), every parameter of a float dtype, and a batch
  with leaves: else an InvalidArgumentError naming the leaves and the fix."""
  for what, tree, fix in (
    (
      "model_state",
      model_state,
      "make it an array (jnp.asarray; a PRNG key from jax.random.key is one) or close over it "
      "in loss_fn if the step does not update it",
    ),
    (
      "params",
      params,
      "make it an array (jnp.asarray) or, if it is a constant, close over it "
      "in loss_fn instead of passing it in params",
    ),
    (
      "batch",
      batch,
      "make it an array whose dim 0 is the batch or, if it is a constant (a "
      "temperature, a learning rate), close over it in loss_fn",
    ),
  ):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise InvalidArgumentError(
          f"{what} leaf {path_str(path_keys(path))} is a {type(x).__name__}, not an array: "
          f"every leaf is sharded over the devices. Fix: {fix}. Got {reprlib.repr(x)}."
        )
  integers = [
    f"{path_str(path_keys(p))} {x.dtype}"
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if not jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  if integers:
    raise InvalidArgumentError(
      "params must be floating-point: the train step takes their gradient. Cast a trained "
      "parameter to a float dtype (x.astype(jnp.float32)); move one that is not trained (a "
      "step counter, a mask, a vocabulary table) out of params, into the batch or closed over "
      f"in loss_fn. Got {len(integers)} non-float leaves: {', '.join(integers[:5])}."
    )
  if not jax.tree.leaves(batch):
    raise InvalidArgumentError(
      "batch has no leaves: the planner splits the batch's dim 0 over devices and prices the "
      "step on its shapes. Pass the batch loss_fn reads, as arrays or jax.ShapeDtypeStruct, "
      f"e.g. {{'x': jax.ShapeDtypeStruct((32, 784), jnp.float32)}}. Got {reprlib.repr(batch)}."
    )


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
