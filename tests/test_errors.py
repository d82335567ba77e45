"""Every error a user can meet is a named error whose message says what to do (8 CPU devices)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses
import json
import math

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.interpreters import mlir

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.search import DEFAULT_MEMORY_HEADROOM

TX = optax.adamw(1e-3)


@pytest.fixture(scope="module")
def mlp():
  return examples.get_example("mlp")


@pytest.fixture(scope="module")
def mlp_plan(mlp):
  return wap.plan(
    mlp.loss_fn,
    mlp.params,
    mlp.batch,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy="dp",
    all_devices=True,
  )


@pytest.mark.slow
def test_model_that_fits_no_plan_names_largest_tensors_and_device_count():
  ex = examples.get_example("gpt-tiny")
  tiny = dataclasses.replace(wap.load_profile("cpu"), name="tiny-memory", memory_bytes=1e5)
  with pytest.raises(wap.errors.NoFeasiblePlanError) as info:
    wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=TX, devices=8, profile=tiny)
  message = str(info.value)
  assert "block_0/mlp_in/kernel [64, 256]" in message  # largest tensors, by path
  # Parameters and AdamW state, fully sharded, over the budget left by the default headroom.
  state = jax.tree.leaves((ex.params, jax.eval_shape(TX.init, ex.params)))
  state_bytes = sum(x.size * x.dtype.itemsize for x in state)
  need = math.ceil(state_bytes / (1e5 * (1 - DEFAULT_MEMORY_HEADROOM)))
  assert need > 8
  assert f"smallest device count that could fit is {need}" in message
  assert f"Offer at least {need} devices" in message  # what to do
  assert info.value.closest.devices <= 8


def test_batch_that_does_not_divide():
  ex = examples.get_example("mlp", batch_size=7)
  with pytest.raises(wap.errors.IndivisibleBatchError) as info:
    wap.plan(
      ex.loss_fn, ex.params, ex.batch, optimizer=TX, devices=8, strategy="dp", all_devices=True
    )
  assert "batch size 7" in str(info.value) and "divisible" in str(info.value)


def test_non_scalar_loss(mlp):
  def per_example_loss(params, batch):
    return mlp.loss_fn(params, batch) * jnp.ones(batch["x"].shape[0])

  with pytest.raises(wap.errors.NonScalarLossError, match=r"jnp.mean.*Got shape \(16,\)|Got shape"):
    wap.plan(per_example_loss, mlp.params, mlp.batch, optimizer=TX, devices=8)


def _custom_primitive():
  """A primitive the planner has no rule for: abstract eval and a lowering, nothing else."""
  prim = jex.core.Primitive("wapar_test_softsign")
  prim.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
  mlir.register_lowering(
    prim, mlir.lower_fun(lambda x: x / (1 + jnp.abs(x)), multiple_results=False)
  )
  return prim


@pytest.mark.slow
def test_unknown_primitive_is_planned_conservatively_with_a_warning(mlp):
  prim = _custom_primitive()

  def loss_fn(params, batch):  # on the batch only: no derivative rule is needed
    return mlp.loss_fn(params, {"x": prim.bind(batch["x"]), "y": batch["y"]})

  with pytest.warns(UserWarning, match="wapar_test_softsign.*conservatively"):
    plan = wap.plan(loss_fn, mlp.params, mlp.batch, optimizer=TX, devices=8, profile="cpu")
  assert plan.details.unknown_primitives == ("wapar_test_softsign",)
  assert "wapar_test_softsign" in plan.explain()
  params = plan.shard(mlp.init_params(jax.random.key(0)))
  _, _, loss = plan.train_step()(
    params, plan.init_opt_state(params), plan.shard_batch(mlp.make_batch(jax.random.key(1)))
  )
  assert np.isfinite(float(loss))


def test_unknown_or_malformed_profile(tmp_path, mlp):
  with pytest.raises(wap.errors.UnknownProfileError, match="Built-in profiles: .*h100-sxm"):
    wap.plan(mlp.loss_fn, mlp.params, mlp.batch, optimizer=TX, profile="h900")
  bad = tmp_path / "gpu.json"
  bad.write_text(json.dumps({"name": "gpu", "memory_bytes": -1}))
  with pytest.raises(wap.errors.InvalidProfileError):
    wap.plan(mlp.loss_fn, mlp.params, mlp.batch, optimizer=TX, profile=str(bad))
  bad.write_text("{oops")
  with pytest.raises((wap.errors.InvalidProfileError, wap.errors.UnknownProfileError)):
    wap.load_profile(str(bad))


def test_corrupt_plan_file(tmp_path, mlp_plan):
  path = tmp_path / "plan.json"
  mlp_plan.save(path)
  text = path.read_text()
  path.write_text(text[: len(text) // 2])  # truncated
  with pytest.raises(wap.errors.CorruptPlanFileError, match="JSON"):
    wap.Plan.load(path)
  data = json.loads(text)
  data["version"] = 99
  path.write_text(json.dumps(data))
  with pytest.raises(wap.errors.CorruptPlanFileError, match="version 99.*plan again"):
    wap.Plan.load(path)
  data["version"] = 2
  del data["mesh_shape"]
  path.write_text(json.dumps(data))
  with pytest.raises(wap.errors.CorruptPlanFileError, match="mesh_shape"):
    wap.Plan.load(path)
  with pytest.raises(wap.errors.CorruptPlanFileError, match="cannot read"):
    wap.Plan.load(tmp_path / "missing.json")


def test_version_1_plan_files_are_still_read(tmp_path, mlp, mlp_plan):
  data = json.loads(mlp_plan.to_json())
  data["version"] = 1
  del data["details"]
  loaded = wap.Plan.from_json(json.dumps(data))
  assert loaded.mesh_shape == mlp_plan.mesh_shape and loaded.details is None
  loaded.check_fits(mlp.params)  # paths only


def test_plan_file_from_another_model_names_each_difference(tmp_path, mlp, mlp_plan):
  path = tmp_path / "plan.json"
  mlp_plan.save(path)
  loaded = wap.Plan.load(path)
  params = dict(jax.tree.map(lambda x: x, mlp.params))
  first, second = sorted(params)[:2]
  changed = {k: dict(v) for k, v in params.items()}
  kernel = changed[first]["kernel"]
  changed[first]["kernel"] = jax.ShapeDtypeStruct(
    (kernel.shape[0] + 1,) + kernel.shape[1:], kernel.dtype
  )
  changed[second]["bias"] = jax.ShapeDtypeStruct(changed[second]["bias"].shape, jnp.bfloat16)
  changed["extra"] = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  del changed[first]["bias"]
  with pytest.raises(wap.errors.PlanMismatchError) as info:
    loaded.train_step(loss_fn=mlp.loss_fn, optimizer=TX, params=changed, batch=mlp.batch)
  message = str(info.value)
  assert f"missing: {first}/bias" in message
  assert "extra: extra/w [3] float32" in message
  assert f"shape: {first}/kernel planned [{kernel.shape[0]}, " in message
  assert f"dtype: {second}/bias planned float32, got bfloat16" in message
  assert "plan again" in message
  # The batch is checked too, except its size.
  bigger = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((2 * x.shape[0],) + x.shape[1:], x.dtype), mlp.batch
  )
  loaded.check_fits(mlp.params, bigger)
  with pytest.raises(wap.errors.PlanMismatchError, match="batch missing: y"):
    loaded.check_fits(mlp.params, {"x": mlp.batch["x"]})


def test_fewer_real_devices_than_the_plan_needs():
  ex = examples.get_example("mlp", batch_size=16)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=16,
    profile="cpu",
    strategy="dp",
    all_devices=True,
  )
  assert plan.num_devices == 16
  with pytest.raises(wap.errors.NotEnoughDevicesError, match="needs 16 devices but 8.*devices=8"):
    plan.shard(ex.init_params(jax.random.key(0)))
