"""The traced step as data: `Op` (one equation of the flattened step) and `TracedStep`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Op:
  """One equation of the flattened step.

  Attributes:
    index: position in program order.
    primitive: the primitive's name.
    cost_key: identity for cost deduplication (primitive, params, input types, literals).
    eqn: the jaxpr equation, kept to lower it on its own for XLA's cost analysis.
    in_vars / out_vars: variable ids (-1 for a literal input).
    multiplicity: how many times it runs per step (product of enclosing trip counts).
    branch: (cond id, branch index) inside a `cond`, else None.
    reduce_dims: (input position, dim) whose sharding makes the output a partial result.
    gather_dims: (input position, dim) whose sharding forces an all-gather of that input.
    source: "file:line (function)" of the user code that produced it.
  """

  index: int
  primitive: str
  cost_key: str
  eqn: Any
  in_vars: tuple[int, ...]
  out_vars: tuple[int, ...]
  multiplicity: float
  branch: tuple[int, int] | None
  reduce_dims: tuple[tuple[int, int], ...]
  gather_dims: tuple[tuple[int, int], ...]
  source: str


@dataclasses.dataclass(frozen=True)
class TracedStep:
  """The flattened train step with every tensor dimension mapped to its class.

  Variables are integers; `var_shape[v]`, `var_itemsize[v]` and `var_classes[v]` (class id per
  dim) describe them. `def_pos[v]` / `last_use[v]` are op indices for liveness (-1 = argument,
  len(ops) = step output). Argument groups keep the flattened order of their pytrees.
  """

  ops: tuple[Op, ...]
  var_shape: tuple[tuple[int, ...], ...]
  var_itemsize: tuple[int, ...]
  var_classes: tuple[tuple[int, ...], ...]
  def_pos: np.ndarray
  last_use: np.ndarray
  class_size: tuple[int, ...]
  loop_classes: frozenset[int]
  param_vars: tuple[int, ...]
  opt_state_vars: tuple[int, ...]
  batch_vars: tuple[int, ...]
  output_vars: tuple[int, ...]
  loss_var: int
  unknown_primitives: tuple[str, ...]
  # (variable, parameter index, runs per step) per gathered use of a parameter (`gathers.mark`),
  # and per copy of one a loop stacks for the backward pass (runs 0) or slices from that stack
  # (runs -1: a view, no buffer of its own).
  gathered: tuple[tuple[int, int, float], ...] = ()
  # (op, bytes moved per run) per slice a loop copies into its stacked outputs (the residuals a
  # scan over layers keeps for the backward pass) or out of such a stack in a later loop.
  loop_copies: tuple[tuple[int, float], ...] = ()
  # A model's state (batch statistics, PRNG keys) the step reads and returns updated.
  state_vars: tuple[int, ...] = ()
  # (stacked variable, one iteration's variable) per scan input sliced by the loop and per
  # output it stacks: the same values, a layer at a time.
  stacks: tuple[tuple[int, int], ...] = ()

  @property
  def num_vars(self) -> int:
    return len(self.var_shape)

  @property
  def batch_classes(self) -> frozenset[int]:
    """The classes of the batch leaves' leading dims (the batch)."""
    return frozenset(self.var_classes[v][0] for v in self.batch_vars if self.var_classes[v])

  @property
  def sequence_classes(self) -> frozenset[int]:
    """The classes of a sequence: a non-batch dim of a batch leaf that no weight has (the T of
    `tokens [B, T]`; an MLP's input features are a weight's)."""
    weight = {c for v in self.param_vars for c in self.var_classes[v]}
    dims = {c for v in self.batch_vars for c in self.var_classes[v][1:]}
    return frozenset(dims - self.batch_classes - weight)

  def var_bytes(self) -> np.ndarray:
    """Bytes of every variable (unsharded), as float64."""
    return np.array(
      [math.prod(shape) * itemsize for shape, itemsize in zip(self.var_shape, self.var_itemsize)],
      dtype=float,
    )
