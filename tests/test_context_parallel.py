"""Context parallelism: attention read from the program, priced, emitted and checked against the
single device."""

import jax
import numpy as np
import optax
import pytest
import yaml
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import compilers, verify
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.search import build_space, sweep
from wapar_jax._src.search.context import context_terms
from wapar_jax._src.step import loss_and_grads, make_train_step
from wapar_jax._src.trace import trace_train_step
from wapar_jax._src.trace.context import find_attention
from wapar_jax._src.tree import abstract, leaf_paths, path_str

TX = optax.adamw(1e-3)
PROFILE = wap.load_profile("h100-sxm")
# gpt-tiny (2 layers, 4 heads of 16) on 2 sequences of 64 tokens: fewer rows than devices.
B, T, LAYERS, HEADS, HEAD_DIM = 2, 64, 2, 4, 16
KV_BYTES = B * T * HEADS * HEAD_DIM * 4  # one layer's keys (or values), unsharded


def _example(name="gpt-tiny"):
  return examples.get_example(name, batch_size=B, seq_len=T)


def _space(ex):
  traced, _ = trace_train_step(ex.loss_fn, ex.params, ex.batch, TX)
  paths = [path_str(k) for k in leaf_paths(ex.params)]
  return build_space(traced, step_costs(traced, CostCache()), paths, rules=compilers.XLA_GPU)


def _plan(ex, all_devices=True, **kw):
  return wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    all_devices=all_devices,
    strategy="cp",
    profile=PROFILE,
    remat="none",
    microbatches=1,
    **kw,
  )


def test_keys_and_values_are_found_as_attention_reads_them_whole():
  ex = _example()
  traced, _ = trace_train_step(ex.loss_fn, ex.params, ex.batch, TX)
  attention = find_attention(traced)
  assert attention.size == T
  # Each layer's keys and values, as made ([B, T, H, Dh]), and their cotangents' partial sums.
  assert len(attention.gathered) == 2 * LAYERS and not attention.reused
  assert {traced.var_shape[v] for v in attention.gathered} == {(B, T, HEADS, HEAD_DIM)}
  assert len(attention.scattered) == 2 * LAYERS
  scan = _example("gpt-tiny-scan")
  traced, _ = trace_train_step(scan.loss_fn, scan.params, scan.batch, TX)
  attention = find_attention(traced)
  # Made once in the layer loop's body; the stacks kept for the backward loop hold them whole.
  assert len(attention.gathered) == 2 and attention.reused
  mlp = examples.get_example("mlp")
  assert not find_attention(trace_train_step(mlp.loss_fn, mlp.params, mlp.batch, TX)[0]).gathered


def test_each_layer_gathers_its_keys_and_values_and_scatters_their_gradients():
  terms = context_terms(_space(_example()))
  assert (terms.gathers, terms.scatters) == (2 * LAYERS, 2 * LAYERS)
  assert terms.gathered_bytes == terms.scattered_bytes == 2 * LAYERS * KV_BYTES


def test_context_candidates_split_a_micro_batch_beyond_its_rows():
  plan = _plan(_example(), all_devices=False)
  cp = [c for c in plan.candidates if c.context > 1]
  layouts = {(c.devices, c.data // c.context, c.context) for c in cp}
  assert layouts == {(d, d // k, k) for d in (2, 4, 8) for k in (2, 4, 8) if k <= d and d // k <= B}
  # "auto" only where the rows do not split over every device: elsewhere DP is cheaper.
  auto = sweep.search(_space(_example()), PROFILE, 8)
  assert {c.devices for c in auto if c.context > 1} == {4, 8}
  assert all(c.mesh_shape == {"data": c.data // c.context, "context": c.context} for c in cp)
  with pytest.raises(wap.errors.InvalidArgumentError, match="has none"):
    mlp = examples.get_example("mlp")
    wap.plan(mlp.loss_fn, mlp.params, mlp.batch, optimizer=TX, devices=8, strategy="cp")


def _compiled(step, ex, mesh_shape):
  params = abstract(ex.params)
  lowered = step.lower(params, abstract(jax.eval_shape(TX.init, params)), abstract(ex.batch))
  return verify.read_compiled(verify.compile_like_target(lowered), mesh_shape, PROFILE)


def test_the_emitted_step_gathers_keys_and_values_over_the_context_axis_only():
  ex = _example()
  plan = _plan(ex)
  data, context = plan.mesh_shape["data"], plan.mesh_shape["context"]
  assert plan.batch_specs["inputs"] == P("data", "context")
  found = _compiled(plan.train_step(), ex, plan.mesh_shape).collectives
  on_context = [c for c in found if c.axes == ("context",)]
  kv = KV_BYTES / data  # a device's keys of one layer, gathered whole on the sequence
  kv_shape = f"f32[{B // data},{T},{HEADS},{HEAD_DIM}]"
  gathered = [c for c in on_context if c.kind == "all-gather" and c.shape == kv_shape]
  assert all(c.nbytes == kv for c in gathered)
  assert sum(c.count for c in gathered) == 2 * LAYERS
  # The keys' and values' gradients: partial sums over the queries, read in slices only.
  scattered = sum(c.scattered_bytes for c in on_context if c.kind == "all-reduce")
  assert scattered >= 2 * LAYERS * kv
  assert context > 1


@pytest.mark.parametrize(
  "name, storage",
  [("gpt-tiny", "zero1"), pytest.param("gpt-tiny-scan", "fsdp", marks=pytest.mark.slow)],
)
def test_a_planned_context_parallel_step_matches_the_single_device_over_three_steps(
  name, storage, monkeypatch
):
  ex = _example(name)
  monkeypatch.setattr(sweep, "CONTEXT_STORAGES", frozenset({storage}))
  plan = _plan(ex)
  assert plan.strategy == f"cp+{storage}" and plan.mesh_shape["context"] > 1
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  grads_of = jax.jit(plan.value_and_grad(ex.loss_fn))
  ref_grads_of = jax.jit(loss_and_grads(ex.loss_fn))
  ref_step = jax.jit(make_train_step(ex.loss_fn, TX))
  step = plan.train_step()
  p = plan.shard(params)
  o, ref_p, ref_o = plan.init_opt_state(p), params, TX.init(params)
  for _ in range(3):
    loss, grads = grads_of(p, batch)
    ref_loss, ref_grads = ref_grads_of(jax.device_get(p), batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
    for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-6 * scale)
    p, o, _ = step(p, o, plan.shard_batch(batch))
    ref_p, ref_o, _ = ref_step(ref_p, ref_o, batch)
  for a, e in zip(jax.tree.leaves(jax.device_get(p)), jax.tree.leaves(ref_p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-4)


def test_a_context_parallel_plan_is_explained_saved_and_exported():
  plan = _plan(_example())
  cp = plan.chosen.context
  text = plan.explain()
  assert "context parallel" in text and "data-parallel devices only" not in text
  loaded = wap.Plan.from_json(plan.to_json())
  assert loaded.chosen == plan.chosen and loaded.mesh_shape == plan.mesh_shape
  config = yaml.safe_load(plan.to_maxtext_yaml())
  assert config["ici_context_parallelism"] * config.get("dcn_context_parallelism", 1) == cp
  v = plan.verify()
  # Memory of the compiled step against the plan's, both under XLA:CPU's buffer rules.
  assert v.predicted.flops == pytest.approx(v.compiled.flops, rel=0.1)
