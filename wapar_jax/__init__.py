"""wapar_jax: a workload-aware sharding planner for JAX train steps.

Give it a single-device `loss_fn(params, batch)`, an optax optimizer and a batch; it chooses how
many devices to use, the mesh shape and a PartitionSpec for every parameter, optimizer-state and
batch leaf, and emits the jitted, sharded train step.

Example:
  >>> import optax, wapar_jax as wap
  >>> plan = wap.plan(loss_fn, params, batch, optimizer=optax.adamw(1e-3), devices=8)
  >>> step = plan.train_step()

Errors live in `wapar_jax.errors` (all derive from `wapar_jax.WaparError`); the built-in example
models in `wapar_jax.examples`.
"""

import importlib.metadata

from wapar_jax import errors as errors
from wapar_jax._src.calibrate import calibrate as calibrate
from wapar_jax._src.emit.own_loop import Shardings as Shardings
from wapar_jax._src.plan import Plan as Plan
from wapar_jax._src.plan import Prediction as Prediction
from wapar_jax._src.planner.api import plan as plan
from wapar_jax._src.planner.inputs import linen_params as linen_params
from wapar_jax._src.profiles import DeviceProfile as DeviceProfile
from wapar_jax._src.profiles import LinkTier as LinkTier
from wapar_jax._src.profiles import list_profiles as list_profiles
from wapar_jax._src.profiles import load_profile as load_profile
from wapar_jax._src.search import Candidate as Candidate
from wapar_jax._src.verify import Verification as Verification
from wapar_jax.errors import WaparError as WaparError

__version__ = importlib.metadata.version("wapar_jax")

__all__ = [
  "Candidate",
  "DeviceProfile",
  "LinkTier",
  "Plan",
  "Prediction",
  "Shardings",
  "Verification",
  "WaparError",
  "calibrate",
  "errors",
  "linen_params",
  "list_profiles",
  "load_profile",
  "plan",
]
