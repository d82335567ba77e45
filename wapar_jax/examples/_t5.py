"""T5 (v1.0): encoder-decoder, RMS norms, relative position biases, ReLU MLP, no dense biases.

Batches are ``{"inputs": int32 [B, T_in], "decoder_inputs": int32 [B, T_out], "targets": int32
[B, T_out]}`` with ``T_out = T_in // 4``; ``decoder_inputs`` is ``targets`` shifted right behind
the start token 0. The loss is the targets' cross-entropy.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from wapar_jax.examples._common import class_loss, module_example
from wapar_jax.examples._gpt import attention, unchanged


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape of a T5 and of its relative-position buckets."""

  n_layer: int  # per stack: the encoder and the decoder each have this many
  d_model: int
  n_head: int
  d_ff: int
  vocab: int
  dtype: Any = jnp.float32
  num_buckets: int = 32
  max_distance: int = 128


_T5_EPS = 1e-6


def _relative_position_bucket(relative, bidirectional, num_buckets, max_distance):
  """T5's bucket of ``key position - query position``: exact when near, log-spaced when far."""
  bucket = 0
  n = -relative
  if bidirectional:
    num_buckets //= 2
    bucket = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  log_ratio = jnp.log(n.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps)
  far = max_exact + (
    log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  ).astype(jnp.int32)
  far = jnp.minimum(far, num_buckets - 1)
  return bucket + jnp.where(n < max_exact, n, far)


class _RelativePositionBias(nn.Module):
  """Per-head score bias ``[1, H, Tq, Tk]`` from a learned table over position buckets."""

  cfg: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, tq, tk):
    cfg = self.cfg
    buckets = _relative_position_bucket(
      jnp.arange(tk)[None, :] - jnp.arange(tq)[:, None],
      self.bidirectional,
      cfg.num_buckets,
      cfg.max_distance,
    )
    table = self.param(
      "table", nn.initializers.normal(1.0), (cfg.num_buckets, cfg.n_head), cfg.dtype
    )
    return jnp.take(table, buckets, axis=0).transpose(2, 0, 1)[None].astype(jnp.float32)


class _T5Attention(nn.Module):
  """Multi-head attention without biases or score scaling (folded into the query init)."""

  cfg: T5Config
  causal: bool

  @nn.compact
  def __call__(self, x, memory, bias):
    cfg = self.cfg
    d, h = cfg.d_model, cfg.n_head
    dense = functools.partial(nn.Dense, d, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.dtype)
    std = d**-0.5
    q = dense(kernel_init=nn.initializers.normal(std * (d // h) ** -0.5), name="query")(x)
    k = dense(kernel_init=nn.initializers.normal(std), name="key")(memory)
    v = dense(kernel_init=nn.initializers.normal(std), name="value")(memory)

    def split(y):
      return y.reshape(*y.shape[:2], h, d // h)

    out = attention(split(q), split(k), split(v), causal=self.causal, bias=bias, scaled=False)
    return dense(kernel_init=nn.initializers.normal(std), name="attn_out")(out)


class _T5Block(nn.Module):
  """Pre-RMSNorm block: self-attention, cross-attention (decoder only), ReLU MLP."""

  cfg: T5Config
  decoder: bool

  @nn.compact
  def __call__(self, x, bias, encoded):
    cfg = self.cfg
    norm = functools.partial(nn.RMSNorm, epsilon=_T5_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype)
    y = norm(name="ln_self")(x)
    x = x + _T5Attention(cfg, causal=self.decoder, name="self_attn")(y, y, bias)
    if self.decoder:
      y = norm(name="ln_cross")(x)
      x = x + _T5Attention(cfg, causal=False, name="cross_attn")(y, encoded, None)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.dtype)
    y = nn.relu(
      dense(cfg.d_ff, kernel_init=nn.initializers.normal(cfg.d_model**-0.5), name="mlp_in")(
        norm(name="ln_mlp")(x)
      )
    )
    return x + dense(
      cfg.d_model, kernel_init=nn.initializers.normal(cfg.d_ff**-0.5), name="mlp_out"
    )(y)


class _T5Stack(nn.Module):
  """The encoder or the decoder: one position-bias table for all its layers, a final norm."""

  cfg: T5Config
  decoder: bool
  hold: Callable = unchanged
  remat_blocks: bool = False

  @nn.compact
  def __call__(self, x, encoded=None):
    t = x.shape[1]
    bias = _RelativePositionBias(self.cfg, bidirectional=not self.decoder, name="rel_bias")(t, t)
    x = self.hold(x)
    block = nn.remat(_T5Block) if self.remat_blocks else _T5Block
    for i in range(self.cfg.n_layer):
      x = self.hold(block(self.cfg, self.decoder, name=f"block_{i}")(x, bias, encoded))
    return nn.RMSNorm(
      epsilon=_T5_EPS, dtype=self.cfg.dtype, param_dtype=self.cfg.dtype, name="ln_f"
    )(x)


class _T5(nn.Module):
  """T5: one embedding shared by encoder, decoder and the (rescaled) output projection."""

  cfg: T5Config
  hold: Callable = unchanged  # as GPT's: what a MaxText-style model adds by hand
  remat_blocks: bool = False

  @nn.compact
  def __call__(self, inputs, decoder_inputs):
    cfg = self.cfg
    shared = nn.Embed(
      cfg.vocab,
      cfg.d_model,
      embedding_init=nn.initializers.normal(1.0),
      dtype=cfg.dtype,
      param_dtype=cfg.dtype,
      name="shared",
    )
    stack = functools.partial(_T5Stack, cfg, hold=self.hold, remat_blocks=self.remat_blocks)
    encoded = stack(decoder=False, name="encoder")(shared(inputs))
    x = stack(decoder=True, name="decoder")(shared(decoder_inputs), encoded)
    return shared.attend(x * cfg.d_model**-0.5)


def t5(name, description, cfg, batch_size, seq_len, hold=None, remat_blocks=False):
  """The T5 of ``cfg``: ``seq_len`` input tokens, a quarter as many targets; ``hold`` and
  ``remat_blocks`` as ``gpt_linen``'s."""
  module = _T5(cfg, hold or unchanged, remat_blocks)
  in_shape, out_shape = (batch_size, seq_len), (batch_size, _t5_target_len(seq_len))
  batch = {
    "inputs": jax.ShapeDtypeStruct(in_shape, jnp.int32),
    "decoder_inputs": jax.ShapeDtypeStruct(out_shape, jnp.int32),
    "targets": jax.ShapeDtypeStruct(out_shape, jnp.int32),
  }

  def make_batch(key):
    k_in, k_out = jax.random.split(key)
    targets = jax.random.randint(k_out, out_shape, 0, cfg.vocab, jnp.int32)
    start = jnp.zeros((batch_size, 1), jnp.int32)  # T5 starts decoding from token 0 (padding)
    return {
      "inputs": jax.random.randint(k_in, in_shape, 0, cfg.vocab, jnp.int32),
      "decoder_inputs": jnp.concatenate([start, targets[:, :-1]], axis=1),
      "targets": targets,
    }

  return module_example(
    name,
    description,
    module,
    batch,
    make_batch,
    ("inputs", "decoder_inputs"),
    lambda logits, batch: class_loss(logits, batch["targets"]),
  )


def _t5_target_len(seq_len):
  # Span corruption turns 512 input tokens into ~114 targets; T5 trains with 512 / 128.
  return max(seq_len // 4, 1)
