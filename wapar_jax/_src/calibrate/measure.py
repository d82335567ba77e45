"""Timing this machine's devices: matmuls, a memory-bound train step, kernel launches, links."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wapar_jax._src import step as step_lib
from wapar_jax._src.cost.collectives import collective_steps, collective_traffic
from wapar_jax._src.planner import api as planner
from wapar_jax._src.profiles import DeviceProfile, LinkTier
from wapar_jax.errors import InvalidArgumentError

MiB = 2**20
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What `calibrate` measures.

  Attributes:
    matmul: sides n of the square matmuls timed per dtype.
    stream_bytes: bytes of the streaming kernel's input array, one run per entry.
    step_bytes: bytes of the reference step's activation, one run per entry.
    collective_bytes: bytes per device of the collectives' input, one run per entry and kind.
    chain: lengths of the tiny-matmul chains whose time difference gives the kernel overhead.
    conv_batch: images in the convolution reference step.
    repeats: timed runs per measurement; the minimum is kept (other processes only add time).
  """

  matmul: tuple[int, ...]
  stream_bytes: tuple[int, ...]
  step_bytes: tuple[int, ...]
  collective_bytes: tuple[int, ...]
  chain: tuple[int, int]
  conv_batch: int
  repeats: int


# Per platform: sizes that reach the sustained rate yet finish in seconds. CPU matmuls peak by
# n = 512-1024 and a 2-core host does 1024^3 in ~15 ms; GPUs need n >= 4096 to fill the chip.
DEFAULT_SIZES = {
  "cpu": Sizes(
    matmul=(64, 128, 256, 512, 1024),
    stream_bytes=(64 * MiB, 256 * MiB),
    step_bytes=(8 * MiB, 32 * MiB, 128 * MiB),
    collective_bytes=(4096, 64 * 1024, MiB, 16 * MiB),
    chain=(50, 200),
    conv_batch=8,
    repeats=7,
  ),
  "gpu": Sizes(
    matmul=(256, 1024, 4096, 8192),
    stream_bytes=(256 * MiB, 1024 * MiB),
    step_bytes=(64 * MiB, 256 * MiB, 1024 * MiB),
    collective_bytes=(4096, 64 * 1024, MiB, 16 * MiB, 128 * MiB),
    chain=(50, 400),
    conv_batch=256,
    repeats=10,
  ),
}
DEFAULT_SIZES["tpu"] = DEFAULT_SIZES["gpu"]
# For tests and smoke runs: every code path, in well under a second of kernels.
TINY_SIZES = Sizes(
  matmul=(32, 64),
  stream_bytes=(MiB,),
  step_bytes=(MiB,),
  collective_bytes=(1024, 16 * 1024),
  chain=(4, 16),
  conv_batch=1,
  repeats=2,
)


# The built-in profile whose unmeasurable figures (inter-node link, power) a calibrated profile
# keeps, by a word of `device_kind`; the first match wins.
@dataclasses.dataclass(frozen=True)
class Measurements:
  """Raw results of one calibration run.

  Attributes:
    platform: "cpu", "gpu" or "tpu".
    device_kind: `jax.devices()[0].device_kind`.
    devices: local devices of the platform (the collective group).
    matmul: dtype -> ((n, FLOP/s), ...).
    stream: ((input bytes, bytes/s), ...) of the raw streaming kernel.
    step: ((activation bytes, planner bytes/s), ...) of the reference train step.
    kernel_overhead: seconds per extra kernel.
    step_overhead: seconds every step pays once (dispatch, launch).
    conv: FLOP/s of the convolution reference step, in the planner's units (FLOPs over the
      matmul efficiency their GEMM size reaches, `matmul_half_size` from `matmul`).
    collectives: ((kind, bytes per device, seconds), ...); empty with one device.
    link: the alpha-beta fit of `collectives`, or None.
    memory_bytes: memory one device may use (see `_memory_bytes`).
    seconds: wall time the measurements took, compiles included.
  """

  platform: str
  device_kind: str
  devices: int
  matmul: Mapping[str, tuple[tuple[int, float], ...]]
  stream: tuple[tuple[int, float], ...]
  step: tuple[tuple[int, float], ...]
  kernel_overhead: float
  step_overhead: float
  conv: float
  collectives: tuple[tuple[str, int, float], ...]
  link: LinkTier | None
  memory_bytes: float
  seconds: float


def _best_seconds(fn: Callable, args: Sequence, repeats: int) -> float:
  """Minimum wall time of `fn(*args)` over `repeats` runs, after one run to compile and warm."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def measure_matmul(
  device, dtype: str, sizes: Sequence[int], repeats: int
) -> tuple[tuple[int, float], ...]:
  """(n, FLOP/s) of `n x n @ n x n` in `dtype` for each n.

  Small sizes run as a chain of dependent matmuls inside one program (about as many FLOPs as
  the largest size), so the program's dispatch does not pass for a slow matmul.
  """
  largest = max(sizes)
  rates = []
  for n in sizes:
    chain = max(1, round((largest / n) ** 3))

    def run(x, a, chain=chain):
      return jax.lax.fori_loop(0, chain, lambda _, y: y @ a, x)

    a = jax.device_put(jnp.full((n, n), 1.0 / n, dtype), device)  # keeps the chain at 1.0
    rates.append((n, chain * 2 * n**3 / _best_seconds(jax.jit(run), (a, a), repeats)))
  return tuple(rates)


def fit_matmul(rates: Sequence[tuple[int, float]]) -> tuple[float, float]:
  """(peak FLOP/s, half size) of rate(n) = peak * n / (n + half), fitted to (n, rate) pairs.

  1 / rate = 1 / peak + (half / peak) / n is a line in 1 / n: least squares, weighting each
  size alike. A fit that is not a saturating curve (too few sizes, noise) gives the best rate
  measured and half size 0.
  """
  best = max(rate for _, rate in rates)
  if len(rates) < 2:
    return best, 0.0
  x = np.array([1.0 / n for n, _ in rates])
  y = np.array([1.0 / rate for _, rate in rates])
  slope, intercept = np.polyfit(x, y, 1)
  if intercept <= 0 or slope <= 0:
    return best, 0.0
  return float(1.0 / intercept), float(slope / intercept)


def measure_stream(device, sizes: Sequence[int], repeats: int) -> tuple[tuple[int, float], ...]:
  """(input bytes, bytes/s) of `y = a * x + b` over float32 arrays: one read and one write."""
  kernel = jax.jit(lambda x: 1.5 * x + 1.0)
  rates = []
  for nbytes in sizes:
    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
    rates.append((nbytes, 2 * nbytes / _best_seconds(kernel, (x,), repeats)))
  return tuple(rates)


def _reference_step(nbytes: int):
  """A memory-bound train step typical of a model's non-matmul work, on a float32 [n, 1024]
  activation of `nbytes`: layer norm, scale and shift, gelu, residual add, log-sum-exp."""
  width = 1024
  rows = max(nbytes // (4 * width), 8)

  def loss_fn(params, batch):
    x = batch["x"]
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    h = centred * jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + 1e-5)
    h = jax.nn.gelu(h * params["scale"] + params["shift"]) + x
    return jax.nn.logsumexp(h, axis=-1).mean()

  params = {"scale": jnp.ones((width,), jnp.float32), "shift": jnp.zeros((width,), jnp.float32)}
  batch = {"x": jnp.linspace(-2.0, 2.0, rows * width, dtype=jnp.float32).reshape(rows, width)}
  return loss_fn, params, batch


def _counting_profile(
  memory_bandwidth: float, kernel_overhead: float, peak: float = 1e30, matmul_half_size=0.0
) -> DeviceProfile:
  """A profile whose predicted seconds count what the planner sees: bytes at 1 byte/s,
  kernels at 1 s each, or FLOPs at 1 FLOP/s (over their matmul efficiency)."""
  return DeviceProfile(
    name="counting",
    description="counts what the planner prices",
    kind="cpu",
    peak_flops={"float32": peak, "bfloat16": peak},
    memory_bandwidth=memory_bandwidth,
    memory_bytes=1e30,
    devices_per_node=1,
    intra_node=LinkTier(1e30, 1e-30),
    inter_node=LinkTier(1e30, 1e-30),
    power_idle_watts=1.0,
    power_busy_watts=1.0,
    compute_efficiency=1.0,
    memory_efficiency=1.0,
    kernel_overhead=kernel_overhead,
    matmul_half_size=matmul_half_size,
    sources=("internal: counts planner bytes, kernels or FLOPs",),
  )


def _counted_and_timed(
  loss_fn, params, batch, counting: DeviceProfile, device, repeats: int
) -> tuple[float, float]:
  """(the planner's single-device prediction on `counting`, the best wall seconds on `device`)
  of the SGD train step of `loss_fn`."""
  optimizer = optax.sgd(1e-3)
  counted = planner.plan(
    loss_fn, params, batch, optimizer=optimizer, devices=1, profile=counting, cache=False
  ).predicted.compute_time
  params, batch = jax.device_put((params, batch), device)
  train_step = jax.jit(step_lib.make_train_step(loss_fn, optimizer))
  return counted, _best_seconds(train_step, (params, optimizer.init(params), batch), repeats)


def measure_step_overhead(device, kernel_overhead: float, repeats: int) -> float:
  """Seconds a train step pays once: the wall time of an SGD step of a 16-float linear model
  (no work to speak of), less the kernels the planner counts for it at `kernel_overhead` each.
  What is left is the program's dispatch and launch, which every step pays."""

  def loss_fn(params, batch):
    return jnp.mean((batch["x"] @ params["w"]) ** 2)

  params = {"w": jnp.full((16,), 0.1, jnp.float32)}
  batch = {"x": jnp.ones((8, 16), jnp.float32)}
  # Unbounded FLOP/s and bandwidth, 1 s a kernel: the prediction in seconds is the kernel count.
  counting = _counting_profile(memory_bandwidth=1e30, kernel_overhead=1.0)
  kernels, seconds = _counted_and_timed(loss_fn, params, batch, counting, device, repeats)
  return max(seconds - kernels * kernel_overhead, 0.0)


def measure_step_bandwidth(device, nbytes: int, repeats: int) -> tuple[float, float]:
  """(planner bytes, seconds) of a memory-bound reference train step.

  The planner counts the bytes of the kernels XLA fuses the step into (`cost.fusion`).
  Dividing them by the step's measured time gives the bandwidth such kernels reach; on a CPU,
  where fused elementwise kernels with transcendentals run below DRAM speed, it is lower than
  the raw stream rate.
  """
  # Unbounded FLOP/s and 1 byte/s: the prediction in seconds is the byte count.
  counting = _counting_profile(memory_bandwidth=1.0, kernel_overhead=0.0)
  return _counted_and_timed(*_reference_step(nbytes), counting, device, repeats)


def _conv_step(batch: int):
  """A convolution-bound train step: two 3 x 3 convolutions, 32 -> 64 -> 64 channels, on
  28 x 28 images (a network's middle, not its 3-channel stem)."""
  dims = ("NHWC", "HWIO", "NHWC")

  def loss_fn(params, batch):
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME")
    h = jax.nn.relu(conv(batch["x"], params["w1"], dimension_numbers=dims))
    return jnp.mean(conv(h, params["w2"], dimension_numbers=dims) ** 2)

  params = {
    "w1": jnp.full((3, 3, 32, 64), 0.02, jnp.float32),
    "w2": jnp.full((3, 3, 64, 64), 0.02, jnp.float32),
  }
  images = jnp.linspace(-1.0, 1.0, batch * 28 * 28 * 32, dtype=jnp.float32)
  return loss_fn, params, {"x": images.reshape(batch, 28, 28, 32)}


def measure_conv_rate(device, batch: int, matmul_half_size: float, repeats: int) -> float:
  """FLOP/s of a convolution-bound reference train step in the planner's units: the FLOPs it
  counts, each over the matmul efficiency its GEMM size reaches, per measured second. Over
  the matmul peak it is the profile's `conv_efficiency`."""
  # 1 FLOP/s at full efficiency, unbounded bandwidth: the prediction in seconds is the FLOPs.
  counting = _counting_profile(1e30, 0.0, peak=1.0, matmul_half_size=matmul_half_size)
  counted, seconds = _counted_and_timed(*_conv_step(batch), counting, device, repeats)
  return counted / seconds


def measure_kernel_overhead(device, chain: tuple[int, int], repeats: int) -> float:
  """Seconds one more kernel adds: the time slope of chains of dependent 8 x 8 matmuls.

  Each link is a matmul (never fused away) and a tanh (fused into its neighbours), with almost
  no work, so the slope between two chain lengths is the per-kernel cost and the fixed cost of
  dispatching the program cancels.
  """

  def chained(length):
    def run(x, w):
      for _ in range(length):
        x = jnp.tanh(x @ w)
      return x

    return jax.jit(run)

  x = jax.device_put(jnp.full((8, 8), 0.1, jnp.float32), device)
  short, long = chain
  t_short = _best_seconds(chained(short), (x, x), repeats)
  t_long = _best_seconds(chained(long), (x, x), repeats)
  return max(t_long - t_short, 0.0) / (long - short)


def measure_collectives(
  devices: Sequence, sizes: Sequence[int], repeats: int
) -> tuple[tuple[str, int, float], ...]:
  """(kind, bytes per device, seconds) of psum and all-gather over `devices`."""
  mesh = jax.sharding.Mesh(np.array(devices), ("i",))
  spec = jax.sharding.PartitionSpec("i")
  kernels = {
    "all-reduce": lambda x: jax.lax.psum(x, "i"),
    "all-gather": lambda x: jax.lax.all_gather(x, "i", tiled=True),
  }
  out = []
  for kind, body in kernels.items():
    out_spec = spec if kind == "all-reduce" else jax.sharding.PartitionSpec()
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=out_spec, check_vma=False))
    for nbytes in sizes:
      x = jax.device_put(
        jnp.ones((len(devices) * (nbytes // 4),), jnp.float32),
        jax.sharding.NamedSharding(mesh, spec),
      )
      out.append((kind, nbytes, _best_seconds(fn, (x,), repeats)))
  return tuple(out)


def fit_link(collectives: Sequence[tuple[str, int, float]], n: int) -> LinkTier:
  """Least-squares alpha-beta fit: seconds = steps * latency + traffic / bandwidth.

  Steps and traffic are `cost.py`'s ring formulas, so the planner prices collectives with the
  model the figures were fitted to. Sizes are per device; an all-gather's full buffer is n times
  its input.
  """
  rows, times = [], []
  for kind, nbytes, seconds in collectives:
    full = nbytes * n if kind == "all-gather" else nbytes
    rows.append((collective_steps(kind, n), collective_traffic(kind, full, n)))
    times.append(seconds)
  rows, times = np.array(rows, dtype=float), np.array(times)
  # Relative residuals: the small sizes (latency) weigh as much as the large (bandwidth).
  weights = 1.0 / times
  (latency, inverse_bw), *_ = np.linalg.lstsq(rows * weights[:, None], times * weights, rcond=None)
  largest = int(np.argmax(rows[:, 1]))
  if inverse_bw <= 0:  # a flat curve (tiny sizes): the largest run's rate is the best bound
    inverse_bw = times[largest] / rows[largest, 1]
  if latency <= 0:
    smallest = int(np.argmin(rows[:, 1]))
    latency = max(times[smallest] - rows[smallest, 1] * inverse_bw, 1e-7) / rows[smallest, 0]
  return LinkTier(bandwidth=float(1.0 / inverse_bw), latency=float(latency))


def measure(sizes: Sizes | None = None, devices: Sequence | None = None) -> Measurements:
  """Runs every measurement on `devices[0]` (collectives over all of `devices`).

  Args:
    sizes: what to measure; default `DEFAULT_SIZES` for the devices' platform.
    devices: the local devices to measure; default `jax.local_devices()`.
  """
  start = time.perf_counter()
  devices = list(devices if devices is not None else jax.local_devices())
  if not devices:
    raise InvalidArgumentError("calibrate needs at least one device. Got an empty list.")
  device = devices[0]
  platform = device.platform
  devices = [d for d in devices if d.platform == platform]
  sizes = sizes or DEFAULT_SIZES.get(platform, DEFAULT_SIZES["gpu"])
  matmul = {dtype: measure_matmul(device, dtype, sizes.matmul, sizes.repeats) for dtype in DTYPES}
  stream = measure_stream(device, sizes.stream_bytes, sizes.repeats)
  step = []
  for nbytes in sizes.step_bytes:
    counted, seconds = measure_step_bandwidth(device, nbytes, sizes.repeats)
    step.append((nbytes, counted / seconds))
  overhead = measure_kernel_overhead(device, sizes.chain, sizes.repeats)
  step_overhead = measure_step_overhead(device, overhead, sizes.repeats)
  half_size = fit_matmul(matmul["float32"])[1]
  conv = measure_conv_rate(device, sizes.conv_batch, half_size, sizes.repeats)
  collectives, link = (), None
  if len(devices) > 1:
    collectives = measure_collectives(devices, sizes.collective_bytes, sizes.repeats)
    link = fit_link(collectives, len(devices))
  return Measurements(
    platform=platform,
    device_kind=device.device_kind,
    devices=len(devices),
    matmul=matmul,
    stream=stream,
    step=tuple(step),
    kernel_overhead=overhead,
    step_overhead=step_overhead,
    conv=conv,
    collectives=collectives,
    link=link,
    memory_bytes=_memory_bytes(device, len(devices)),
    seconds=time.perf_counter() - start,
  )


def _memory_bytes(device, devices: int) -> float:
  """Memory one device may use: the allocator's limit, or on CPU the host's RAM split evenly
  over its virtual devices (they share it)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / devices
