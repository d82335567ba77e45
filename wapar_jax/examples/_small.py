"""Small examples that plan in moments: a linen MLP and CNN, and a regression in plain jnp.

Batches: ``mlp`` and ``cnn`` take ``{"x": float [B, ...], "y": int32 [B]}`` class labels with a
softmax cross-entropy; ``plain`` takes ``{"x": float [B, 32], "y": float32 [B, 8]}`` regression
targets with an MSE loss.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from wapar_jax.examples._common import Example, classification_batch, eval_params, linen_example


class _MLP(nn.Module):
  hidden: int
  num_classes: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.dtype)
    x = nn.relu(dense(self.hidden)(x))
    x = nn.relu(dense(self.hidden)(x))
    return dense(self.num_classes)(x)


class _CNN(nn.Module):
  num_classes: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), dtype=self.dtype, param_dtype=self.dtype)
    x = nn.max_pool(nn.relu(conv(32)(x)), (2, 2), strides=(2, 2))
    x = nn.max_pool(nn.relu(conv(64)(x)), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(x)


def mlp(name, description, batch_size, dtype):
  """A 3-layer linen MLP classifier, 64 -> 256 -> 256 -> 10."""
  batch, make_batch = classification_batch(batch_size, (64,), 10, dtype)
  return linen_example(name, description, _MLP(256, 10, dtype), batch, make_batch, "x", "y")


def cnn(name, description, batch_size, dtype):
  """A linen CNN classifier of 32x32x3 images into 10 classes."""
  batch, make_batch = classification_batch(batch_size, (32, 32, 3), 10, dtype)
  return linen_example(name, description, _CNN(10, dtype), batch, make_batch, "x", "y")


def plain(name, description, batch_size, dtype):
  """A 2-layer tanh MLP regression written with jnp only: no flax, params a dict of arrays."""
  n_in, n_hidden, n_out = 32, 64, 8

  @jax.jit
  def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
      "w1": jax.random.normal(k1, (n_in, n_hidden), dtype) / math.sqrt(n_in),
      "b1": jnp.zeros((n_hidden,), dtype),
      "w2": jax.random.normal(k2, (n_hidden, n_out), dtype) / math.sqrt(n_hidden),
      "b2": jnp.zeros((n_out,), dtype),
    }

  def loss_fn(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    pred = (hidden @ params["w2"] + params["b2"]).astype(jnp.float32)
    return jnp.mean((pred - batch["y"]) ** 2)

  batch = {
    "x": jax.ShapeDtypeStruct((batch_size, n_in), dtype),
    "y": jax.ShapeDtypeStruct((batch_size, n_out), jnp.float32),
  }

  def make_batch(key):
    kx, ky = jax.random.split(key)
    return {
      "x": jax.random.normal(kx, (batch_size, n_in), dtype),
      "y": jax.random.normal(ky, (batch_size, n_out), jnp.float32),
    }

  return Example(
    name, description, loss_fn, eval_params(init_params), batch, init_params, make_batch
  )
