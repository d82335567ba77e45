"""The frozen Plan: what was chosen, what it is predicted to cost, the ranked alternatives.

A Plan is data (mesh shape, PartitionSpecs by leaf path, figures) plus, when it comes straight
from `wapar_jax.plan`, the loss function and optimizer it was made for, so that it can build the
sharded train step. Plans from JSON carry no code: pass `loss_fn` and `optimizer` to
`train_step` / `init_opt_state`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from wapar_jax._src import fit_check, optimizers, plan_file
from wapar_jax._src import verify as verify_lib
from wapar_jax._src.emit import checkpoint as checkpoint_lib
from wapar_jax._src.emit import mesh as mesh_lib
from wapar_jax._src.emit import nnx_metadata, own_loop
from wapar_jax._src.emit import pipeline as pipeline_lib
from wapar_jax._src.emit import shardings as shardings_lib
from wapar_jax._src.emit import step as step_lib
from wapar_jax._src.emit.own_loop import Shardings
from wapar_jax._src.files import dumps_strict, write_text_atomic
from wapar_jax._src.plan_details import PlanDetails
from wapar_jax._src.search.candidate import Candidate
from wapar_jax._src.tree import abstract, leaf_paths, nest, path_keys, path_str, specs_like
from wapar_jax._src.views import explain as explain_lib
from wapar_jax._src.views import export, plots
from wapar_jax.errors import CorruptPlanFileError, InvalidArgumentError, PlanMismatchError

# 2: adds "details" (leaf shapes and dtypes, dimension groups, hot spots). 3: predictions under
# the rules of the profile's compiler only (the XLA:CPU figure is verify's). 4: adds "pipeline"
# (the stage layout) and the candidates' stages, repeats and stage micro-batches. Older
# versions are read too. 5: adds "model_state_specs" (a model's state the step carries) and
# "batch_axes" (batch dims other than dim 0).
PLAN_FORMAT_VERSION = 5
_READABLE_VERSIONS = (1, 2, 3, 4, 5)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """Predicted cost of one train step, per device (energy: all used devices together)."""

  step_time: float  # seconds
  compute_time: float  # seconds
  comm_time: float  # seconds
  flops: float  # FLOPs per device
  comm_bytes: float  # bytes sent per device
  peak_memory: float  # bytes per device
  energy: float  # joules per step, all used devices
  memory_budget: float  # bytes per device the plan had to fit in

  @classmethod
  def of(cls, c: Candidate, memory_budget: float) -> Prediction:
    return cls(
      c.step_time,
      c.compute_time,
      c.comm_time,
      c.flops,
      c.comm_bytes,
      c.peak_memory,
      c.energy,
      memory_budget,
    )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Prediction:
    """Reads the known fields; others (from other versions) are left out."""
    return cls(**{f.name: float(d[f.name]) for f in dataclasses.fields(cls)})


def _spec_to_json(spec: P) -> list:
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def _spec_from_json(entries: list) -> P:
  return P(*(tuple(e) if isinstance(e, list) else e for e in entries))


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
class Plan:
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
    )

  # --- the user's own loop ---------------------------------------------------------------

  def shardings(
    self, mesh=None, *, optimizer=None, params=None, batch=None, model_state=None
  ) -> Shardings:
    """NamedShardings for params, optimizer state, batch and model state, for a hand-written
    `jax.jit` step.

    Each tree is shaped like the one it lays out: `params` / `batch` (abstract is enough;
    default: the planned trees, needed for a plan loaded from JSON), the state
    `optimizer.init(params)` returns (default optimizer: the planned one; None without one).
    With `constrain` or `value_and_grad` in the loss, the step compiles to the plan's program.

    Example:
      >>> sh = plan.shardings()
      >>> step = jax.jit(train_step, in_shardings=(sh.params, sh.opt_state, sh.batch),
      ...                out_shardings=(sh.params, sh.opt_state, NamedSharding(sh.mesh, P())),
      ...                donate_argnums=(0, 1))
      >>> params = jax.device_put(params, sh.params)
    """
    self._refuse_pipeline("shardings")
    params, batch = self._planned_trees(params, batch)
    optimizer = optimizer or self._optimizer
    opt_specs = None
    if optimizer is not None:
      opt_specs = self._opt_state_specs(optimizers.as_transformation(optimizer), params)
    mesh = self.make_mesh() if mesh is None else self._check_mesh(mesh)
    state_specs = None
    if self.flat_model_state_specs is not None:
      state_specs = self._model_state_specs(model_state)
    return own_loop.shardings(
      mesh, self._param_specs(params), opt_specs, self._batch_specs(batch), state_specs
    )

  def _model_state_specs(self, model_state=None):
    """Specs shaped like `model_state` (default: the planned one; needed for a plan from JSON)."""
    model_state = self._abstract_model_state if model_state is None else model_state
    if model_state is None:
      raise InvalidArgumentError(
        "a plan with model state loaded from JSON needs the state's tree: pass model_state= "
        "(jax.ShapeDtypeStruct leaves are enough). Got model_state = None."
      )
    return _specs_within_rank(model_state, self.flat_model_state_specs, "model-state specs")

  def _opt_state_specs(self, optimizer, params):
    return shardings_lib.opt_state_specs(optimizer, abstract(params), self._opt_param_specs(params))

  def save_checkpoint(self, directory, step: int, params, opt_state) -> bool:
    """Writes params and optimizer state as checkpoint `step` with orbax-checkpoint.

    `directory` is a path or an `orbax.checkpoint.CheckpointManager`, whose options then
    apply (`save_interval_steps`, `max_to_keep`, asynchronous saves): pass it every step and it
    saves every N-th (see docs/multihost.md). Returns whether a checkpoint was written. A
    pipeline plan's stage storage is refused: its parameters are not in the user's tree.

    Example:
      >>> plan.save_checkpoint("/tmp/run", 100, params, opt_state)
    """
    self._refuse_pipeline("save_checkpoint")
    return checkpoint_lib.save(directory, step, {"params": params, "opt_state": opt_state})

  def restore_checkpoint(self, directory, step=None, *, optimizer=None, params=None, mesh=None):
    """`(step, params, opt_state)` of checkpoint `step` (default: the latest) in `directory`
    (a path or an orbax CheckpointManager), each array read straight into this plan's sharding.

    The checkpoint may come from another plan of the same model (another mesh, strategy or
    device count). `params` (abstract is enough; default: the planned tree) and `optimizer`
    (default: the planned one) shape the trees, as `shardings` does.

    Example:
      >>> plan = wapar_jax.Plan.load("plan.json")
      >>> step, params, opt_state = plan.restore_checkpoint("/tmp/run", params=params,
      ...                                                   optimizer=optax.adamw(1e-3))
    """
    self._refuse_pipeline("restore_checkpoint")
    optimizer = self._need_optimizer(optimizer)
    params = self._abstract_params if params is None else params
    if params is None:
      raise InvalidArgumentError(
        "a plan loaded from JSON needs the parameter tree to restore into: pass params= "
        "(jax.ShapeDtypeStruct leaves are enough). Got params=None."
      )
    self.check_fits(params)
    mesh = self.make_mesh() if mesh is None else self._check_mesh(mesh)
    like = {"params": abstract(params), "opt_state": jax.eval_shape(optimizer.init, params)}
    shardings = {
      "params": shardings_lib.named(mesh, self._param_specs(params)),
      "opt_state": shardings_lib.named(mesh, self._opt_state_specs(optimizer, params)),
    }
    step, state = checkpoint_lib.restore(directory, step, shardings, like)
    return step, state["params"], state["opt_state"]

  def constrain(self, loss_fn: Callable, mesh=None) -> Callable:
    """`loss_fn(params, batch)` laid out as the plan's step lays it out, to differentiate in
    one's own step: each use of a weight stored split over the data axis (FSDP) constrained to
    its gathered layout, a scanned layer's slice inside the scan, the batch held to its split,
    and the plan's per-layer remat.

    A constraint on the whole params tree at the top of the loss is another program: it
    gathers a scanned stack of layers at once, and pins tied weights XLA would otherwise
    reduce once. The plan's gradient accumulation (`plan.chosen.microbatches` > 1) is not part
    of a loss: `value_and_grad` has it. `loss_fn(params, batch)` returns the scalar loss; with
    model state, `loss_fn(params, batch, model_state) -> (loss, new_model_state)`.

    The layout is constraints for Auto mesh axes. Under Explicit axes (`jax.make_mesh`'s
    default on jax 0.10, with `jax.set_mesh`) run the whole step in Auto mode with
    `jax.sharding.auto_axes`, else ExplicitAxesError: with sharding in types the optimizer's
    update alone adds all-gathers the plan has not.

    Example:
      >>> loss = plan.constrain(loss_fn)
      >>> def train_step(params, opt_state, batch):
      ...   value, grads = jax.value_and_grad(loss)(params, batch)
      ...   updates, opt_state = tx.update(grads, opt_state, params)
      ...   return optax.apply_updates(params, updates), opt_state, value
      >>> sh = plan.shardings()
      >>> step = jax.jit(train_step, in_shardings=(sh.params, sh.opt_state, sh.batch),
      ...                out_shardings=(sh.params, sh.opt_state, NamedSharding(sh.mesh, P())),
      ...                donate_argnums=(0, 1))
      >>> # Under an Explicit mesh: the same step, run in Auto mode.
      >>> specs = jax.tree.map(lambda s: s.spec, (sh.params, sh.opt_state))
      >>> auto_step = jax.sharding.auto_axes(train_step, out_sharding=(*specs, P()))
    """
    self._refuse_pipeline("constrain")
    mesh = self.make_mesh() if mesh is None else self._check_mesh(mesh)
    remat = self.chosen.remat

    def constrained(params, batch, *model_state):
      own_loop.refuse_explicit("constrain", params, batch)
      fn = own_loop.constrained_loss(
        loss_fn, mesh, self._param_specs(params), self._batch_specs(batch), remat=remat
      )
      return fn(params, batch, *model_state)

    return constrained

  def value_and_grad(self, loss_fn: Callable, mesh=None) -> Callable:
    """`jax.value_and_grad(loss_fn)` as the plan's step computes it: `constrain`'s layout plus
    the plan's gradient accumulation over micro-batches (gradients kept split under ZeRO).

    Example:
      >>> grads_of = plan.value_and_grad(loss_fn)  # with model state:
      >>> # (loss, model_state), grads = grads_of(params, batch, model_state)
      >>> def train_step(params, opt_state, batch):
      ...   loss, grads = grads_of(params, batch)
      ...   updates, opt_state = tx.update(grads, opt_state, params)
      ...   return optax.apply_updates(params, updates), opt_state, loss
    """
    self._refuse_pipeline("value_and_grad")
    mesh = self.make_mesh() if mesh is None else self._check_mesh(mesh)
    chosen = self.chosen

    def grads_of(params, batch, *model_state):
      own_loop.refuse_explicit("value_and_grad", params, batch)
      grad_specs = self._opt_param_specs(params) if chosen.storage != "replicated" else None
      fn = own_loop.constrained_grads(
        loss_fn,
        mesh,
        self._param_specs(params),
        self._batch_specs(batch),
        grad_specs,
        remat=chosen.remat,
        microbatches=chosen.microbatches,
        with_state=bool(model_state),
        batch_axes=self._batch_axes(batch),
      )
      return fn(params, batch, *model_state)

    return grads_of

  def annotate(self, model):
    """Puts the plan onto an NNX model as sharding metadata, in place: each `nnx.Param`'s
    `out_sharding` (flax 0.12's name) set to its spec, so that flax's own tools read the plan.
    Returns the model.

    Example:
      >>> model = plan.annotate(Model(nnx.Rngs(0)))
      >>> nnx.get_partition_spec(nnx.state(model, nnx.Param))  # the plan's specs
      >>> state = jax.device_put(nnx.state(model, nnx.Param), plan.shardings().params)
    """
    if not isinstance(model, nnx.Module):
      raise InvalidArgumentError(
        "plan.annotate takes an nnx.Module (a linen model's parameters carry no metadata: use "
        f"plan.shardings().params). Got {type(model).__name__}."
      )
    return nnx_metadata.annotate(model, self._param_specs(nnx.state(model, nnx.Param)))

  def _planned_trees(self, params, batch):
    params = self._abstract_params if params is None else params
    batch = self._abstract_batch if batch is None else batch
    if params is None or batch is None:
      raise InvalidArgumentError(
        "a plan loaded from JSON needs the trees it applies to: pass params= and batch= "
        "(jax.ShapeDtypeStruct leaves are enough). Got params or batch = None."
      )
    self.check_fits(params, batch)
    return params, batch

  def _refuse_pipeline(self, what: str) -> None:
    if self.pipeline is not None:
      raise InvalidArgumentError(
        f"plan.{what} is for a step written by hand, and a pipeline plan's step is a schedule "
        "over stages that holds parameters stacked by stage: run it with plan.train_step(), "
        f"or plan without a pipeline (stages=1). Got a plan of {self.chosen.stages} stages."
      )

  def _check_mesh(self, mesh):
    """`mesh` if it has the plan's axes and sizes, else a PlanMismatchError."""
    if dict(mesh.shape) != dict(self.mesh_shape):
      raise PlanMismatchError(
        f"the mesh must have the plan's axes and sizes {dict(self.mesh_shape)}: build it with "
        f"plan.make_mesh() (or jax.make_mesh with those). Got {dict(mesh.shape)}."
      )
    return mesh

  def verify(self, devices=None, **kwargs):
    """Compiles the train step for the plan's mesh on CPU devices; prediction vs compiled.

    Runs in a child process when this one has too few CPU devices. On CPU devices the
    predicted peak is this plan priced again under XLA:CPU's buffer rules (the plan's own
    figure is under its profile's compiler's). Keyword arguments: `profile` (to price the
    collectives with), `workload` (how a child process rebuilds a built-in example),
    `loss_fn`, `optimizer`, `params`, `batch` (for a plan loaded from JSON), `timeout`.

    Example:
      >>> print(plan.verify().table())
    """
    return verify_lib.verify(self, devices, **kwargs)

  # --- files ------------------------------------------------------------------------------

  def to_json(self) -> str:
    def flat(specs):
      return [{"path": list(k), "spec": _spec_to_json(s)} for k, s in specs.items()]

    data = {
      "format": "wapar_jax.plan",
      "version": PLAN_FORMAT_VERSION,
      "mesh_shape": dict(self.mesh_shape),
      "strategy": self.strategy,
      "objective": self.objective,
      "profile": self.profile,
      "devices_offered": self.devices_offered,
      "model_split": list(self.model_split),
      "predicted": dataclasses.asdict(self.predicted),
      "chosen": self.chosen.to_dict(),
      "candidates": [c.to_dict() for c in self.candidates],
      "stats": dict(self.stats),
      "memory_decision": self.memory_decision,
      "param_specs": flat(self.flat_param_specs),
      "opt_state_param_specs": flat(self.flat_opt_specs),
      "batch_specs": flat(self.flat_batch_specs),
    }
    if self.pipeline is not None:
      data["pipeline"] = self.pipeline.to_dict()
    if self.flat_model_state_specs is not None:
      data["model_state_specs"] = flat(self.flat_model_state_specs)
    if self.flat_batch_axes:
      data["batch_axes"] = [{"path": list(k), "axis": a} for k, a in self.flat_batch_axes.items()]
    if self.details is not None:
      data["details"] = self.details.to_dict()
    return dumps_strict(data, "the plan", indent=1)

  @classmethod
  def from_json(cls, text: str) -> Plan:
    """The plan `to_json` wrote, every field checked for form and sense (`plan_file.checked`);
    fields this version does not know are ignored with a warning."""
    try:
      data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python reads
      raise CorruptPlanFileError(
        f"a plan file must be JSON written by Plan.to_json. Got {type(e).__name__}: {e}"
      ) from e
    if not isinstance(data, dict) or data.get("format") != "wapar_jax.plan":
      raise CorruptPlanFileError(
        'this is not a wapar_jax plan (no "format": "wapar_jax.plan"). '
        f"Got keys {sorted(data)[:8] if isinstance(data, dict) else type(data).__name__}."
      )
    version = data.get("version")
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
      raise CorruptPlanFileError(
        f"plan file version {version!r} is not supported by this wapar_jax "
        f"(reads versions {_READABLE_VERSIONS}); plan again. Got {version!r}."
      )
    data = plan_file.checked(data)

    def flat(entries):
      return {tuple(e["path"]): _spec_from_json(e["spec"]) for e in entries}

    def candidate(d):
      d = {k: v for k, v in d.items() if k != "mesh_shape"}  # derived from data, model, fsdp
      d["model_groups"] = tuple(d["model_groups"])
      d["cross_node_axes"] = tuple(d.get("cross_node_axes", ()))
      return Candidate(**d)

    params, opt, batch = (
      flat(data[k]) for k in ("param_specs", "opt_state_param_specs", "batch_specs")
    )
    state = flat(data["model_state_specs"]) if "model_state_specs" in data else None
    return cls(
      mesh_shape=dict(data["mesh_shape"]),
      param_specs=nest(params),
      batch_specs=nest(batch),
      opt_state_param_specs=nest(opt),
      predicted=Prediction.from_dict(data["predicted"]),
      candidates=tuple(candidate(c) for c in data["candidates"]),
      chosen=candidate(data["chosen"]),
      strategy=data["strategy"],
      objective=data["objective"],
      profile=data["profile"],
      devices_offered=data["devices_offered"],
      model_split=tuple(data["model_split"]),
      stats=dict(data["stats"]),
      memory_decision=data.get("memory_decision", ""),
      flat_param_specs=params,
      flat_opt_specs=opt,
      flat_batch_specs=batch,
      details=(PlanDetails.from_dict(data["details"]) if "details" in data else None),
      pipeline=(
        pipeline_lib.StageLayout.from_dict(data["pipeline"]) if "pipeline" in data else None
      ),
      model_state_specs=None if state is None else nest(state),
      flat_model_state_specs=state,
      flat_batch_axes=(
        {tuple(e["path"]): e["axis"] for e in data["batch_axes"]} if "batch_axes" in data else None
      ),
    )

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
