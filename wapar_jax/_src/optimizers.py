"""What the planner accepts as an optimizer, and optimizers by name for the command line and for
verify's child process."""

from __future__ import annotations

import optax

from wapar_jax.errors import InvalidArgumentError

OPTIMIZERS = {
  "adamw": optax.adamw,
  "adam": optax.adam,
  "sgd": optax.sgd,
  "adafactor": optax.adafactor,
  "lion": optax.lion,
}


def by_name(name: str, learning_rate: float) -> optax.GradientTransformation:
  """`optax.<name>(learning_rate)` for one of `OPTIMIZERS`."""
  if name not in OPTIMIZERS:
    raise InvalidArgumentError(f"optimizer must be one of {sorted(OPTIMIZERS)}. Got {name!r}.")
  return OPTIMIZERS[name](learning_rate)


def as_transformation(optimizer) -> optax.GradientTransformation:
  """`optimizer` as the optax transformation the train step calls.

  `optax.MultiSteps` is a wrapper object, not a GradientTransformation: its own init and update
  are taken, with extra-args support so that what it wraps still gets `value=` and friends.
  """
  if isinstance(optimizer, optax.MultiSteps):
    return optax.GradientTransformationExtraArgs(optimizer.init, optimizer.update)
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer
  hint = (
    f" For a {type(optimizer).__name__}, pass its .gradient_transformation()."
    if callable(getattr(optimizer, "gradient_transformation", None))
    else ""
  )
  raise InvalidArgumentError(
    "optimizer must be an optax.GradientTransformation (e.g. optax.adamw(1e-3)) or an "
    f"optax.MultiSteps.{hint} Got {type(optimizer).__name__}."
  )
