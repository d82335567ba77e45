"""The frozen Plan: what was chosen, what it is predicted to cost, the ranked alternatives.

A Plan is data (mesh shape, PartitionSpecs by leaf path, figures) plus, when it comes straight
from `wapar_jax.plan`, the loss function and optimizer it was made for, so that it can build the
sharded train step. Plans from JSON carry no code: pass `loss_fn` and `optimizer` to
`train_step` / `init_opt_state`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec as P

from wapar_jax._src import fit_check, optimizers, plan_json
from wapar_jax._src import verify as verify_lib
from wapar_jax._src.emit import mesh as mesh_lib
from wapar_jax._src.emit import pipeline as pipeline_lib
from wapar_jax._src.emit import shardings as shardings_lib
from wapar_jax._src.emit import step as step_lib
from wapar_jax._src.files import dumps_strict, write_text_atomic
from wapar_jax._src.plan_details import PlanDetails, Prediction
from wapar_jax._src.plan_own_loop import OwnLoopMethods
from wapar_jax._src.search.candidate import Candidate
from wapar_jax._src.tree import abstract, leaf_paths, path_keys, path_str, specs_like
from wapar_jax._src.views import explain as explain_lib
from wapar_jax._src.views import export, plots
from wapar_jax.errors import CorruptPlanFileError, InvalidArgumentError, PlanMismatchError


def _specs_within_rank(tree, flat_specs, what: str):
  """`specs_like`, refusing a spec longer than its leaf's rank: a plan file without details
  (version 1) records no shapes, so only the tree it is applied to can tell."""
  specs = specs_like(tree, flat_specs, what)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, leaf), spec in zip(leaves, jax.tree.leaves(specs, is_leaf=_is_spec)):
    shape = tuple(getattr(leaf, "shape", ()))
    if len(spec) > len(shape):
      raise PlanMismatchError(
        f"the plan's {what} give {path_str(path_keys(path))} {len(spec)} entries but the leaf "
        f"has rank {len(shape)} (shape {list(shape)}): the plan was made for another "
        f"model, or its file was edited. Plan again for this model. Got {spec}."
      )
  return specs


def _is_spec(x) -> bool:
  return isinstance(x, P)


@dataclasses.dataclass(frozen=True)
class Plan(OwnLoopMethods):
  """A sharding plan for one train step on one kind of device.

  Attributes:
    mesh_shape: axis name -> size; the product may be fewer than the devices offered.
    param_specs: PartitionSpec per parameter leaf, shaped like params.
    batch_specs: PartitionSpec per batch leaf, shaped like batch.
    opt_state_param_specs: per parameter, the spec of its optimizer-state leaves (differs from
      param_specs under ZeRO-1).
    predicted: the chosen candidate's figures; peak memory under the buffer rules of the
      profile's compiler (GPU XLA for GPU and TPU profiles).
    candidates: ranked alternatives (best first), including the best one per device count.
    strategy: family of the chosen candidate ("dp", "fsdp", "tp", "dp_tp", ...).
    profile: name of the device profile; devices_offered: how many devices the search could use.
    details: leaf shapes / dtypes, dimension groups, hot spots and memory terms
      (`PlanDetails`); None for a version-1 plan file.
    stats: how planning went (seconds per phase, equations, candidates); not part of equality.
    model_state_specs: PartitionSpec per leaf of the model's state (replicated), shaped like
      it; None for a model without state. Its step takes and returns the state:
      `(params, opt_state, batch, model_state) -> (params, opt_state, loss, model_state)`.
    pipeline: for a pipeline plan, which layers each stage holds (`StageLayout`); its train
      step, `shard`, `init_params` and `init_opt_state` work on the parameters stored by stage
      (`{"stages": [...], "rest": [...]}`); `user_params` gives them back in the user's tree.
  """

  mesh_shape: Mapping[str, int]
  param_specs: Any
  batch_specs: Any
  opt_state_param_specs: Any
  predicted: Prediction
  candidates: tuple[Candidate, ...]
  chosen: Candidate
  strategy: str
  objective: str
  profile: str
  devices_offered: int
  model_split: tuple[str, ...]
  stats: Mapping[str, float] = dataclasses.field(compare=False)
  flat_param_specs: Mapping[tuple, P] = dataclasses.field(repr=False)
  flat_opt_specs: Mapping[tuple, P] = dataclasses.field(repr=False)
  flat_batch_specs: Mapping[tuple, P] = dataclasses.field(repr=False)
  # What a plan straight from `wapar_jax.plan` carries to build its step; None from a file.
  _loss_fn: Callable | None = dataclasses.field(default=None, repr=False, compare=False)
  _optimizer: optax.GradientTransformation | None = dataclasses.field(
    default=None, repr=False, compare=False
  )
  _abstract_params: Any = dataclasses.field(default=None, repr=False, compare=False)
  _abstract_batch: Any = dataclasses.field(default=None, repr=False, compare=False)
  _device_list: Any = dataclasses.field(default=None, repr=False, compare=False)
  details: PlanDetails | None = dataclasses.field(default=None, repr=False)
  # Which memory term ruled out faster plans and which levers made this one fit ("" if none).
  memory_decision: str = ""
  # A pipeline plan's stage layout: its step takes the layers' parameters stacked by stage.
  pipeline: pipeline_lib.StageLayout | None = None
  # A model's state the step carries (batch statistics, PRNG keys): its specs, None if none.
  model_state_specs: Any = None
  flat_model_state_specs: Mapping[tuple, P] | None = dataclasses.field(default=None, repr=False)
  _abstract_model_state: Any = dataclasses.field(default=None, repr=False, compare=False)
  # The batch dim of each batch leaf by path, where one is not dim 0 (`plan(batch_axes=)`).
  flat_batch_axes: Mapping[tuple, int] | None = None

  @property
  def num_devices(self) -> int:
    n = 1
    for size in self.mesh_shape.values():
      n *= size
    return n

  def summary(self, max_params: int = 12) -> str:
    """Mesh, specs of the largest parameters, predicted costs and the device sweep, as text."""
    return explain_lib.summary(self, max_params)

  def explain(self, top: int = 10) -> str:
    """Why this plan: devices chosen and the margin to every other count, parameter groups,
    the step split into compute / communication, memory by term, alternatives, hot spots.

    Example:
      >>> print(plan.explain())
    """
    return explain_lib.explain(self, top)

  def _repr_html_(self) -> str:
    return explain_lib.html(self)

  def plot_sweep(self):
    """Step time and energy per sample against device count (the WAP curve): a Figure."""
    return plots.plot_sweep(self)

  def plot_breakdown(self, max_candidates: int = 12):
    """Compute and communication time of each candidate kept, as stacked bars: a Figure."""
    return plots.plot_breakdown(self, max_candidates)

  def plot_layout(self, param_path: str | None = None):
    """Which device holds which block of a parameter (default: the largest): a Figure."""
    return plots.plot_layout(self, param_path)

  def logical_axis_rules(self) -> list[tuple[str, str | tuple[str, ...] | None]]:
    """The plan as flax-style `(logical axis, mesh axes)` rules, one per name: through
    `flax.linen.logical_to_mesh_axes` they give back every spec from `param_logical_axes`."""
    return export.logical_axis_rules(self)

  def param_logical_axes(self, optimizer_state: bool = False) -> Any:
    """Per parameter, the logical axis name of each dim, shaped like the parameter tree; with
    `optimizer_state=True`, those of its optimizer-state leaves (they differ under ZeRO-1)."""
    return export.param_logical_axes(self, optimizer_state)

  def to_maxtext_yaml(self) -> str:
    """mesh_axes, data_sharding, dcn_* / ici_* parallelism and logical_axis_rules in MaxText's
    config style."""
    return export.to_maxtext_yaml(self)

  def check_fits(self, params=None, batch=None) -> None:
    """Raises PlanMismatchError naming each leaf that is missing, extra, or differs in shape
    or dtype from the model the plan was made for (the batch size itself may differ).

    Example:
      >>> plan.check_fits(params, batch)   # None if the plan fits
    """
    if self.details is not None:
      fit_check.check_fits(self.details, params, batch)
    elif params is not None:  # a version-1 file knows only the leaf paths
      specs_like(params, self.flat_param_specs, "parameter specs")

  # --- running the plan -------------------------------------------------------------------

  def make_mesh(self, devices: Sequence[Any] | None = None):
    """The plan's mesh over the first `num_devices` of `devices` (default: jax.devices())."""
    return mesh_lib.make_mesh(self.mesh_shape, self._device_list if devices is None else devices)

  def _param_specs(self, params):
    return _specs_within_rank(params, self.flat_param_specs, "parameter specs")

  def _opt_param_specs(self, params):
    return _specs_within_rank(params, self.flat_opt_specs, "optimizer-state specs")

  def _batch_axes(self, batch) -> tuple[int, ...] | None:
    """The batch dim of each leaf of `batch` (flattened order), None if every one is dim 0."""
    if not self.flat_batch_axes:
      return None
    return tuple(self.flat_batch_axes.get(k, 0) for k in leaf_paths(batch))

  def _batch_specs(self, batch):
    return _specs_within_rank(batch, self.flat_batch_specs, "batch specs")

  def _model_state_specs(self, model_state=None):
    """Specs shaped like `model_state` (default: the planned one; needed for a plan from JSON)."""
    model_state = self._abstract_model_state if model_state is None else model_state
    if model_state is None:
      raise InvalidArgumentError(
        "a plan with model state loaded from JSON needs the state's tree: pass model_state= "
        "(jax.ShapeDtypeStruct leaves are enough). Got model_state = None."
      )
    return _specs_within_rank(model_state, self.flat_model_state_specs, "model-state specs")

  def shard(self, params, devices=None):
    """Copies concrete parameters (or any tree shaped like them) onto the plan's mesh.

    A copy, never an alias: the train step donates its inputs, and the caller's arrays must
    survive that.
    """
    self.check_fits(params)
    mesh = self.make_mesh(devices)
    shardings = shardings_lib.named(mesh, self._stored_specs(params, self.flat_param_specs))
    if self.pipeline is not None:
      params = jax.jit(self.pipeline.to_storage)(params)
    if jax.process_count() > 1:  # every process holds the same full copy; each keeps its shards
      return shardings_lib.from_host_copy(params, shardings)
    return shardings_lib.copy_to(params, shardings)

  def _stored_specs(self, params, flat_specs):
    """Specs of the parameters as the step takes them: the user's tree's, or a pipeline's stage
    storage's."""
    if self.pipeline is not None:
      return self.pipeline.stored_specs(list(flat_specs.values()))
    what = "parameter specs" if flat_specs is self.flat_param_specs else "optimizer-state specs"
    return _specs_within_rank(params, flat_specs, what)

  def stored_params(self, params):
    """Abstract parameters as the train step takes them (for `lower`): `params` itself, or for
    a pipeline plan their stage storage."""
    if self.pipeline is None:
      return abstract(params)
    return self.pipeline.storage_shapes(abstract(params))

  def user_params(self, params):
    """Parameters from the train step back in the user's tree (for a pipeline plan, out of
    the stage storage); anything else is returned as it is."""
    if self.pipeline is None:
      return params
    treedef = jax.tree.structure(self._abstract_params) if self._abstract_params else None
    if treedef is None:
      raise InvalidArgumentError(
        "this pipeline plan was loaded from JSON and knows no parameter tree: use "
        "plan.pipeline.from_storage(params, jax.tree.structure(your_params)). Got None."
      )
    return self.pipeline.from_storage(params, treedef)

  def shard_batch(self, batch, devices=None):
    """The batch on the plan's mesh, split over the data axis.

    Under `jax.distributed` (several processes), `batch` is this process's part of the global
    batch: its rows, in process order (`jax.make_array_from_process_local_data`); the global
    batch has `jax.process_count()` times as many rows.
    """
    self.check_fits(batch=batch)
    mesh = self.make_mesh(devices)
    shardings = shardings_lib.named(mesh, self._batch_specs(batch))
    if jax.process_count() > 1:
      return shardings_lib.from_process_local(batch, shardings)
    return shardings_lib.copy_to(batch, shardings)

  def shard_model_state(self, model_state, devices=None):
    """Copies a model's state (an NNX model's non-Param state, linen's batch_stats, PRNG keys)
    onto the plan's mesh, as the train step takes it.

    Example:
      >>> _, params, model_state = nnx.split(model, nnx.Param, ...)
      >>> params, model_state = plan.shard(params), plan.shard_model_state(model_state)
      >>> params, opt_state, loss, model_state = step(params, opt_state, batch, model_state)
    """
    if self.flat_model_state_specs is None:
      raise InvalidArgumentError(
        "this plan's model has no model state: its step is step(params, opt_state, batch). "
        "Plan with model_state= (or an NNX model holding BatchNorm or Rngs state) to carry one. "
        "Got a plan without model state."
      )
    shardings = shardings_lib.named(self.make_mesh(devices), self._model_state_specs(model_state))
    if jax.process_count() > 1:
      return shardings_lib.from_host_copy(model_state, shardings)
    return shardings_lib.copy_to(model_state, shardings)

  def init_params(self, init_fn: Callable, *args, devices=None):
    """Runs `init_fn(*args)` so each device creates only its shard: no full host copy."""
    abstract_params = jax.eval_shape(init_fn, *args)
    mesh = self.make_mesh(devices)
    shardings = shardings_lib.named(
      mesh, self._stored_specs(abstract_params, self.flat_param_specs)
    )
    if self.pipeline is not None:
      layout = self.pipeline
      return jax.jit(lambda *a: layout.to_storage(init_fn(*a)), out_shardings=shardings)(*args)
    return jax.jit(init_fn, out_shardings=shardings)(*args)

  def _need(self, loss_fn, optimizer):
    loss_fn = loss_fn or self._loss_fn
    if loss_fn is None:
      raise InvalidArgumentError(
        "this plan carries no loss_fn (it was loaded from JSON): pass it and the optimizer, "
        "e.g. plan.train_step(loss_fn=loss_fn, optimizer=optax.adamw(1e-3)). Got None."
      )
    return loss_fn, self._need_optimizer(optimizer)

  def _need_optimizer(self, optimizer):
    optimizer = optimizer or self._optimizer
    if optimizer is None:
      raise InvalidArgumentError(
        "this plan carries no optimizer (it was loaded from JSON): pass optimizer=. Got None."
      )
    return optimizers.as_transformation(optimizer)

  def init_opt_state(self, sharded_params, optimizer=None, devices=None):
    """The optimizer state, each leaf created sharded like its parameter."""
    optimizer = self._need_optimizer(optimizer)
    mesh = self.make_mesh(devices)
    if self.pipeline is not None:  # the stage storage
      param_specs = self._stored_specs(None, self.flat_opt_specs)
    else:
      param_specs = self._opt_param_specs(sharded_params)
    specs = shardings_lib.opt_state_specs(optimizer, sharded_params, param_specs)
    return jax.jit(optimizer.init, out_shardings=shardings_lib.named(mesh, specs))(sharded_params)

  def train_step(
    self,
    devices=None,
    *,
    loss_fn=None,
    optimizer=None,
    params=None,
    batch=None,
    model_state=None,
  ):
    """`(params, opt_state, batch) -> (params, opt_state, loss)`, jitted with the plan's shardings;
    with model state, `(params, opt_state, batch, model_state) -> (params, opt_state, loss,
    model_state)`.

    Params, opt state and model state are donated: pass the arrays each call returns to the
    next. `params` / `batch` / `model_state` (abstract is enough) are needed only for a plan
    loaded from JSON, to shape the specs like the trees (an NNX model's loss from JSON: pass
    `loss_fn(params, batch, model_state) -> (loss, model_state)`); the step takes batches of
    `batch`'s size (default: the planned one).
    A call with donated inputs raises DonatedInputError, one with another batch size or with
    inputs not laid out by `shard` / `init_opt_state` / `shard_batch` PlanMismatchError.
    """
    loss_fn, optimizer = self._need(loss_fn, optimizer)
    params, batch = self._planned_trees(params, batch)
    state_specs = None
    if self.flat_model_state_specs is not None:
      state_specs = self._model_state_specs(model_state)
    mesh = self.make_mesh(devices)
    if self.pipeline is not None:
      return pipeline_lib.pipeline_train_step(
        loss_fn,
        optimizer,
        mesh,
        self.pipeline,
        abstract(params),
        abstract(batch),
        list(self.flat_param_specs.values()),
        list(self.flat_opt_specs.values()),
        self._batch_specs(batch),
      )
    opt_specs = shardings_lib.opt_state_specs(
      optimizer, abstract(params), self._opt_param_specs(params)
    )
    return step_lib.sharded_train_step(
      loss_fn,
      optimizer,
      mesh,
      self._param_specs(params),
      opt_specs,
      self._batch_specs(batch),
      remat=self.chosen.remat,
      microbatches=self.chosen.microbatches,
      grad_specs=self._opt_param_specs(params) if self.chosen.storage != "replicated" else None,
      planned_batch=batch,
      state_specs=state_specs,
      batch_axes=self._batch_axes(batch),
      sequence_parallel=self.chosen.sequence_parallel,
    )

  def verify(self, devices=None, **kwargs):
    """Compiles the train step for the plan's mesh; prediction vs compiled.

    Runs in a child process when this one has too few CPU devices. On CPU devices the
    predicted peak is this plan priced again under XLA:CPU's buffer rules (the plan's own
    figure is under its profile's compiler's), and a bf16 / f16 plan's memory is checked
    through its float32 twin. Keyword arguments: `compiler` ("cpu", the default, or "gpu":
    GPU XLA on mock GPU devices, where a GPU exists), `profile` (to price the collectives with),
    `workload` (how a child process rebuilds a built-in example), `loss_fn`, `optimizer`,
    `params`, `batch` (for a plan loaded from JSON), `timeout`.

    Example:
      >>> print(plan.verify().table())
    """
    return verify_lib.verify(self, devices, **kwargs)

  # --- files ------------------------------------------------------------------------------

  def to_json(self) -> str:
    return dumps_strict(plan_json.to_data(self), "the plan", indent=1)

  @classmethod
  def from_json(cls, text: str) -> Plan:
    """The plan `to_json` wrote, every field checked for form and sense (`plan_file.checked`);
    fields this version does not know are ignored with a warning."""
    return cls(**plan_json.fields(text))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the plan as JSON atomically: a reader never sees half a file, and a plan with a
    NaN or infinite figure is refused (`NonFiniteValueError`) before anything is written."""
    write_text_atomic(path, self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike) -> Plan:
    try:
      with open(path) as f:
        return cls.from_json(f.read())
    except OSError as e:
      raise CorruptPlanFileError(f"cannot read the plan file {os.fspath(path)!r}. Got {e}.") from e
