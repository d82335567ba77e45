"""wapar_jax: a workload-aware sharding planner for JAX train steps.

Give it a single-device `loss_fn(params, batch)`, an optax optimizer and a batch; it chooses how
many devices to use, the mesh shape and a PartitionSpec for every parameter, optimizer-state and
batch leaf, and emits the jitted, sharded train step.
"""

from wapar_jax._src.calibrate import calibrate as calibrate
from wapar_jax.errors import CorruptPlanFileError as CorruptPlanFileError
from wapar_jax.errors import IndivisibleBatchError as IndivisibleBatchError
from wapar_jax.errors import InvalidArgumentError as InvalidArgumentError
from wapar_jax.errors import InvalidProfileError as InvalidProfileError
from wapar_jax.errors import NoFeasiblePlanError as NoFeasiblePlanError
from wapar_jax.errors import NonScalarLossError as NonScalarLossError
from wapar_jax.errors import NotEnoughDevicesError as NotEnoughDevicesError
from wapar_jax.errors import PlanMismatchError as PlanMismatchError
from wapar_jax.errors import UnknownProfileError as UnknownProfileError
from wapar_jax.errors import WaparError as WaparError
from wapar_jax._src.models import linen_params as linen_params
from wapar_jax._src.plan import Plan as Plan
from wapar_jax._src.plan import Prediction as Prediction
from wapar_jax._src.planner import plan as plan
from wapar_jax._src.profiles import DeviceProfile as DeviceProfile
from wapar_jax._src.profiles import LinkTier as LinkTier
from wapar_jax._src.profiles import list_profiles as list_profiles
from wapar_jax._src.profiles import load_profile as load_profile
from wapar_jax._src.search import Candidate as Candidate
from wapar_jax._src.verify import Verification as Verification
from wapar_jax.errors import VerificationFailedError as VerificationFailedError

__version__ = "0.1.0"

__all__ = [
    "Candidate", "CorruptPlanFileError", "DeviceProfile", "IndivisibleBatchError",
    "InvalidArgumentError", "InvalidProfileError", "LinkTier", "NoFeasiblePlanError",
    "NonScalarLossError", "NotEnoughDevicesError", "Plan", "PlanMismatchError", "Prediction",
    "UnknownProfileError", "Verification", "VerificationFailedError", "WaparError",
    "calibrate", "linen_params", "list_profiles", "load_profile", "plan",
]
