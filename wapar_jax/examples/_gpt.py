"""GPT-2-style decoders in linen (optionally ``nn.scan`` over layers) and in flax.nnx.

Also holds the attention that the other transformer families share. Batches are
``{"inputs": int32 [B, T], "targets": int32 [B, T]}`` with ``targets`` the inputs shifted left by
one token; the loss is the next-token cross-entropy.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from wapar_jax._src.tree import abstract
from wapar_jax.examples._common import Example, class_loss, linen_example, token_batch


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Shape of a GPT (and of a BERT, which has the same fields)."""

  n_layer: int
  d_model: int
  n_head: int
  vocab: int
  max_len: int  # rows of the learned position table; sequences may be shorter.
  dtype: Any = jnp.float32


NORMAL_INIT = nn.initializers.normal(0.02)  # GPT-2's initialiser for weights and embeddings.
LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon.


def attention(q, k, v, *, causal, bias=None, scaled=True):
  """Softmax attention of q ``[B, Tq, H, Dh]`` over k, v ``[B, Tk, H, Dh]``; ``[B, Tq, H * Dh]``.

  Args:
    q, k, v: queries, keys and values, heads split.
    causal: query i sees keys 0..i only.
    bias: added to the float32 scores, broadcastable to ``[B, H, Tq, Tk]`` (T5's relative
      positions).
    scaled: divide the scores by sqrt(Dh); T5 folds that factor into its query initialiser.
  """
  b, tq, h, dh = q.shape
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
  if scaled:
    scores = scores * (dh**-0.5)
  if bias is not None:
    scores = scores + bias
  if causal:  # built from iota, no T x T constant
    mask = jnp.arange(tq)[:, None] >= jnp.arange(k.shape[1])[None, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, tq, h * dh)


def self_attention(y, n_head, dense, *, causal):
  """Multi-head self-attention of linen ``y [B, T, D]``.

  Called inside a compact method: the projections ``query``, ``key``, ``value`` and
  ``attn_out`` become submodules of the caller, so blocks that share this keep flat param trees.
  """
  b, t, d = y.shape
  heads = (n_head, d // n_head)
  q, k, v = (dense(d, name=n)(y).reshape(b, t, *heads) for n in ("query", "key", "value"))
  return dense(d, name="attn_out")(attention(q, k, v, causal=causal))


def unchanged(x):
  return x


class _Block(nn.Module):
  """Pre-LayerNorm transformer block: causal multi-head attention, then a 4x GELU MLP."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d = x.shape[-1]
    dense = functools.partial(
      nn.Dense, kernel_init=NORMAL_INIT, dtype=cfg.dtype, param_dtype=cfg.dtype
    )
    norm = functools.partial(nn.LayerNorm, epsilon=LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype)

    x = x + self_attention(norm(name="ln_1")(x), cfg.n_head, dense, causal=True)
    y = norm(name="ln_2")(x)
    y = jax.nn.gelu(dense(4 * d, name="mlp_in")(y))
    return x + dense(d, name="mlp_out")(y)


class _ScanBlock(nn.Module):
  """``_Block`` with the ``(carry) -> (carry, ys)`` signature that ``nn.scan`` wants."""

  cfg: GPTConfig
  hold: Callable = unchanged
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_Block) if self.remat else _Block
    return self.hold(block(self.cfg, name="block")(x)), None


class _GPT(nn.Module):
  """GPT-2: token + learned position embedding, blocks, final LayerNorm, tied output projection."""

  cfg: GPTConfig
  scan_layers: bool = False
  # What a MaxText-style model adds by hand: a sharding constraint on the residual stream at
  # each block boundary (`nn.with_logical_constraint` there), and every block rematerialised
  # (`nn.remat`, MaxText's `remat_policy: full`). Defaults leave the model as GPT-2 is written.
  hold: Callable = unchanged
  remat_blocks: bool = False

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    embed = functools.partial(
      nn.Embed, embedding_init=NORMAL_INIT, dtype=cfg.dtype, param_dtype=cfg.dtype
    )
    wte = embed(cfg.vocab, cfg.d_model, name="wte")
    x = wte(tokens) + embed(cfg.max_len, cfg.d_model, name="wpe")(jnp.arange(tokens.shape[1]))
    x = self.hold(x)
    if self.scan_layers:
      blocks = nn.scan(
        _ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.n_layer
      )
      x, _ = blocks(cfg, self.hold, self.remat_blocks, name="blocks")(x)
    else:
      block = nn.remat(_Block) if self.remat_blocks else _Block
      for i in range(cfg.n_layer):
        x = self.hold(block(cfg, name=f"block_{i}")(x))
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype, name="ln_f")(x)
    return wte.attend(x)


class _NnxBlock(nnx.Module):
  """``_Block`` in flax.nnx."""

  def __init__(self, cfg, *, rngs):
    d = cfg.d_model
    self.n_head = cfg.n_head
    linear = functools.partial(
      nnx.Linear, kernel_init=NORMAL_INIT, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs
    )
    norm = functools.partial(
      nnx.LayerNorm, d, epsilon=LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs
    )
    self.ln_1, self.ln_2 = norm(), norm()
    self.query, self.key, self.value = linear(d, d), linear(d, d), linear(d, d)
    self.attn_out = linear(d, d)
    self.mlp_in, self.mlp_out = linear(d, 4 * d), linear(4 * d, d)

  def __call__(self, x):
    b, t, d = x.shape
    heads = (self.n_head, d // self.n_head)
    y = self.ln_1(x)
    q, k, v = (proj(y).reshape(b, t, *heads) for proj in (self.query, self.key, self.value))
    x = x + self.attn_out(attention(q, k, v, causal=True))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln_2(x))))


class _NnxGPT(nnx.Module):
  """``_GPT`` in flax.nnx."""

  def __init__(self, cfg, *, rngs):
    embed = functools.partial(
      nnx.Embed, embedding_init=NORMAL_INIT, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs
    )
    self.wte = embed(cfg.vocab, cfg.d_model)
    self.wpe = embed(cfg.max_len, cfg.d_model)
    self.blocks = nnx.List([_NnxBlock(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.ln_f = nnx.LayerNorm(
      cfg.d_model, epsilon=LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs
    )

  def __call__(self, tokens):
    x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.wte.attend(self.ln_f(x))


def gpt_linen(
  name, description, cfg, batch_size, seq_len, scan_layers=False, hold=None, remat_blocks=False
):
  """The linen GPT of ``cfg``; ``scan_layers`` stacks the blocks' params under ``nn.scan``;
  ``hold(x)`` is applied to the residual stream at every block boundary and ``remat_blocks``
  rematerialises each block, as a MaxText-style model is written by hand."""
  batch, make_batch = token_batch(batch_size, seq_len, cfg.vocab)
  model = _GPT(cfg, scan_layers, hold or unchanged, remat_blocks)
  return linen_example(name, description, model, batch, make_batch, "inputs", "targets")


def gpt_nnx(name, description, cfg, batch_size, seq_len):
  """The flax.nnx GPT of ``cfg``: its ``nnx.Param`` state is the params."""
  batch, make_batch = token_batch(batch_size, seq_len, cfg.vocab)
  abstract_model = nnx.eval_shape(lambda: _NnxGPT(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):  # Only nnx.Param state is planned; anything else would be lost.
    raise RuntimeError(f"_NnxGPT holds non-Param state: {rest}")

  @jax.jit
  def init_params(key):
    return nnx.split(_NnxGPT(cfg, rngs=nnx.Rngs(key)), nnx.Param, ...)[1]

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params, rest)
    return class_loss(model(batch["inputs"]), batch["targets"])

  return Example(
    name, description, loss_fn, abstract(abstract_params), batch, init_params, make_batch
  )
