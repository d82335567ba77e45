"""Model state through the step: NNX BatchNorm and Dropout (nnx.Rngs), linen batch_stats and a
dropout key. Every sharded run is checked against a single-device step written by hand."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import wapar_jax as wap

# SGD: Adam turns the rounding noise of a gradient that is zero in exact arithmetic (the bias
# before a BatchNorm) into full-size steps.
TX = optax.sgd(0.05, momentum=0.9)
BATCH = {
  "x": jax.random.normal(jax.random.key(1), (32, 16)),
  "y": jax.random.normal(jax.random.key(2), (32, 4)),
}


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 64, rngs=rngs)
    self.bn = nnx.BatchNorm(64, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc2 = nnx.Linear(64, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc2(self.drop(jax.nn.relu(self.bn(self.fc1(x)))))


def nnx_loss(model, batch):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def _nnx_reference(steps: int):
  """Losses and final state of NNX's own single-device training loop."""
  model = NnxNet(nnx.Rngs(0))
  opt = nnx.Optimizer(model, TX, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(nnx_loss)(model, batch)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, BATCH)) for _ in range(steps)]
  return losses, model


def _train(plan, params, model_state, steps: int):
  step = plan.train_step()
  params, model_state = plan.shard(params), plan.shard_model_state(model_state)
  opt_state = plan.init_opt_state(params)
  batch = plan.shard_batch(BATCH)
  losses = []
  for _ in range(steps):
    params, opt_state, loss, model_state = step(params, opt_state, batch, model_state)
    losses.append(float(loss))
  return losses, params, model_state


@pytest.mark.parametrize(
  "abstract, strategy", [(True, "dp"), pytest.param(False, "fsdp", marks=pytest.mark.slow)]
)
def test_nnx_dropout_and_batchnorm_train_as_on_one_device(abstract, strategy):
  model = nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))) if abstract else NnxNet(nnx.Rngs(0))
  plan = wap.plan(
    nnx_loss,
    model,
    BATCH,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy=strategy,
    all_devices=True,
  )
  assert plan.model_state_specs is not None
  _, params, state = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param, ...)
  losses, params, state = _train(plan, params, state, 3)
  ref_losses, ref_model = _nnx_reference(3)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
  # The statistics moved and the dropout key advanced exactly as NNX's own loop did.
  _, ref_params, ref_state = nnx.split(ref_model, nnx.Param, ...)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    if jnp.issubdtype(want.dtype, jax.dtypes.prng_key):
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
  assert len(set(losses)) == 3  # a new mask every step, not one held constant


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(64)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.5, deterministic=not train)(jax.nn.relu(x))
    return nn.Dense(4)(x)


def linen_loss(params, batch, model_state):
  """The linen pattern: batch_stats updated through `mutable`, the dropout key split per step."""
  key, dropout_key = jax.random.split(model_state["key"])
  out, updates = LinenNet().apply(
    {"params": params, "batch_stats": model_state["batch_stats"]},
    batch["x"],
    train=True,
    mutable=["batch_stats"],
    rngs={"dropout": dropout_key},
  )
  loss = jnp.mean((out - batch["y"]) ** 2)
  return loss, {"batch_stats": updates["batch_stats"], "key": key}


def _linen_variables():
  variables = LinenNet().init(jax.random.key(0), BATCH["x"], train=False)
  return variables["params"], {"batch_stats": variables["batch_stats"], "key": jax.random.key(7)}


def _hand_written_linen_steps(steps: int) -> list[float]:
  params, model_state = _linen_variables()
  opt_state = TX.init(params)

  @jax.jit
  def step(params, opt_state, model_state):
    (loss, model_state), grads = jax.value_and_grad(linen_loss, has_aux=True)(
      params, BATCH, model_state
    )
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, model_state

  losses = []
  for _ in range(steps):
    params, opt_state, loss, model_state = step(params, opt_state, model_state)
    losses.append(float(loss))
  return losses


def test_linen_batch_stats_and_dropout_key_train_as_on_one_device():
  params, model_state = _linen_variables()
  plan = wap.plan(
    linen_loss,
    wap.linen_params(LinenNet(), BATCH["x"], train=False),
    BATCH,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy="dp",
    all_devices=True,
    model_state=model_state,
  )
  losses, _, _ = _train(plan, params, model_state, 3)
  np.testing.assert_allclose(losses, _hand_written_linen_steps(3), rtol=1e-4)
  assert len(set(losses)) == 3


def test_plan_file_keeps_the_model_state(tmp_path):
  params, model_state = _linen_variables()
  plan = wap.plan(
    linen_loss, params, BATCH, optimizer=TX, devices=4, profile="cpu", model_state=model_state
  )
  plan.save(tmp_path / "plan.json")
  loaded = wap.Plan.load(tmp_path / "plan.json")
  assert loaded.flat_model_state_specs == plan.flat_model_state_specs
  with pytest.raises(wap.errors.InvalidArgumentError, match="model_state="):
    loaded.train_step(loss_fn=linen_loss, optimizer=TX, params=params, batch=BATCH)
  step = loaded.train_step(
    loss_fn=linen_loss, optimizer=TX, params=params, batch=BATCH, model_state=model_state
  )
  p = loaded.shard(params)
  out = step(
    p,
    loaded.init_opt_state(p, TX),
    loaded.shard_batch(BATCH),
    loaded.shard_model_state(model_state),
  )
  assert len(out) == 4


def test_step_arity_and_state_errors_are_named():
  params, model_state = _linen_variables()
  plan = wap.plan(
    linen_loss, params, BATCH, optimizer=TX, devices=2, profile="cpu", model_state=model_state
  )
  p = plan.shard(params)
  with pytest.raises(wap.errors.InvalidArgumentError, match="shard_model_state"):
    plan.train_step()(p, plan.init_opt_state(p), plan.shard_batch(BATCH))
  stateless = wap.plan(
    lambda p, b: linen_loss(p, b, model_state)[0],
    params,
    BATCH,
    optimizer=TX,
    devices=2,
    profile="cpu",
  )
  with pytest.raises(wap.errors.InvalidArgumentError, match="no model state"):
    stateless.shard_model_state(model_state)
  with pytest.raises(wap.errors.InvalidArgumentError, match="new_model_state"):
    wap.plan(
      lambda p, b, s: linen_loss(p, b, s)[0],
      params,
      BATCH,
      optimizer=TX,
      devices=2,
      model_state=model_state,
    )
  with pytest.raises(wap.errors.InvalidArgumentError, match="without model_state"):
    wap.plan(nnx_loss, NnxNet(nnx.Rngs(0)), BATCH, optimizer=TX, model_state=model_state)


def test_micro_batches_carry_the_state_from_one_to_the_next():
  params, model_state = _linen_variables()
  plan = wap.plan(
    linen_loss,
    params,
    BATCH,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy="dp",
    all_devices=True,
    microbatches=2,
    model_state=model_state,
  )
  assert plan.chosen.microbatches == 2
  losses, _, state = _train(plan, params, model_state, 2)

  # By hand: micro-batch j holds rows j, j + 2, ...; the state passes from one to the next.
  opt_state, want = TX.init(params), []
  grad_of = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))
  for _ in range(2):
    total, grads_sum = 0.0, None
    for j in range(2):
      micro = jax.tree.map(lambda x, j=j: x[j::2], BATCH)
      (loss, model_state), grads = grad_of(params, micro, model_state)
      total += float(loss)
      grads_sum = grads if grads_sum is None else jax.tree.map(jnp.add, grads_sum, grads)
    updates, opt_state = TX.update(jax.tree.map(lambda g: g / 2, grads_sum), opt_state, params)
    params = optax.apply_updates(params, updates)
    want.append(total / 2)
  np.testing.assert_allclose(losses, want, rtol=1e-4)
  np.testing.assert_allclose(
    np.asarray(state["batch_stats"]["BatchNorm_0"]["mean"]),
    np.asarray(model_state["batch_stats"]["BatchNorm_0"]["mean"]),
    rtol=1e-4,
    atol=1e-6,
  )


@pytest.mark.slow
def test_a_checkpoint_keeps_the_model_state_and_the_run_resumes_as_it_was(tmp_path):
  plan = wap.plan(
    nnx_loss,
    nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))),
    BATCH,
    optimizer=TX,
    devices=4,
    profile="cpu",
    strategy="dp",
    all_devices=True,
  )
  _, params, state = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param, ...)
  step, batch = plan.train_step(), plan.shard_batch(BATCH)
  params, state = plan.shard(params), plan.shard_model_state(state)
  opt_state = plan.init_opt_state(params)
  losses = []
  for i in range(4):
    if i == 2:
      with pytest.raises(wap.errors.InvalidArgumentError, match="model_state="):
        plan.save_checkpoint(tmp_path / "run", i, params, opt_state)
      plan.save_checkpoint(tmp_path / "run", i, params, opt_state, state)
    params, opt_state, loss, state = step(params, opt_state, batch, state)
    losses.append(float(loss))
  # A new process would do this: restore, then take the last two steps again.
  start, params, opt_state, state = plan.restore_checkpoint(tmp_path / "run")
  resumed = []
  for _ in range(start, 4):
    params, opt_state, loss, state = step(params, opt_state, batch, state)
    resumed.append(float(loss))
  assert start == 2
  np.testing.assert_allclose(resumed, losses[2:], rtol=1e-6)
