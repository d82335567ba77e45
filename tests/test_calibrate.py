import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
import pytest

import wapar_jax as wap
from wapar_jax._src import calibrate as calibrate_lib
from wapar_jax._src import profiles
from wapar_jax._src.cost import roofline
from wapar_jax._src.cost.collectives import collective_time
from wapar_jax._src.cost.fusion import FusedTraffic
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.profiles import DeviceProfile, LinkTier
from wapar_jax._src.trace import trace_train_step
from wapar_jax.errors import InvalidProfileError


def _mlp():
  params = {
    "w1": jax.ShapeDtypeStruct((64, 128), jnp.float32),
    "w2": jax.ShapeDtypeStruct((128, 10), jnp.float32),
  }
  batch = {"x": jax.ShapeDtypeStruct((32, 64), jnp.float32)}

  def loss_fn(p, b):
    return jnp.mean(jnp.tanh(b["x"] @ p["w1"]) @ p["w2"])

  return loss_fn, params, batch


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
  path = tmp_path_factory.mktemp("calibrate") / "me.json"
  return path, wap.calibrate(path, sizes=calibrate_lib.TINY_SIZES)


def test_tiny_calibration_is_a_valid_profile_that_says_it_was_measured(calibrated):
  path, profile = calibrated
  assert profile.kind == jax.devices()[0].platform
  assert profile.devices_per_node == len(jax.local_devices())
  assert profile.kernel_overhead >= 0
  assert profile.step_overhead >= 0
  assert "step_overhead:" in profile.notes
  assert 0.05 <= profile.conv_efficiency <= 4 and "conv_efficiency:" in profile.notes
  assert "Measured with wapar calibrate" in profile.sources[0]
  assert "Measured by wapar calibrate on" in profile.notes
  for size in calibrate_lib.TINY_SIZES.matmul:  # the notes list every size measured
    assert f"{size}:" in profile.notes
  assert "alpha-beta fit" in profile.notes  # 8 virtual devices: collectives were measured
  loaded = profiles.load_profile(path)
  assert loaded == profile
  assert DeviceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_calibrated_file_and_profile_both_plan(calibrated):
  path, profile = calibrated
  loss_fn, params, batch = _mlp()
  for given in (path, str(path), profile):
    plan = wap.plan(
      loss_fn, params, batch, optimizer=optax.adamw(1e-3), devices=4, profile=given, cache=False
    )
    assert plan.profile == profile.name
    assert plan.predicted.step_time > 0


def test_single_device_keeps_the_base_link_and_says_so():
  m = calibrate_lib.measure(calibrate_lib.TINY_SIZES, devices=jax.local_devices()[:1])
  assert m.devices == 1 and m.collectives == () and m.link is None
  profile = calibrate_lib.to_profile(m, name="solo", base="cpu")
  assert profile.name == "solo"
  assert profile.intra_node == profiles.load_profile("cpu").intra_node
  assert "no collective was measured" in profile.notes


def test_link_fit_recovers_alpha_beta():
  n, link = 4, LinkTier(bandwidth=5e9, latency=3e-5)
  samples = [
    (
      kind,
      nbytes,
      collective_time(
        kind, nbytes * (n if kind == "all-gather" else 1), n, link.bandwidth, link.latency
      ),
    )
    for kind in ("all-reduce", "all-gather")
    for nbytes in (1024, 2**20, 2**24)
  ]
  fitted = calibrate_lib.fit_link(samples, n)
  assert fitted.bandwidth == pytest.approx(link.bandwidth, rel=1e-6)
  assert fitted.latency == pytest.approx(link.latency, rel=1e-6)


def test_kernel_overhead_round_trips_and_is_validated():
  data = profiles.load_profile("h100-sxm").to_dict()
  data["kernel_overhead"] = 4e-6
  profile = DeviceProfile.from_dict(json.loads(json.dumps(data)))
  assert profile.kernel_overhead == 4e-6
  assert DeviceProfile.from_dict(profile.to_dict()) == profile
  data["kernel_overhead"] = -1.0
  with pytest.raises(InvalidProfileError, match="kernel_overhead"):
    DeviceProfile.from_dict(data)


def test_profiles_without_kernel_overhead_still_load(tmp_path):
  data = profiles.load_profile("cpu").to_dict()
  del data["kernel_overhead"]  # as every profile file written before the field existed
  path = tmp_path / "old.json"
  path.write_text(json.dumps(data))
  assert profiles.load_profile(path).kernel_overhead == 0.0
  assert all(
    profiles.load_profile(name).kernel_overhead == 0.0 for name in profiles.list_profiles()
  )


def test_kernel_overhead_adds_time_per_unfused_kernel():
  loss_fn, params, batch = _mlp()
  base = profiles.load_profile("cpu")

  def compute_time(overhead):
    profile = dataclasses.replace(base, kernel_overhead=overhead)
    return wap.plan(
      loss_fn, params, batch, optimizer=optax.sgd(1e-3), devices=1, profile=profile, cache=False
    ).predicted.compute_time

  extra = compute_time(1e-3) - compute_time(0.0)
  # Two matmuls forward, their gradients, a reduction or two: a handful of kernels, not the
  # dozens of elementwise ops XLA fuses away.
  assert 3e-3 <= extra <= 20e-3


def test_step_overhead_is_paid_once_per_step_and_validated():
  loss_fn, params, batch = _mlp()
  base = profiles.load_profile("cpu")

  def predicted(overhead, devices):
    profile = dataclasses.replace(base, step_overhead=overhead)
    return wap.plan(
      loss_fn,
      params,
      batch,
      optimizer=optax.sgd(1e-3),
      devices=devices,
      profile=profile,
      strategy="dp",
      cache=False,
    ).predicted

  for devices in (1, 2):
    with_, without = predicted(1e-3, devices), predicted(0.0, devices)
    assert with_.compute_time - without.compute_time == pytest.approx(1e-3)
    assert with_.step_time - without.step_time == pytest.approx(1e-3)
  data = base.to_dict()
  data["step_overhead"] = -1.0
  with pytest.raises(InvalidProfileError, match="step_overhead"):
    DeviceProfile.from_dict(data)
  del data["step_overhead"]  # profile files written before the field existed
  assert DeviceProfile.from_dict(data).step_overhead == 0.0


def test_fit_matmul_recovers_a_saturating_rate():
  peak, half = 2e11, 64.0
  rates = [(n, peak * n / (n + half)) for n in (64, 128, 256, 1024)]
  fitted_peak, fitted_half = calibrate_lib.fit_matmul(rates)
  assert fitted_peak == pytest.approx(peak, rel=1e-6)
  assert fitted_half == pytest.approx(half, rel=1e-6)
  # A rate that falls with size is no saturating curve: the best rate, no size term.
  assert calibrate_lib.fit_matmul([(64, 3e9), (128, 2e9)]) == (3e9, 0.0)


def test_matmul_half_size_slows_small_matmuls_only():
  def loss_fn(params, batch):
    return jnp.mean(jnp.tanh(batch["x"] @ params["w"]))

  params = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  batch = {"x": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  traced, _ = trace_train_step(loss_fn, params, batch, optax.sgd(0.1))
  profile = dataclasses.replace(wap.load_profile("cpu"), matmul_half_size=64.0)
  efficiency = roofline.matmul_efficiency(traced, profile)
  dots = [op.index for op in traced.ops if op.primitive == "dot_general"]
  assert dots and all(efficiency[i] == pytest.approx(0.5) for i in dots)  # 64 x 64 x 64: half
  assert all(efficiency[op.index] == 1.0 for op in traced.ops if op.primitive != "dot_general")
  assert (roofline.matmul_efficiency(traced, wap.load_profile("cpu")) == 1.0).all()


def test_a_skinny_matmul_ranks_by_its_smallest_dimension():
  # 256 x 16 x 256 has the FLOPs of a 101-sided cube but the operand reuse (arithmetic
  # intensity) of a 43-sided one: its inner dimension of 16 bounds what each load is used for.
  def loss_fn(params, batch):
    return jnp.mean(batch["x"] @ params["w"])

  params = {"w": jax.ShapeDtypeStruct((16, 256), jnp.float32)}
  batch = {"x": jax.ShapeDtypeStruct((256, 16), jnp.float32)}
  traced, _ = trace_train_step(loss_fn, params, batch, optax.sgd(0.1))
  forward = next(op for op in traced.ops if op.primitive == "dot_general")
  assert roofline.gemm_size(forward.eqn) == pytest.approx(3 / (1 / 256 + 1 / 256 + 1 / 16))
  profile = dataclasses.replace(wap.load_profile("cpu"), matmul_half_size=64.0)
  assert roofline.matmul_efficiency(traced, profile)[forward.index] == pytest.approx(
    42.67 / (42.67 + 64), rel=1e-3
  )


def test_conv_efficiency_slows_convolutions_only_and_is_validated():
  def loss_fn(params, batch):
    dims = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(
      batch["x"], params["w"], (1, 1), "SAME", dimension_numbers=dims
    )
    return jnp.mean(jnp.tanh(h.reshape(8, -1) @ params["v"]))

  params = {
    "w": jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32),
    "v": jax.ShapeDtypeStruct((16 * 16 * 16, 64), jnp.float32),
  }
  batch = {"x": jax.ShapeDtypeStruct((8, 16, 16, 16), jnp.float32)}
  traced, _ = trace_train_step(loss_fn, params, batch, optax.sgd(0.1))
  costs = step_costs(traced, CostCache(persist=False))
  traffic = FusedTraffic.unfused(costs)
  base = wap.load_profile("cpu")
  slow = dataclasses.replace(base, conv_efficiency=0.25)
  fast_s, slow_s = (roofline.op_roofline(traced, costs, p, traffic)[0] for p in (base, slow))
  for op in traced.ops:
    ratio = 4.0 if op.primitive == "conv_general_dilated" else 1.0
    assert slow_s[op.index] == pytest.approx(ratio * fast_s[op.index])
  assert any(op.primitive == "conv_general_dilated" for op in traced.ops)
  data = base.to_dict()
  data["conv_efficiency"] = 0.0
  with pytest.raises(InvalidProfileError, match="conv_efficiency"):
    DeviceProfile.from_dict(data)
