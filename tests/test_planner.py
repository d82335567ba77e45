import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples

TX = optax.adamw(1e-3)


def _is_spec(x):
  return isinstance(x, P)


@pytest.fixture(scope="module")
def gpt_tiny():
  return examples.get_example("gpt-tiny")


@pytest.fixture(scope="module")
def tiny_plan(gpt_tiny):
  return wap.plan(
    gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, optimizer=TX, devices=8, profile="cpu"
  )


def test_plan_is_frozen_data_shaped_like_the_inputs(gpt_tiny, tiny_plan):
  plan = tiny_plan
  assert plan.num_devices <= 8
  assert jax.tree.structure(plan.param_specs, is_leaf=_is_spec) == jax.tree.structure(
    jax.tree.map(lambda _: P(), gpt_tiny.params)
  )
  assert jax.tree.structure(plan.batch_specs, is_leaf=_is_spec) == jax.tree.structure(
    jax.tree.map(lambda _: P(), gpt_tiny.batch)
  )
  with pytest.raises(dataclasses.FrozenInstanceError):
    plan.strategy = "dp"
  figures = plan.predicted
  assert figures.step_time == pytest.approx(figures.compute_time + figures.comm_time)
  assert figures.peak_memory <= figures.memory_budget
  assert plan.candidates[0] == plan.chosen
  # The sweep keeps the best candidate of every device count it could use.
  assert {c.devices for c in plan.candidates} >= {1, 2, 4, 8}


@pytest.mark.slow
def test_json_round_trip_and_training_from_a_loaded_plan(gpt_tiny, tiny_plan, tmp_path):
  path = tmp_path / "plan.json"
  tiny_plan.save(path)
  assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left behind
  loaded = wap.Plan.load(path)
  assert loaded == tiny_plan
  with pytest.raises(wap.errors.InvalidArgumentError, match="loss_fn"):
    loaded.train_step()
  step = loaded.train_step(
    loss_fn=gpt_tiny.loss_fn, optimizer=TX, params=gpt_tiny.params, batch=gpt_tiny.batch
  )
  params = loaded.shard(gpt_tiny.init_params(jax.random.key(0)))
  opt_state = loaded.init_opt_state(params, optimizer=TX)
  _, _, loss = step(params, opt_state, loaded.shard_batch(gpt_tiny.make_batch(jax.random.key(1))))
  assert np.isfinite(float(loss))


def test_corrupt_or_foreign_plan_files_are_named_errors(tmp_path, tiny_plan):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(wap.errors.CorruptPlanFileError, match="JSON"):
    wap.Plan.load(bad)
  bad.write_text(json.dumps({"hello": 1}))
  with pytest.raises(wap.errors.CorruptPlanFileError, match="not a wapar_jax plan"):
    wap.Plan.load(bad)
  other = examples.get_example("mlp")
  with pytest.raises(wap.errors.PlanMismatchError, match="no spec"):
    tiny_plan.shard(other.init_params(jax.random.key(0)))


def test_small_per_device_batch_on_pcie_prefers_fewer_devices():
  # The WAP paper's finding: AlexNet with a small batch trains faster on one Titan Xp than on
  # four over PCIe, because the gradient all-reduce outweighs the compute it saves.
  ex = examples.get_example("alexnet", batch_size=4)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=optax.sgd(0.01),
    devices=4,
    profile="titanxp-pcie",
    strategy="dp",
  )
  assert plan.num_devices == 1
  sweep = {c.devices: c.step_time for c in plan.candidates}
  assert sweep[1] < sweep[2] < sweep[4]


def test_tensor_parallel_finds_megatron_split_from_structure():
  ex = examples.get_example("gpt2-small", seq_len=128)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=4,
    profile="h100-sxm",
    strategy="tp",
    all_devices=True,
  )
  specs = {"/".join(map(str, k)): s for k, s in plan.flat_param_specs.items()}
  # The MLP hidden dim and the attention heads are split, as Megatron-LM does by hand.
  assert specs["block_0/mlp_in/kernel"] == P(None, "model")
  assert specs["block_0/mlp_out/kernel"] == P("model", None)
  assert specs["block_0/query/kernel"] == P(None, "model")
  assert specs["block_0/attn_out/kernel"] == P("model", None)


def test_specs_do_not_depend_on_parameter_names():
  ex = examples.get_example("plain")
  renamed = {"zz": "w1", "aa": "b1", "q": "w2", "x": "b2"}

  def renamed_loss(params, batch):
    return ex.loss_fn({old: params[new] for new, old in renamed.items()}, batch)

  params = {new: ex.params[old] for new, old in renamed.items()}
  a = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy="tp",
    all_devices=True,
  )
  b = wap.plan(
    renamed_loss,
    params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy="tp",
    all_devices=True,
  )
  for new, old in renamed.items():
    assert b.param_specs[new] == a.param_specs[old]


def test_nnx_model_is_accepted_directly():
  ex = examples.get_example("gpt-tiny-nnx")

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(32, 128, rngs=rngs)
      self.fc2 = nnx.Linear(128, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.relu(self.fc1(x)))

  def loss(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

  model = nnx.eval_shape(lambda: Mlp(nnx.Rngs(0)))
  batch = {
    "x": jax.ShapeDtypeStruct((16, 32), jnp.float32),
    "y": jax.ShapeDtypeStruct((16, 4), jnp.float32),
  }
  plan = wap.plan(
    loss, model, batch, optimizer=TX, devices=8, profile="cpu", strategy="dp", all_devices=True
  )
  concrete = Mlp(nnx.Rngs(0))
  state = plan.shard(nnx.state(concrete, nnx.Param))
  opt_state = plan.init_opt_state(state)
  data = {"x": jnp.ones((16, 32)), "y": jnp.zeros((16, 4))}
  _, _, loss_value = plan.train_step()(state, opt_state, plan.shard_batch(data))
  assert float(loss_value) == pytest.approx(float(loss(concrete, data)), rel=1e-5)
  assert ex.params is not None


def test_linen_params_are_abstract():
  from flax import linen as nn

  params = wap.linen_params(nn.Dense(4096), jnp.zeros((2, 4096)))
  assert isinstance(params["kernel"], jax.ShapeDtypeStruct)
  assert params["kernel"].shape == (4096, 4096)


def test_plan_that_cannot_fit_names_the_closest_option(gpt_tiny):
  tiny = dataclasses.replace(wap.load_profile("cpu"), name="tiny-memory", memory_bytes=1e5)
  with pytest.raises(wap.errors.NoFeasiblePlanError, match="Closest") as info:
    wap.plan(
      gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, optimizer=TX, devices=8, profile=tiny
    )
  assert info.value.closest is not None
  assert info.value.closest.peak_memory > 1e5 * 0.9


def test_indivisible_batch_is_a_named_error():
  ex = examples.get_example("mlp", batch_size=7)
  with pytest.raises(wap.errors.IndivisibleBatchError, match="batch size 7"):
    wap.plan(
      ex.loss_fn, ex.params, ex.batch, optimizer=TX, devices=8, strategy="dp", all_devices=True
    )


def test_devices_may_be_a_list_and_bad_arguments_are_named(gpt_tiny):
  plan = wap.plan(
    gpt_tiny.loss_fn,
    gpt_tiny.params,
    gpt_tiny.batch,
    optimizer=TX,
    devices=jax.devices()[:4],
    profile="cpu",
  )
  assert plan.devices_offered == 4
  with pytest.raises(wap.errors.InvalidArgumentError, match="optax"):
    wap.plan(gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, optimizer="adam")
  with pytest.raises(wap.errors.InvalidArgumentError, match="strategy"):
    wap.plan(gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, optimizer=TX, strategy="magic")
  with pytest.raises(wap.errors.UnknownProfileError):
    wap.plan(gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, optimizer=TX, profile="h900")


def test_energy_objective_never_uses_more_energy_than_time_objective(gpt_tiny):
  kwargs = dict(optimizer=TX, devices=8, profile="titanxp-pcie")
  by_time = wap.plan(gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, **kwargs)
  by_energy = wap.plan(
    gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, objective="energy", **kwargs
  )
  assert by_energy.predicted.energy <= by_time.predicted.energy
  assert by_time.predicted.step_time <= by_energy.predicted.step_time


@pytest.mark.slow
def test_sharded_init_matches_unsharded_init():
  ex = examples.get_example("mlp")
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy="fsdp",
    all_devices=True,
  )
  key = jax.random.key(3)
  sharded = plan.init_params(ex.init_params, key)
  expected = ex.init_params(key)
  for leaf, want, spec in zip(
    jax.tree.leaves(sharded),
    jax.tree.leaves(expected),
    jax.tree.leaves(plan.param_specs, is_leaf=_is_spec),
  ):
    assert leaf.sharding.spec == spec
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(want), rtol=1e-6)
  assert any("data" in spec for spec in jax.tree.leaves(plan.param_specs, is_leaf=_is_spec))


def test_memory_rules_choose_whose_peak_must_fit():
  # GPU XLA keeps fewer values than XLA:CPU: with a budget between the two peaks, the plan fits
  # under the profile's (GPU) rules and not under XLA:CPU's, which plan.verify() would compile.
  ex = examples.get_example("gpt-tiny", batch_size=64, seq_len=128)
  forced = dict(
    optimizer=TX, devices=8, strategy="dp", all_devices=True, remat="none", microbatches=1
  )
  gpu = wap.plan(ex.loss_fn, ex.params, ex.batch, profile="h100-sxm", **forced).predicted
  cpu = wap.plan(
    ex.loss_fn, ex.params, ex.batch, profile="h100-sxm", memory_rules="xla:cpu", **forced
  ).predicted
  assert gpu.peak_memory < 0.95 * cpu.peak_memory
  between = (gpu.peak_memory + cpu.peak_memory) / 2
  card = dataclasses.replace(
    wap.load_profile("h100-sxm"), name="between", memory_bytes=between / (1 - 0.15)
  )
  fits = wap.plan(ex.loss_fn, ex.params, ex.batch, profile=card, **forced)
  assert fits.predicted.peak_memory == pytest.approx(gpu.peak_memory)
  with pytest.raises(wap.errors.NoFeasiblePlanError):
    wap.plan(ex.loss_fn, ex.params, ex.batch, profile=card, memory_rules="xla:cpu", **forced)
  with pytest.raises(wap.errors.InvalidArgumentError, match="memory_rules"):
    wap.plan(ex.loss_fn, ex.params, ex.batch, profile=card, memory_rules="gpu", **forced)


def test_a_scan_over_layers_is_also_planned_rematerialised_for_speed():
  # Its residuals are copied into stacks and out again; remat is searched even when the plain
  # step fits, and the copies are priced.
  ex = examples.get_example("gpt-tiny-scan")
  plan = wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=optax.adamw(1e-3), devices=8)
  assert plan.stats["variants_searched"] == 2
  unrolled = examples.get_example("gpt-tiny")
  plan = wap.plan(
    unrolled.loss_fn, unrolled.params, unrolled.batch, optimizer=optax.adamw(1e-3), devices=8
  )
  # Its per-layer remat variant is searched only to price pipelines on (their stages remat).
  assert plan.stats["variants_searched"] == 2
  staged = [c for c in plan.candidates if c.stages > 1]
  assert all(c.remat == "layers" for c in staged)
  plan = wap.plan(
    unrolled.loss_fn,
    unrolled.params,
    unrolled.batch,
    optimizer=optax.adamw(1e-3),
    devices=8,
    strategy="zero1",
  )
  assert plan.stats["variants_searched"] == 1
