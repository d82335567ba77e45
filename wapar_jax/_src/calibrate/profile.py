"""A DeviceProfile from measurements, and `calibrate()`: measure, then write the profile."""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence

import jax
import numpy as np

from wapar_jax._src.calibrate.measure import Measurements, Sizes, fit_matmul, measure
from wapar_jax._src.profiles import DeviceProfile, LinkTier, load_profile, save_profile

_BASES = (
  ("h200", "h200"),
  ("h100", "h100-sxm"),
  ("a100", "a100-80g-sxm"),
  ("v100", "v100-sxm2"),
  ("p100", "p100-nvlink"),
  ("titan", "titanxp-pcie"),
  ("v5", "tpu-v5e"),
  ("v4", "tpu-v4"),
)
_DEFAULT_BASE = {"cpu": "cpu", "gpu": "h100-sxm", "tpu": "tpu-v4"}


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


def to_profile(
  m: Measurements,
  *,
  name: str | None = None,
  base: str | os.PathLike | DeviceProfile | None = None,
  memory_bytes: float | None = None,
) -> DeviceProfile:
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
  when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  kind = m.platform if m.platform in ("cpu", "gpu", "tpu") else "gpu"
  # CPUs report device_kind "cpu"; say the platform only when it adds something.
  device = m.device_kind if m.device_kind == m.platform else f"{m.device_kind} ({m.platform})"
  fits = {dtype: fit_matmul(rates) for dtype, rates in m.matmul.items()}
  peak = {dtype: fit[0] for dtype, fit in fits.items()}
  half_size = fits.get("float32", next(iter(fits.values())))[1]
  if m.link is not None:
    link_note = (
      f"intra_node: alpha-beta fit of all-reduce and all-gather over {m.devices} "
      f"local devices (bytes per device -> ms: "
      + ", ".join(f"{kind_} {nbytes}: {t * 1e3:.3f}" for kind_, nbytes, t in m.collectives)
      + ")."
    )
    intra = m.link
  else:
    link_note = (
      f"intra_node: one local device, so no collective was measured; the figures "
      f"are those of the built-in profile {base_profile.name}."
    )
    intra = base_profile.intra_node
  inter = base_profile.inter_node
  if inter.bandwidth > intra.bandwidth or inter.latency < intra.latency:
    # Never let the unmeasured tier look faster than the measured one.
    inter = LinkTier(min(inter.bandwidth, intra.bandwidth), max(inter.latency, intra.latency))
  bandwidth = float(np.median([rate for _, rate in m.step]))
  capped = ""
  if m.platform != "cpu" and bandwidth > base_profile.memory_bandwidth:
    # A rate above the datasheet's means bytes the planner counts that the device never moves.
    capped = (
      f" The fit, {bandwidth / 1e9:.0f} GB/s, is above the datasheet's "
      f"{base_profile.memory_bandwidth / 1e9:.0f} GB/s ({base_profile.name}), so the datasheet's "
      f"figure is kept."
    )
    bandwidth = base_profile.memory_bandwidth
  notes = (
    f"Measured by wapar calibrate on {when}, jax {jax.__version__}, on {device}, in "
    f"{m.seconds:.1f} s; each figure is the minimum time over repeated "
    f"runs. peak_flops and matmul_half_size: rate(n) = peak * n / (n + half) fitted to "
    f"square n x n matmuls (GFLOP/s by n: "
    + "; ".join(f"{dtype} {_rates(rates, 1e9, '.1f')}" for dtype, rates in m.matmul.items())
    + f"; half size from float32: {half_size:.0f}). memory_bandwidth: median over activation "
    f"sizes of the bytes the planner counts for a memory-bound reference train step (layer "
    f"norm, gelu, residual, log-sum-exp on a "
    f"float32 [n, 1024] activation, SGD) over its measured time, so that it is in the "
    f"planner's units (GB/s by activation bytes: {_rates(m.step, 1e9, '.2f')}); for "
    f"comparison, the raw stream y = a * x + b with a fresh output reads + writes "
    f"{_rates(m.stream, 1e9, '.2f')} GB/s by input bytes.{capped} compute_efficiency and "
    f"memory_efficiency are 1 because the rates are achieved, not datasheet, rates. "
    f"kernel_overhead: time slope of "
    f"chains of dependent 8 x 8 matmul + tanh links ({m.kernel_overhead * 1e6:.2f} us per "
    f"link). step_overhead: wall time of an SGD step of a 16-float model less its kernels "
    f"({m.step_overhead * 1e6:.1f} us). conv_efficiency: the planner's FLOP/s of a reference "
    f"step of two 3 x 3 convolutions (32 -> 64 -> 64 channels, 28 x 28) over the float32 matmul "
    f"peak ({m.conv / 1e9:.1f} against {peak['float32'] / 1e9:.1f} GFLOP/s). {link_note} "
    f"inter_node, power_idle_watts and "
    f"power_busy_watts are not measured: they are those of the built-in profile "
    f"{base_profile.name}."
  )
  return DeviceProfile(
    name=name or f"calibrated-{_slug(m.device_kind)}",
    description=(
      f"{device} as measured on this machine by "
      f"`wapar calibrate` on {when}, {m.devices} local device(s)."
    ),
    kind=kind,
    peak_flops=peak,
    memory_bandwidth=bandwidth,
    memory_bytes=memory_bytes or m.memory_bytes,
    devices_per_node=m.devices,
    intra_node=intra,
    inter_node=inter,
    power_idle_watts=base_profile.power_idle_watts,
    power_busy_watts=base_profile.power_busy_watts,
    compute_efficiency=1.0,
    memory_efficiency=1.0,
    kernel_overhead=m.kernel_overhead,
    step_overhead=m.step_overhead,
    matmul_half_size=half_size,
    conv_efficiency=float(np.clip(m.conv / peak["float32"], 0.05, 4.0)),
    sources=(
      f"Measured with wapar calibrate on {when} (jax {jax.__version__}, "
      f"{m.device_kind}, {m.devices} local {m.platform} device(s))",
      f"Unmeasured figures (inter-node link, power) from the built-in profile "
      f"{base_profile.name!r}",
    ),
    notes=notes,
  )


def calibrate(
  path: str | os.PathLike | None = None,
  *,
  name: str | None = None,
  sizes: Sizes | None = None,
  devices: Sequence | None = None,
  base: str | os.PathLike | DeviceProfile | None = None,
) -> DeviceProfile:
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
