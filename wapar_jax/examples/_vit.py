"""Vision Transformers: patch embedding, a class token and BERT's encoder block, pre-LayerNorm.

Batches are ``{"x": float [B, H, W, 3], "y": int32 [B]}`` with a softmax cross-entropy loss.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from wapar_jax.examples._bert import EncoderBlock
from wapar_jax.examples._common import classification_batch, linen_example
from wapar_jax.examples._gpt import NORMAL_INIT


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a ViT; ``dtype`` is set when the example is built."""

  n_layer: int
  d_model: int
  n_head: int
  image_size: int
  patch: int
  num_classes: int
  dtype: Any = jnp.float32


_VIT_LN_EPS = 1e-6


class _ViT(nn.Module):
  """ViT: patch embedding, class token, learned positions, pre-LN blocks, class-token head."""

  cfg: ViTConfig

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    b = images.shape[0]
    x = nn.Conv(
      cfg.d_model,
      (cfg.patch, cfg.patch),
      strides=(cfg.patch, cfg.patch),
      padding="VALID",
      dtype=cfg.dtype,
      param_dtype=cfg.dtype,
      name="patch_embed",
    )(images)
    x = x.reshape(b, -1, cfg.d_model)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, cfg.d_model), cfg.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.d_model)).astype(x.dtype), x], axis=1)
    x = x + self.param("pos_embed", NORMAL_INIT, (1, x.shape[1], cfg.d_model), cfg.dtype)
    for i in range(cfg.n_layer):
      x = EncoderBlock(
        cfg.n_head,
        4 * cfg.d_model,
        _VIT_LN_EPS,
        pre_norm=True,
        kernel_init=nn.initializers.xavier_uniform(),
        dtype=cfg.dtype,
        name=f"block_{i}",
      )(x)
    x = nn.LayerNorm(epsilon=_VIT_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype, name="ln_f")(
      x[:, 0]
    )
    return nn.Dense(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.dtype, name="head")(x)


def vit(cfg_without_dtype):
  """The builder of the ViT of ``cfg_without_dtype``, whose dtype the build call replaces.

  Returns:
    ``build(name, description, batch_size, dtype) -> Example``.
  """

  def build(name, description, batch_size, dtype):
    cfg = dataclasses.replace(cfg_without_dtype, dtype=dtype)
    batch, make_batch = classification_batch(
      batch_size, (cfg.image_size, cfg.image_size, 3), cfg.num_classes, dtype
    )
    return linen_example(name, description, _ViT(cfg), batch, make_batch, "x", "y")

  return build
