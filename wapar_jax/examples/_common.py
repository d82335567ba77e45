"""What every example family shares: the ``Example`` record, abstract trees, losses and batches."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from wapar_jax._src.tree import abstract


@dataclasses.dataclass(frozen=True)
class Example:
  """A named single-device workload.

  Attributes:
    name: the example's name, e.g. ``"gpt2-small"``.
    description: one line for humans.
    loss_fn: ``loss_fn(params, batch) -> scalar`` float32 loss; pure, single-device code.
    params: pytree of ``jax.ShapeDtypeStruct`` (never materialised).
    batch: pytree of ``jax.ShapeDtypeStruct``; leading dim of every leaf is the batch dim.
    init_params: ``init_params(key)`` -> concrete params with the same tree, shapes and dtypes.
    make_batch: ``make_batch(key)`` -> concrete batch matching ``batch``.
  """

  name: str
  description: str
  loss_fn: Callable
  params: Any
  batch: Any
  init_params: Callable
  make_batch: Callable


def eval_params(init_params):
  """Abstract params of ``init_params(key)``, traced without allocating them."""
  return abstract(jax.eval_shape(init_params, jax.random.key(0)))


def class_loss(logits, labels):
  """Mean softmax cross-entropy of integer ``labels``, in float32 whatever the logits' dtype."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def classification_batch(batch_size, input_shape, num_classes, dtype):
  """Abstract batch and its ``make_batch`` for ``{"x": [B, *input_shape], "y": int32 [B]}``."""
  shape = (batch_size, *input_shape)
  batch = {
    "x": jax.ShapeDtypeStruct(shape, dtype),
    "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }

  def make_batch(key):
    kx, ky = jax.random.split(key)
    return {
      "x": jax.random.normal(kx, shape, dtype),
      "y": jax.random.randint(ky, (batch_size,), 0, num_classes, jnp.int32),
    }

  return batch, make_batch


def token_batch(batch_size, seq_len, vocab):
  """Abstract batch and its ``make_batch`` for next-token prediction.

  ``{"inputs": int32 [B, T], "targets": int32 [B, T]}``, ``targets`` being ``inputs`` shifted left
  by one token: two leaves rather than one ``[B, T + 1]`` array, so the loss never slices the
  sequence dimension.
  """
  shape = (batch_size, seq_len)
  batch = {
    "inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
    "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
  }

  def make_batch(key):
    tokens = jax.random.randint(key, (batch_size, seq_len + 1), 0, vocab, jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  return batch, make_batch


def module_example(name, description, module, batch, make_batch, input_keys, loss):
  """Wraps a linen module applied to ``batch[k] for k in input_keys`` into an ``Example``.

  Args:
    name: the example's name.
    description: its one-line description.
    module: the linen module; its params are the example's params.
    batch: the abstract batch.
    make_batch: ``make_batch(key)`` -> a concrete batch matching ``batch``.
    input_keys: the batch leaves passed to the module, in order.
    loss: ``loss(module outputs, batch)`` -> float32 scalar.

  Returns:
    The ``Example``, with abstract params.
  """
  # init needs shapes only; batch 1 is cheapest.
  dummies = [jnp.zeros((1, *batch[k].shape[1:]), batch[k].dtype) for k in input_keys]

  @jax.jit
  def init_params(key):
    return module.init(key, *dummies)["params"]

  def loss_fn(params, batch):
    return loss(module.apply({"params": params}, *(batch[k] for k in input_keys)), batch)

  return Example(
    name, description, loss_fn, eval_params(init_params), batch, init_params, make_batch
  )


def linen_example(name, description, module, batch, make_batch, input_key, label_key):
  """Wraps a linen module whose output is logits into an Example with a cross-entropy loss."""
  return module_example(
    name,
    description,
    module,
    batch,
    make_batch,
    (input_key,),
    lambda logits, batch: class_loss(logits, batch[label_key]),
  )
