"""The Plan's methods for a researcher's own training loop: shardings shaped like their trees,
the plan's compute layout for their loss, NNX sharding metadata, and checkpoints.

A mixin of `Plan` (its data and its spec helpers are the Plan's); the work is in
`emit.own_loop`, `emit.nnx_metadata` and `emit.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from wapar_jax._src import optimizers
from wapar_jax._src.emit import checkpoint as checkpoint_lib
from wapar_jax._src.emit import nnx_metadata, own_loop
from wapar_jax._src.emit import shardings as shardings_lib
from wapar_jax._src.emit.own_loop import Shardings
from wapar_jax._src.tree import abstract
from wapar_jax.errors import InvalidArgumentError, PlanMismatchError


class OwnLoopMethods:
  """`Plan.shardings`, `constrain`, `value_and_grad`, `annotate`, `save_checkpoint`,
  `restore_checkpoint`."""

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

  def _opt_state_specs(self, optimizer, params):
    return shardings_lib.opt_state_specs(optimizer, abstract(params), self._opt_param_specs(params))

  def save_checkpoint(self, directory, step: int, params, opt_state, model_state=None) -> bool:
    """Writes params, optimizer state (and a model's state, for a plan with one) as checkpoint
    `step` with orbax-checkpoint.

    `directory` is a path or an `orbax.checkpoint.CheckpointManager`, whose options then
    apply (`save_interval_steps`, `max_to_keep`, asynchronous saves): pass it every step and it
    saves every N-th (see docs/multihost.md). Returns whether a checkpoint was written. A
    pipeline plan's stage storage is refused: its parameters are not in the user's tree.

    Example:
      >>> plan.save_checkpoint("/tmp/run", 100, params, opt_state)
    """
    self._refuse_pipeline("save_checkpoint")
    state = {"params": params, "opt_state": opt_state}
    if self.flat_model_state_specs is not None:
      if model_state is None:
        raise InvalidArgumentError(
          "this plan's model carries state (batch statistics, PRNG keys) that the run needs to "
          "resume as it was: pass model_state= too. Got model_state=None."
        )
      state["model_state"] = model_state
    return checkpoint_lib.save(directory, step, state)

  def restore_checkpoint(
    self, directory, step=None, *, optimizer=None, params=None, mesh=None, model_state=None
  ):
    """`(step, params, opt_state)` of checkpoint `step` (default: the latest) in `directory`
    (a path or an orbax CheckpointManager), each array read straight into this plan's sharding;
    `(step, params, opt_state, model_state)` for a plan whose model carries state
    (`model_state`, abstract is enough, shapes it for a plan loaded from JSON).

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
    if self.flat_model_state_specs is not None:
      state_specs = self._model_state_specs(model_state)
      model_state = self._abstract_model_state if model_state is None else model_state
      like["model_state"] = abstract(model_state)
      shardings["model_state"] = shardings_lib.named(mesh, state_specs)
    step, state = checkpoint_lib.restore(directory, step, shardings, like)
    if "model_state" in state:
      return step, state["params"], state["opt_state"], state["model_state"]
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
    chosen = self.chosen

    def constrained(params, batch, *model_state):
      own_loop.refuse_explicit("constrain", params, batch)
      fn = own_loop.constrained_loss(
        loss_fn,
        mesh,
        self._param_specs(params),
        self._batch_specs(batch),
        remat=chosen.remat,
        sequence_parallel=chosen.sequence_parallel,
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
        sequence_parallel=chosen.sequence_parallel,
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
