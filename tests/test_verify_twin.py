"""verify() of bf16 plans through their float32 twin on CPU, and verify(compiler="gpu")."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

import wapar_jax as wap
from wapar_jax import errors, examples
from wapar_jax._src.profiles import load_profile
from wapar_jax._src.verify import Verification, collectives, hlo, schedule
from wapar_jax._src.verify.twin import float32_twin


def _plan(dtype, strategy="dp"):
  ex = examples.get_example("gpt-tiny", dtype=dtype)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=optax.adamw(1e-3),
    devices=8,
    profile="cpu",
    strategy=strategy,
    all_devices=True,
  )
  return ex, plan


@pytest.mark.slow
def test_the_twin_is_the_same_program_in_float32():
  # gpt-tiny's Flax modules compute in their own dtype: a cast of the parameters alone would
  # leave the twin in bf16.
  bf16, f32 = examples.get_example("gpt-tiny", dtype="bfloat16"), examples.get_example("gpt-tiny")
  twin, (params, batch) = float32_twin(bf16.loss_fn, (bf16.params, bf16.batch))
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
  assert "bf16" in str(jax.make_jaxpr(bf16.loss_fn)(bf16.params, bf16.batch))
  assert "bf16" not in str(jax.make_jaxpr(twin)(params, batch))
  p, b = f32.init_params(jax.random.key(0)), f32.make_batch(jax.random.key(1))
  np.testing.assert_allclose(jax.jit(twin)(p, b), jax.jit(f32.loss_fn)(p, b), rtol=1e-5)
  # A micro-batch step calls the loss on a slice of the batch: the twin follows its shapes.
  half = jax.tree.map(lambda x: x[: x.shape[0] // 2], b)
  np.testing.assert_allclose(jax.jit(twin)(p, half), jax.jit(f32.loss_fn)(p, half), rtol=1e-5)


@pytest.fixture(scope="module")
def bf16_verified():
  _, plan = _plan("bfloat16")
  return plan, plan.verify()


@pytest.mark.slow  # the bf16 plan's verify: two compiles
def test_a_bf16_plan_on_cpu_is_checked_through_its_float32_twin(bf16_verified):
  plan, v = bf16_verified
  assert (v.compiler, v.planned_dtype, v.twin_dtype) == ("xla:cpu", "bfloat16", "float32")
  # What the twin is for: XLA:CPU keeps the bf16 step's temporaries in f32, far above the
  # bf16 prediction (measured -35% for this plan).
  assert v.errors["peak_memory"] < -0.25
  # The twin against the plan priced for the twin: as close as float32 plans get (the f32
  # gpt-tiny dp plan's own error is -5.9%).
  assert abs(v.twin_peak_error) < 0.15
  assert v.twin_peak_memory == v.twin_memory.peak > v.compiled.peak_memory
  assert v.twin_memory.argument == pytest.approx(2 * v.memory.argument, rel=0.01)
  table = v.table()
  assert "memory checked through the float32 twin" in table
  assert "peak memory, float32 twin" in table
  assert "see twin" in table
  # XLA:CPU all-reduces the bf16 gradients in f32 too: the table says so.
  assert "XLA:CPU also communicates in f32: 1 of 1 collectives" in table


@pytest.mark.slow  # the bf16 plan's verify: two compiles
def test_twin_fields_survive_the_child_process_round_trip(bf16_verified):
  _, v = bf16_verified
  back = Verification.from_dict(json.loads(json.dumps(v.to_dict())))
  assert back == v
  assert back.to_dict()["twin_peak_error"] == pytest.approx(v.twin_peak_error)


@pytest.mark.slow  # the bf16 plan's verify: two compiles
def test_a_dict_written_before_the_twin_reads_with_defaults(bf16_verified):
  _, v = bf16_verified
  new = {
    "compiler",
    "planned_dtype",
    "twin_dtype",
    "twin_memory",
    "twin_predicted_peak",
    "twin_peak_memory",
    "twin_peak_error",
    "twin_compile_seconds",
    "async_collectives",
    "overlapped_collectives",
  }
  old = {k: x for k, x in v.to_dict().items() if k not in new}
  back = Verification.from_dict(old)
  assert back == dataclasses.replace(
    v,
    planned_dtype="",
    twin_dtype="",
    twin_memory=None,
    twin_predicted_peak=0.0,
    twin_compile_seconds=0.0,
  )
  assert back.twin_peak_error is None and "see twin" not in back.table()


def test_a_float32_plan_has_no_twin():
  _, plan = _plan("float32")
  v = plan.verify()
  assert (v.planned_dtype, v.twin_dtype, v.twin_memory) == ("", "", None)
  assert "twin" not in v.table()


# --- compiler="gpu" ----------------------------------------------------------------------------


def test_gpu_compiler_without_a_gpu_is_a_named_error():
  _, plan = _plan("bfloat16")
  with pytest.raises(errors.NoGpuError, match="compiler='cpu'"):
    plan.verify(compiler="gpu")
  with pytest.raises(errors.InvalidArgumentError, match="devices=None"):
    plan.verify(jax.devices("cpu")[:8], compiler="gpu")
  with pytest.raises(errors.InvalidArgumentError, match="compiler must be one of"):
    plan.verify(compiler="tpu")


# A GPU XLA schedule as it prints one: async halves, kernels in between, a reduce-scatter
# wrapped in async-start / async-done.
_GPU_HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused (q: f32[64,16]) -> f32[64,16] {
  %q = f32[64,16]{1,0} parameter(0)
  ROOT %n = f32[64,16]{1,0} negate(%q)
}

%async_rs (p0: f32[64,16]) -> f32[8,16] {
  %p0 = f32[64,16]{1,0} parameter(0)
  ROOT %rs = f32[8,16]{1,0} reduce-scatter(%p0), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

ENTRY %main (a: f32[64,16], b: bf16[8,16]) -> f32[8,16] {
  %a = f32[64,16]{1,0} parameter(0)
  %b = bf16[8,16]{1,0} parameter(1)
  %ags = (bf16[8,16]{1,0}, bf16[64,16]{1,0}) all-gather-start(%b), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %ars = f32[64,16]{1,0} all-reduce-start(%a), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %f = f32[64,16]{1,0} fusion(%a), kind=kLoop, calls=%fused
  %ard = f32[64,16]{1,0} all-reduce-done(%ars)
  %agd = bf16[64,16]{1,0} all-gather-done(%ags)
  %rss = ((f32[64,16]{1,0}), f32[8,16]{1,0}) async-start(%ard), calls=%async_rs
  %bc = f32[64,16]{1,0} bitcast(%f)
  %rsd = f32[8,16]{1,0} async-done(%rss)
  %cps = (f32[64,16]{1,0}, f32[64,16]{1,0}) collective-permute-start(%f), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %g = f32[64,16]{1,0} custom-call(%bc, %bc), custom_call_target="__cublas$gemm"
  %g2 = f32[64,16]{1,0} fusion(%g), kind=kLoop, calls=%fused
  %cpd = f32[64,16]{1,0} collective-permute-done(%cps)
  ROOT %r = f32[8,16]{1,0} add(%rsd, %rsd)
}
"""


def test_async_pairs_and_the_kernels_between_them():
  found = schedule.async_collectives(hlo.parse_hlo(_GPU_HLO))
  by_kind = {a.kind: a for a in found}
  assert [a.kind for a in found] == [
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
  ]  # in the order their windows close
  assert by_kind["all-gather"].overlapped == 1  # the fusion; the all-reduce's halves are not
  assert by_kind["all-reduce"].overlapped == 1
  assert by_kind["reduce-scatter"].overlapped == 0  # a bitcast launches no kernel
  assert by_kind["collective-permute"].overlapped == 2  # a cuBLAS call and a fusion
  assert all(a.computation == "main" for a in found)


def test_a_wrapped_async_collective_is_read_like_the_others():
  found = collectives.collectives(_GPU_HLO, {"data": 8}, load_profile("h100-sxm"))
  assert sorted(c.kind for c in found) == [
    "all-gather",
    "all-reduce",
    "collective-permute",
    "reduce-scatter",
  ]


def test_the_gpu_child_compiles_only(monkeypatch):
  from wapar_jax._src.verify import run

  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  env = run._child_env(16, "gpu")
  assert "JAX_PLATFORMS" not in env and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert "--xla_gpu_autotune_level=0" in env["XLA_FLAGS"]
  assert "device_count" not in env["XLA_FLAGS"]
  cpu = run._child_env(16, "cpu")
  assert cpu["JAX_PLATFORMS"] == "cpu"
  assert cpu["XLA_FLAGS"] == "--xla_force_host_platform_device_count=16"


@pytest.mark.slow  # the bf16 plan's verify: two compiles
def test_a_twin_that_cannot_be_built_leaves_the_bf16_compile_and_a_note(bf16_verified, monkeypatch):
  from wapar_jax._src.verify import run

  def fails(loss_fn, args):
    raise NotImplementedError("no twin rule for this_primitive")

  monkeypatch.setattr(run, "float32_twin", fails)
  plan, _ = bf16_verified
  v = plan.verify()
  assert (v.planned_dtype, v.twin_dtype, v.twin_memory) == ("bfloat16", "", None)
  assert any("no float32 twin: NotImplementedError: no twin rule" in n for n in v.notes)
  assert "see twin" not in v.table()
