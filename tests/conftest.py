import os

# Every test module shares one process: 8 virtual CPU devices, set before jax initialises. The
# tests check what XLA's HLO passes decide (partitioning, collectives, buffers) and numerics,
# none of which LLVM's optimisation of the CPU kernels changes; compiling them unoptimised
# takes a fifth less CPU time (tests/test_own_loop.py: 45 -> 36 s).
os.environ.setdefault(
  "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("WAPAR_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))
