"""Named errors. Each message says what was wrong, what to do next, and ends with what was got.

Naming follows ``<Verb/Adjective><Object>Error`` (as flax.errors does), one base class so callers
can catch everything the planner raises with ``except wapar_jax.WaparError``.

Example:
  >>> from wapar_jax import errors
  >>> try:
  ...   plan = wapar_jax.plan(loss_fn, params, batch, optimizer=tx, devices=4)
  ... except errors.NoFeasiblePlanError as e:
  ...   print(e.closest.mesh_shape)
"""


class WaparError(Exception):
  """Base class of every error wapar_jax raises on purpose."""


class InvalidArgumentError(WaparError, ValueError):
  """An argument to a public function has the wrong type or value."""


class UnknownProfileError(WaparError, KeyError):
  """A device profile name is not built in and is not a readable file."""

  def __str__(self):  # KeyError would print the message with quotes around it.
    return str(self.args[0]) if self.args else ""


class InvalidProfileError(WaparError, ValueError):
  """A device profile's data is missing fields or has values out of range."""


class NonScalarLossError(WaparError, ValueError):
  """The loss function does not return a scalar."""


class ShardedLossError(WaparError, ValueError):
  """The loss function already shards or communicates (shard_map, with_sharding_constraint,
  collectives): the planner takes single-device code."""


class IndivisibleBatchError(WaparError, ValueError):
  """The batch's leading dimension cannot be split over any data-parallel degree asked for."""


class NoFeasiblePlanError(WaparError, RuntimeError):
  """No candidate fits the device memory; carries the closest option."""

  def __init__(self, message, closest=None):
    super().__init__(message)
    self.closest = closest


class NotEnoughDevicesError(WaparError, RuntimeError):
  """The plan needs more devices than are available in this process."""


class PlanMismatchError(WaparError, ValueError):
  """A plan is applied to a parameter tree it was not made for."""


class ExplicitAxesError(WaparError, ValueError):
  """The plan's compute layout is applied where the mesh's axes are Explicit (sharding in
  types): it is made of constraints for Auto axes."""


class DonatedInputError(WaparError, RuntimeError):
  """An input of the train step was donated to an earlier call, so its buffers are gone."""


class MissingDependencyError(WaparError, ImportError):
  """An optional dependency a feature needs (orbax-checkpoint for checkpoints) is not installed."""


class CheckpointNotFoundError(WaparError, FileNotFoundError):
  """The checkpoint asked for is not in the directory (or the directory has none)."""


class CorruptPlanFileError(WaparError, ValueError):
  """A plan file cannot be parsed or has the wrong version."""


class NonFiniteValueError(WaparError, ValueError):
  """A value to be written as JSON (a plan's prediction, say) is NaN or infinite."""


class NoGpuError(WaparError, RuntimeError):
  """A GPU compile was asked for (``verify(compiler="gpu")``) where jax sees no GPU."""


class VerificationFailedError(WaparError, RuntimeError):
  """Compiling the plan's step for verification failed, timed out, or cannot be arranged."""
