"""Sharded train state through orbax-checkpoint: a restart, or another plan, continues the run."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax._src.step import make_train_step

TX = optax.adam(1e-2)


def _loss(params, batch):
  hidden = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] - batch["y"]) ** 2)


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "w1": jax.random.normal(k1, (64, 512)) / 8,
    "b1": jnp.zeros(512),
    "w2": jax.random.normal(k2, (512, 64)) / 23,
  }


def _batch(i):
  kx, ky = jax.random.split(jax.random.key(100 + i))
  return {"x": jax.random.normal(kx, (32, 64)), "y": jax.random.normal(ky, (32, 64))}


@functools.cache
def _plan(strategy, devices):
  plan = wap.plan(
    _loss,
    jax.eval_shape(_params),
    jax.eval_shape(lambda: _batch(0)),
    optimizer=TX,
    devices=devices,
    profile="cpu",
    strategy=strategy,
    all_devices=True,
  )
  assert plan.num_devices == devices
  return plan


def _train(plan, state, steps, **step_args):
  (params, opt_state), step, losses = state, plan.train_step(**step_args), []
  for i in steps:
    params, opt_state, loss = step(params, opt_state, plan.shard_batch(_batch(i)))
    losses.append(float(loss))
  return params, opt_state, losses


@functools.cache
def _single_device_losses():
  step, params, losses = jax.jit(make_train_step(_loss, TX)), _params(), []
  opt_state = TX.init(params)
  for i in range(6):
    params, opt_state, loss = step(params, opt_state, _batch(i))
    losses.append(float(loss))
  return losses


@pytest.mark.slow
def test_a_restart_from_a_checkpoint_continues_the_run(tmp_path):
  plan = _plan("fsdp", 8)
  assert any("data" in s for s in jax.tree.leaves(plan.param_specs, is_leaf=_is_spec))
  params = plan.shard(_params())
  params, opt_state, first = _train(plan, (params, plan.init_opt_state(params)), range(3))
  assert plan.save_checkpoint(tmp_path / "ckpt", 3, params, opt_state)
  _, _, rest = _train(plan, (params, opt_state), range(3, 6))
  np.testing.assert_allclose(first + rest, _single_device_losses(), rtol=1e-5)

  plan.save(tmp_path / "plan.json")
  restarted = wap.Plan.load(tmp_path / "plan.json")  # no code, as in a new process
  like = dict(params=jax.eval_shape(_params), batch=jax.eval_shape(lambda: _batch(0)))
  step, params, opt_state = restarted.restore_checkpoint(
    tmp_path / "ckpt", optimizer=TX, params=like["params"]
  )
  assert step == 3
  assert jax.tree.leaves(params)[0].sharding == jax.tree.leaves(plan.shardings().params)[0]
  _, _, resumed = _train(
    restarted, (params, opt_state), range(3, 6), loss_fn=_loss, optimizer=TX, **like
  )
  np.testing.assert_allclose(resumed, rest, rtol=1e-6)


def test_a_checkpoint_restores_onto_another_plan(tmp_path):
  fsdp, dp_tp = _plan("fsdp", 8), _plan("dp_tp", 4)
  assert dict(dp_tp.mesh_shape) != dict(fsdp.mesh_shape)
  params = fsdp.shard(_params())
  params, opt_state, _ = _train(fsdp, (params, fsdp.init_opt_state(params)), range(3))
  fsdp.save_checkpoint(tmp_path, 3, params, opt_state)
  step, params, opt_state = dp_tp.restore_checkpoint(tmp_path)
  assert step == 3
  assert {d for x in jax.tree.leaves(params) for d in x.sharding.device_set} == set(
    jax.devices()[:4]
  )
  _, _, resumed = _train(dp_tp, (params, opt_state), range(3, 6))
  np.testing.assert_allclose(resumed, _single_device_losses()[3:], rtol=1e-5)


def test_checkpoint_errors_say_what_to_do(tmp_path):
  plan = _plan("fsdp", 8)
  with pytest.raises(wap.errors.CheckpointNotFoundError, match="save one"):
    plan.restore_checkpoint(tmp_path)
  loaded = wap.Plan.from_json(plan.to_json())
  with pytest.raises(wap.errors.InvalidArgumentError, match="optimizer="):
    loaded.restore_checkpoint(tmp_path)


def _is_spec(x) -> bool:
  return isinstance(x, P)


def test_without_orbax_the_error_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # import fails as if uninstalled
  plan = _plan("fsdp", 8)
  with pytest.raises(wap.errors.MissingDependencyError, match=r"wapar_jax\[checkpoint\]"):
    plan.save_checkpoint(tmp_path, 0, {}, {})
