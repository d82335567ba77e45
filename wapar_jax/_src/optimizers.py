"""Optimizers by name, for the command line and for verify's child process."""

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
