"""Vision Transformers: patch embedding, a class token and BERT's encoder block, pre-LayerNorm.

Batches are ``{"x": float [B, H, W, 3], "y": int32 [B]}`` with a softmax cross-entropy loss.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from wapar_jax.examples._bert import EncoderBlock
from wapar_jax.examples._common import classification_batch, linen_example
from wapar_jax.examples._gpt import NORMAL_INIT, unchanged


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
  hold: Callable = unchanged  # as GPT's: what a MaxText-style model adds by hand
  remat_blocks: bool = False

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
    x = self.hold(x)
    block = nn.remat(EncoderBlock) if self.remat_blocks else EncoderBlock
    for i in range(cfg.n_layer):
      x = self.hold(
        block(
          cfg.n_head,
          4 * cfg.d_model,
          _VIT_LN_EPS,
          pre_norm=True,
          kernel_init=nn.initializers.xavier_uniform(),
          dtype=cfg.dtype,
          name=f"block_{i}",
        )(x)
      )
    x = nn.LayerNorm(epsilon=_VIT_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype, name="ln_f")(
      x[:, 0]
    )
    return nn.Dense(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.dtype, name="head")(x)


def vit(cfg_without_dtype):
  """The builder of the ViT of ``cfg_without_dtype``, whose dtype the build call replaces.

  Returns:
    ``build(name, description, batch_size, dtype, hold=None, remat_blocks=False) -> Example``,
    ``hold`` and ``remat_blocks`` as ``gpt_linen``'s.
  """

  def build(name, description, batch_size, dtype, hold=None, remat_blocks=False):
    cfg = dataclasses.replace(cfg_without_dtype, dtype=dtype)
    batch, make_batch = classification_batch(
      batch_size, (cfg.image_size, cfg.image_size, 3), cfg.num_classes, dtype
    )
    model = _ViT(cfg, hold or unchanged, remat_blocks)
    return linen_example(name, description, model, batch, make_batch, "x", "y")

  return build
