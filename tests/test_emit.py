"""The emitted step compiles to what the same shardings written by hand with jax.jit give."""

import jax
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import verify
from wapar_jax._src.tree import abstract

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


def _compiled(step, ex, mesh_shape):
  params, batch = abstract(ex.params), abstract(ex.batch)
  opt_state = abstract(jax.eval_shape(TX.init, params))
  compiled = verify.compile_like_target(step.lower(params, opt_state, batch))
  return verify.read_compiled(compiled, mesh_shape, PROFILE)


# ZeRO-1: every parameter is pinned to its compute layout at the top of the loss, which stops XLA
# from adding the tied weight's two partial gradients before reducing them (gpt2-small, 8
# devices, 16 x 256: 1499 MiB sent against 1243 MiB by hand). Pinning only the FSDP-split
# parameters closes the gap, but the cost model then over-predicts ZeRO-1's bytes of tied
# models by 14%: the two change together.
_TIED_ZERO1 = pytest.mark.xfail(strict=True, reason="pinned tied weights reduce twice")


@pytest.mark.parametrize(
  "strategy", [pytest.param("zero1", marks=_TIED_ZERO1), "dp", "tp", "dp_tp"]
)
def test_emitted_step_costs_what_the_hand_written_one_does(strategy):
  # gpt-tiny ties its output projection to the token embedding: pinning that weight to its
  # layout would stop XLA from adding its two partial gradients before reducing them.
  ex = examples.get_example("gpt-tiny", batch_size=32)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile=PROFILE,
    strategy=strategy,
    all_devices=True,
    remat="none",
    microbatches=1,
  )
  mesh = plan.make_mesh()
  emitted = _compiled(plan.train_step(), ex, plan.mesh_shape)
  hand = _compiled(_hand_written(ex, plan, mesh), ex, plan.mesh_shape)
  assert emitted.figures.comm_bytes == pytest.approx(hand.figures.comm_bytes, rel=1e-9)
  assert sorted(c.kind for c in emitted.collectives) == sorted(c.kind for c in hand.collectives)
  assert emitted.figures.compute_time <= hand.figures.compute_time * 1.01


def test_fsdp_weights_are_gathered_not_the_activations():
  # Without a constraint XLA may split the work on the weights' data split instead of
  # gathering them: the emitted step holds parameters to their gathered layout.
  ex = examples.get_example("gpt-tiny", batch_size=32)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile=PROFILE,
    strategy="fsdp",
    all_devices=True,
    remat="none",
    microbatches=1,
  )
  emitted = _compiled(plan.train_step(), ex, plan.mesh_shape)
  free = _compiled(_hand_written(ex, plan, plan.make_mesh()), ex, plan.mesh_shape)
  assert "all-gather" in [c.kind for c in emitted.collectives]
  assert emitted.figures.comm_bytes < free.figures.comm_bytes
