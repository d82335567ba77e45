"""What the `wapar` command plans: a built-in example by name, or the researcher's own
`module:function`.

`function(**overrides)` returns `(loss_fn, params, batch)` or `(loss_fn, params, batch,
optimizer)`. It is handed `batch_size`, `seq_len` and `dtype` as keywords when the user gave
those flags; a flag the function takes no keyword for is an error rather than silently ignored.
Its optimizer is used unless the --optimizer flag names one.

Example, with `mypkg/train.py` holding

  def workload(batch_size=32, dtype="float32"):
    ...
    return loss_fn, params, batch, optax.adamw(3e-4)

`load("mypkg.train:workload", batch_size=64)` calls `workload(batch_size=64)`, and
`wapar plan mypkg.train:workload --seq-len 512` is an error naming `--seq-len`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from typing import Any

from wapar_jax import examples
from wapar_jax._src import optimizers
from wapar_jax.errors import InvalidArgumentError

# The command-line flags a workload function may take, as its keyword names.
OVERRIDES = {"batch_size": "--batch-size", "seq_len": "--seq-len", "dtype": "--dtype"}
# The optimizer when neither --optimizer nor the workload names one; --lr's default.
DEFAULT_OPTIMIZER, DEFAULT_LR = "adamw", 1e-3


@dataclasses.dataclass(frozen=True)
class Workload:
  """A train step's parts, and how a verify child process rebuilds them (`child`: a built-in
  example's name and flags, as `Plan.verify(workload=...)` takes them; None for user code,
  which goes to the child pickled)."""

  loss_fn: Any
  params: Any
  batch: Any
  optimizer: Any
  child: dict | None = None


def load(spec: str, *, optimizer: str | None = None, lr: float | None = None, **overrides):
  """The workload `spec` names, with `overrides` (those of OVERRIDES that are not None), and
  the optimizer the flags name (`optimizer`, `lr`: None when not given)."""
  given = {k: v for k, v in overrides.items() if v is not None}
  rate = DEFAULT_LR if lr is None else lr
  if ":" not in spec:
    ex = examples.get_example(spec, **given)
    name = optimizer or DEFAULT_OPTIMIZER
    child = {"example": spec, **overrides, "optimizer": name, "lr": rate}
    return Workload(ex.loss_fn, ex.params, ex.batch, optimizers.by_name(name, rate), child)
  fn = _function(spec)
  _check_keywords(spec, fn, given)
  returned = fn(**given)
  if not isinstance(returned, tuple) or len(returned) not in (3, 4):
    raise InvalidArgumentError(
      f"{spec}() must return (loss_fn, params, batch) or (loss_fn, params, batch, optimizer). "
      f"Got {_describe(returned)}."
    )
  if len(returned) == 4 and optimizer is None:
    if lr is not None:
      raise InvalidArgumentError(
        f"--lr sets the rate of --optimizer, and {spec} returns an optimizer of its own: set "
        "the rate in the function, or pass --optimizer NAME to replace its optimizer. Got "
        f"--lr {lr} without --optimizer."
      )
    return Workload(*returned)
  return Workload(*returned[:3], optimizers.by_name(optimizer or DEFAULT_OPTIMIZER, rate))


def _function(spec: str):
  module_name, fn_name = spec.split(":", 1)
  if os.getcwd() not in sys.path:  # as `python -m` would: the user's module beside them
    sys.path.insert(0, os.getcwd())
  module = importlib.import_module(module_name)
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise InvalidArgumentError(
      f"module {module_name!r} has no function {fn_name!r}: name a function that returns "
      f"(loss_fn, params, batch[, optimizer]), e.g. `mypkg.train:workload`. Got {spec!r}."
    )
  return fn


def _check_keywords(spec: str, fn, given: dict) -> None:
  params = inspect.signature(fn).parameters.values()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return
  names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
  missing = [k for k in given if k not in names]
  if missing:
    flags = ", ".join(OVERRIDES[k] for k in missing)
    raise InvalidArgumentError(
      f"{flags} cannot reach {spec}: the function takes no {', '.join(missing)} keyword. Add "
      f"it, e.g. `def {fn.__name__}({missing[0]}=...)`, or drop the flag. Got the keywords "
      f"{sorted(names) or 'none'}."
    )


def _describe(x) -> str:
  if isinstance(x, tuple):
    return f"a tuple of {len(x)}"
  return type(x).__name__
