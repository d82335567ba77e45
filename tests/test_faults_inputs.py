"""Faults a careless user or a damaged file brings: each is a named error saying what to do.

Plan files checked for sense, `plan()`'s arguments, and the emitted step's inputs (issue 20).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import plan_file
from wapar_jax._src.plan_details import PlanDetails

TX = optax.adamw(1e-3)
errors = wap.errors


@pytest.fixture(scope="module")
def mlp():
  return examples.get_example("mlp", batch_size=16)


@pytest.fixture(scope="module")
def mlp_plan(mlp):
  return wap.plan(
    mlp.loss_fn,
    mlp.params,
    mlp.batch,
    optimizer=TX,
    devices=4,
    profile="cpu",
    strategy="dp",
    all_devices=True,
  )


@pytest.fixture(scope="module")
def plan_data(mlp_plan):
  return json.loads(mlp_plan.to_json())


# --- plan files ---------------------------------------------------------------------------


def _set(path, value):
  """A corruption: the field at `path` (keys and indices) set to `value`."""

  def corrupt(data):
    node = data
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value

  return corrupt


CORRUPTIONS = {
  "mesh size 0": (_set(("mesh_shape", "data"), 0), r"mesh_shape\.data must be a positive int"),
  "mesh size negative": (_set(("mesh_shape", "data"), -4), r"mesh_shape\.data.*Got -4"),
  "mesh size 4.5": (_set(("mesh_shape", "data"), 4.5), r"mesh_shape\.data.*Got 4\.5"),
  "mesh size '4'": (_set(("mesh_shape", "data"), "4"), r"mesh_shape\.data.*Got '4'"),
  "mesh size true": (_set(("mesh_shape", "data"), True), r"mesh_shape\.data.*Got True"),
  "mesh 3 x 2 on 4 devices": (
    _set(("mesh_shape",), {"data": 3, "model": 2}),
    r"mesh_shape must have sizes whose product is .* chosen\.devices = 4",
  ),
  "spec as a string": (
    _set(("param_specs", 0, "spec"), "model"),
    r"param_specs\[0\]\.spec must be a list .*Got 'model'",
  ),
  "spec naming no mesh axis": (
    _set(("param_specs", 0, "spec"), ["model"]),
    r"param_specs\[0\]\.spec must name only the mesh's axes \('data',\)",
  ),
  "spec naming an axis twice": (
    _set(("param_specs", 1, "spec"), ["data", "data"]),
    r"param_specs\[1\]\.spec must name each mesh axis at most once",
  ),
  "spec longer than the rank": (
    _set(("opt_state_param_specs", 0, "spec"), [None, None]),
    r"opt_state_param_specs\[0\]\.spec must have at most 1 entries, the rank of Dense_0/bias",
  ),
  "NaN prediction": (
    _set(("predicted", "step_time"), float("nan")),
    r"predicted\.step_time must be a finite number",
  ),
  "infinite prediction": (
    _set(("predicted", "peak_memory"), float("inf")),
    r"predicted\.peak_memory must be a finite number",
  ),
  "negative figure of a candidate": (
    _set(("candidates", 0, "comm_bytes"), -1.0),
    r"candidates\[0\]\.comm_bytes must be a finite number >= 0",
  ),
  "chosen.devices not the mesh's": (
    _set(("chosen", "devices"), 2),
    r"chosen\.devices must equal chosen\.data x chosen\.model = 4 x 1",
  ),
  "candidate on more devices than offered": (
    lambda d: d["candidates"][0].update(devices=8, data=8, mesh_shape={"data": 8}),
    r"candidates\[0\]\.devices must be at most devices_offered = 4",
  ),
  "chosen mesh not the plan's": (
    lambda d: d["chosen"].update(data=2, model=2, mesh_shape={"data": 2, "model": 2}),
    r"mesh_shape must be the chosen candidate's mesh \{'data': 2, 'model': 2\}",
  ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_plan_file_checked_for_sense(plan_data, case):
  corrupt, message = CORRUPTIONS[case]
  data = copy.deepcopy(plan_data)
  corrupt(data)
  with pytest.raises(errors.CorruptPlanFileError, match=message):
    wap.Plan.from_json(json.dumps(data))


def test_deeply_nested_plan_file_is_a_corrupt_file_not_a_recursion_error(tmp_path):
  path = tmp_path / "plan.json"
  path.write_text('{"format": "wapar_jax.plan", "version": 3, "x": ' + "[" * 10**5 + "]" * 10**5)
  with pytest.raises(errors.CorruptPlanFileError, match="RecursionError"):
    wap.Plan.load(path)


@pytest.mark.parametrize(
  "where",
  [("new_field",), ("predicted", "new_field"), ("chosen", "new_field"), ("details", "new_field")],
)
def test_unknown_fields_are_ignored_with_a_warning(mlp_plan, plan_data, where):
  data = copy.deepcopy(plan_data)
  _set(where, 1.0)(data)
  data["details"]["hotspots"][0]["new_too"] = "x"
  data["predicted"]["peak_memory_xla_cpu"] = 1.0  # written by versions 1-2: dropped silently
  with pytest.warns(
    UserWarning, match=rf"{'.'.join(where)}, details\.hotspots\[0\]\.new_too"
  ) as record:
    loaded = wap.Plan.from_json(json.dumps(data))
  assert loaded == mlp_plan
  assert "peak_memory_xla_cpu" not in str(record[0].message) and len(record) == 1


def test_version_1_spec_longer_than_the_rank_is_refused_when_applied(mlp, plan_data):
  data = copy.deepcopy(plan_data)
  data["version"] = 1
  del data["details"]  # no shapes in the file: only the tree it is applied to can tell
  data["param_specs"][0]["spec"] = [None, None]
  loaded = wap.Plan.from_json(json.dumps(data))
  with pytest.raises(
    errors.PlanMismatchError, match="Dense_0/bias 2 entries but the leaf has rank 1"
  ):
    loaded.train_step(loss_fn=mlp.loss_fn, optimizer=TX, params=mlp.params, batch=mlp.batch)


def test_the_plan_file_rules_name_every_field():
  # A field added to the dataclasses needs its rule, or new plan files would not load.
  def names(cls):
    return {f.name for f in dataclasses.fields(cls)}

  assert set(plan_file.PREDICTION_RULES) == names(wap.Prediction)
  assert set(plan_file.CANDIDATE_RULES) == names(wap.Candidate) | {"mesh_shape"}
  assert set(plan_file.DETAILS_RULES) == names(PlanDetails)


# --- plan() arguments ---------------------------------------------------------------------

BAD_DEVICES = {
  "a string": ("16", r"device count .* Got str '16'"),
  "ints": ([0, 1, 2, 3], r"jax devices .* not int: to plan for a count pass devices=4"),
  "a repeated device": (None, r"same device more than once.* 1 distinct"),
  "a bool": (True, r"device count .* Got bool True"),
  "a float": (4.5, r"device count .* Got float 4\.5"),
}


@pytest.mark.parametrize("case", list(BAD_DEVICES))
def test_devices_must_be_a_count_or_distinct_devices(mlp, case):
  devices, message = BAD_DEVICES[case]
  devices = [jax.devices()[0]] * 4 if devices is None else devices
  with pytest.raises(errors.InvalidArgumentError, match=message):
    wap.plan(mlp.loss_fn, mlp.params, mlp.batch, optimizer=TX, devices=devices, profile="cpu")


def test_devices_as_a_numpy_integer(mlp):
  plan = wap.plan(mlp.loss_fn, mlp.params, mlp.batch, optimizer=optax.sgd(0.1), devices=np.int64(2))
  assert plan.devices_offered == 2 and type(plan.devices_offered) is int


def _mlp_loss_reading(mlp, where, name):
  """The mlp's loss, also reading the extra leaf `name` of params or batch."""

  def loss_fn(params, batch):
    tree = params if where == "params" else batch
    extra = jnp.sum(jnp.asarray(tree[name]))
    params = {k: v for k, v in params.items() if k != name}
    batch = {k: v for k, v in batch.items() if k != name}
    return mlp.loss_fn(params, batch) + 0.0 * extra

  return loss_fn


BAD_LEAVES = {
  "a float parameter": ("params", 1.5, r"params leaf scale is a float, not an array.*close over"),
  "an integer parameter": (
    "params",
    jax.ShapeDtypeStruct((4,), jnp.int32),
    r"params must be floating-point.*astype.*Got 1 non-float leaves: scale int32",
  ),
  "a float batch leaf": ("batch", 0.5, r"batch leaf scale is a float, not an array.*dim 0"),
}


@pytest.mark.parametrize("case", list(BAD_LEAVES))
def test_leaves_that_cannot_be_planned_are_named(mlp, case):
  where, leaf, message = BAD_LEAVES[case]
  params, batch = dict(mlp.params), dict(mlp.batch)
  (params if where == "params" else batch)["scale"] = leaf
  with pytest.raises(errors.InvalidArgumentError, match=message):
    wap.plan(
      _mlp_loss_reading(mlp, where, "scale"), params, batch, optimizer=TX, devices=4, profile="cpu"
    )


def test_empty_batch_is_refused(mlp):
  real_batch = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), mlp.batch)
  with pytest.raises(errors.InvalidArgumentError, match=r"batch has no leaves.*Got \{\}"):
    wap.plan(lambda p, _: mlp.loss_fn(p, real_batch), mlp.params, {}, optimizer=TX, devices=8)


def _mesh():
  return jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


SHARDED_LOSSES = {
  "with_sharding_constraint to a NamedSharding": (
    lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(_mesh(), P("d"))),
    r"already shards the step: it calls jax\.lax\.with_sharding_constraint at .*test_faults",
  ),
  "with_sharding_constraint to a PartitionSpec": (
    lambda x: jax.lax.with_sharding_constraint(x, P("d")),
    r"uses jax\.lax\.with_sharding_constraint.*remove it from loss_fn",
  ),
  "shard_map": (
    lambda x: jax.shard_map(lambda y: 2 * y, mesh=_mesh(), in_specs=P("d"), out_specs=P("d"))(x),
    r"already shards the step: it calls jax\.shard_map",
  ),
  "psum": (lambda x: jax.lax.psum(x, "d"), r"uses a collective over a named axis \(psum"),
}


@pytest.mark.parametrize("case", list(SHARDED_LOSSES))
def test_sharding_already_in_the_loss_is_named(mlp, case):
  call, message = SHARDED_LOSSES[case]

  def loss_fn(params, batch):
    return mlp.loss_fn(params, {**batch, "x": call(batch["x"])})

  with pytest.raises(errors.ShardedLossError, match=message):
    wap.plan(loss_fn, mlp.params, mlp.batch, optimizer=TX, devices=4, profile="cpu")


# --- the emitted step ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def step(mlp_plan):
  return mlp_plan.train_step()


def _state(mlp, plan):
  params = plan.shard(mlp.init_params(jax.random.key(0)))
  batch = plan.shard_batch(mlp.make_batch(jax.random.key(1)))
  return params, plan.init_opt_state(params), batch


def test_donated_inputs_reused_are_refused_before_any_buffer_is_touched(mlp, mlp_plan, step):
  params, opt_state, batch = _state(mlp, mlp_plan)
  new_params, new_opt_state, _ = step(params, opt_state, batch)
  with pytest.raises(errors.DonatedInputError, match=r"params/Dense_0/bias was donated.*returned"):
    step(params, opt_state, batch)  # was a segfault
  with pytest.raises(errors.DonatedInputError, match=r"opt_state/0/count was donated"):
    step(new_params, opt_state, batch)
  _, _, loss = step(new_params, new_opt_state, batch)  # the returned arrays still train
  assert np.isfinite(float(loss))


def test_batch_of_another_size_than_planned_is_refused(mlp, mlp_plan, step):
  params, opt_state, _ = _state(mlp, mlp_plan)
  bigger = mlp_plan.shard_batch(
    examples.get_example("mlp", batch_size=32).make_batch(jax.random.key(1))
  )
  with pytest.raises(errors.PlanMismatchError, match=r"batches of 16 rows .*batch/x of shape \[32"):
    step(params, opt_state, bigger)
  assert not any(x.is_deleted() for x in jax.tree.leaves((params, opt_state)))


def test_params_not_laid_out_by_the_plan_point_to_plan_shard(mlp, mlp_plan, step):
  _, opt_state, batch = _state(mlp, mlp_plan)
  mesh = mlp_plan.make_mesh()
  split = jax.tree.map(
    lambda x: jax.device_put(x, NamedSharding(mesh, P("data") if x.shape[0] % 4 == 0 else P())),
    mlp.init_params(jax.random.key(0)),
  )
  with pytest.raises(
    errors.PlanMismatchError, match=r"plan\.shard\(params\).*params/Dense_0/bias is P\('data',\)"
  ):
    step(split, opt_state, batch)
