"""plan.explain / _repr_html_, plots, rule export and the `wapar explain` command."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json
import types
import warnings

import jax
import jax.numpy as jnp
import matplotlib
import optax
import pytest
import yaml
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples

matplotlib.use("Agg")
TX = optax.adamw(1e-3)


@pytest.fixture(scope="module")
def tp_plan():
  ex = examples.get_example("gpt-tiny")
  return wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy="dp_tp",
    all_devices=True,
  )


@pytest.fixture(scope="module")
def alexnet_plan():
  ex = examples.get_example("alexnet", batch_size=4)
  return wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=optax.sgd(0.01),
    devices=4,
    profile="titanxp-pcie",
    strategy="dp",
  )


def test_explain_tells_why(alexnet_plan):
  text = alexnet_plan.explain()
  assert text.startswith("mesh {'data': 1}: 1 of 4 titanxp-pcie devices")
  assert "more devices do not pay" in text
  for section in (
    "predicted step, per device",
    "memory per device",
    "parameter groups",
    "logical axes",
    "top alternatives",
    "largest costs by equation",
  ):
    assert section in text
  assert "dominated by" in text
  # Hot spots point at the model's source lines.
  assert "_imagenet.py:" in text and "conv_general_dilated" in text
  html = alexnet_plan._repr_html_()
  assert html.startswith('<div class="wapar-plan">') and "<table>" in html


def test_parameter_groups_fold_repeated_layers(tp_plan):
  text = tp_plan.explain()
  assert "2 x block_*/mlp_in/kernel" in text
  assert "P(None, 'model')" in text


def test_hotspots_add_up_to_compute(tp_plan):
  d = tp_plan.details
  total = d.compute_bound_seconds + d.memory_bound_seconds
  assert total == pytest.approx(tp_plan.predicted.compute_time, rel=1e-6)
  seconds = [h.seconds for h in d.hotspots]
  assert seconds == sorted(seconds, reverse=True)
  assert {h.primitive for h in d.hotspots} >= {"dot_general"}
  names = dict(d.memory)
  assert sum(names.values()) == pytest.approx(tp_plan.predicted.peak_memory, rel=1e-6)


def test_logical_axis_rules_reproduce_the_plan_under_flax(tp_plan):
  rules = tp_plan.logical_axis_rules()
  assert rules[0] == ("batch", "data")
  names = {n for n, _ in rules}
  assert {"embed", "mlp", "heads"} <= names
  assert ("mlp", "model") in rules and ("heads", "model") in rules
  axes = tp_plan.param_logical_axes()
  assert axes["block_0"]["mlp_in"]["kernel"] == ("embed", "mlp")
  reproduced = 0
  for leaf in tp_plan.details.params:
    spec = nn.logical_to_mesh_axes(leaf.dims, rules)
    want = tp_plan.flat_param_specs[leaf.path]
    reproduced += tuple(spec) == tuple(want) + (None,) * (len(leaf.dims) - len(want))
  assert reproduced == len(tp_plan.details.params)


def test_maxtext_yaml(tp_plan):
  text = tp_plan.to_maxtext_yaml()
  config = yaml.safe_load(text)
  # MaxText's names: the model axis is its tensor axis.
  assert config["mesh_axes"] == ["data", "tensor"]
  assert config["data_sharding"] == [["data"]]
  assert ["mlp", ["tensor"]] in config["logical_axis_rules"]
  rename = {"model": "tensor"}
  assert [tuple(r) for r in config["logical_axis_rules"]] == [
    (name, [] if axis is None else [rename.get(axis, axis)])
    for name, axis in tp_plan.logical_axis_rules()
  ]
  sizes = dict(tp_plan.mesh_shape)
  assert config["ici_data_parallelism"] == sizes["data"]
  assert config["ici_tensor_parallelism"] == sizes["model"]
  assert config["dcn_data_parallelism"] == config["dcn_tensor_parallelism"] == 1
  assert "reproduce 36 of 36" in text


def test_plots_are_figures(alexnet_plan, tp_plan):
  from matplotlib.figure import Figure

  assert isinstance(alexnet_plan.plot_sweep(), Figure)
  assert isinstance(tp_plan.plot_breakdown(), Figure)
  fig = tp_plan.plot_layout("block_0/mlp_in/kernel")
  texts = [t.get_text() for t in fig.axes[0].texts]
  assert sorted(texts) == ["devices\n0, 2, 4, 6", "devices\n1, 3, 5, 7"]
  with pytest.raises(wap.errors.InvalidArgumentError, match="no parameter"):
    tp_plan.plot_layout("nope")


def test_device_blocks():
  from wapar_jax._src.views.plots import device_blocks

  dims, axes, blocks = device_blocks((8, 4), P("data", "model"), {"data": 2, "model": 2})
  assert dims == [0, 1] and axes == ["data", "model"]
  assert blocks == {(0, 0): [0], (0, 1): [1], (1, 0): [2], (1, 1): [3]}


def test_loaded_plan_explains_and_exports(tp_plan, tmp_path):
  path = tmp_path / "plan.json"
  tp_plan.save(path)
  loaded = wap.Plan.load(path)
  assert loaded == tp_plan
  assert loaded.explain() == tp_plan.explain()
  assert loaded.logical_axis_rules() == tp_plan.logical_axis_rules()
  assert loaded.param_logical_axes()["block_0"]["mlp_in"]["kernel"] == ("embed", "mlp")


def test_cli_explain(tmp_path, capsys):
  from wapar_jax.cli import main

  path = tmp_path / "plan.json"
  assert main(["plan", "mlp", "--devices", "4", "--profile", "cpu", "--out", str(path)]) == 0
  capsys.readouterr()
  assert main(["explain", "--plan", str(path)]) == 0
  assert "largest costs by equation" in capsys.readouterr().out
  assert main(["explain", "--plan", str(path), "--maxtext"]) == 0
  assert capsys.readouterr().out.startswith("# wapar_jax plan")
  assert main(["explain", "--plan", str(path), "--rules"]) == 0
  assert capsys.readouterr().out.startswith("('batch', ")
  assert main(["explain", "mlp", "--devices", "4", "--json", "--progress"]) == 0
  out = capsys.readouterr()
  assert json.loads(out.out)["logical_axis_rules"][0][0] == "batch"
  assert "cost analysis" not in out.err  # no bars with --json
  assert (
    main(["explain", "mlp", "--devices", "2", "--progress", "--plots", str(tmp_path / "figs")]) == 0
  )
  assert "cost analysis" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path / "figs")) == ["breakdown.png", "layout.png", "sweep.png"]
  assert main(["explain"]) == 2
  assert "--plan FILE" in capsys.readouterr().err


def test_cli_profiles_show_and_help(capsys):
  from wapar_jax.cli import main

  assert main(["profiles", "show", "titanxp-pcie"]) == 0
  assert json.loads(capsys.readouterr().out)["name"] == "titanxp-pcie"
  assert main(["profiles", "cpu"]) == 0
  assert json.loads(capsys.readouterr().out)["name"] == "cpu"
  for command in (["explain", "--help"], ["profiles", "--help"]):
    with pytest.raises(SystemExit):
      main(command)
    assert "examples:" in capsys.readouterr().out


class _DropoutMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dropout(0.1, deterministic=False)(nn.Dense(512)(x))
    return nn.Dense(256)(x)


def _bernoulli_loss(params, batch):
  x = batch["x"] @ params["w"]
  keep = jax.random.bernoulli(jax.random.key(0), 0.9, x.shape)
  return jnp.mean(jnp.where(keep, x / 0.9, 0.0) ** 2)


def _linen_dropout_workload():
  model = _DropoutMLP()
  x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros(x.shape)))

  def loss_fn(params, batch):
    y = model.apply(params, batch["x"], rngs={"dropout": jax.random.key(0)})
    return jnp.mean(y**2)

  return loss_fn, params, {"x": x}


@pytest.mark.parametrize("kind", ["bernoulli", "linen"])
def test_dropout_hotspots_name_the_model_line_and_plan_without_warnings(kind):
  if kind == "bernoulli":
    loss_fn, batch = _bernoulli_loss, {"x": jax.ShapeDtypeStruct((64, 256), jnp.float32)}
    params = {"w": jax.ShapeDtypeStruct((256, 512), jnp.float32)}
  else:
    loss_fn, params, batch = _linen_dropout_workload()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # "no sharding rule for bitcast_convert_type" would raise
    plan = wap.plan(loss_fn, params, batch, optimizer=TX, devices=4, profile="h100-sxm")
  hot = plan.details.hotspots
  assert plan.details.unknown_primitives == ()
  assert all(h.source != "?" for h in hot), [h for h in hot if h.source == "?"]
  # random_bits runs inside jax.random's jit: its line is the model's call of dropout.
  bits = next(h for h in hot if h.primitive == "random_bits")
  assert bits.source.startswith(f"{__file__}:"), bits.source
  caller = "_bernoulli_loss" if kind == "bernoulli" else "_DropoutMLP.__call__"
  assert bits.source.endswith(f"({caller})")


@pytest.mark.parametrize(
  ("in_shape", "out_shape", "whole"),
  [((64, 8), (64, 8), ()), ((64, 8), (64, 8, 4), ()), ((64, 8, 4), (64, 8), ((0, 2),))],
)
def test_bitcast_keeps_leading_dims(in_shape, out_shape, whole):
  from wapar_jax._src.trace.dim_rules import dim_rules

  eqn = types.SimpleNamespace(primitive=types.SimpleNamespace(name="bitcast_convert_type"))
  links = dim_rules(eqn, [in_shape], [out_shape])
  assert links.known and links.gather_dims == whole
  assert links.links == tuple(((("i", 0, d), ("o", 0, d))) for d in range(2))


@pytest.fixture(scope="module")
def mlp_plan():
  ex = examples.get_example("mlp")
  return wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=TX, devices=8, profile="h100-sxm")


def test_explain_says_why_device_counts_are_missing(mlp_plan, tp_plan):
  assert sorted({c.devices for c in mlp_plan.candidates}) == [1, 2, 4, 5, 8]
  assert (
    "no plan on 3, 6, 7 devices: a count is used only as data x model, the data degree dividing "
    "the batch (32)" in mlp_plan.explain()
  )
  assert "no plan on" not in tp_plan.explain()  # all_devices: no other count was asked for


def test_sweep_plot_breaks_lines_at_missing_counts_and_keeps_its_legend_off_the_axes(mlp_plan):
  fig = mlp_plan.plot_sweep()
  fig.canvas.draw()
  skipped = {3, 6, 7}
  for ax in fig.axes:
    assert ax.get_legend() is None
    for line in ax.get_lines():
      xs = list(line.get_xdata())
      if line.get_linestyle() in ("-", "--") and len(xs) > 1 and xs[0] != xs[1]:
        for a, b in zip(xs, xs[1:]):
          assert not any(a < s < b for s in skipped), (line.get_label(), xs)
  (legend,) = fig.legends
  assert {t.get_text() for t in legend.get_texts()} >= {"step time", "energy per sample"}
  box = legend.get_window_extent()
  assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
  assert "no plan on 3, 6, 7 devices" in fig.get_supxlabel().replace("\n", " ")


def test_breakdown_labels_tell_every_bar_apart(mlp_plan, tp_plan):
  for plan in (mlp_plan, tp_plan):
    labels = [t.get_text() for t in plan.plot_breakdown().axes[0].get_xticklabels()]
    assert len(labels) == min(12, len(plan.candidates)) and len(set(labels)) == len(labels)
