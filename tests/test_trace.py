import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import sys

import jax
import jax.extend as jex
import jax.numpy as jnp
import optax
import pytest
from jax import lax

from wapar_jax import examples
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.step import make_train_step
from wapar_jax._src.trace import trace_jaxpr, trace_train_step
from wapar_jax._src.trace.dim_rules import RULES, DimLinks, dim_rules, register, reshape_links
from wapar_jax._src.trace.source import source_line
from wapar_jax.errors import NonScalarLossError

TX = optax.adamw(1e-3)


def _traced(name):
  ex = examples.get_example(name)
  traced, opt_state = trace_train_step(ex.loss_fn, ex.params, ex.batch, TX)
  return ex, traced, opt_state


def _xla_flops(ex, opt_state):
  step = jax.jit(make_train_step(ex.loss_fn, TX))
  analysis = step.lower(ex.params, opt_state, ex.batch).compile().cost_analysis()
  return analysis["flops"]


@pytest.mark.parametrize(
  "name",
  ["mlp", "gpt-tiny"]
  + [pytest.param(n, marks=pytest.mark.slow) for n in ("cnn", "plain", "gpt-tiny-nnx")],
)
def test_summed_flops_match_whole_program_within_1_percent(name):
  ex, traced, opt_state = _traced(name)
  ours = step_costs(traced, CostCache(persist=False)).total_flops
  assert ours == pytest.approx(_xla_flops(ex, opt_state), rel=0.01)


def test_scanned_layers_cost_trip_count_times_body():
  # XLA counts a scan body once; the unrolled model is the ground truth for trip counts.
  _, scanned, _ = _traced("gpt-tiny-scan")
  _, unrolled, _ = _traced("gpt-tiny")
  scanned_flops = step_costs(scanned, CostCache(persist=False)).total_flops
  unrolled_flops = step_costs(unrolled, CostCache(persist=False)).total_flops
  assert scanned_flops == pytest.approx(unrolled_flops, rel=0.01)
  assert max(op.multiplicity for op in scanned.ops) == 2


def test_while_and_cond_costs():
  def loss(p, b):
    def body(i, h):
      return jnp.tanh(h @ p["w"])

    h = lax.fori_loop(0, 5, body, b["x"])
    h = lax.cond(b["x"].sum() > 0, lambda h: h @ p["w"] @ p["w"], lambda h: h, h)
    return jnp.mean(h**2)

  params = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  batch = {"x": jax.ShapeDtypeStruct((16, 64), jnp.float32)}
  traced, _ = trace_train_step(loss, params, batch, optax.sgd(0.1))
  costs = step_costs(traced, CostCache(persist=False))
  dots = [op for op in traced.ops if op.primitive == "dot_general"]
  forward_matmul = 2 * 16 * 64 * 64
  # fori_loop with static bounds is scanned for grad: 5 forward + 10 backward matmuls, cond's
  # expensive branch 2 forward + 4 backward.
  total_dot = sum(costs.flops[op.index] for op in dots)
  assert total_dot == pytest.approx((15 + 6) * forward_matmul, rel=0.01)


def test_dimension_classes_follow_the_program_not_names():
  ex, traced, _ = _traced("gpt-tiny")
  params = jax.tree_util.tree_flatten_with_path(ex.params)[0]
  classes = {
    jax.tree_util.keystr(p): traced.var_classes[v] for (p, _), v in zip(params, traced.param_vars)
  }
  fc = [k for k in classes if "kernel" in k and ex.params is not None]
  # The batch dim of every batch leaf is one class.
  batch_classes = {traced.var_classes[v][0] for v in traced.batch_vars}
  assert len(batch_classes) == 1
  # Optimizer state leaves carry their parameter's classes.
  param_class_sets = set(classes.values())
  for v in traced.opt_state_vars:
    if traced.var_shape[v]:
      assert traced.var_classes[v] in param_class_sets
  assert fc


def test_reshape_links_keep_major_dims():
  assert reshape_links((8, 16, 64), (128, 64)) == ([(0, 0), (2, 1)], [1])
  assert reshape_links((4, 768), (4, 12, 64)) == ([(0, 0), (1, 1)], [])


def test_a_registered_rule_decides_a_new_primitives_classes():
  swap_p = jex.core.Primitive("wapar_test_swap")  # a made-up primitive: [A, B] -> [B, A]
  swap_p.def_abstract_eval(lambda x: x.update(shape=x.shape[::-1]))
  closed = jax.make_jaxpr(swap_p.bind)(jax.ShapeDtypeStruct((4, 8), jnp.float32))

  def classes():
    traced = trace_jaxpr(closed, 0, 0, 1, loss_output=0)
    (x,), (y,) = traced.batch_vars, traced.output_vars
    return traced.var_classes[x], traced.var_classes[y], traced.unknown_primitives

  x, y, unknown = classes()  # the fallback cannot line [4, 8] up with [8, 4]
  assert unknown == ("wapar_test_swap",) and not set(x) & set(y)

  @register("wapar_test_swap")
  def _swap(eqn, in_shapes, out_shapes):
    return DimLinks(links=((("i", 0, 0), ("o", 0, 1)), (("i", 0, 1), ("o", 0, 0))))

  try:
    x, y, unknown = classes()
    assert unknown == () and x == y[::-1]
    with pytest.raises(ValueError, match="already has a dim rule"):
      register("wapar_test_swap")(_swap)
  finally:
    del RULES["wapar_test_swap"]
  assert dim_rules(closed.jaxpr.eqns[0], [(4, 8)], [(8, 4)]).known is False


def test_every_registered_rule_names_a_jax_primitive():
  # `from jax import lax` above loaded the modules that define every lax primitive.
  primitives = {
    v.name
    for m in list(sys.modules.values())
    if m and m.__name__.startswith("jax")
    for v in list(vars(m).values())
    if isinstance(v, jex.core.Primitive)
  }
  assert {"dot_general", "scatter-add", "sharding_constraint"} <= primitives
  assert sorted(set(RULES) - primitives) == []  # a typo'd name would never match an equation


def test_non_scalar_loss_is_a_named_error():
  params = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  batch = {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
  with pytest.raises(NonScalarLossError, match=r"shape \(8, 4\)"):
    trace_train_step(lambda p, b: b["x"] @ p["w"], params, batch, TX)


def test_remat_inside_scan_counts_the_recomputation():
  def layer(h, w):
    return jnp.tanh(h @ w), None

  def loss(remat):
    def fn(p, b):
      body = jax.checkpoint(layer) if remat else layer
      h, _ = lax.scan(body, b["x"], p["w"])
      return jnp.mean(h**2)

    return fn

  params = {"w": jax.ShapeDtypeStruct((4, 64, 64), jnp.float32)}
  batch = {"x": jax.ShapeDtypeStruct((32, 64), jnp.float32)}
  plain, _ = trace_train_step(loss(False), params, batch, optax.sgd(0.1))
  remat, _ = trace_train_step(loss(True), params, batch, optax.sgd(0.1))

  def dot_flops(traced):
    costs = step_costs(traced, CostCache(persist=False))
    return sum(costs.flops[op.index] for op in traced.ops if op.primitive == "dot_general")

  matmul = 2 * 32 * 64 * 64
  assert dot_flops(plain) == pytest.approx(4 * 3 * matmul)  # forward, dx, dW per layer
  assert dot_flops(remat) == pytest.approx(4 * 4 * matmul)  # plus the recomputed forward


def test_closed_over_constants_and_top_k_on_a_leading_axis_trace():
  import numpy as np

  import wapar_jax as wap

  mask = jnp.asarray(
    np.tril(np.ones((16, 16), np.float32))
  )  # a concrete array the loss closes over

  def loss_fn(params, batch):
    h = batch["x"] @ params["w"] @ mask  # [B, 16]
    # top_k over the feature axis, written as the leading axis of the transpose: the batch
    # axis (now last) must stay free to shard.
    top, _ = lax.top_k(h.T, 4, axis=0)  # [4, B]
    return jnp.mean(top**2)

  params = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}
  batch = {"x": jax.ShapeDtypeStruct((32, 8), jnp.float32)}
  traced, _ = trace_train_step(loss_fn, params, batch, TX)
  assert not traced.unknown_primitives
  top_k = next(op for op in traced.ops if op.primitive == "top_k")
  batch_class = traced.var_classes[traced.batch_vars[0]][0]
  assert traced.var_classes[top_k.out_vars[0]][1] == batch_class
  plan = wap.plan(
    loss_fn, params, batch, optimizer=TX, devices=8, profile="cpu", strategy="dp", all_devices=True
  )
  assert plan.mesh_shape == {"data": 8}
  assert plan.batch_specs["x"] == jax.sharding.PartitionSpec("data", None)


def test_rev_needs_only_the_dims_it_reverses_whole():
  # The gradient of a convolution flips the kernel's spatial dims; its channels keep their split.
  def loss_fn(params, batch):
    kernel = lax.rev(params["k"], (0, 1))
    return jnp.mean((batch["x"] @ kernel.reshape(-1, 8)) ** 2)

  params = {"k": jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)}
  batch = {"x": jax.ShapeDtypeStruct((16, 36), jnp.float32)}
  traced, _ = trace_train_step(loss_fn, params, batch, TX)
  rev = next(op for op in traced.ops if op.primitive == "rev")
  (source,), (result,) = [v for v in rev.in_vars if v >= 0], rev.out_vars
  assert [d for _, d in rev.gather_dims] == [0, 1]
  for d in (2, 3):
    assert traced.var_classes[source][d] == traced.var_classes[result][d]


def test_source_names_the_model_line_not_an_installed_library(tmp_path, monkeypatch):
  # A layer from an installed library (as flax is in a virtualenv): the hot spot should name
  # the researcher's line that called it.
  lib = tmp_path / "site-packages"
  lib.mkdir()
  (lib / "fake_layers.py").write_text(
    "import jax.numpy as jnp\n\ndef dense(w, x):\n  return jnp.tanh(x @ w)\n"
  )
  monkeypatch.syspath_prepend(str(lib))
  import fake_layers

  def loss_fn(params, batch):
    return fake_layers.dense(params["w"], batch["x"]).sum()

  jaxpr = jax.make_jaxpr(loss_fn)({"w": jnp.ones((4, 4))}, {"x": jnp.ones((2, 4))})
  dot = next(e for e in jaxpr.eqns if e.primitive.name == "dot_general")
  assert source_line(dot).startswith(f"{__file__}:")
  assert source_line(dot).endswith(".loss_fn)")
