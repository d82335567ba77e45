"""The step's memory traffic as the kernels XLA fuses it into (`cost.fusion`)."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest

from wapar_jax._src import step as step_lib
from wapar_jax._src.calibrate.measure import _counting_profile
from wapar_jax._src.compilers import XLA_CPU, XLA_GPU
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.search import space as space_lib
from wapar_jax._src.trace import trace_train_step
from wapar_jax._src.tree import leaf_paths, path_str
from wapar_jax._src.verify import kernels as kernels_lib
from wapar_jax._src.verify.hlo import multiplicities, parse_hlo

SIDE = 512
PARAM_BYTES = SIDE * SIDE * 4


def _traffic(loss_fn, params, batch, optimizer, rules=XLA_GPU):
  traced, _ = trace_train_step(loss_fn, params, batch, optimizer)
  paths = [path_str(k) for k in leaf_paths(params)]
  space = space_lib.build_space(
    traced, step_costs(traced, CostCache(persist=False)), paths, rules=rules
  )
  return space.traffic


def _linear():
  def loss_fn(params, batch):
    return jnp.mean((batch["x"] @ params["w"]) ** 2)

  params = {"w": jnp.full((SIDE, SIDE), 0.01, jnp.float32)}
  batch = {"x": jnp.ones((8, SIDE), jnp.float32)}
  return loss_fn, params, batch


def test_adamw_update_moves_each_buffer_once():
  # AdamW reads the gradient, both moments and the parameters and writes the moments and the
  # parameters (7 buffers); SGD reads the gradient and the parameters and writes them (3). The
  # ~20 equations of the update, each counted with its operands and result, would be far more.
  loss_fn, params, batch = _linear()
  adamw = _traffic(loss_fn, params, batch, optax.adamw(1e-3)).nbytes.sum()
  sgd = _traffic(loss_fn, params, batch, optax.sgd(1e-3)).nbytes.sum()
  assert (adamw - sgd) / PARAM_BYTES == pytest.approx(4.0, abs=0.1)


def test_a_residual_stream_is_written_once_per_layer_not_remade_from_every_layer():
  # x + f(x) is read by the next layer's kernels: remade in each from its sources, traffic
  # would grow with the square of the depth.
  def model(layers):
    def loss_fn(params, batch):
      x = batch["x"]
      for w in params["w"]:
        x = x + jnp.tanh(x @ w)
      return jnp.mean(x**2)

    params = {"w": [jnp.full((64, 64), 0.01, jnp.float32) for _ in range(layers)]}
    return loss_fn, params, {"x": jnp.ones((256, 64), jnp.float32)}

  per_layer = [_traffic(*model(n), optax.sgd(1e-3)).nbytes.sum() / n for n in (4, 16)]
  assert per_layer[1] < 1.1 * per_layer[0]


def test_traffic_is_close_to_the_compiled_kernels():
  # Against the kernels XLA:CPU emits for the same step, priced at 1 byte/s.
  loss_fn, params, batch = _linear()
  optimizer = optax.adamw(1e-3)
  predicted = _traffic(loss_fn, params, batch, optimizer, rules=XLA_CPU).nbytes.sum()
  train_step = jax.jit(step_lib.make_train_step(loss_fn, optimizer))
  text = train_step.lower(params, optimizer.init(params), batch).compile().as_text()
  module = parse_hlo(text)
  mult, _, _ = multiplicities(module)
  unit = _counting_profile(memory_bandwidth=1.0, kernel_overhead=0.0)
  compiled = kernels_lib.kernel_seconds(module, mult, unit)
  assert predicted == pytest.approx(compiled, rel=0.15)


def test_a_max_pool_gradient_moves_its_operands_once_where_the_compiler_emits_it_natively():
  # XLA GPU runs select-and-scatter as one kernel; XLA:CPU, whose cost analysis prices every
  # equation, expands it into a scatter loop counting each window element as an access.
  def loss_fn(params, batch):
    y = jax.lax.reduce_window(
      batch["x"] * params["s"], -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID"
    )
    return jnp.mean(y**2)

  params = {"s": jnp.ones((1, 1, 1, 16), jnp.float32)}
  batch = {"x": jnp.ones((8, 33, 33, 16), jnp.float32)}
  traced, _ = trace_train_step(loss_fn, params, batch, optax.sgd(1e-3))
  (sas,) = [op for op in traced.ops if op.primitive == "select_and_scatter_add"]
  operand_and_result = 2 * 8 * 33 * 33 * 16 * 4 + 8 * 16 * 16 * 16 * 4
  gpu = _traffic(loss_fn, params, batch, optax.sgd(1e-3), rules=XLA_GPU).nbytes[sas.index]
  cpu = _traffic(loss_fn, params, batch, optax.sgd(1e-3), rules=XLA_CPU).nbytes[sas.index]
  assert gpu == pytest.approx(operand_and_result)
  assert cpu > 3 * operand_and_result


def test_the_compiled_truth_prices_xla_cpus_expanded_max_pool_gradient_as_one_gpu_kernel():
  # The compiled module is XLA:CPU's (iotas, an arg-max reduce-window, a scatter); priced for a
  # GPU it is the one kernel a GPU compile emits: pooled input + source + result, once.
  def pool_grad(x):
    return jax.grad(
      lambda x: jnp.sum(
        jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID") ** 2
      )
    )(x)

  x = jnp.ones((8, 33, 33, 16), jnp.float32)
  module = parse_hlo(jax.jit(pool_grad).lower(x).compile().as_text())
  entry = module.entry
  native = kernels_lib.native_select_and_scatter(module, entry)
  assert sorted(native.values())[-1] == 2 * x.size * 4 + 8 * 16 * 16 * 16 * 4
  assert sum(v > 0 for v in native.values()) == 1  # the rest of the expansion launches nothing
  cpu = _counting_profile(memory_bandwidth=1.0, kernel_overhead=0.0)
  gpu = dataclasses.replace(cpu, kind="gpu")
  seconds = {p.kind: sum(kernels_lib.instruction_seconds(module, entry, p)) for p in (cpu, gpu)}
  assert seconds["gpu"] < seconds["cpu"] / 2


_SUMMED_THEN_SLICED = """HloModule step, num_partitions=8

%update (p0: f32[1024,64], p1: f32[1024,512], p2: f32[1024,512], p3: s32[]) -> f32[1024,64] {
  %p1 = f32[1024,512]{1,0} parameter(1)
  %p2 = f32[1024,512]{1,0} parameter(2)
  %sum = f32[1024,512]{1,0} add(%p1, %p2)
  %zero = s32[] constant(0)
  %p3 = s32[] parameter(3)
  %shard = f32[1024,64]{1,0} dynamic-slice(%sum, %zero, %p3), dynamic_slice_sizes={1024,64}
  %p0 = f32[1024,64]{1,0} parameter(0)
  ROOT %new = f32[1024,64]{1,0} add(%shard, %p0)
}

ENTRY %main (a: f32[1024,64], g: f32[1024,512], h: f32[1024,512], i: s32[]) -> f32[1024,64] {
  %a = f32[1024,64]{1,0} parameter(0)
  %g = f32[1024,512]{1,0} parameter(1)
  %h = f32[1024,512]{1,0} parameter(2)
  %i = s32[] parameter(3)
  ROOT %f = f32[1024,64]{1,0} fusion(%a, %g, %h, %i), kind=kLoop, calls=%update
}
"""


def test_a_fused_kernel_reads_an_operand_summed_then_sliced_only_in_the_slice():
  # ZeRO's update of a tied embedding on XLA:CPU: the two gradients' sum is sliced to the
  # device's shard inside the kernel, which computes (and reads) only the shard's elements.
  module = parse_hlo(_SUMMED_THEN_SLICED)
  unit = _counting_profile(memory_bandwidth=1.0, kernel_overhead=0.0)
  (seconds,) = [s for s in kernels_lib.instruction_seconds(module, module.entry, unit) if s]
  shard = 1024 * 64 * 4
  assert seconds == pytest.approx(4 * shard + 4)  # 2 gradient slices, the state, the result


_STRIDED_GATHER = """HloModule step, num_partitions=8

%to_major (x: f32[768,48]) -> f32[768,48] {
  %x = f32[768,48]{1,0} parameter(0)
  ROOT %c = f32[768,48]{0,1} copy(%x)
}

%to_row_major (y: f32[768,384]) -> f32[768,384] {
  %y = f32[768,384]{0,1} parameter(0)
  ROOT %c = f32[768,384]{1,0} copy(%y)
}

ENTRY %main (w: f32[768,48]) -> f32[768,384] {
  %w = f32[768,48]{1,0} parameter(0)
  %major = f32[768,48]{0,1} fusion(%w), kind=kLoop, calls=%to_major
  %all = f32[768,384]{0,1} all-gather(%major), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={1}
  ROOT %back = f32[768,384]{1,0} fusion(%all), kind=kLoop, calls=%to_row_major
}
"""


def test_xla_cpus_copies_around_a_minor_dim_gather_cost_nothing_on_a_gpu():
  module = parse_hlo(_STRIDED_GATHER)
  assert kernels_lib.strided_gather_copies(module, module.entry) == {"major", "back"}
  cpu = _counting_profile(memory_bandwidth=1.0, kernel_overhead=0.0)
  gpu = dataclasses.replace(cpu, kind="gpu")
  priced = lambda p: sum(kernels_lib.instruction_seconds(module, module.entry, p))
  seconds = {p.kind: priced(p) for p in (cpu, gpu)}
  assert seconds["cpu"] == pytest.approx(2 * (768 * 48 + 768 * 384) * 4)
  assert seconds["gpu"] == 0.0
