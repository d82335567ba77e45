"""The emitted step of every plan family gives the single-device numbers (8 virtual devices)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import optax
import pytest

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.step import make_train_step

SLOW = pytest.mark.slow
# The fast tier's numerics are test_properties'; these compile a step per model and strategy.
MODELS = [pytest.param(m, marks=SLOW) for m in ("mlp", "gpt-tiny", "gpt-tiny-nnx", "gpt-tiny-scan")]
# "auto" on the local-CPU profile, where splitting pays off for these small models. dp, zero1,
# tp and dp_tp are the property-based test's (tests/test_properties.py, random sizes).
STRATEGIES = ["auto", "fsdp"]
# The zoo's families that differ most from the GPTs: top-k routed experts with capacity, an
# encoder-decoder. On dp_tp only, which splits the batch and the model dims (heads, MLPs,
# experts) at once. The encoders (BERT, ViT) are the GPT's blocks without the causal mask: the
# suite compiles them; convolutions split on channels are the property test's (its CNN on
# dp_tp), batch statistics across the data axis test_model_state's.
FAMILIES = ["moe-tiny", "t5-tiny"]
STEPS = 3


def _reference(name):
  ex = examples.get_example(name)
  tx = optax.adamw(1e-3)
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  step = jax.jit(make_train_step(ex.loss_fn, tx))
  p, o, losses = params, tx.init(params), []
  for _ in range(STEPS):
    p, o, loss = step(p, o, batch)
    losses.append(float(loss))
  grads = jax.jit(jax.grad(ex.loss_fn))(params, batch)
  return ex, tx, params, batch, np.array(losses), grads


@pytest.fixture(scope="module", params=MODELS)
def reference(request):
  return _reference(request.param)


def _assert_grads_close(actual, expected, atol_fraction=1e-6):
  # Some gradients are exactly zero in theory (a key bias under softmax) and ~1e-11 in
  # practice: compare each leaf against the scale of all gradients.
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(expected))
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=atol_fraction * scale)


def _check_sharded_step(reference, strategy):
  ex, tx, params, batch, ref_losses, ref_grads = reference
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=tx,
    devices=8,
    profile="cpu",
    strategy=strategy,
    all_devices=strategy != "auto",
  )
  if strategy != "auto":
    assert plan.num_devices == 8
    assert plan.strategy in (strategy, f"{strategy}+sp")  # sequence parallelism is searched
  sharded_params = plan.shard(params)
  sharded_batch = plan.shard_batch(batch)
  grads = jax.jit(jax.grad(ex.loss_fn))(sharded_params, sharded_batch)
  _assert_grads_close(grads, ref_grads)

  step = plan.train_step()
  p, o = sharded_params, plan.init_opt_state(sharded_params)
  losses = []
  for _ in range(STEPS):
    p, o, loss = step(p, o, sharded_batch)
    losses.append(float(loss))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
  # The step keeps the plan's layout: outputs come back sharded as they went in.
  for leaf, spec in zip(
    jax.tree.leaves(p),
    jax.tree.leaves(plan.param_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
  ):
    assert leaf.sharding.spec == spec


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_step_matches_single_device(reference, strategy):
  _check_sharded_step(reference, strategy)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_model_families_match_single_device(name):
  _check_sharded_step(_reference(name), "dp_tp")
