"""The emitted step compiles to what the same shardings written by hand with jax.jit give."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import verify
from wapar_jax._src.emit.step import _gather_hook
from wapar_jax._src.step import loss_and_grads, make_train_step
from wapar_jax._src.tree import abstract
from wapar_jax.examples import _gpt

TX = optax.adamw(1e-3)
PROFILE = wap.load_profile("h100-sxm")


def _hand_written(ex, plan, mesh):
  """The plan's in / out shardings on a plain jax.jit step, as a researcher would write it."""
  named = lambda t: jax.tree.map(
    lambda s: NamedSharding(mesh, s), t, is_leaf=lambda x: isinstance(x, P)
  )
  params = abstract(ex.params)
  opt_specs = optax.tree_map_params(
    TX,
    lambda _, spec: spec,
    jax.eval_shape(TX.init, params),
    plan._opt_param_specs(params),
    transform_non_params=lambda _: P(),
    is_leaf=lambda x: isinstance(x, P),
  )

  def step(p, o, b):
    loss, grads = jax.value_and_grad(ex.loss_fn)(p, b)
    updates, o = TX.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  shardings = (named(plan.param_specs), named(opt_specs), named(plan.batch_specs))
  out = (shardings[0], shardings[1], NamedSharding(mesh, P()))
  return jax.jit(step, in_shardings=shardings, out_shardings=out, donate_argnums=(0, 1))


def _compiled(step, ex, mesh_shape, profile=PROFILE):
  params, batch = abstract(ex.params), abstract(ex.batch)
  opt_state = abstract(jax.eval_shape(TX.init, params))
  compiled = verify.compile_like_target(step.lower(params, opt_state, batch))
  return verify.read_compiled(compiled, mesh_shape, profile)


def _forced_plan(ex, strategy, *, remat="none", microbatches=1, profile=PROFILE):
  """One strategy on all 8 devices, with the levers fixed."""
  return wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile=profile,
    strategy=strategy,
    all_devices=True,
    remat=remat,
    microbatches=microbatches,
  )


def _assert_steps_match_single_device(ex, plan, params, batch, steps=3):
  """The plan's emitted step, `steps` times, against the single-device step on the same inputs."""
  ref_step = jax.jit(make_train_step(ex.loss_fn, TX))
  step = plan.train_step()
  sharded = plan.shard(params)
  p, o, ref_p, ref_o = sharded, plan.init_opt_state(sharded), params, TX.init(params)
  for _ in range(steps):
    p, o, loss = step(p, o, plan.shard_batch(batch))
    ref_p, ref_o, ref_loss = ref_step(ref_p, ref_o, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  return step


# The fast tier keeps ZeRO-1, the case a constraint on the tied weight would break.
@pytest.mark.parametrize(
  "strategy", [pytest.param(s, marks=pytest.mark.slow) for s in ("zero1", "dp", "tp", "dp_tp")]
)
def test_emitted_step_costs_what_the_hand_written_one_does(strategy):
  # gpt-tiny ties its output projection to the token embedding: a constraint on that weight
  # would stop XLA from adding its two partial gradients before reducing them.
  ex = examples.get_example("gpt-tiny", batch_size=32)
  plan = _forced_plan(ex, strategy)
  mesh = plan.make_mesh()
  emitted = _compiled(plan.train_step(), ex, plan.mesh_shape)
  hand = _compiled(_hand_written(ex, plan, mesh), ex, plan.mesh_shape)
  assert emitted.figures.comm_bytes == pytest.approx(hand.figures.comm_bytes, rel=1e-9)
  assert sorted(c.kind for c in emitted.collectives) == sorted(c.kind for c in hand.collectives)
  assert emitted.figures.compute_time <= hand.figures.compute_time * 1.01


@pytest.mark.slow
def test_fsdp_weights_are_gathered_not_the_activations():
  # Without a constraint XLA may split the work on the weights' data split instead of
  # gathering them: the emitted step holds parameters to their gathered layout.
  ex = examples.get_example("gpt-tiny", batch_size=32)
  plan = _forced_plan(ex, "fsdp")
  emitted = _compiled(plan.train_step(), ex, plan.mesh_shape)
  free = _compiled(_hand_written(ex, plan, plan.make_mesh()), ex, plan.mesh_shape)
  assert "all-gather" in [c.kind for c in emitted.collectives]
  assert emitted.figures.comm_bytes < free.figures.comm_bytes


def _wide_gpt(kind):
  """gpt-tiny widened so that FSDP splits its weights (at least FSDP_MIN_BYTES each)."""
  cfg = _gpt.GPTConfig(2, 128, 4, 256, 32, jnp.float32)
  if kind == "nnx":
    return _gpt.gpt_nnx("wide-nnx", "", cfg, 16, 32)
  return _gpt.gpt_linen(f"wide-{kind}", "", cfg, 16, 32, scan_layers=kind == "scan")


@pytest.mark.parametrize(
  "kind, remat",
  [
    pytest.param(k, r, marks=pytest.mark.slow)
    # The scanned and the unrolled linen layers, each with a remat choice: NNX's FSDP step is
    # test_model_state's, the rest of the matrix the same code path (the benchmark suite
    # compiles every family on larger models).
    for k, r in [("scan", "layers"), ("linen", "weights")]
  ],
)
def test_fsdp_per_layer_gives_the_single_device_numbers(kind, remat):
  ex = _wide_gpt(kind)
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  ref_loss, ref_grads = jax.jit(loss_and_grads(ex.loss_fn))(params, batch)
  plan = _forced_plan(ex, "fsdp", remat=remat)
  specs = jax.tree.leaves(plan.param_specs, is_leaf=lambda x: isinstance(x, P))
  assert any("data" in s for s in specs)
  mesh = plan.make_mesh()
  sharded_params, sharded_batch = plan.shard(params), plan.shard_batch(batch)
  # The emitted step's own gradients: each layer's weights gathered where the layer runs.
  grads_of = loss_and_grads(ex.loss_fn, remat=remat, gather=_gather_hook(mesh, plan.param_specs))
  loss, grads = jax.jit(grads_of)(sharded_params, sharded_batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-6 * scale)
  step = _assert_steps_match_single_device(ex, plan, params, batch)
  compiled = _compiled(step, ex, plan.mesh_shape)
  gathers = [c for c in compiled.collectives if c.kind == "all-gather"]
  if kind == "scan":  # a layer's slice, gathered inside the loop over layers
    assert any(c.depth >= 1 for c in gathers)
  # Each split weight gathered once per layer in the forward pass, and again in the backward
  # pass under remat (all but those outside the layers, such as the embedding).
  shapes = [x.shape for x in jax.tree.leaves(ex.params)]
  layers = 2
  forward = sum(layers if len(shape) == 3 else 1 for s, shape in zip(specs, shapes) if "data" in s)
  total = sum(c.count for c in gathers)
  assert total >= forward
  if remat != "none":
    assert total >= 2 * forward - 2


@pytest.mark.slow
def test_zero2_accumulation_matches_single_device():
  # ZeRO-1 storage with gradient accumulation keeps the accumulated gradients split (ZeRO-2).
  ex = _wide_gpt("linen")
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  plan = _forced_plan(ex, "zero1", microbatches=2)
  assert plan.chosen.microbatches == 2
  _assert_steps_match_single_device(ex, plan, params, batch)


@pytest.mark.slow
def test_hybrid_sharding_splits_state_inside_nodes_and_matches_single_device():
  # Two nodes of four: the state is split over the fsdp axis inside each node, the batch over
  # data x fsdp, and the plan exports as MaxText's dcn_data x ici_fsdp.
  ex = _wide_gpt("scan")
  profile = dataclasses.replace(PROFILE, devices_per_node=4)
  plan = _forced_plan(ex, "hsdp", profile=profile)
  assert dict(plan.mesh_shape) == {"data": 2, "fsdp": 4}
  specs = jax.tree.leaves(plan.param_specs, is_leaf=lambda x: isinstance(x, P))
  assert any("fsdp" in s for s in specs) and not any("data" in s for s in specs)
  config = yaml.safe_load(plan.to_maxtext_yaml())
  assert (config["dcn_data_parallelism"], config["ici_fsdp_parallelism"]) == (2, 4)
  assert config["data_sharding"] == [["data", "fsdp"]]
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  step = _assert_steps_match_single_device(ex, plan, params, batch)
  compiled = _compiled(step, ex, plan.mesh_shape, profile)
  gathers = [c for c in compiled.collectives if c.kind == "all-gather"]
  assert gathers and all(c.axes == ("fsdp",) for c in gathers)  # weights stay in the node
  assert compiled.figures.comm_bytes == pytest.approx(plan.predicted.comm_bytes, rel=0.02)
