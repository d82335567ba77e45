"""Device profiles: what the cost model knows about one kind of device, as frozen data.

Each built-in profile is a JSON file next to this module (file name = profile name + ".json"),
so a person can read, diff and copy the figures without reading code. Every file lists the
datasheets and measurements its numbers come from in "sources"; "notes" says which figures are
estimates. `save_profile` writes a profile in the same format to start a custom one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import os
import types
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from wapar_jax._src.files import write_text_atomic
from wapar_jax.errors import InvalidArgumentError, InvalidProfileError, UnknownProfileError

KINDS = ("gpu", "tpu", "cpu")
REQUIRED_DTYPES = ("float32", "bfloat16")
# An assumption until a lent GPU measures it (`benchmarks/gpu_check.sh`): NCCL's kernels take
# a few of the GPU's SMs and part of its memory bandwidth from the compute they run beside.
DEFAULT_OVERLAP_EFFICIENCY = 0.8


@dataclasses.dataclass(frozen=True)
class LinkTier:
  """One level of the interconnect, as an alpha-beta model of a ring collective.

  Attributes:
    bandwidth: bytes/s per device, one direction: the ring "bus bandwidth" that nccl-tests
      reports as busbw, so that time = traffic per device / bandwidth.
    latency: seconds per ring step (the alpha term).
  """

  bandwidth: float
  latency: float


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
  """Figures for one kind of device. Build with `from_dict` or `load_profile`; both validate.

  Attributes:
    name: short name, e.g. "h100-sxm".
    description: one paragraph: which part, which machine, which choices the figures embody.
    kind: "gpu", "tpu" or "cpu".
    peak_flops: dense FLOP/s per dtype name; has "float32" and "bfloat16" at least.
    memory_bandwidth: HBM (or DRAM) bytes/s.
    memory_bytes: memory capacity per device, bytes.
    devices_per_node: devices that share the fast `intra_node` link (for TPUs: one ICI domain).
    intra_node: NVLink / PCIe / ICI inside a node.
    inter_node: InfiniBand / Ethernet / DCN between nodes.
    power_idle_watts: power of a device that waits (on a collective, say).
    power_busy_watts: board power under load (TDP-like).
    compute_efficiency: fraction of peak FLOP/s large matmuls reach, in (0, 1].
    memory_efficiency: fraction of memory_bandwidth streaming kernels reach, in (0, 1].
    kernel_overhead: seconds every kernel XLA launches pays on top of its roofline time
      (launch, dispatch); `wapar calibrate` measures it. 0 in the datasheet profiles, whose
      figures are for large kernels.
    step_overhead: seconds every train step pays once, whatever its kernels (the host's
      dispatch of the program, its launch on the device); `wapar calibrate` measures it. 0 in
      the datasheet profiles.
    matmul_half_size: the matmul size at which half of the peak rate is reached: a dot whose
      GEMM dims m, n, k have harmonic mean g runs at peak * g / (g + matmul_half_size).
      `wapar calibrate` fits it; 0 (the datasheet profiles) means every matmul reaches
      `compute_efficiency` of peak.
    conv_efficiency: the fraction of the matmul rate (at the same GEMM size) a convolution
      reaches: below 1 where convolutions are lowered less well than matmuls (XLA:CPU's), above
      1 where a library computes them in fewer FLOPs than XLA counts (Winograd). `wapar
      calibrate` measures it; 1 in the datasheet profiles.
    overlap_efficiency: the fraction of a collective's window of independent compute that
      hides it (`cost.overlap`): the compute slows while a collective shares its memory
      bandwidth and cores. 0 runs every collective on the critical path, as XLA:CPU does.
    sources: where the figures come from (URLs, datasheet names); never empty.
    notes: which figures are estimates, and why.
  """

  name: str
  description: str
  kind: str
  peak_flops: Mapping[str, float]
  memory_bandwidth: float
  memory_bytes: float
  devices_per_node: int
  intra_node: LinkTier
  inter_node: LinkTier
  power_idle_watts: float
  power_busy_watts: float
  compute_efficiency: float
  memory_efficiency: float
  sources: tuple[str, ...]
  notes: str = ""
  kernel_overhead: float = 0.0
  step_overhead: float = 0.0
  matmul_half_size: float = 0.0
  conv_efficiency: float = 1.0
  overlap_efficiency: float = DEFAULT_OVERLAP_EFFICIENCY

  def __post_init__(self):
    _raise_if_any(_value_problems(self.__dict__), self.name)
    # Read-only copies, so a frozen profile cannot be changed through a shared dict or list.
    object.__setattr__(
      self, "peak_flops", types.MappingProxyType({k: float(v) for k, v in self.peak_flops.items()})
    )
    object.__setattr__(self, "sources", tuple(self.sources))

  def __hash__(self):  # a mappingproxy is not hashable; the JSON form is.
    return hash(json.dumps(self.to_dict(), sort_keys=True))

  def step_energy(self, devices: int, step_time: float, compute_time: float) -> float:
    """Joules of one step on `devices` devices: each idles through the step and works through
    its compute."""
    busy = self.power_busy_watts - self.power_idle_watts
    return devices * (self.power_idle_watts * step_time + busy * compute_time)

  def flops_per_second(self, dtype) -> float:
    """Peak dense FLOP/s for `dtype` (a numpy / jax dtype or its name), before efficiency.

    float16 falls back to bfloat16's figure (same tensor-core rate on every part that has one);
    any other dtype not listed, integers included, falls back to float32's.
    """
    name = _dtype_name(dtype)
    if name in self.peak_flops:
      return self.peak_flops[name]
    if name == "float16":
      return self.peak_flops["bfloat16"]
    return self.peak_flops["float32"]

  def link(self, crosses_nodes: bool) -> LinkTier:
    """The link a collective runs over: `inter_node` once its group spans several nodes."""
    return self.inter_node if crosses_nodes else self.intra_node

  def to_dict(self) -> dict:
    """JSON-ready form; `from_dict` reads it back to an equal profile."""
    data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    data["peak_flops"] = dict(self.peak_flops)
    data["intra_node"] = dataclasses.asdict(self.intra_node)
    data["inter_node"] = dataclasses.asdict(self.inter_node)
    data["sources"] = list(self.sources)
    return data

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> DeviceProfile:
    """Validates `data` and builds a profile; raises InvalidProfileError listing every problem."""
    if not isinstance(data, Mapping):
      raise InvalidProfileError(
        f"A device profile must be a JSON object (a dict). Got {type(data).__name__}."
      )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    problems = [f"{n}: missing; it is required." for n in required if n not in data]
    problems += [
      f"{k}: unknown field; known fields are {', '.join(fields)}. Got {k!r}."
      for k in data
      if k not in fields
    ]
    values = {k: v for k, v in data.items() if k in fields}
    for tier in ("intra_node", "inter_node"):
      if tier in values:
        link, link_problems = _parse_link(tier, values[tier])
        problems += link_problems
        values[tier] = link
    problems += _value_problems(values)
    _raise_if_any(problems, data.get("name"))
    return cls(**values)


def _dtype_name(dtype) -> str:
  """'bfloat16' for jnp.bfloat16, np.dtype('bfloat16'), 'bfloat16' alike; '' if not a dtype."""
  try:
    if isinstance(dtype, str):
      dtype = getattr(ml_dtypes, dtype, dtype)  # numpy alone does not know the name "bfloat16"
    return np.dtype(dtype).name
  except (TypeError, ValueError):
    return ""


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_link(tier: str, value) -> tuple[LinkTier | None, list[str]]:
  if isinstance(value, LinkTier):
    return value, []
  if not isinstance(value, Mapping):
    return None, [
      f"{tier}: must be an object with 'bandwidth' (bytes/s) and 'latency' (s). Got {value!r}."
    ]
  problems = [
    f"{tier}.{k}: missing; it is required." for k in ("bandwidth", "latency") if k not in value
  ]
  problems += [
    f"{tier}.{k}: unknown field; known fields are bandwidth, latency. Got {k!r}."
    for k in value
    if k not in ("bandwidth", "latency")
  ]
  if problems:
    return None, problems
  return LinkTier(value["bandwidth"], value["latency"]), []


def _value_problems(values: Mapping[str, Any]) -> list[str]:
  """One line per bad value among the fields present in `values` (missing ones are not here)."""
  problems = []

  def check(name, ok, what):
    if name in values and not ok(values[name]):
      problems.append(f"{name}: must be {what}. Got {values[name]!r}.")

  positive = lambda x: _is_number(x) and x > 0
  fraction = lambda x: _is_number(x) and 0 < x <= 1
  check("name", lambda x: isinstance(x, str) and x.strip() != "", "a non-empty string")
  check("description", lambda x: isinstance(x, str), "a string")
  check("notes", lambda x: isinstance(x, str), "a string")
  check("kind", lambda x: x in KINDS, f"one of {', '.join(map(repr, KINDS))}")
  for name in ("memory_bandwidth", "memory_bytes", "power_idle_watts", "power_busy_watts"):
    check(name, positive, "a positive number")
  check(
    "devices_per_node",
    lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0,
    "a positive integer",
  )
  for name in ("compute_efficiency", "memory_efficiency"):
    check(name, fraction, "a number in (0, 1]")
  check("kernel_overhead", lambda x: _is_number(x) and x >= 0, "a number of seconds >= 0")
  check("step_overhead", lambda x: _is_number(x) and x >= 0, "a number of seconds >= 0")
  check("matmul_half_size", lambda x: _is_number(x) and x >= 0, "a number >= 0")
  check("conv_efficiency", lambda x: _is_number(x) and 0 < x <= 4, "a number in (0, 4]")
  check("overlap_efficiency", lambda x: _is_number(x) and 0 <= x <= 1, "a number in [0, 1]")
  check(
    "sources",
    lambda x: (
      isinstance(x, (list, tuple))
      and len(x) > 0
      and all(isinstance(s, str) and s.strip() for s in x)
    ),
    "a non-empty list of non-empty strings",
  )
  powers = ("power_idle_watts", "power_busy_watts")
  if all(positive(values.get(k)) for k in powers) and (
    values["power_busy_watts"] < values["power_idle_watts"]
  ):
    problems.append(
      f"power_busy_watts: must be at least power_idle_watts "
      f"({values['power_idle_watts']!r}). Got {values['power_busy_watts']!r}."
    )

  flops = values.get("peak_flops")
  if "peak_flops" in values and not isinstance(flops, Mapping):
    problems.append(f"peak_flops: must be an object of dtype name -> FLOP/s. Got {flops!r}.")
  elif isinstance(flops, Mapping):
    for dtype in REQUIRED_DTYPES:
      if dtype not in flops:
        problems.append(
          f"peak_flops.{dtype}: missing; {' and '.join(REQUIRED_DTYPES)} are required."
        )
    for dtype, rate in flops.items():
      if not isinstance(dtype, str) or _dtype_name(dtype) != dtype:
        problems.append(f"peak_flops: keys must be dtype names such as 'float32'. Got {dtype!r}.")
      elif not positive(rate):
        problems.append(f"peak_flops.{dtype}: must be a positive number. Got {rate!r}.")

  for tier in ("intra_node", "inter_node"):
    link = values.get(tier)
    if tier in values and not isinstance(link, LinkTier):
      if link is not None:  # None: `_parse_link` has said what is wrong already.
        problems.append(f"{tier}: must be a LinkTier. Got {link!r}.")
      continue
    if isinstance(link, LinkTier):
      for attr in ("bandwidth", "latency"):
        if not positive(getattr(link, attr)):
          problems.append(f"{tier}.{attr}: must be a positive number. Got {getattr(link, attr)!r}.")
  return problems


def _raise_if_any(problems: list[str], name) -> None:
  if problems:
    label = f" {name!r}" if isinstance(name, str) else ""
    raise InvalidProfileError(
      f"Device profile{label} is invalid ({len(problems)} problem"
      f"{'s' if len(problems) > 1 else ''}); fix these fields:\n  " + "\n  ".join(problems)
    )


@functools.cache
def list_profiles() -> tuple[str, ...]:
  """Names of the built-in profiles, sorted."""
  return tuple(
    sorted(
      p.name[: -len(".json")]
      for p in importlib.resources.files(__name__).iterdir()
      if p.name.endswith(".json")
    )
  )


@functools.cache
def _builtin(name: str) -> DeviceProfile:
  text = importlib.resources.files(__name__).joinpath(f"{name}.json").read_text()
  return _from_json(text, f"built-in profile {name!r}")


def _from_json(text: str, origin: str) -> DeviceProfile:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise InvalidProfileError(
      f"{origin} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. Fix the "
      f"file or write it with save_profile. Got {text[:60]!r}."
    ) from e
  try:
    return DeviceProfile.from_dict(data)
  except InvalidProfileError as e:
    raise InvalidProfileError(f"{origin}: {e}") from e


def load_profile(profile: str | os.PathLike | DeviceProfile) -> DeviceProfile:
  """A profile from a built-in name or a .json file; a DeviceProfile is returned as it is.

  Args:
    profile: a DeviceProfile, a name from `list_profiles()`, or a path to a JSON file in the
      format `save_profile` writes.

  Returns:
    The validated DeviceProfile.

  Examples:
    >>> load_profile("h100-sxm").devices_per_node
    8
  """
  if isinstance(profile, DeviceProfile):
    return profile
  if not isinstance(profile, (str, os.PathLike)):
    raise InvalidArgumentError(
      "profile must be a DeviceProfile, a built-in profile name or a path to a .json file. "
      f"Got {type(profile).__name__}."
    )
  if isinstance(profile, str) and profile in list_profiles():
    return _builtin(profile)
  path = os.fspath(profile)
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    raise UnknownProfileError(
      f"Unknown device profile: not a built-in name and not a readable file. Built-in "
      f"profiles: {', '.join(list_profiles())}. A path to a .json file (as save_profile "
      f"writes) is also accepted. Got {path!r}."
    ) from None
  return _from_json(text, f"profile file {path!r}")


def save_profile(profile: str | os.PathLike | DeviceProfile, path: str | os.PathLike) -> None:
  """Writes `profile` (anything `load_profile` accepts) as JSON, atomically.

  A reader never sees half a file: the JSON goes to a temporary file in the same directory,
  which then replaces `path`.
  """
  write_text_atomic(path, json.dumps(load_profile(profile).to_dict(), indent=2) + "\n")
