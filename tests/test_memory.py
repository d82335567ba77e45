"""Which values the memory model writes out, and which buffers it lets a kernel reuse."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from wapar_jax import examples
from wapar_jax._src import compilers
from wapar_jax._src.compilers import XLA_CPU, XLA_GPU
from wapar_jax._src.memory.buffers import materialised
from wapar_jax._src.trace import trace_train_step

PARAMS = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
BATCH = jax.ShapeDtypeStruct((32, 64), jnp.float32)


def _outputs_of(traced, primitive):
  return [v for op in traced.ops if op.primitive == primitive for v in op.out_vars]


def _traced(loss_fn):
  return trace_train_step(loss_fn, PARAMS, BATCH, optax.sgd(0.1))[0]


def _deep(p, h):
  for _ in range(8):  # layers between a value and its reads in the backward pass
    h = jnp.sin(h @ p["w"])
  return jnp.sum(h)


def test_a_value_read_again_in_the_backward_pass_is_written_out():
  # tanh's output is read by the next layer and, much later, by its own derivative: XLA keeps
  # it rather than recompute the tanh there.
  traced = _traced(lambda p, x: _deep(p, jnp.tanh(x @ p["w"])))
  kept, _ = materialised(traced, XLA_CPU)
  assert all(kept[v] for v in _outputs_of(traced, "tanh"))


def test_a_value_read_only_by_its_neighbours_is_fused():
  # Like a batch norm's output feeding a ReLU and the ReLU's mask: both readers follow it.
  def loss(p, x):
    y = (x @ p["w"]) * 2.0 + 1.0
    return _deep(p, jnp.maximum(y, 0.0) + (y > 0))

  traced = _traced(loss)
  kept, _ = materialised(traced, XLA_CPU)
  (y,) = [v for v in _outputs_of(traced, "add") if traced.var_shape[v] == (32, 64)][:1]
  assert not kept[y]


def test_a_cheap_value_read_once_is_fused():
  traced = _traced(lambda p, x: jnp.sum((x @ p["w"]) * 2.0 + 1.0))
  kept, _ = materialised(traced, XLA_CPU)
  assert not any(kept[v] for v in _outputs_of(traced, "add"))


def test_an_elementwise_kernel_reuses_a_same_size_operand_that_dies_there():
  def loss(p, x):
    a = x @ p["w"]
    b = x @ p["w"].T
    c = jnp.sin(a) + b  # written out: the next dot reads it
    return jnp.sum(c @ p["w"])

  traced = _traced(loss)
  kept, last_use = materialised(traced, XLA_CPU)
  (c,) = [v for v in _outputs_of(traced, "add") if kept[v]][:1]
  writer = int(traced.def_pos[c])
  # b's last reader is the add, which takes over its buffer: b is freed one op earlier, so
  # b and c are never live together.
  b = [v for v in _outputs_of(traced, "dot_general") if traced.def_pos[v] < writer][1]
  assert traced.last_use[b] == writer
  assert last_use[b] == writer - 1


def test_a_value_a_kernel_reads_through_a_reshape_is_written_out():
  def loss(p, x):
    h = jnp.sin(x @ p["w"]).reshape(32, 8, 8).reshape(32, 64)  # bitcasts, as Dense inputs get
    return jnp.sum(h @ p["w"])

  traced = _traced(loss)
  kept, _ = materialised(traced, XLA_CPU)
  assert all(kept[v] for v in _outputs_of(traced, "sin"))


def test_gpu_xla_recomputes_a_cheap_value_read_again_later_but_keeps_an_expensive_one():
  # A LayerNorm-like chain: rsqrt (expensive) feeds a cheap product that the backward pass
  # reads again much later. XLA:CPU writes both out; GPU XLA recomputes the product from kept
  # inputs inside the backward fusion (measured on an H200 with mock devices).
  def loss(p, x):
    h = x @ p["w"]
    scale = jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
    normed = h * scale
    return _deep(p, normed * normed)

  traced = _traced(loss)
  squares = [op for op in traced.ops if op.primitive == "mul" and op.in_vars[0] == op.in_vars[1]]
  cheap = squares[1].in_vars[0]  # h * scale, squared (the first square is h * h)
  expensive = _outputs_of(traced, "rsqrt")
  cpu_kept, _ = materialised(traced, XLA_CPU)
  gpu_kept, _ = materialised(traced, XLA_GPU)
  assert cpu_kept[cheap] and not gpu_kept[cheap]
  assert all(cpu_kept[v] and gpu_kept[v] for v in expensive)


def test_gpu_xla_does_not_keep_a_value_a_kernel_reads_through_a_transpose():
  # XLA:CPU writes out a value a dot reads through a transpose; GPU XLA fuses the value into
  # the transposing copy the dot reads.
  def loss(p, x):
    y = jnp.sin(x @ p["w"]) + 1.0
    return jnp.sum(y.T @ x)

  traced = _traced(loss)
  (y,) = [v for v in _outputs_of(traced, "add") if traced.var_shape[v] == (32, 64)][:1]
  assert materialised(traced, XLA_CPU)[0][y]
  assert not materialised(traced, XLA_GPU)[0][y]


def test_profiles_pick_their_compilers_rules():
  assert compilers.for_profile("cpu") is XLA_CPU
  assert compilers.for_profile("gpu") is XLA_GPU
  # No TPU measurements yet: TPU XLA's rules are GPU XLA's under their own name.
  assert compilers.for_profile("tpu").name == "xla:tpu"
  assert dataclasses.replace(compilers.for_profile("tpu"), name="xla:gpu") == XLA_GPU


def _cnn():
  # Two conv -> ReLU -> 2x2 max-pool layers, then a dense classifier.
  ex = examples.get_example("cnn", batch_size=16)
  return trace_train_step(ex.loss_fn, ex.params, ex.batch, optax.sgd(0.1))[0]


def _scratch(traced, compiler, like):
  s = compiler.scratch_buffers(traced)
  return [
    (float(b), int(a), int(z)) for v, b, a, z in zip(s.like, s.nbytes, s.start, s.stop) if v == like
  ]


def test_xla_cpu_expands_a_max_pool_gradient_into_iotas_indices_and_zeros():
  traced = _cnn()
  pool_grads = [op for op in traced.ops if op.primitive == "select_and_scatter_add"]
  assert len(pool_grads) == 2
  for op in pool_grads:
    source, pooled_input = op.in_vars[0], op.in_vars[1]
    (forward_pool,) = [
      p.index
      for p in traced.ops
      if p.primitive == "reduce_window_max" and p.in_vars[0] == pooled_input
    ]
    elements = math.prod(traced.var_shape[pooled_input])
    # One int32 iota per dim (rank 4), from the top of the step to the forward pool ...
    assert (4 * 4 * elements, 0, forward_pool) in _scratch(traced, XLA_CPU, pooled_input)
    # ... a zero gradient the scatter writes into, made at the top of the step ...
    assert (4 * elements, 0, op.index - 1) in _scratch(traced, XLA_CPU, pooled_input)
    # ... and the argmax coordinates, one int32 per dim per output, until the scatter.
    indices = 4 * 4 * math.prod(traced.var_shape[source])
    assert (indices, forward_pool, op.index) in _scratch(traced, XLA_CPU, source)
  assert XLA_GPU.scratch_buffers(traced).like.size == 0


def test_xla_cpu_reads_a_kernel_gradients_activations_through_a_transposed_copy():
  traced = _cnn()
  images = traced.batch_vars[0]
  ((nbytes, start, stop),) = _scratch(traced, XLA_CPU, images)
  assert nbytes == traced.var_bytes()[images] and start == 0
  conv = traced.ops[stop]
  assert conv.primitive == "conv_general_dilated" and conv.in_vars[0] == images
  kernels = {traced.var_shape[v] for v in traced.param_vars if len(traced.var_shape[v]) == 4}
  assert traced.var_shape[conv.out_vars[0]] in kernels  # a kernel gradient


def test_a_max_pool_input_is_not_kept_for_its_gradient_on_xla_cpu():
  # The gradient reads the argmax indices, computed in the forward pass, instead.
  traced = _cnn()
  op = next(op for op in traced.ops if op.primitive == "select_and_scatter_add")
  pooled_input = op.in_vars[1]
  forward_end = traced.def_pos[traced.loss_var]
  _, cpu_last_use = materialised(traced, XLA_CPU)
  _, gpu_last_use = materialised(traced, XLA_GPU)
  assert cpu_last_use[pooled_input] < forward_end
  assert gpu_last_use[pooled_input] >= op.index


def test_an_expensive_value_read_late_through_a_cheap_one_is_written_out():
  # jax >= 0.11 writes tanh's derivative as `one_minus_square(t)`, read only in the backward
  # pass: XLA keeps t there rather than recompute the tanh. Here `1 - t * t` stands in for it.
  def loss(p, x):
    t = jnp.tanh(x)  # of the batch: no gradient flows through it
    slope = 1.0 - t * t  # read once, at the end
    h = t + 1.0
    for _ in range(8):
      h = jnp.sin(h @ p["w"])
    return jnp.sum(h) + jnp.sum(slope * x)

  traced = _traced(loss)
  for compiler in compilers.REGISTRY.values():
    kept, _ = materialised(traced, compiler)
    assert all(kept[v] for v in _outputs_of(traced, "tanh")), compiler
    assert not any(kept[v] for v in _outputs_of(traced, "sub")), compiler  # recomputed late
