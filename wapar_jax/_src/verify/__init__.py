"""Ground truth for a plan: compile its train step with XLA for the plan's mesh and compare.

XLA's SPMD partitioner is the same on CPU as on GPU, so the emitted step compiled for N virtual
CPU devices shows what the plan really costs per device: FLOPs (`cost_analysis`), memory
(`memory_analysis`) and every collective with its shape and replica groups (`as_text`). The
collectives are priced with the same ring alpha-beta formulas and device profile as the
planner, so prediction and compiled truth are compared figure by figure.

A process whose jax already runs with too few CPU devices compiles in a child process started
with `--xla_force_host_platform_device_count=N`. The child gets the plan as JSON and rebuilds
the workload from a built-in example's name, or from a cloudpickle of the user's functions.

A bf16 / f16 plan compiled on CPU devices is also compiled as its float32 twin (XLA:CPU
computes bf16 in f32, so only the twin's memory can be held against a prediction); with
`compiler="gpu"` the child compiles with GPU XLA on mock GPU devices instead.

Modules, each importing only those before it: `results` (what is reported), `hlo` (reading
the HLO text), `replica_groups`, `collectives`, `kernels`, `schedule` (async collectives in a
GPU schedule), `compiled` (a compiled step read whole), `twin` (a low-precision step's float32
twin), `run` (`verify` itself) and `child` (the child process's entry point).
"""

from wapar_jax._src.verify.compiled import CompiledStep as CompiledStep
from wapar_jax._src.verify.compiled import read_compiled as read_compiled
from wapar_jax._src.verify.results import FIGURES as FIGURES
from wapar_jax._src.verify.results import Collective as Collective
from wapar_jax._src.verify.results import Figures as Figures
from wapar_jax._src.verify.results import MemoryBreakdown as MemoryBreakdown
from wapar_jax._src.verify.results import Verification as Verification
from wapar_jax._src.verify.results import relative_error as relative_error
from wapar_jax._src.verify.run import analyse_compiled as analyse_compiled
from wapar_jax._src.verify.run import compile_like_target as compile_like_target
from wapar_jax._src.verify.run import lower_plan_step as lower_plan_step
from wapar_jax._src.verify.run import verify as verify

__all__ = [
  "FIGURES",
  "Collective",
  "CompiledStep",
  "Figures",
  "MemoryBreakdown",
  "Verification",
  "analyse_compiled",
  "compile_like_target",
  "lower_plan_step",
  "read_compiled",
  "relative_error",
  "verify",
]
