"""A researcher's own jax.jit step, written with plan.shardings() and plan.constrain(), compiles to
the plan's own step and trains to the single-device numbers."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.step import make_train_step
from wapar_jax._src.tree import abstract
from wapar_jax._src.verify.collectives import collectives
from wapar_jax._src.verify.hlo import multiplicities, parse_hlo
from wapar_jax.examples import _gpt

TX = optax.adamw(1e-3)
PROFILE = wap.load_profile("h100-sxm")
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@functools.cache
def _case(name):
  """(example, plan): FSDP over a scanned GPT's layers (weights gathered per layer inside the
  loop), and DP x TP over gpt-tiny (tied embedding)."""
  if name == "fsdp":
    cfg = _gpt.GPTConfig(2, 128, 4, 256, 32, jnp.float32)
    ex, strategy = _gpt.gpt_linen("wide-scan", "", cfg, 16, 32, scan_layers=True), "fsdp"
  else:
    ex, strategy = examples.get_example("gpt-tiny", batch_size=32), "dp_tp"
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile=PROFILE,
    strategy=strategy,
    all_devices=True,
  )
  return ex, plan


def _is_spec(x) -> bool:
  return isinstance(x, P)


def _counts(step, ex) -> dict:
  """Per collective kind: (instructions, executions per step) in the compiled module."""
  params = abstract(ex.params)
  text = step.lower(params, abstract(TX.init(params)), abstract(ex.batch)).compile().as_text()
  module = parse_hlo(text)
  mult, _, _ = multiplicities(module)
  found = collectives(text, {}, PROFILE, module, mult, [])
  by_kind = collections.defaultdict(lambda: [0, 0.0])
  for c in found:
    by_kind[c.kind][0] += 1
    by_kind[c.kind][1] += c.count
  return {k: tuple(by_kind[k]) for k in KINDS if k in by_kind}


@functools.cache
def _plan_counts(name):
  ex, plan = _case(name)
  return _counts(plan.train_step(), ex)


def _user_train_step(plan, loss_fn):
  """What a researcher writes: their own step, the plan's layout inside the loss."""
  loss = plan.constrain(loss_fn)

  def train_step(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return train_step


def _user_jit(plan, loss_fn, mesh=None):
  sh = plan.shardings(mesh)
  return jax.jit(
    _user_train_step(plan, loss_fn),
    in_shardings=(sh.params, sh.opt_state, sh.batch),
    out_shardings=(sh.params, sh.opt_state, NamedSharding(sh.mesh, P())),
    donate_argnums=(0, 1),
  )


def _explicit_mesh(plan):
  mesh = jax.make_mesh(tuple(plan.mesh_shape.values()), tuple(plan.mesh_shape))
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}  # jax 0.10's default
  return mesh


# Each case compiles two steps (~3 s each): FSDP, the per-use gathers inside a scan, in the full
# suite; the fast tier keeps DP x TP.
@pytest.mark.parametrize("name", [pytest.param("fsdp", marks=pytest.mark.slow), "dp_tp"])
def test_own_jit_compiles_to_the_plans_program(name):
  ex, plan = _case(name)
  assert _counts(_user_jit(plan, ex.loss_fn), ex) == _plan_counts(name)


@pytest.mark.slow
def test_in_and_out_shardings_alone_give_another_program():
  # Why plan.constrain exists: without it XLA lays an FSDP step out otherwise.
  ex, plan = _case("fsdp")
  sh = plan.shardings()

  def free(params, opt_state, batch):
    value, grads = jax.value_and_grad(ex.loss_fn)(params, batch)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  shardings = (sh.params, sh.opt_state, sh.batch)
  out = (sh.params, sh.opt_state, NamedSharding(sh.mesh, P()))
  assert _counts(jax.jit(free, in_shardings=shardings, out_shardings=out), ex) != _plan_counts(
    "fsdp"
  )


# On DP x TP only: the explicit mesh's path through auto_axes is the same for every family, and
# FSDP's per-use gathers are test_own_jit_compiles_to_the_plans_program's.
def test_own_jit_under_an_explicit_mesh_compiles_to_the_plans_program():
  ex, plan = _case("dp_tp")
  planned = _plan_counts("dp_tp")
  mesh = _explicit_mesh(plan)
  with jax.set_mesh(mesh):
    sh = plan.shardings(mesh)
    specs = jax.tree.map(lambda s: s.spec, (sh.params, sh.opt_state))
    step = jax.sharding.auto_axes(_user_train_step(plan, ex.loss_fn), out_sharding=(*specs, P()))
    jitted = jax.jit(
      step,
      in_shardings=(sh.params, sh.opt_state, sh.batch),
      out_shardings=(sh.params, sh.opt_state, NamedSharding(mesh, P())),
      donate_argnums=(0, 1),
    )
    assert _counts(jitted, ex) == planned


@pytest.mark.slow
def test_the_plans_own_step_under_an_explicit_mesh_is_the_planned_program():
  # The step traces in the plan's Auto mesh whatever mesh the caller has set.
  ex, plan = _case("dp_tp")
  with jax.set_mesh(_explicit_mesh(plan)):
    inside = _counts(plan.train_step(), ex)
  assert inside == _plan_counts("dp_tp")


@pytest.mark.slow
def test_planning_and_verifying_under_an_explicit_mesh_trace_the_single_device_step():
  # Before: flax's and optax's reshards under the caller's mesh were refused as a sharded loss.
  ex, plan = _case("dp_tp")
  with jax.set_mesh(_explicit_mesh(plan)):
    again = wap.plan(
      ex.loss_fn,
      ex.params,
      ex.batch,
      optimizer=TX,
      devices=8,
      profile=PROFILE,
      strategy="dp_tp",
      all_devices=True,
    )
    verified = again.verify()
  assert again.chosen == plan.chosen
  assert verified.compiled.flops == pytest.approx(plan.verify().compiled.flops)


def test_the_layout_under_explicit_axes_is_refused_by_name():
  ex, plan = _case("fsdp")
  mesh = _explicit_mesh(plan)
  with jax.set_mesh(mesh), pytest.raises(wap.errors.ExplicitAxesError, match="auto_axes"):
    jax.eval_shape(plan.constrain(ex.loss_fn), abstract(ex.params), abstract(ex.batch))


@pytest.mark.slow
def test_own_jit_trains_to_the_single_device_numbers():
  ex, plan = _case("fsdp")
  params, batch = ex.init_params(jax.random.key(0)), ex.make_batch(jax.random.key(1))
  sh = plan.shardings()
  p = jax.device_put(jax.tree.map(jnp.copy, params), sh.params)
  o = jax.jit(TX.init, out_shardings=sh.opt_state)(p)
  b = jax.device_put(batch, sh.batch)
  step, ref_step = _user_jit(plan, ex.loss_fn), jax.jit(make_train_step(ex.loss_fn, TX))
  ref_p, ref_o = params, TX.init(params)
  for _ in range(3):
    p, o, loss = step(p, o, b)
    ref_p, ref_o, ref_loss = ref_step(ref_p, ref_o, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)


def test_shardings_are_shaped_like_the_trees():
  ex, plan = _case("dp_tp")
  sh = plan.shardings()
  params = abstract(ex.params)
  assert jax.tree.structure(sh.params) == jax.tree.structure(params)
  assert jax.tree.structure(sh.opt_state) == jax.tree.structure(jax.eval_shape(TX.init, params))
  assert jax.tree.structure(sh.batch) == jax.tree.structure(ex.batch)
  specs = jax.tree.leaves(plan.param_specs, is_leaf=_is_spec)
  assert [s.spec for s in jax.tree.leaves(sh.params)] == specs
  loaded = wap.Plan.from_json(plan.to_json())
  assert loaded.shardings(params=params, batch=ex.batch, optimizer=TX) == sh
  assert loaded.shardings(params=params, batch=ex.batch).opt_state is None
  with pytest.raises(wap.errors.InvalidArgumentError, match="params= and batch="):
    loaded.shardings()
  with pytest.raises(wap.errors.PlanMismatchError, match="axes and sizes"):
    plan.shardings(jax.make_mesh((8,), ("data",)))


class _Mlp(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(32, 128, rngs=rngs)
    self.fc2 = nnx.Linear(128, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x)))


def _mlp_loss(model, batch):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


_MLP_BATCH = {
  "x": jax.ShapeDtypeStruct((16, 32), jnp.float32),
  "y": jax.ShapeDtypeStruct((16, 4), jnp.float32),
}


@functools.cache
def _nnx_plan():
  model = nnx.eval_shape(lambda: _Mlp(nnx.Rngs(0)))
  return wap.plan(
    _mlp_loss, model, _MLP_BATCH, optimizer=TX, devices=8, profile="cpu", strategy="tp"
  )


def test_a_loaded_nnx_plan_has_the_fresh_plans_specs():
  plan = _nnx_plan()
  loaded = wap.Plan.from_json(plan.to_json())
  assert loaded.param_specs == plan.param_specs
  assert loaded.opt_state_param_specs == plan.opt_state_param_specs
  assert loaded == plan
  assert set(plan.param_specs["fc1"]) == {"kernel", "bias"}  # no Variable payload level
  state = nnx.state(nnx.eval_shape(lambda: _Mlp(nnx.Rngs(0))), nnx.Param)
  assert jax.tree.structure(plan.shardings().params) == jax.tree.structure(state)


def test_annotate_puts_the_plan_on_the_model():
  plan = _nnx_plan()
  model = plan.annotate(_Mlp(nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs.to_pure_dict() == plan.param_specs
  assert any(
    s != P() for s in jax.tree.leaves(plan.param_specs, is_leaf=lambda x: isinstance(x, P))
  )
  # flax's own shardings from the metadata are the plan's.
  mesh = plan.make_mesh()
  named = nnx.get_named_sharding(nnx.state(model, nnx.Param), mesh)
  assert jax.tree.leaves(named) == jax.tree.leaves(plan.shardings(mesh).params)
  with pytest.raises(wap.errors.InvalidArgumentError, match="nnx.Module"):
    plan.annotate({"w": jnp.zeros(3)})
