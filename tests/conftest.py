import os

# Every test module shares one process: 8 virtual CPU devices, set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("WAPAR_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))
