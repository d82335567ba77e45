"""Roofline time of each equation on one device: FLOPs at the achievable peak (matmuls at the
efficiency their size reaches), bytes at the achievable bandwidth, and a launch per kernel."""

from __future__ import annotations

import math

import numpy as np

from wapar_jax._src.cost.fusion import FusedTraffic
from wapar_jax._src.cost.xla import StepCosts
from wapar_jax._src.profiles import DeviceProfile


def gemm_size(eqn) -> float:
  """Harmonic mean of the (m, n, k) of a dot or convolution seen as one GEMM; 0 otherwise.

  A GEMM's arithmetic intensity is m n k / (m k + k n + m n), a third of this mean, so a
  skinny GEMM (attention's head dimension, a stem convolution's three channels) ranks as small
  as its reuse is; for a square GEMM it is the side, as calibration measures."""
  name = eqn.primitive.name
  if name == "dot_general":
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    k = math.prod(lhs[d] for d in lc)
    m = math.prod(lhs[d] for d in range(len(lhs)) if d not in lc and d not in lb)
    n = math.prod(rhs[d] for d in range(len(rhs)) if d not in rc and d not in rb)
  elif name == "conv_general_dilated":
    dn = eqn.params["dimension_numbers"]
    out, rhs = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
    n = out[dn.out_spec[1]]
    k = math.prod(rhs) // max(rhs[dn.rhs_spec[0]], 1)
    m = math.prod(out) // max(n, 1)
  else:
    return 0.0
  if not (m and n and k):
    return 0.0
  return 3.0 / (1.0 / m + 1.0 / n + 1.0 / k)


def matmul_efficiency(traced, profile: DeviceProfile) -> np.ndarray:
  """Per op: the fraction of peak its matmul reaches at its size (1 for other ops, and for
  profiles without `matmul_half_size`)."""
  half = profile.matmul_half_size
  if not half:
    return np.ones(len(traced.ops))
  size = np.array([gemm_size(op.eqn) for op in traced.ops])
  return np.where(size > 0, size / (size + half), 1.0)


def op_dtype(op):
  """The dtype an op computes in: that of its first typed operand or result."""
  for v in list(op.eqn.invars) + list(op.eqn.outvars):
    dtype = getattr(v.aval, "dtype", None)
    if dtype is not None:
      return dtype
  return "float32"


def op_roofline(
  traced, costs: StepCosts, profile: DeviceProfile, traffic: FusedTraffic
) -> tuple[np.ndarray, np.ndarray]:
  """Per op on one device: (FLOPs / achievable peak, bytes its kernel moves for it / achievable
  bandwidth) seconds."""
  by_dtype: dict = {}  # a few dtypes among many ops: look each one's peak up once
  peak = np.array(
    [
      by_dtype[d] if d in by_dtype else by_dtype.setdefault(d, profile.flops_per_second(d))
      for d in map(op_dtype, traced.ops)
    ]
  )
  peak = peak * matmul_efficiency(traced, profile)
  if profile.conv_efficiency != 1.0:
    conv = np.array([op.primitive == "conv_general_dilated" for op in traced.ops])
    peak = np.where(conv, peak * profile.conv_efficiency, peak)
  return (
    costs.flops / (peak * profile.compute_efficiency),
    traffic.nbytes / (profile.memory_bandwidth * profile.memory_efficiency),
  )


def op_seconds(
  traced, costs: StepCosts, profile: DeviceProfile, traffic: FusedTraffic
) -> np.ndarray:
  """Roofline time of each op on one device: the larger of its compute and memory time, plus
  the profile's per-kernel overhead for every kernel it launches (`cost.fusion`)."""
  seconds = np.maximum(*op_roofline(traced, costs, profile, traffic))
  return (
    seconds + profile.kernel_overhead * traffic.kernels + loop_copy_seconds(traced, costs, profile)
  )


def loop_copy_seconds(traced, costs: StepCosts, profile: DeviceProfile) -> np.ndarray:
  """Per op, the copies of its result into a loop's stacked outputs, or of a stacked slice it
  reads out of the stack: a kernel each, every iteration (`TracedStep.loop_copies`). Compiled
  gpt2-small with nn.scan spends 56% more time on memory than the same model unrolled, most of
  it in such copies."""
  extra = np.zeros(len(traced.ops))
  for op, nbytes in traced.loop_copies:
    extra[op] += nbytes / (profile.memory_bandwidth * profile.memory_efficiency)
    extra[op] += profile.kernel_overhead
  return extra * costs.multiplicity
