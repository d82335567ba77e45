"""Measures the local devices and writes a DeviceProfile of what they achieve.

The datasheet profiles give peak rates; a step on this machine runs at the rates its kernels
reach. `calibrate` times a few kernels on `jax.devices()[0]` (and collectives over all local
devices of that platform) and turns the timings into a profile:

- matmul: square `n x n @ n x n` products per dtype; `peak_flops` is the best rate measured.
- memory: `memory_bandwidth` is in the planner's units: the bytes the planner counts for a
  memory-bound reference train step (layer norm, gelu, residual add, log-sum-exp), divided by
  the step's measured time, median over a few activation sizes. The planner sums XLA's
  per-equation bytes and counts a share of them for fused ops; what a device really does with
  such a step depends on more than DRAM speed (on a CPU, fused kernels with transcendentals run
  several times below it). The raw rate of a streaming kernel (`y = a * x + b` with a fresh
  output, arrays beyond the caches) is measured too and reported in the notes.
- kernel overhead: the slope of the time of a chain of tiny dependent matmuls over the chain's
  length, i.e. what one more kernel costs when it has almost no work.
- collectives (two or more local devices): all-reduce (psum) and all-gather over every local
  device at several sizes, fitted by least squares to the ring alpha-beta model of `cost.py`.

Because the rates are achieved ones, the efficiencies are 1. Figures the machine cannot show
(links between nodes, power) come from a built-in base profile, and the notes say which.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wapar_jax._src import step as step_lib
from wapar_jax._src.planner import api as planner
from wapar_jax._src.cost.collectives import collective_steps, collective_traffic
from wapar_jax.errors import InvalidArgumentError
from wapar_jax._src.profiles import DeviceProfile, LinkTier, load_profile, save_profile

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
    repeats: timed runs per measurement; the minimum is kept (other processes only add time).
  """
  matmul: tuple[int, ...]
  stream_bytes: tuple[int, ...]
  step_bytes: tuple[int, ...]
  collective_bytes: tuple[int, ...]
  chain: tuple[int, int]
  repeats: int


# Per platform: sizes that reach the sustained rate yet finish in seconds. CPU matmuls peak by
# n = 512-1024 and a 2-core host does 1024^3 in ~15 ms; GPUs need n >= 4096 to fill the chip.
DEFAULT_SIZES = {
    "cpu": Sizes(matmul=(64, 128, 256, 512, 1024), stream_bytes=(64 * MiB, 256 * MiB),
                 step_bytes=(8 * MiB, 32 * MiB, 128 * MiB),
                 collective_bytes=(4096, 64 * 1024, MiB, 16 * MiB), chain=(50, 200), repeats=7),
    "gpu": Sizes(matmul=(256, 1024, 4096, 8192), stream_bytes=(256 * MiB, 1024 * MiB),
                 step_bytes=(64 * MiB, 256 * MiB, 1024 * MiB),
                 collective_bytes=(4096, 64 * 1024, MiB, 16 * MiB, 128 * MiB), chain=(50, 400),
                 repeats=10),
}
DEFAULT_SIZES["tpu"] = DEFAULT_SIZES["gpu"]
# For tests and smoke runs: every code path, in well under a second of kernels.
TINY_SIZES = Sizes(matmul=(32, 64), stream_bytes=(MiB,), step_bytes=(MiB,), collective_bytes=(1024, 16 * 1024),
                   chain=(4, 16), repeats=2)

# The built-in profile whose unmeasurable figures (inter-node link, power) a calibrated profile
# keeps, by a word of `device_kind`; the first match wins.
_BASES = (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80g-sxm"), ("v100", "v100-sxm2"),
          ("p100", "p100-nvlink"), ("titan", "titanxp-pcie"), ("v5", "tpu-v5e"),
          ("v4", "tpu-v4"))
_DEFAULT_BASE = {"cpu": "cpu", "gpu": "h100-sxm", "tpu": "tpu-v4"}


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


def measure_matmul(device, dtype: str, sizes: Sequence[int],
                   repeats: int) -> tuple[tuple[int, float], ...]:
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


def measure_step_bandwidth(device, nbytes: int, repeats: int) -> tuple[float, float]:
  """(planner bytes, seconds) of a memory-bound reference train step.

  The planner does not see the bytes a device moves: it sums XLA's per-equation bytes and
  counts a share of them for fused elementwise ops (roofline.FUSED_BYTES_SHARE). Dividing the
  bytes it counts for this step by the step's measured time gives the bandwidth in the
  planner's own units; on a CPU, where fused elementwise kernels with transcendentals run well
  below DRAM speed, it is several times lower than the raw stream rate.
  """
  loss_fn, params, batch = _reference_step(nbytes)
  optimizer = optax.sgd(1e-3)
  params, batch = jax.device_put((params, batch), device)
  # A profile with unbounded FLOP/s and 1 byte/s: the prediction in seconds is the byte count.
  unit = DeviceProfile(
      name="bytes", description="counts planner bytes", kind="cpu",
      peak_flops={"float32": 1e30, "bfloat16": 1e30}, memory_bandwidth=1.0, memory_bytes=1e30,
      devices_per_node=1, intra_node=LinkTier(1e30, 1e-30), inter_node=LinkTier(1e30, 1e-30),
      power_idle_watts=1.0, power_busy_watts=1.0, compute_efficiency=1.0, memory_efficiency=1.0,
      sources=("internal: prices planner bytes at 1 byte/s",))
  counted = planner.plan(loss_fn, params, batch, optimizer=optimizer, devices=1, profile=unit,
                         cache=False).predicted.compute_time
  train_step = jax.jit(step_lib.make_train_step(loss_fn, optimizer))
  opt_state = optimizer.init(params)
  return counted, _best_seconds(train_step, (params, opt_state, batch), repeats)


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


def measure_collectives(devices: Sequence, sizes: Sequence[int],
                        repeats: int) -> tuple[tuple[str, int, float], ...]:
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
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=out_spec,
                                check_vma=False))
    for nbytes in sizes:
      x = jax.device_put(jnp.ones((len(devices) * (nbytes // 4),), jnp.float32),
                         jax.sharding.NamedSharding(mesh, spec))
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
  (latency, inverse_bw), *_ = np.linalg.lstsq(rows * weights[:, None], times * weights,
                                              rcond=None)
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
  matmul = {dtype: measure_matmul(device, dtype, sizes.matmul, sizes.repeats)
            for dtype in DTYPES}
  stream = measure_stream(device, sizes.stream_bytes, sizes.repeats)
  step = []
  for nbytes in sizes.step_bytes:
    counted, seconds = measure_step_bandwidth(device, nbytes, sizes.repeats)
    step.append((nbytes, counted / seconds))
  overhead = measure_kernel_overhead(device, sizes.chain, sizes.repeats)
  collectives, link = (), None
  if len(devices) > 1:
    collectives = measure_collectives(devices, sizes.collective_bytes, sizes.repeats)
    link = fit_link(collectives, len(devices))
  return Measurements(platform=platform, device_kind=device.device_kind, devices=len(devices),
                      matmul=matmul, stream=stream, step=tuple(step), kernel_overhead=overhead,
                      collectives=collectives, link=link,
                      memory_bytes=_memory_bytes(device, len(devices)),
                      seconds=time.perf_counter() - start)


def _memory_bytes(device, devices: int) -> float:
  """Memory one device may use: the allocator's limit, or on CPU the host's RAM split evenly
  over its virtual devices (they share it)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / devices


def _base_name(platform: str, device_kind: str) -> str:
  kind = device_kind.lower()
  if platform != "cpu":
    for word, name in _BASES:
      if word in kind:
        return name
  return _DEFAULT_BASE.get(platform, "h100-sxm")


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _rates(pairs, unit: float, fmt: str) -> str:
  return ", ".join(f"{k}: {v / unit:{fmt}}" for k, v in pairs)


def to_profile(m: Measurements, *, name: str | None = None,
               base: str | os.PathLike | DeviceProfile | None = None,
               memory_bytes: float | None = None) -> DeviceProfile:
  """A DeviceProfile from measurements; unmeasured figures come from `base`.

  Args:
    m: what `measure` returned.
    name: the profile's name; default "calibrated-<device kind>".
    base: the profile that supplies the inter-node link and power figures (and the intra-node
      link with one device); default the built-in profile nearest the device kind.
    memory_bytes: memory per device; default the device allocator's limit (GPU, TPU) or the
      host's RAM over the local CPU devices.
  """
  base_profile = load_profile(base or _base_name(m.platform, m.device_kind))
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  kind = m.platform if m.platform in ("cpu", "gpu", "tpu") else "gpu"
  # CPUs report device_kind "cpu"; say the platform only when it adds something.
  device = m.device_kind if m.device_kind == m.platform else f"{m.device_kind} ({m.platform})"
  fits = {dtype: fit_matmul(rates) for dtype, rates in m.matmul.items()}
  peak = {dtype: fit[0] for dtype, fit in fits.items()}
  half_size = fits.get("float32", next(iter(fits.values())))[1]
  if m.link is not None:
    link_note = (f"intra_node: alpha-beta fit of all-reduce and all-gather over {m.devices} "
                 f"local devices (bytes per device -> ms: " + ", ".join(
                     f"{kind_} {nbytes}: {t * 1e3:.3f}" for kind_, nbytes, t in m.collectives)
                 + ").")
    intra = m.link
  else:
    link_note = (f"intra_node: one local device, so no collective was measured; the figures "
                 f"are those of the built-in profile {base_profile.name}.")
    intra = base_profile.intra_node
  inter = base_profile.inter_node
  if inter.bandwidth > intra.bandwidth or inter.latency < intra.latency:
    # Never let the unmeasured tier look faster than the measured one.
    inter = LinkTier(min(inter.bandwidth, intra.bandwidth), max(inter.latency, intra.latency))
  notes = (
      f"Measured by wapar calibrate on {when}, jax {jax.__version__}, on {device}, in "
      f"{m.seconds:.1f} s; each figure is the minimum time over repeated "
      f"runs. peak_flops and matmul_half_size: rate(n) = peak * n / (n + half) fitted to "
      f"square n x n matmuls (GFLOP/s by n: " + "; ".join(
          f"{dtype} {_rates(rates, 1e9, '.1f')}" for dtype, rates in m.matmul.items()) +
      f"; half size from float32: {half_size:.0f}). memory_bandwidth: median over activation sizes of the bytes the planner counts for "
      f"a memory-bound reference train step (layer norm, gelu, residual, log-sum-exp on a "
      f"float32 [n, 1024] activation, SGD) over its measured time, so that it is in the "
      f"planner's units (GB/s by activation bytes: {_rates(m.step, 1e9, '.2f')}); for "
      f"comparison, the raw stream y = a * x + b with a fresh output reads + writes "
      f"{_rates(m.stream, 1e9, '.2f')} GB/s by input bytes. compute_efficiency and memory_efficiency are 1 "
      f"because the rates are achieved, not datasheet, rates. kernel_overhead: time slope of "
      f"chains of dependent 8 x 8 matmul + tanh links ({m.kernel_overhead * 1e6:.2f} us per "
      f"link). {link_note} inter_node, power_idle_watts and power_busy_watts are not measured: "
      f"they are those of the built-in profile {base_profile.name}.")
  return DeviceProfile(
      name=name or f"calibrated-{_slug(m.device_kind)}",
      description=(f"{device} as measured on this machine by "
                   f"`wapar calibrate` on {when}, {m.devices} local device(s)."),
      kind=kind,
      peak_flops=peak,
      memory_bandwidth=float(np.median([rate for _, rate in m.step])),
      memory_bytes=memory_bytes or m.memory_bytes,
      devices_per_node=m.devices,
      intra_node=intra,
      inter_node=inter,
      power_idle_watts=base_profile.power_idle_watts,
      power_busy_watts=base_profile.power_busy_watts,
      compute_efficiency=1.0,
      memory_efficiency=1.0,
      kernel_overhead=m.kernel_overhead,
      matmul_half_size=half_size,
      sources=(f"Measured with wapar calibrate on {when} (jax {jax.__version__}, "
               f"{m.device_kind}, {m.devices} local {m.platform} device(s))",
               f"Unmeasured figures (inter-node link, power) from the built-in profile "
               f"{base_profile.name!r}"),
      notes=notes)


def calibrate(path: str | os.PathLike | None = None, *, name: str | None = None,
              sizes: Sizes | None = None, devices: Sequence | None = None,
              base: str | os.PathLike | DeviceProfile | None = None) -> DeviceProfile:
  """Measures the local devices and returns (and optionally writes) their DeviceProfile.

  Args:
    path: where to write the profile as JSON (atomically); None writes nothing.
    name: the profile's name; default "calibrated-<device kind>".
    sizes: what to measure; default `DEFAULT_SIZES` for the platform (tens of seconds at most).
    devices: the local devices to measure; default all of `jax.local_devices()`.
    base: built-in profile (or file) for the figures one machine cannot measure.

  Returns:
    The validated profile; pass it, or `path`, as `wapar_jax.plan(..., profile=...)`.

  Examples:
    >>> profile = wapar_jax.calibrate("my-machine.json")
    >>> plan = wapar_jax.plan(loss_fn, params, batch, optimizer=tx, profile="my-machine.json")
  """
  profile = to_profile(measure(sizes, devices), name=name, base=base)
  if path is not None:
    save_profile(profile, path)
  return profile
