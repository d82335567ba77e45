"""Sequence parallelism with tensor parallelism (Megatron-SP): the activations outside the
tensor-parallel regions split on the sequence over the model axis, found from dimension classes.
Every sharded result is checked against the single-device step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import compilers, verify
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.emit import sequence
from wapar_jax._src.emit.shardings import opt_state_specs
from wapar_jax._src.emit.step import sharded_train_step
from wapar_jax._src.search import build_space
from wapar_jax._src.search.aggregates import aggregate
from wapar_jax._src.search.sweep import sequence_choices
from wapar_jax._src.step import loss_and_grads, make_train_step
from wapar_jax._src.trace import trace_train_step
from wapar_jax._src.tree import abstract, leaf_paths, path_str
from wapar_jax.examples import _gpt

TX = optax.adamw(1e-3)
PROFILE = wap.load_profile("h100-sxm")
TP = 4
# 8 heads and a 4x MLP split 4 ways; the position table (64 rows) is longer than the sequence
# (32), so its rows are not the sequence's class.
CFG = _gpt.GPTConfig(2, 128, 8, 256, 64, jnp.float32)


@pytest.fixture(scope="module")
def gpt():
  return _gpt.gpt_linen("sp-gpt", "", CFG, 8, 32)


def _megatron_specs(params):
  """Tensor parallelism as Megatron-LM writes it: q / k / v and the MLP's first matmul split on
  their outputs, the attention and MLP output projections on their inputs."""

  def spec(path, x):
    layer, name = (getattr(k, "key", None) for k in path[-2:])
    if layer in ("query", "key", "value", "mlp_in"):
      return P(None, "model") if name == "kernel" else P("model")
    if layer in ("attn_out", "mlp_out") and name == "kernel":
      return P("model", None)
    return P(*[None] * x.ndim)

  return jax.tree_util.tree_map_with_path(spec, params)


def _megatron_inputs(ex):
  """Real params and batch, the mesh, Megatron's specs, the batch's and a NamedSharding maker."""
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  mesh = _mesh()
  named = lambda t: jax.tree.map(
    lambda s: NamedSharding(mesh, s), t, is_leaf=lambda x: isinstance(x, P)
  )
  batch_specs = jax.tree.map(lambda x: P(None, None), batch)
  return params, batch, mesh, _megatron_specs(params), batch_specs, named


def _mesh():
  return Mesh(np.array(jax.devices()[:TP]), ("model",), axis_types=(AxisType.Auto,))


def _step(ex, mesh, sequence_parallel, remat="none"):
  params = abstract(ex.params)
  specs = _megatron_specs(params)
  batch_specs = jax.tree.map(lambda x: P(None, None), ex.batch)
  return sharded_train_step(
    ex.loss_fn,
    TX,
    mesh,
    specs,
    opt_state_specs(TX, params, specs),
    batch_specs,
    planned_batch=ex.batch,
    remat=remat,
    sequence_parallel=sequence_parallel,
  )


def _assert_three_steps_match(ex, plan):
  """Three steps of the plan's step against the single-device step on the same inputs."""
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  ref_step = jax.jit(make_train_step(ex.loss_fn, TX))
  step = plan.train_step()
  p = plan.shard(params)
  o, ref_p, ref_o = plan.init_opt_state(p), params, TX.init(params)
  for _ in range(3):
    p, o, loss = step(p, o, plan.shard_batch(batch))
    ref_p, ref_o, ref_loss = ref_step(ref_p, ref_o, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)


def _compiled(step, ex, mesh_shape):
  params = abstract(ex.params)
  lowered = step.lower(params, abstract(jax.eval_shape(TX.init, params)), abstract(ex.batch))
  return verify.read_compiled(verify.compile_like_target(lowered), mesh_shape, PROFILE)


def test_the_residual_stream_is_split_on_the_sequence_and_the_regions_on_their_own_dims(gpt):
  specs = jax.tree.leaves(_megatron_specs(gpt.params), is_leaf=lambda x: isinstance(x, P))
  batch_specs = [P(None, None)] * 2
  closed = jax.make_jaxpr(gpt.loss_fn)(abstract(gpt.params), abstract(gpt.batch))
  split = sequence.sequence_specs(closed, specs, batch_specs, 0, TP)
  eqns = {id(e): e for e in closed.jaxpr.eqns}
  constrained = {(eqns[k].outvars[0].aval.shape, s) for k, s in split.items() if k in eqns}
  # Split on dim 1 (T = 32).
  on_sequence = {shape for shape, s in constrained if shape[1] == 32 and s[1] == "model"}
  # The residual stream [B, T, D] (adds, norms, the embedding) and the logits [B, T, V].
  assert {(8, 32, 128), (8, 32, 256)} <= on_sequence
  # Inside the regions (the MLP hidden [B, T, 4D], heads [B, T, H, Dh]): their own split.
  assert ((8, 32, 512), P(None, None, "model")) in constrained
  assert ((8, 32, 8, 16), P(None, None, "model", None)) in constrained
  # The attention scores [B, H, T, T] are left to XLA, which splits them on the heads.
  assert not any(shape == (8, 8, 32, 32) for shape, _ in constrained)
  assert not any(512 in shape or len(shape) == 4 for shape in on_sequence)


def test_sequence_parallel_gives_the_single_device_loss_and_gradients(gpt):
  params, batch, mesh, specs, batch_specs, named = _megatron_inputs(gpt)
  split_loss = sequence.sequence_split(gpt.loss_fn, mesh, specs, batch_specs)
  ref_loss, ref_grads = jax.jit(loss_and_grads(gpt.loss_fn))(params, batch)
  loss, grads = jax.jit(loss_and_grads(split_loss))(
    jax.device_put(params, named(specs)), jax.device_put(batch, named(batch_specs))
  )
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.slow
def test_three_steps_of_the_emitted_megatron_sp_step_match_plain_jax_jit(gpt):
  params, batch, mesh, specs, batch_specs, named = _megatron_inputs(gpt)

  # The single-device step written by hand with jax.jit and optax.
  def ref(p, o, b):
    loss, g = jax.value_and_grad(gpt.loss_fn)(p, b)
    updates, o = TX.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  ref_step = jax.jit(ref)
  step = _step(gpt, mesh, sequence_parallel=True)
  # Host copies: a replicated leaf put on device 0 could alias the reference's buffer, which
  # the step donates.
  host = lambda t: jax.tree.map(np.asarray, t)
  p = jax.device_put(host(params), named(specs))
  o = jax.device_put(host(TX.init(params)), step._shardings[1])
  ref_p, ref_o = params, TX.init(params)
  for _ in range(3):
    p, o, loss = step(p, o, jax.device_put(batch, named(batch_specs)))
    ref_p, ref_o, ref_loss = ref_step(ref_p, ref_o, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)


@pytest.mark.slow
def test_sequence_parallel_lowers_the_compiled_peak_with_gathers_into_the_regions(gpt):
  mesh = _mesh()
  tp = _compiled(_step(gpt, mesh, False), gpt, {"model": TP})
  sp = _compiled(_step(gpt, mesh, True), gpt, {"model": TP})
  assert sp.figures.peak_memory < 0.95 * tp.figures.peak_memory
  # TP alone all-reduces each region's output; with SP each region is entered by an all-gather
  # (XLA:CPU leaves its reduce-scatters as all-reduces read only as each device's slice).
  assert "all-gather" not in {c.kind for c in tp.collectives}
  gathers = [c for c in sp.collectives if c.kind == "all-gather" and c.axes == ("model",)]
  assert sum(c.count for c in gathers) >= 2 * CFG.n_layer


@pytest.mark.slow
def test_a_planned_sequence_parallel_step_matches_the_single_device_run():
  # Wide and long enough that TP on 4 devices splits the heads and the MLP with SP, where
  # TP alone splits only the MLP (checked below): a searched choice, not a forced one.
  cfg = _gpt.GPTConfig(2, 256, 8, 256, 256, jnp.float32)
  ex = _gpt.gpt_linen("sp-gpt-wide", "", cfg, 8, 128)
  plan_for = lambda sp: wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=TP,
    all_devices=True,
    strategy="tp",
    sequence_parallel=sp,
    profile=PROFILE,
  )
  plan, alone = plan_for(None), plan_for(False)
  assert plan.chosen.sequence_parallel and plan.strategy == "tp+sp"
  assert plan.predicted.peak_memory < alone.predicted.peak_memory
  assert not alone.chosen.sequence_parallel and alone.strategy == "tp"
  assert "sequence parallel" in plan.explain()
  assert wap.Plan.from_json(plan.to_json()).chosen == plan.chosen
  _assert_three_steps_match(ex, plan)
  # Your own loop: plan.value_and_grad lays the loss out as the emitted step does, SP included.
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  ref_loss, ref_grads = jax.jit(loss_and_grads(ex.loss_fn))(params, batch)
  loss, grads = jax.jit(plan.value_and_grad(ex.loss_fn))(
    plan.shard(params), plan.shard_batch(batch)
  )
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-6 * scale)
  traced = lambda p: str(jax.make_jaxpr(p.value_and_grad(ex.loss_fn))(ex.params, ex.batch))
  assert "sharding_constraint" in traced(plan) and "sharding_constraint" not in traced(alone)


@pytest.mark.slow
def test_sequence_parallel_with_a_data_axis_matches_the_single_device_run():
  # dp_tp+sp: the batch dim of each constrained activation keeps the batch's split.
  cfg = _gpt.GPTConfig(2, 256, 8, 256, 256, jnp.float32)
  ex = _gpt.gpt_linen("sp-gpt-dp", "", cfg, 8, 128)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    all_devices=True,
    strategy="dp_tp",
    sequence_parallel=True,
    profile=PROFILE,
  )
  assert plan.strategy == "dp_tp+sp" and plan.chosen.data > 1 and plan.chosen.model > 1
  _assert_three_steps_match(ex, plan)


@pytest.mark.slow
def test_sequence_parallel_inside_a_scan_over_layers_matches_the_single_device_run():
  # nn.scan: the layer's equations are a scan body, constrained there too.
  cfg = _gpt.GPTConfig(2, 256, 8, 256, 256, jnp.float32)
  ex = _gpt.gpt_linen("sp-gpt-scan", "", cfg, 8, 128, scan_layers=True)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=TP,
    all_devices=True,
    strategy="tp",
    sequence_parallel=True,
    profile=PROFILE,
    memory_rules="xla:cpu",
  )
  assert plan.strategy == "tp+sp"
  v = plan.verify()
  assert v.compiled.peak_memory == pytest.approx(v.predicted.peak_memory, rel=0.15)
  assert v.compiled.flops == pytest.approx(v.predicted.flops, rel=0.03)
  assert v.comm_bytes_scattered == pytest.approx(v.predicted.comm_bytes, rel=0.10)
  _assert_three_steps_match(ex, plan)


def test_sequence_parallelism_needs_a_degree_dividing_the_sequence_and_the_heads_split(gpt):
  space = _space(gpt)
  assert space.sequence_size == 32
  # The heads' group holds every attention score tensor [B, H, T, T]; the MLP's holds none.
  heads = next(g for g in range(len(space.groups)) if space.sequence_pairs[:, g].all())
  mlp = next(g.index for g in space.groups if g.size == 4 * CFG.d_model)
  assert sequence_choices(space, 1, (), None) == (False,)
  assert sequence_choices(space, 3, (heads,), None) == (False,)  # 3 does not divide T = 32
  assert sequence_choices(space, 4, (heads, mlp), None) == (False, True)
  assert sequence_choices(space, 4, (heads, mlp), True) == (True,)
  assert sequence_choices(space, 4, (heads, mlp), False) == (False,)
  # The attention outside the regions would need every key of the split sequence.
  assert sequence_choices(space, 4, (mlp,), None) == (False,)
  assert sequence_choices(space, 4, (mlp,), True) == ()  # forced: not priced there
  assert sequence_choices(space, 1, (), True) == (False,)


def test_an_mlp_has_no_sequence_its_input_features_are_a_weight_dim():
  space = _space(examples.get_example("mlp"))
  assert space.sequence_size == 0 and not space.var_sequence.any()
  assert sequence_choices(space, 2, (0,), None) == (False,)


def _space(ex, remat="none"):
  traced, _ = trace_train_step(ex.loss_fn, ex.params, ex.batch, TX, remat=remat)
  costs = step_costs(traced, CostCache(persist=False))
  paths = [path_str(k) for k in leaf_paths(ex.params)]
  return build_space(traced, costs, paths, rules=compilers.REGISTRY["xla:cpu"], remat=remat)


@pytest.mark.parametrize("remat", ["none", "layers", "layers_dots"])
def test_region_entry_gathers_are_counted_as_compiled_under_remat(gpt, remat):
  # Per layer: each region's input gathered forward (and again where remat recomputes it), and
  # each region output's cotangent backward; the barrier that orders each layer's recompute
  # passes split residuals and cotangents through and gathers none of them.
  space = _space(gpt, remat)
  heads = next(g for g in range(len(space.groups)) if space.sequence_pairs[:, g].all())
  mlp = next(g.index for g in space.groups if g.size == 4 * CFG.d_model)
  ops = np.zeros(len(space.traced.ops))
  agg = aggregate(space, (heads, mlp), ops, sequence_parallel=True)
  compiled = _compiled(_step(gpt, _mesh(), True, remat), gpt, {"model": TP})
  gathers = [c for c in compiled.collectives if c.kind == "all-gather" and c.axes == ("model",)]
  count = sum(c.count for c in gathers)
  assert count == (4 if remat == "none" else 6) * CFG.n_layer
  assert agg.sequence_gathers_n == count
  assert agg.sequence_gathers == sum(c.nbytes * c.count for c in gathers)


def test_the_command_line_forces_it(capsys):
  from wapar_jax.cli import main

  args = ["plan", "gpt-tiny", "--devices", "4", "--all-devices", "--strategy", "tp"]
  assert main([*args, "--sequence-parallel", "on", "--seq-len", "16", "--json"]) == 0
  chosen = json.loads(capsys.readouterr().out)["chosen"]
  # gpt-tiny's 4 heads split 4 ways hold its attention scores: SP is possible and forced.
  assert chosen["sequence_parallel"] and chosen["strategy"] == "tp+sp"


def test_plan_refuses_a_sequence_parallel_that_is_not_a_choice(gpt):
  with pytest.raises(wap.errors.InvalidArgumentError, match="sequence_parallel"):
    wap.plan(gpt.loss_fn, gpt.params, gpt.batch, optimizer=TX, sequence_parallel="yes")


def test_logits_split_on_the_vocabulary_are_resharded_where_the_labels_gather_them(gpt):
  space = _space(gpt)
  vocab = next(g.index for g in space.groups if g.size == CFG.vocab)
  heads = next(g for g in range(len(space.groups)) if space.sequence_pairs[:, g].all())
  op_seconds = np.zeros(len(space.traced.ops))
  # The logits [B, T, V] at the labels, forward, and their cotangent's scatter-add, backward.
  logits = 8 * 32 * CFG.vocab * 4
  with_vocab = aggregate(space, (heads, vocab), op_seconds, sequence_parallel=True)
  assert (with_vocab.sequence_reshards, with_vocab.sequence_reshards_n) == (2 * logits, 2)
  assert aggregate(space, (heads,), op_seconds, sequence_parallel=True).sequence_reshards == 0
  assert aggregate(space, (heads, vocab), op_seconds).sequence_reshards == 0
