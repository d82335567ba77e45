"""The exported rules give back every spec of every family: through flax's
`nn.logical_to_mesh_axes`, and through MaxText's rule semantics applied to the parsed YAML."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest
import yaml
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax._src.search import sweep
from wapar_jax._src.tree import path_keys, path_str
from wapar_jax._src.views import export
from wapar_jax.examples import _gpt

TX = optax.adamw(1e-3)
# gpt-tiny widened so that FSDP splits its large weights and keeps its small ones whole.
_WIDE = _gpt.GPTConfig(2, 128, 4, 256, 32, jnp.float32)
_TWO_NODES = dataclasses.replace(wap.load_profile("h100-sxm"), devices_per_node=4)
# MaxText's mesh axis names for the plan's; its parallelism key of each mesh axis.
_FROM_MAXTEXT = {"tensor": "model"}
_KEYS = {"data": "data", "fsdp": "fsdp", "tensor": "tensor", "stage": "pipeline"}


def _plan(strategy, profile="h100-sxm", scan=False):
  ex = _gpt.gpt_linen("wide", "", _WIDE, 16, 32, scan_layers=scan)
  return wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile=profile,
    strategy=strategy,
    all_devices=True,
  )


def _three_axes():
  # No strategy asks for data x fsdp x model, and "auto" picks it only at scales too large for a
  # test; the hsdp family widened to tensor parallelism makes the planner build one.
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sweep._FAMILIES, "hsdp", ("many", "many", frozenset({"hsdp"})))
    return _plan("hsdp", _TWO_NODES, scan=True)


def _pipeline():
  ex = _gpt.gpt_linen("scan4", "", _gpt.GPTConfig(4, 64, 4, 256, 32), 16, 32, scan_layers=True)
  return wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=optax.sgd(0.1),
    devices=4,
    profile="titanxp-pcie",
    strategy="pp",
  )


_FAMILIES = {
  "dp": lambda: _plan("dp"),
  "zero1": lambda: _plan("zero1"),
  "fsdp": lambda: _plan("fsdp"),
  "tp": lambda: _plan("tp"),
  "dp_tp": lambda: _plan("dp_tp"),
  "hsdp": lambda: _plan("hsdp", _TWO_NODES, scan=True),
  "data_fsdp_model": _three_axes,
  "pp": _pipeline,
}


@pytest.fixture(scope="module")
def plans():
  return {}


def _get(plans, family):
  if family not in plans:
    plans[family] = _FAMILIES[family]()
  return plans[family]


def _norm(spec, rank):
  """Trailing Nones, 1-tuples and () as the same split, so equal specs compare equal."""
  out = []
  for e in tuple(spec) + (None,) * (rank - len(spec)):
    if isinstance(e, tuple):
      e = None if not e else e[0] if len(e) == 1 else e
    out.append(e)
  return tuple(out[:rank])


def _flat_axes(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {path_keys(p): names for p, names in leaves}


def _maxtext_spec(names, config):
  """MaxText's rule semantics on its parsed config: YAML lists are tuples, flax's
  `logical_to_mesh_axes` takes, in rule order, the first rule of a dim's name whose mesh axes
  the tensor does not use yet, then mesh axes of size 1 are dropped (`remove_size_one_mesh_axis`).
  Written out here rather than calling flax, so that the YAML is checked on its own terms."""
  sizes = {
    axis: config[f"ici_{key}_parallelism"] * config[f"dcn_{key}_parallelism"]
    for axis, key in _KEYS.items()
  }
  result: list = [None] * len(names)
  assigned = [False] * len(names)
  used: set = set()
  for logical, mesh in config["logical_axis_rules"]:
    axes = tuple(mesh) if isinstance(mesh, list) else (mesh,)
    if logical not in names:
      continue
    d = names.index(logical)
    if assigned[d] or used & set(axes):
      continue
    assigned[d], result[d] = True, axes
    used |= set(axes)
  spec = []
  for axes in result:
    kept = tuple(_FROM_MAXTEXT.get(a, a) for a in axes or () if sizes.get(a, 1) != 1)
    spec.append(kept or None)
  return P(*spec)


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_flax_rules_reproduce_every_spec(plans, family):
  plan = _get(plans, family)
  rules = plan.logical_axis_rules()
  assert len({name for name, _ in rules}) == len(rules)  # one rule per name
  for optimizer_state, want in [(False, plan.flat_param_specs), (True, plan.flat_opt_specs)]:
    axes = _flat_axes(plan.param_logical_axes(optimizer_state=optimizer_state))
    assert axes.keys() == want.keys()
    for path, names in axes.items():
      got = nn.logical_to_mesh_axes(names, rules)
      assert _norm(got, len(names)) == _norm(want[path], len(names)), path_str(path)
  for kind in ("params", "opt_state", "batch"):
    ok, total, differ = export.rules_reproduce(plan, kind=kind)
    assert (ok, differ) == (total, [])


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_maxtext_yaml_reproduces_every_spec(plans, family):
  plan = _get(plans, family)
  text = plan.to_maxtext_yaml()
  config = yaml.safe_load(text)
  for optimizer_state, want in [(False, plan.flat_param_specs), (True, plan.flat_opt_specs)]:
    axes = _flat_axes(plan.param_logical_axes(optimizer_state=optimizer_state))
    for path, names in axes.items():
      got = _maxtext_spec(names, config)
      assert _norm(got, len(names)) == _norm(want[path], len(names)), path_str(path)
  n = len(plan.flat_param_specs)
  assert f"reproduce {n} of {n} parameter specs" in text
  # The batch: data_sharding and the "batch" rule say the same, and match the batch specs.
  batch_axes = tuple(_FROM_MAXTEXT.get(a, a) for a in config["data_sharding"][0])
  for spec in plan.flat_batch_specs.values():
    assert _norm(P(batch_axes), 1) == _norm(spec, 1)
    assert _norm(_maxtext_spec(("batch",), config), 1) == _norm(spec, 1)
  # The mesh: every axis's ici x dcn is its size, and the product is the plan's device count.
  assert [_FROM_MAXTEXT.get(a, a) for a in config["mesh_axes"]] == list(plan.mesh_shape)
  total = 1
  for axis, key in _KEYS.items():
    size = config[f"ici_{key}_parallelism"] * config[f"dcn_{key}_parallelism"]
    assert size == plan.mesh_shape.get(_FROM_MAXTEXT.get(axis, axis), 1)
    total *= size
  assert total == plan.num_devices


def test_fsdp_gets_a_name_per_split(plans):
  # FSDP splits each large weight on its largest free dim and keeps biases whole: the mlp group
  # is split on data in the kernels and whole in mlp_in's bias, so it has two names; the split
  # covering the most elements keeps the plain one.
  plan = _get(plans, "fsdp")
  rules = dict(plan.logical_axis_rules())
  assert rules["mlp"] == "data" and rules["mlp_unsplit"] is None
  mlp_in = plan.param_logical_axes()["block_0"]["mlp_in"]
  assert mlp_in == {"kernel": ("embed", "mlp"), "bias": ("mlp_unsplit",)}
  assert plan.flat_param_specs[("block_0", "mlp_in", "kernel")] == P(None, "data")


def test_zero1_names_its_optimizer_state_apart(plans):
  plan = _get(plans, "zero1")
  params, state = plan.param_logical_axes(), plan.param_logical_axes(optimizer_state=True)
  assert params["block_0"]["mlp_in"]["kernel"] == ("embed", "mlp")
  assert state["block_0"]["mlp_in"]["kernel"] != params["block_0"]["mlp_in"]["kernel"]
  config = yaml.safe_load(plan.to_maxtext_yaml())
  assert config["shard_optimizer_over_data"] is True
  assert "shard_optimizer_over_data" not in yaml.safe_load(_get(plans, "dp").to_maxtext_yaml())


def test_multi_node_plans_put_the_crossing_axis_on_dcn(plans):
  for family, inside in [("hsdp", {"fsdp": 4}), ("data_fsdp_model", {"fsdp": 2, "tensor": 2})]:
    plan = _get(plans, family)
    config = yaml.safe_load(plan.to_maxtext_yaml())
    assert plan.chosen.cross_node_axes == ("data",)
    assert (config["dcn_data_parallelism"], config["ici_data_parallelism"]) == (2, 1)
    assert config["data_sharding"] == [["data", "fsdp"]]
    for axis, size in inside.items():
      assert config[f"ici_{axis}_parallelism"] == size
  three = _get(plans, "data_fsdp_model")
  assert dict(three.mesh_shape) == {"data": 2, "fsdp": 2, "model": 2}
  specs = set(three.flat_param_specs.values())
  assert any("fsdp" in s for s in specs) and any("model" in s for s in specs)


def test_pipeline_exports_its_stage_axis(plans):
  plan = _get(plans, "pp")
  config = yaml.safe_load(plan.to_maxtext_yaml())
  assert config["mesh_axes"][0] == "stage"
  assert config["ici_pipeline_parallelism"] * config["dcn_pipeline_parallelism"] == (
    plan.pipeline.stages
  )
  assert ["layers", ["stage"]] in config["logical_axis_rules"]


def test_rules_reproduce_counts_what_other_rules_miss(plans):
  plan = _get(plans, "fsdp")
  # One rule per group, as a hand-written list has: the biases FSDP keeps whole come out split.
  coarse = [(n, a) for n, a in plan.logical_axis_rules() if n != "mlp_unsplit"]
  coarse.append(("mlp_unsplit", "data"))
  ok, total, differ = export.rules_reproduce(plan, coarse)
  assert ok < total and "block_0/mlp_in/bias" in differ
  with pytest.raises(wap.errors.InvalidArgumentError, match="kind must be one of"):
    export.rules_reproduce(plan, kind="grads")


def test_a_group_twice_in_one_leaf_gets_a_second_name():
  # A square weight on a residual stream has the same group on both dims; flax refuses a name
  # twice in one array, so the second occurrence is named apart.
  params = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
  batch = jax.ShapeDtypeStruct((64, 256), jnp.float32)

  def loss_fn(p, x):
    return jnp.mean((x + x @ p["w"]) ** 2)

  plan = wap.plan(
    loss_fn, params, batch, optimizer=TX, devices=8, strategy="fsdp", all_devices=True
  )
  (leaf,) = plan.details.params
  assert leaf.dims[0] == leaf.dims[1]
  with pytest.raises(ValueError, match="more than once"):
    nn.logical_to_mesh_axes(leaf.dims, plan.logical_axis_rules())
  first, second = plan.param_logical_axes()["w"]
  assert first == leaf.dims[0] and second != first
  got = nn.logical_to_mesh_axes((first, second), plan.logical_axis_rules())
  assert _norm(got, 2) == _norm(plan.flat_param_specs[("w",)], 2) == ("data", None)
