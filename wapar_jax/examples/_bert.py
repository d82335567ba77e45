"""BERT: a bidirectional encoder (post-LayerNorm) with its masked-LM head.

Also holds the encoder block that ViT shares. Batches are ``{"inputs": int32 [B, T], "targets":
int32 [B, T], "weights": float32 [B, T]}``: ``inputs`` has 15% of ``targets``' tokens replaced by
[MASK], ``weights`` is 1 there and 0 elsewhere; the loss is the masked-LM cross-entropy averaged
over the masked tokens.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from wapar_jax.examples._common import module_example
from wapar_jax.examples._gpt import NORMAL_INIT, GPTConfig, self_attention, unchanged


class EncoderBlock(nn.Module):
  """Transformer block with bidirectional attention and a GELU MLP.

  ``pre_norm`` puts the LayerNorm before each sub-layer (ViT); otherwise after each residual sum
  (BERT).
  """

  n_head: int
  d_ff: int
  epsilon: float
  pre_norm: bool
  kernel_init: Callable
  dtype: Any

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dense = functools.partial(
      nn.Dense, kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.dtype
    )
    norm = functools.partial(
      nn.LayerNorm, epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.dtype
    )

    def mlp(y):
      return dense(d, name="mlp_out")(
        jax.nn.gelu(dense(self.d_ff, name="mlp_in")(y), approximate=False)
      )

    if self.pre_norm:
      x = x + self_attention(norm(name="ln_1")(x), self.n_head, dense, causal=False)
      return x + mlp(norm(name="ln_2")(x))
    x = norm(name="ln_1")(x + self_attention(x, self.n_head, dense, causal=False))
    return norm(name="ln_2")(x + mlp(x))


_BERT_LN_EPS = 1e-12
_MASK_ID = 103  # BERT's [MASK] token
_MASK_RATE = 0.15  # fraction of tokens masked, as in BERT pre-training


class _BERT(nn.Module):
  """BERT encoder with its masked-LM head (dense, GELU, LayerNorm, tied decoder plus a bias).

  Segment embeddings and the pooler / next-sentence head are left out: the masked-LM loss does
  not use them (they are 0.3% of BERT-large).
  """

  cfg: GPTConfig  # the same fields: layers, width, heads, vocabulary, position-table rows
  hold: Callable = unchanged  # as GPT's: what a MaxText-style model adds by hand
  remat_blocks: bool = False

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    embed = functools.partial(
      nn.Embed, embedding_init=NORMAL_INIT, dtype=cfg.dtype, param_dtype=cfg.dtype
    )
    norm = functools.partial(
      nn.LayerNorm, epsilon=_BERT_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype
    )
    wte = embed(cfg.vocab, cfg.d_model, name="wte")
    x = wte(tokens) + embed(cfg.max_len, cfg.d_model, name="wpe")(jnp.arange(tokens.shape[1]))
    x = self.hold(norm(name="ln_embed")(x))
    block = nn.remat(EncoderBlock) if self.remat_blocks else EncoderBlock
    for i in range(cfg.n_layer):
      x = self.hold(
        block(
          cfg.n_head,
          4 * cfg.d_model,
          _BERT_LN_EPS,
          pre_norm=False,
          kernel_init=NORMAL_INIT,
          dtype=cfg.dtype,
          name=f"block_{i}",
        )(x)
      )
    x = nn.Dense(
      cfg.d_model, kernel_init=NORMAL_INIT, dtype=cfg.dtype, param_dtype=cfg.dtype, name="mlm_dense"
    )(x)
    x = norm(name="mlm_ln")(jax.nn.gelu(x, approximate=False))
    bias = self.param("mlm_bias", nn.initializers.zeros, (cfg.vocab,), cfg.dtype)
    return wte.attend(x) + bias


def bert(name, description, cfg, batch_size, seq_len, hold=None, remat_blocks=False):
  """The BERT of ``cfg`` with a masked-LM loss over sequences of ``seq_len`` tokens; ``hold``
  and ``remat_blocks`` as ``gpt_linen``'s."""
  module = _BERT(cfg, hold or unchanged, remat_blocks)
  shape = (batch_size, seq_len)
  batch = {
    "inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
    "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
    "weights": jax.ShapeDtypeStruct(shape, jnp.float32),
  }

  def make_batch(key):
    k_tokens, k_mask = jax.random.split(key)
    tokens = jax.random.randint(k_tokens, shape, 0, cfg.vocab, jnp.int32)
    masked = jax.random.bernoulli(k_mask, _MASK_RATE, shape)
    return {
      "inputs": jnp.where(masked, _MASK_ID, tokens),
      "targets": tokens,
      "weights": masked.astype(jnp.float32),
    }

  def masked_lm_loss(logits, batch):
    losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["targets"]
    )
    weights = batch["weights"]
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  return module_example(name, description, module, batch, make_batch, ("inputs",), masked_lm_loss)
