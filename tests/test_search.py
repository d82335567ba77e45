"""The search's arrays and sums, checked against what the step does by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.compilers import XLA_CPU, XLA_GPU
from wapar_jax._src.cost import roofline
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.search import aggregates as aggregate_lib
from wapar_jax._src.search import pricing
from wapar_jax._src.search import space as space_lib
from wapar_jax._src.trace import trace_train_step
from wapar_jax._src.tree import leaf_paths, path_str
from wapar_jax.examples import _gpt

TX = optax.adamw(1e-3)


def _space(loss_fn, params, batch, rules=XLA_CPU, optimizer=TX, **kwargs):
  traced, _ = trace_train_step(loss_fn, params, batch, optimizer, **kwargs)
  paths = [path_str(k) for k in leaf_paths(params)]
  return space_lib.build_space(
    traced, step_costs(traced, CostCache(persist=False)), paths, rules=rules, **kwargs
  )


def _aggregate(space, groups=()):
  seconds = roofline.op_seconds(space.traced, space.costs, wap.load_profile("cpu"), space.traffic)
  return aggregate_lib.aggregate(space, groups, seconds)


def test_fsdp_gathers_each_weight_where_it_is_used_and_frees_it_before_the_update():
  # The classifier's weights are gathered by the layer that reads them, not at the top of the
  # step, and their gathered copies die with the backward pass's matmuls, long before the
  # optimizer update at the end of the step.
  ex = examples.get_example("mlp", batch_size=64)
  space = _space(ex.loss_fn, ex.params, ex.batch)
  traced = space.traced
  update = min(max(op.index for op in traced.ops if v in op.in_vars) for v in traced.param_vars)
  big = np.flatnonzero(space.param_bytes >= space_lib.FSDP_MIN_BYTES)
  assert len(big)
  first_reads = []
  for i in big:
    uses = space.gathered_var[(space.gathered_param == i) & (space.gathered_runs > 0)]
    assert len(uses) == 1
    assert traced.last_use[uses[0]] < update
    first_reads.append(traced.def_pos[uses[0]])
  assert first_reads == sorted(set(first_reads))  # one after the other, layer by layer


def test_fsdp_gathers_a_scanned_layer_slice_inside_the_loop():
  # nn.scan stacks the layers' weights: each iteration gathers its layer's slice.
  ex = examples.get_example("gpt-tiny-scan")
  space = _space(ex.loss_fn, ex.params, ex.batch)
  traced = space.traced
  stacked = [i for i, v in enumerate(traced.param_vars) if len(traced.var_shape[v]) == 3]
  assert stacked
  n_layer = traced.var_shape[traced.param_vars[stacked[0]]][0]
  for i in stacked:
    which = (space.gathered_param == i) & (space.gathered_runs > 0)
    assert set(space.gathered_runs[which]) == {n_layer}
    slices = space.var_bytes[space.gathered_var[which]]
    assert np.allclose(slices, space.param_bytes[i] / n_layer)


@pytest.mark.slow
def test_regathering_weights_trades_collectives_for_memory():
  # remat "weights": the backward pass gathers each layer's slice again instead of keeping the
  # forward pass's copies (a stack of every layer's gathered weights): more bytes sent, a
  # lower peak. Measured compiled on 8 devices: benchmarks/large_model.py, tests/test_emit.py.
  cfg = _gpt.GPTConfig(4, 256, 4, 512, 64, jnp.float32)
  ex = _gpt.gpt_linen("wide-scan", "", cfg, 16, 64, scan_layers=True)
  profile = wap.load_profile("h100-sxm")
  priced = {}
  for remat in ("none", "weights"):
    space = _space(ex.loss_fn, ex.params, ex.batch, rules=XLA_GPU, remat=remat)
    seconds = roofline.op_seconds(space.traced, space.costs, profile, space.traffic)
    agg = aggregate_lib.aggregate(space, (), seconds)
    priced[remat] = pricing.price(space, agg, profile, 8, 1, (), "fsdp", 1e12)
  assert priced["weights"].peak_memory < priced["none"].peak_memory
  assert priced["weights"].comm_bytes > priced["none"].comm_bytes


def test_a_value_used_twice_is_gathered_once():
  # gpt-tiny ties its output projection to the token embedding: XLA's CSE leaves one gather.
  ex = examples.get_example("gpt-tiny")
  space = _space(ex.loss_fn, ex.params, ex.batch)
  paths = [path_str(k) for k in leaf_paths(ex.params)]
  wte = paths.index("wte/embedding")
  assert ((space.gathered_param == wte) & (space.gathered_runs > 0)).sum() == 1


def test_fsdp_parameters_gathered_along_a_minor_dim_are_found():
  # XLA:CPU gathers those transposed and copies them back to row-major (priced in its peak).
  ex = examples.get_example("mlp", batch_size=64)
  space = _space(ex.loss_fn, ex.params, ex.batch)
  paths = [path_str(k) for k in leaf_paths(ex.params)]
  shardable = pricing.fsdp_shardable(space, 4, ())
  strided = dict(zip(paths, pricing.gathered_strided(space, 4, (), shardable, 1)))
  shapes = dict(zip(paths, (space.traced.var_shape[v] for v in space.traced.param_vars)))
  assert shapes["Dense_0/kernel"] == (64, 256) and strided["Dense_0/kernel"]  # split on 256
  assert shapes["Dense_1/kernel"] == (256, 256) and not strided["Dense_1/kernel"]  # on dim 0


def test_xla_cpu_reduces_gradients_in_combined_buckets_of_256():
  # XLA:CPU combines independent all-reduces 256 operands at a time: 300 gradients reduce in
  # two buckets, each where its last gradient is made, all 256 / 44 at once.
  params = {f"p{i:03d}": jax.ShapeDtypeStruct((64, 8), jnp.float32) for i in range(300)}
  batch = jax.ShapeDtypeStruct((32, 64), jnp.float32)
  loss = lambda p, x: sum(jnp.mean(jnp.tanh(x @ w)) for w in p.values())  # noqa: E731
  cpu = _aggregate(_space(loss, params, batch, optimizer=optax.sgd(0.1)))
  (curves,) = cpu.memory
  combined = curves.combine_curves.sum(axis=(0, 1))
  assert sorted(combined[combined > 0]) == [44 * 2048, 256 * 2048]
  gpu = _aggregate(_space(loss, params, batch, rules=XLA_GPU, optimizer=optax.sgd(0.1)))
  assert gpu.memory[0].combine_curves is None  # GPU XLA reduces in place


@pytest.mark.slow
def test_a_gpu_remat_step_is_priced_under_both_rule_sets():
  # GPU XLA's peak in a rematerialised step is bounded by XLA:CPU's rules; a plain step is
  # priced under GPU XLA's alone (one liveness scan per candidate, not two).
  ex = examples.get_example("gpt-tiny", batch_size=8)
  plain = _space(ex.loss_fn, ex.params, ex.batch, rules=XLA_GPU)
  remat = _space(ex.loss_fn, ex.params, ex.batch, rules=XLA_GPU, remat="layers")
  assert [b.rules.name for b in plain.buffers] == ["xla:gpu"]
  assert [b.rules.name for b in remat.buffers] == ["xla:gpu", "xla:cpu"]
  assert [
    b.rules.name for b in _space(ex.loss_fn, ex.params, ex.batch, remat="layers").buffers
  ] == ["xla:cpu"]
