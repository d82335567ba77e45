"""Batch dims other than dim 0 (`plan(batch_axes=...)`), and batches that narrow the plan.

Every sharded run is checked against a single-device step written by hand."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import wapar_jax as wap

T, B, D = 6, 16, 32
TX = optax.sgd(0.1)
PARAMS = {
  "w": jax.random.normal(jax.random.key(0), (D, D)) * 0.1,
  "v": jax.random.normal(jax.random.key(1), (D, 3)) * 0.1,
}
# Time-major, as an RNN's inputs often are: (seq, batch, features); targets are batch-major.
BATCH = {
  "x": jax.random.normal(jax.random.key(2), (T, B, D)),
  "y": jax.random.normal(jax.random.key(3), (B, 3)),
}
AXES = {"x": 1, "y": 0}


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["w"]).mean(0)
  return jnp.mean((h @ params["v"] - batch["y"]) ** 2)


def _by_hand(steps: int) -> list[float]:
  params, losses = PARAMS, []
  step = jax.jit(lambda p: jax.value_and_grad(loss_fn)(p, BATCH))
  for _ in range(steps):
    loss, grads = step(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    losses.append(float(loss))
  return losses


def _train(plan, steps: int) -> list[float]:
  step = plan.train_step()
  params = plan.shard(PARAMS)
  opt_state, batch = plan.init_opt_state(params), plan.shard_batch(BATCH)
  losses = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
  return losses


@pytest.mark.parametrize(
  "strategy, microbatches",
  [("dp", 1), ("fsdp", 2), pytest.param("dp_tp", 1, marks=pytest.mark.slow)],
)
def test_time_major_batch_is_split_on_its_batch_dim(strategy, microbatches):
  plan = wap.plan(
    loss_fn,
    PARAMS,
    BATCH,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy=strategy,
    all_devices=True,
    microbatches=microbatches,
    batch_axes=AXES,
  )
  data = plan.mesh_shape.get("data", 1)
  assert plan.batch_specs["x"] == P(None, "data", None) and plan.batch_specs["y"] == P("data", None)
  assert plan.shard_batch(BATCH)["x"].sharding.shard_shape((T, B, D)) == (T, B // data, D)
  np.testing.assert_allclose(_train(plan, 3), _by_hand(3), rtol=1e-5)


def test_batch_sizes_that_disagree_are_named():
  with pytest.raises(wap.errors.InvalidArgumentError, match=r"batch_axes.*x: 6, y: 16"):
    wap.plan(loss_fn, PARAMS, BATCH, optimizer=TX, devices=8, profile="cpu")


@pytest.mark.parametrize("bad", [3, "1", {"x": 1, "y": 1.5}, {"x": 1}])
def test_bad_batch_axes_are_named(bad):
  with pytest.raises(wap.errors.InvalidArgumentError, match="batch_axes"):
    wap.plan(loss_fn, PARAMS, BATCH, optimizer=TX, devices=8, profile="cpu", batch_axes=bad)


def test_a_batch_of_another_size_names_its_batch_dim(tmp_path):
  plan = wap.plan(
    loss_fn,
    PARAMS,
    BATCH,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy="dp",
    all_devices=True,
    batch_axes=AXES,
  )
  plan.save(tmp_path / "plan.json")
  loaded = wap.Plan.load(tmp_path / "plan.json")
  assert loaded.flat_batch_axes == {("x",): 1, ("y",): 0}
  step = loaded.train_step(loss_fn=loss_fn, optimizer=TX, params=PARAMS, batch=BATCH)
  params = loaded.shard(PARAMS)
  half = jax.tree.map(lambda x, a: jnp.take(x, jnp.arange(B // 2), axis=a), BATCH, AXES)
  with pytest.raises(wap.errors.PlanMismatchError, match=r"16 rows \(dim 1 of batch/x\)"):
    step(params, loaded.init_opt_state(params, TX), half)


def test_a_batch_that_narrows_the_data_axis_is_explained():
  batch = {"x": jnp.ones((7, T, D)), "y": jnp.ones((7, 3))}
  plan = wap.plan(
    lambda p, b: loss_fn(p, {"x": jnp.swapaxes(b["x"], 0, 1), "y": b["y"]}),
    PARAMS,
    batch,
    optimizer=TX,
    devices=8,
    profile="cpu",
  )
  assert plan.mesh_shape.get("data", 1) in (1, 7)
  assert "the batch (7 rows) splits over [1, 7] data-parallel devices only" in plan.explain()
