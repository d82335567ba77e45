"""The ImageNet CNNs of the WAP paper, AlexNet and VGG-16, without dropout or batch norm.

Batches are ``{"x": float [B, 224, 224, 3], "y": int32 [B]}`` with labels in [0, 1000) and a
softmax cross-entropy loss.
"""

import functools
from typing import Any

from flax import linen as nn

from wapar_jax.examples._common import classification_batch, linen_example


class _AlexNet(nn.Module):
  """AlexNet as in torchvision (one-tower, 64-192-384-256-256 filters), ~61M parameters."""

  num_classes: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=self.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.dtype)
    pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2))
    x = pool(nn.relu(conv(64, (11, 11), strides=(4, 4), padding=((2, 2), (2, 2)))(x)))
    x = pool(nn.relu(conv(192, (5, 5), padding=((2, 2), (2, 2)))(x)))
    x = nn.relu(conv(384, (3, 3))(x))
    x = nn.relu(conv(256, (3, 3))(x))
    x = pool(nn.relu(conv(256, (3, 3))(x)))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(dense(4096)(x))
    x = nn.relu(dense(4096)(x))
    return dense(self.num_classes)(x)


_VGG16_LAYERS = (
  64,
  64,
  "pool",
  128,
  128,
  "pool",
  256,
  256,
  256,
  "pool",
  512,
  512,
  512,
  "pool",
  512,
  512,
  512,
  "pool",
)


class _VGG16(nn.Module):
  """VGG-16 (configuration D), ~138M parameters."""

  num_classes: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.dtype)
    for layer in _VGG16_LAYERS:
      if layer == "pool":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nn.relu(nn.Conv(layer, (3, 3), dtype=self.dtype, param_dtype=self.dtype)(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(dense(4096)(x))
    x = nn.relu(dense(4096)(x))
    return dense(self.num_classes)(x)


def _imagenet_example(name, description, module, batch_size, dtype):
  batch, make_batch = classification_batch(batch_size, (224, 224, 3), 1000, dtype)
  return linen_example(name, description, module, batch, make_batch, "x", "y")


def alexnet(name, description, batch_size, dtype):
  """AlexNet on 224x224x3 images into 1000 classes."""
  return _imagenet_example(name, description, _AlexNet(1000, dtype), batch_size, dtype)


def vgg16(name, description, batch_size, dtype):
  """VGG-16 on 224x224x3 images into 1000 classes."""
  return _imagenet_example(name, description, _VGG16(1000, dtype), batch_size, dtype)
