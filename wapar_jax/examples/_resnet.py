"""Bottleneck ResNets (v1.5) with batch norm in training mode, ResNet-50 among them.

Batches are ``{"x": float [B, H, W, 3], "y": int32 [B]}`` with a softmax cross-entropy loss.
Batch norm normalises with the batch's own statistics; its running averages are not parameters
and are not returned.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from wapar_jax._src.tree import abstract
from wapar_jax.examples._common import Example, class_loss, classification_batch

# Training mode: normalise with the batch's own statistics. Momentum and epsilon are
# torchvision's (its momentum 0.1 weighs the other term). The two-pass variance, as PyTorch
# computes it, keeps sharded and single-device gradients within float32 rounding of each other;
# the one-pass E[x^2] - E[x]^2 cancels badly.
_batch_norm = functools.partial(
  nn.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False
)


class _Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 convolutions with 4x expansion; a projection when shapes change."""

  filters: int
  stride: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
    norm = functools.partial(_batch_norm, dtype=self.dtype, param_dtype=self.dtype)
    strides = (self.stride, self.stride)
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(norm()(conv(self.filters, (3, 3), strides=strides)(y)))
    y = norm()(conv(4 * self.filters, (1, 1))(y))
    if x.shape[-1] != 4 * self.filters or self.stride != 1:
      x = norm(name="proj_norm")(conv(4 * self.filters, (1, 1), strides=strides, name="proj")(x))
    return nn.relu(x + y)


class _ResNet(nn.Module):
  """ResNet v1.5 (stride on the 3x3 convolution), as torchvision's; ResNet-50 has ~25.6M params."""

  stage_sizes: tuple[int, ...]
  width: int
  num_classes: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
      self.width,
      (7, 7),
      strides=(2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.dtype,
      name="stem",
    )(x)
    x = _batch_norm(dtype=self.dtype, param_dtype=self.dtype, name="stem_norm")(x)
    x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding="SAME")
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        x = _Bottleneck(self.width * 2**i, 2 if i > 0 and j == 0 else 1, self.dtype)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(x)


def resnet(stage_sizes, width, image_size, num_classes):
  """The builder of a ResNet example.

  Args:
    stage_sizes: bottleneck blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
    width: filters of the stem and of the first stage's 3x3 convolutions.
    image_size: height and width of the square input images.
    num_classes: the classifier's outputs.

  Returns:
    ``build(name, description, batch_size, dtype) -> Example``.
  """

  def build(name, description, batch_size, dtype):
    module = _ResNet(stage_sizes, width, num_classes, dtype)
    batch, make_batch = classification_batch(
      batch_size, (image_size, image_size, 3), num_classes, dtype
    )
    dummy = jnp.zeros((1, image_size, image_size, 3), dtype)
    variables = abstract(jax.eval_shape(module.init, jax.random.key(0), dummy))
    stats = variables["batch_stats"]

    @jax.jit
    def init_params(key):
      return module.init(key, dummy)["params"]

    def loss_fn(params, batch):
      # Training-mode batch norm normalises with the batch's own statistics; the running averages
      # only feed evaluation. They are not parameters, so they start at their initial values
      # here and their update is discarded: the planned step is pure in (params, batch).
      running = jax.tree_util.tree_map_with_path(
        lambda path, s: (jnp.ones if path[-1].key == "var" else jnp.zeros)(s.shape, s.dtype), stats
      )
      logits, _ = module.apply(
        {"params": params, "batch_stats": running}, batch["x"], mutable=["batch_stats"]
      )
      return class_loss(logits, batch["y"])

    return Example(name, description, loss_fn, variables["params"], batch, init_params, make_batch)

  return build
