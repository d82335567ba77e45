"""Expert parallelism: the experts of every MoE layer split over the mesh's expert axis, tokens
moved to them and back by all-to-all, found from dimension classes. Every sharded result is
checked against the single-device step."""

import math

import jax
import numpy as np
import optax
import pytest
import yaml
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import compilers, verify
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.emit.shardings import opt_state_specs
from wapar_jax._src.emit.step import sharded_train_step
from wapar_jax._src.search import build_space, sweep
from wapar_jax._src.search.experts import expert_terms
from wapar_jax._src.step import loss_and_grads, make_train_step
from wapar_jax._src.trace import trace_train_step
from wapar_jax._src.trace.experts import find_experts
from wapar_jax._src.tree import abstract, leaf_paths, path_str
from wapar_jax._src.views import export
from wapar_jax.examples import _moe

TX = optax.adamw(1e-3)
PROFILE = wap.load_profile("h100-sxm")
# 8 experts top-2 over 32-token groups: capacity ceil(1.25 * 2 * 32 / 8) = 10 slots.
CFG = _moe.MoEConfig(2, 64, 4, 256, 32, n_experts=8)
BIG = 2**16  # bytes: the expert all-to-alls of this model are 8 * 8 * 10 * 64 * 4 / 8 = 20 KiB


@pytest.fixture(scope="module")
def moe():
  return _moe.moe("ep-moe", "", CFG, 8, 32)


def _compiled(step, ex, mesh_shape):
  params = abstract(ex.params)
  lowered = step.lower(params, abstract(jax.eval_shape(TX.init, params)), abstract(ex.batch))
  return verify.read_compiled(verify.compile_like_target(lowered), mesh_shape, PROFILE)


def _assert_close(grads, ref_grads):
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-6 * scale)


def test_the_experts_and_their_capacity_are_read_from_the_program(moe):
  traced, _ = trace_train_step(moe.loss_fn, moe.params, moe.batch, TX)
  experts = find_experts(traced)
  assert (experts.size, experts.capacity, experts.tokens) == (8, 10, 32)
  assert experts.slots_per_token == pytest.approx(2.5)  # capacity factor 1.25 x top-2
  assert (experts.top_k, experts.capacity_factor) == (2, pytest.approx(1.25))
  dense = examples.get_example("gpt-tiny")
  assert not find_experts(trace_train_step(dense.loss_fn, dense.params, dense.batch, TX)[0]).classes


def _emitted(moe, mesh_shape):
  """The emitted step for `mesh_shape`, the expert weights split on E by hand, and its specs."""
  names = tuple(mesh_shape)
  devices = np.array(jax.devices()[:8]).reshape(tuple(mesh_shape.values()))
  mesh = Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))
  expert_weight = lambda path: getattr(path[-1], "key", "") in ("w_in", "w_out")
  specs = jax.tree_util.tree_map_with_path(
    lambda path, x: P("expert", None, None) if expert_weight(path) else P(), moe.params
  )
  batch_specs = jax.tree.map(lambda x: P(names if len(names) > 1 else "expert"), moe.batch)
  step = sharded_train_step(
    moe.loss_fn,
    TX,
    mesh,
    specs,
    opt_state_specs(TX, abstract(moe.params), specs),
    batch_specs,
    planned_batch=moe.batch,
  )
  return step, mesh, specs


def test_four_all_to_alls_per_layer_are_priced_on_the_expert_side_tensors(moe):
  traced, _ = trace_train_step(moe.loss_fn, moe.params, moe.batch, TX)
  paths = [path_str(k) for k in leaf_paths(moe.params)]
  space = build_space(traced, step_costs(traced, CostCache()), paths, rules=compilers.XLA_GPU)
  terms = expert_terms(space)
  # dispatch and combine, forward and backward, of expert_in / expert_out [B, E, C, D] each
  assert terms.switches == 4 * CFG.n_layer
  assert terms.switch_bytes == 4 * CFG.n_layer * 8 * 8 * 10 * 64 * 4
  # w_in, w_out and the router, whose E dim is the experts class too
  assert terms.param_bytes == CFG.n_layer * (2 * 8 * 64 * 256 + 64 * 8) * 4


@pytest.mark.parametrize(
  "mesh_shape", [{"data": 2, "expert": 4}, pytest.param({"expert": 8}, marks=pytest.mark.slow)]
)
def test_the_emitted_step_moves_tokens_by_all_to_all_not_expert_weights(moe, mesh_shape):
  step, _, _ = _emitted(moe, mesh_shape)
  found = _compiled(step, moe, mesh_shape).collectives
  big = [c for c in found if c.nbytes >= BIG / 4]
  # Dispatch and combine, forward and backward, per layer; never a gathered expert weight.
  assert sum(c.count for c in big if c.kind == "all-to-all") == 4 * CFG.n_layer
  assert not [c for c in big if c.kind == "all-gather"]


@pytest.fixture(scope="module")
def planned(moe):
  return wap.plan(
    moe.loss_fn,
    moe.params,
    moe.batch,
    optimizer=TX,
    devices=8,
    all_devices=True,
    strategy="ep",
    profile=PROFILE,
  )


def test_a_planned_expert_parallel_step_is_explained_saved_and_exported(moe, planned):
  plan = planned
  ep = plan.chosen.expert
  assert ep > 1 and plan.mesh_shape["expert"] == ep and plan.strategy.startswith("ep")
  # The experts dim splits over the expert axis (the rest may shard over data, FSDP-style).
  assert plan.param_specs["block_0"]["moe"]["w_in"][0] == "expert"
  assert "expert parallel" in plan.explain() and plan.details.experts == (8, 10, 32, 2)
  loaded = wap.Plan.from_json(plan.to_json())
  assert (loaded.chosen, loaded.details) == (plan.chosen, plan.details)
  config = yaml.safe_load(plan.to_maxtext_yaml())
  assert config["ici_expert_parallelism"] * config["dcn_expert_parallelism"] == ep
  assert export.rules_reproduce(plan)[0] == export.rules_reproduce(plan)[1]


# The planned step's numerics are the next test's: the loss and gradients at each of three steps
# of `plan.train_step`, against the single device's.


@pytest.mark.slow
def test_the_planned_gradients_match_the_single_device_ones_over_three_steps(moe, planned):
  params = moe.init_params(jax.random.key(0))
  batch = moe.make_batch(jax.random.key(1))
  grads_of = jax.jit(planned.value_and_grad(moe.loss_fn))
  ref_grads_of = jax.jit(loss_and_grads(moe.loss_fn))
  step = planned.train_step()
  p = planned.shard(params)
  o = planned.init_opt_state(p)
  for _ in range(3):
    # The gradients at this step's parameters: AdamW's update amplifies rounding differences.
    loss, grads = grads_of(p, batch)
    ref_loss, ref_grads = ref_grads_of(jax.device_get(p), batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
    _assert_close(grads, ref_grads)
    p, o, _ = step(p, o, planned.shard_batch(batch))


@pytest.mark.slow
def test_fsdp_with_expert_parallelism_gathers_each_devices_experts_over_data_only(moe):
  with pytest.MonkeyPatch.context() as mp:  # "auto" picks it where memory binds, not here
    mp.setattr(sweep, "EXPERT_STORAGES", frozenset({"fsdp"}))
    plan = wap.plan(
      moe.loss_fn,
      moe.params,
      moe.batch,
      optimizer=TX,
      devices=8,
      all_devices=True,
      strategy="ep",
      profile=PROFILE,
    )
  ep = plan.chosen.expert
  assert plan.strategy == "ep+fsdp" and plan.mesh_shape == {"data": 8 // ep, "expert": ep}
  assert plan.param_specs["wte"]["embedding"] == P(("data", "expert"), None)
  params = moe.init_params(jax.random.key(0))
  batch = moe.make_batch(jax.random.key(1))
  ref_step = jax.jit(make_train_step(moe.loss_fn, TX))
  step = plan.train_step()
  p = plan.shard(params)
  o, ref_p, ref_o = plan.init_opt_state(p), params, TX.init(params)
  for _ in range(3):
    p, o, loss = step(p, o, plan.shard_batch(batch))
    ref_p, ref_o, ref_loss = ref_step(ref_p, ref_o, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  found = _compiled(step, moe, plan.mesh_shape).collectives
  w_in = 8 * 64 * 256 * 4
  gathered = [c for c in found if c.kind == "all-gather" and c.nbytes >= w_in / ep]
  assert gathered and all(c.nbytes == w_in / ep for c in gathered)  # this device's experts


def test_expert_degrees_divide_the_experts_and_the_batch_devices(moe):
  plan = wap.plan(
    moe.loss_fn, moe.params, moe.batch, optimizer=TX, devices=8, strategy="ep", profile=PROFILE
  )
  degrees = {(c.data, c.expert) for c in plan.candidates if c.devices > 1}
  assert degrees == {(d, e) for d in (2, 4, 8) for e in (2, 4, 8) if e <= d}
  assert all(math.prod(c.mesh_shape.values()) == c.devices for c in plan.candidates)


def test_strategy_ep_needs_a_mixture_of_experts():
  dense = examples.get_example("gpt-tiny")
  with pytest.raises(wap.errors.InvalidArgumentError, match="has none"):
    wap.plan(dense.loss_fn, dense.params, dense.batch, optimizer=TX, devices=8, strategy="ep")
