"""Optax transformations whose state is a pytree over the parameters: planned, sharded, trained.

Each emitted step, 3 steps on 8 virtual devices, is checked against a plain single-device
`jax.jit` step with the same transformation on the same inputs.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.emit.shardings import opt_state_specs
from wapar_jax._src.step import make_train_step
from wapar_jax._src.tree import abstract
from wapar_jax.errors import InvalidArgumentError

SLOW = pytest.mark.slow
STEPS = 3


def _frozen_first_layer(params):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "frozen" if path[0].key == "Dense_0" else "train", params
  )


def _matrices(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


def _multi_transform():
  return optax.multi_transform(
    {"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, _frozen_first_layer
  )


def _masked():
  return optax.masked(optax.adam(1e-2), _matrices)


def _multi_steps():
  return optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)


def _inject_hyperparams():
  # A masked Adam whose learning rate is state, which the user may set between steps.
  def masked_adam(learning_rate):
    return optax.masked(optax.adam(learning_rate), _matrices)

  return optax.inject_hyperparams(masked_adam)(learning_rate=1e-2)


def _chain():
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.masked(optax.add_decayed_weights(1e-2), _matrices),
    optax.multi_transform(
      {
        "train": optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
        "frozen": optax.set_to_zero(),
      },
      _frozen_first_layer,
    ),
  )


def _adafactor():
  # Its factored statistics are trees over the params of row and column vectors: replicated.
  return optax.adafactor(1e-2)


TRANSFORMS = {
  "multi_transform": _multi_transform,
  "masked": _masked,
  "multi_steps": _multi_steps,
  "inject_hyperparams": _inject_hyperparams,
  "chain": _chain,
  "adafactor": _adafactor,
}


# Whether Dense_0's / Dense_1's kernel moves at each step (default: at every step): the frozen
# group never does, MultiSteps(k=2) applies its accumulated update at step 2 only.
MOVES = {
  "multi_transform": ([False] * STEPS, [True] * STEPS),
  "chain": ([False] * STEPS, [True] * STEPS),
  "multi_steps": ([False, True, False], [False, True, False]),
}


@pytest.fixture(scope="module")
def mlp():
  ex = examples.get_example("mlp")
  return ex, ex.init_params(jax.random.key(0)), ex.make_batch(jax.random.key(1))


def _reference_run(ex, tx, params, batch):
  """(params, loss) after each step of a plain single-device jit step, written as a user would."""

  def step(p, o, b):
    loss, grads = jax.value_and_grad(ex.loss_fn)(p, b)
    value_fn = lambda q: ex.loss_fn(q, b)  # noqa: E731
    updates, o = tx.update(grads, o, p, value=loss, grad=grads, value_fn=value_fn)
    return optax.apply_updates(p, updates), o, loss

  step = jax.jit(step)
  p, o, run = params, tx.init(params), []
  for _ in range(STEPS):
    p, o, loss = step(p, o, batch)
    run.append((p, float(loss)))
  return run


def _sharded_run(ex, tx, params, batch, strategy):
  """(params, loss) after each step of the plan's step, and the optimizer state's specs."""
  plan = wap.plan(
    ex.loss_fn, ex.params, ex.batch, optimizer=tx, devices=8, strategy=strategy, all_devices=True
  )
  assert (plan.num_devices, plan.strategy) == (8, strategy)
  step = plan.train_step()
  p = plan.shard(params)
  o = plan.init_opt_state(p)
  state_specs = [x.sharding.spec for x in jax.tree.leaves(o)]
  run = []
  for _ in range(STEPS):
    p, o, loss = step(p, o, plan.shard_batch(batch))
    run.append((jax.tree.map(np.asarray, p), float(loss)))  # the next step donates p
  return run, state_specs


def _moved(params, run, layer):
  kernels = [params[layer]["kernel"]] + [p[layer]["kernel"] for p, _ in run]
  return [not np.array_equal(a, b) for a, b in zip(kernels, kernels[1:])]


def _check_matches_single_device(mlp, name, tx, strategy, rtol=1e-5):
  ex, params, batch = mlp
  ref = _reference_run(ex, tx, params, batch)
  got, state_specs = _sharded_run(ex, tx, params, batch, strategy)
  for (got_p, got_loss), (ref_p, ref_loss) in zip(got, ref):
    np.testing.assert_allclose(got_loss, ref_loss, rtol=rtol)
    # Adam divides by the gradient's own size: a parameter moves by about the learning rate
    # (1e-2) whatever its gradient, so params are compared to a small fraction of it (a
    # gradient near zero, summed in another order, moves by 2e-5 of it).
    for a, b in zip(jax.tree.leaves(got_p), jax.tree.leaves(ref_p)):
      np.testing.assert_allclose(a, np.asarray(b), rtol=rtol, atol=1e-4)
  first, other = MOVES.get(name, ([True] * STEPS, [True] * STEPS))
  assert (_moved(params, got, "Dense_0"), _moved(params, got, "Dense_1")) == (first, other)
  if strategy != "dp":  # the state really is split: the case a wrong spec tree breaks
    assert any("data" in str(s) for s in state_specs), state_specs


@pytest.mark.parametrize("strategy", ["dp", pytest.param("zero1", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transformation_trains_like_single_device(mlp, name, strategy):
  _check_matches_single_device(mlp, name, TRANSFORMS[name](), strategy)


@pytest.mark.slow
# The two that nest the others (a frozen group; a chain of clip, masked, multi_transform and
# inject_hyperparams): the rest are covered under dp and zero1 above.
@pytest.mark.parametrize("name", ["multi_transform", "chain"])
def test_transformation_trains_like_single_device_under_fsdp(mlp, name):
  _check_matches_single_device(mlp, name, TRANSFORMS[name](), "fsdp")


def test_state_specs_follow_the_state_structure(mlp):
  ex, _, _ = mlp
  params = abstract(ex.params)
  param_specs = jax.tree.map(lambda x: P("data", *([None] * (x.ndim - 1))), params)
  train = opt_state_specs(_chain(), params, param_specs)[2].inner_states["train"].inner_state
  adam = train.inner_state[0]
  # The frozen group's leaves are MaskedNode in the trained group's state; the others follow
  # their parameter.
  assert isinstance(adam.mu["Dense_0"]["kernel"], optax.MaskedNode)
  assert adam.nu["Dense_1"]["kernel"] == P("data", None)
  assert adam.mu["Dense_2"]["bias"] == P("data")
  # Counts and hyperparameters are not per parameter: replicated.
  assert adam.count == P() and train.count == P()
  assert train.hyperparams["learning_rate"] == P()
  masked = opt_state_specs(_masked(), params, param_specs).inner_state[0]
  assert isinstance(masked.mu["Dense_1"]["bias"], optax.MaskedNode)
  assert masked.mu["Dense_1"]["kernel"] == P("data", None)


# ZeRO-1 storage of an optax state is covered by the transformations above; L-BFGS once.
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["dp"])
def test_lbfgs_trains_like_single_device(mlp, strategy):
  # Its zoom line search reads value=, grad= and value_fn= from the step.
  _check_matches_single_device(mlp, "lbfgs", optax.lbfgs(), strategy, rtol=1e-4)


@pytest.mark.slow
def test_lbfgs_line_search_reads_the_loss_over_all_micro_batches(mlp):
  ex, params, batch = mlp
  tx = optax.lbfgs()
  runs = []
  for k in (1, 2):
    step = jax.jit(make_train_step(ex.loss_fn, tx, microbatches=k))
    p, o, loss = step(params, tx.init(params), batch)
    runs.append((p, float(loss)))
  (p1, loss1), (p2, loss2) = runs
  np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_a_wrapper_that_is_no_transformation_is_named():
  ex = examples.get_example("mlp")

  class Wrapper:
    def gradient_transformation(self):
      return optax.sgd(1e-3)

  with pytest.raises(InvalidArgumentError, match=r"pass its \.gradient_transformation\(\)"):
    wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=Wrapper(), devices=1)
