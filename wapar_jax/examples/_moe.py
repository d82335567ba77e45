"""Mixture-of-experts decoder: GPT-2 blocks whose MLP is a top-k routed set of experts.

Batches are GPT's, ``{"inputs": int32 [B, T], "targets": int32 [B, T]}``; the loss is the
next-token cross-entropy plus 0.01 times the load-balancing loss of the routers.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from wapar_jax.examples._common import class_loss, module_example, token_batch
from wapar_jax.examples._gpt import LN_EPS, NORMAL_INIT, self_attention, unchanged


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Shape of a MoE decoder: GPTConfig's fields plus the experts and their routing."""

  n_layer: int
  d_model: int
  n_head: int
  vocab: int
  max_len: int
  n_experts: int
  top_k: int = 2
  capacity_factor: float = 1.25
  dtype: Any = jnp.float32


_AUX_LOSS_WEIGHT = 0.01  # Switch Transformer's load-balancing coefficient


class MoEMLP(nn.Module):
  """Top-k experts with dense dispatch and combine einsums (GShard; MaxText's dense-matmul path).

  Each sequence is one routing group. An expert takes at most
  ``C = ceil(capacity_factor * top_k * T / E)`` tokens of a group; first choices of the whole
  group claim slots before second choices, and tokens past capacity are dropped (they continue
  on the residual path only). Expert weights are stacked ``[E, D, F]`` and ``[E, F, D]``.

  Returns the output and the Switch load-balancing loss, 1 when routing is uniform.
  """

  cfg: MoEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, t, d = x.shape
    e, k = cfg.n_experts, cfg.top_k
    capacity = math.ceil(cfg.capacity_factor * k * t / e)
    router = self.param("router", NORMAL_INIT, (d, e), cfg.dtype)
    w_in = self.param("w_in", NORMAL_INIT, (e, d, 4 * d), cfg.dtype)
    w_out = self.param("w_out", NORMAL_INIT, (e, 4 * d, d), cfg.dtype)

    probs = jax.nn.softmax(jnp.einsum("btd,de->bte", x, router).astype(jnp.float32), axis=-1)
    gates, chosen = jax.lax.top_k(probs, k)  # [B, T, K]
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    choice = jax.nn.one_hot(chosen, e, dtype=jnp.float32)  # [B, T, K, E]
    # Slot of each (token, choice) in its expert's buffer, counting choice-major over the group.
    by_priority = choice.transpose(0, 2, 1, 3).reshape(b, k * t, e)
    slots = jnp.cumsum(by_priority, axis=1).reshape(b, k, t, e).transpose(0, 2, 1, 3) - 1
    slot = jnp.sum(slots * choice, axis=-1).astype(jnp.int32)  # [B, T, K]
    # one_hot of a slot >= capacity is all zeros: that is the token dropped.
    dispatch_k = choice[..., None] * jax.nn.one_hot(slot, capacity)[..., None, :]  # [B,T,K,E,C]
    dispatch = jnp.sum(dispatch_k, axis=2).astype(x.dtype)
    combine = jnp.einsum("btk,btkec->btec", gates, dispatch_k).astype(x.dtype)

    expert_in = jnp.einsum("btec,btd->becd", dispatch, x)
    hidden = jax.nn.gelu(jnp.einsum("becd,edf->becf", expert_in, w_in))
    expert_out = jnp.einsum("becf,efd->becd", hidden, w_out)
    y = jnp.einsum("btec,becd->btd", combine, expert_out)

    routed = jnp.mean(jnp.sum(choice, axis=2), axis=1) / k  # [B, E] fraction of assignments
    aux = e * jnp.mean(jnp.sum(routed * jnp.mean(probs, axis=1), axis=-1))
    return y, aux


class _MoEBlock(nn.Module):
  """GPT's ``_Block`` with the MLP replaced by ``MoEMLP``; returns ``(x, load-balancing loss)``."""

  cfg: MoEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = functools.partial(
      nn.Dense, kernel_init=NORMAL_INIT, dtype=cfg.dtype, param_dtype=cfg.dtype
    )
    norm = functools.partial(nn.LayerNorm, epsilon=LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype)
    x = x + self_attention(norm(name="ln_1")(x), cfg.n_head, dense, causal=True)
    y, aux = MoEMLP(cfg, name="moe")(norm(name="ln_2")(x))
    return x + y, aux


class _MoEGPT(nn.Module):
  """GPT's ``_GPT`` with ``_MoEBlock``s; returns logits and the layers' mean load-balancing loss."""

  cfg: MoEConfig
  hold: Callable = unchanged  # as GPT's: what a MaxText-style model adds by hand
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
    aux = []
    block = nn.remat(_MoEBlock) if self.remat_blocks else _MoEBlock
    for i in range(cfg.n_layer):
      x, layer_aux = block(cfg, name=f"block_{i}")(x)
      x = self.hold(x)
      aux.append(layer_aux)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype, name="ln_f")(x)
    return wte.attend(x), sum(aux) / cfg.n_layer


def moe(name, description, cfg, batch_size, seq_len, hold=None, remat_blocks=False):
  """The MoE decoder of ``cfg``; its loss adds the routers' load-balancing loss; ``hold`` and
  ``remat_blocks`` as ``gpt_linen``'s."""
  module = _MoEGPT(cfg, hold or unchanged, remat_blocks)
  batch, make_batch = token_batch(batch_size, seq_len, cfg.vocab)

  def loss(outputs, batch):
    logits, aux = outputs
    return class_loss(logits, batch["targets"]) + _AUX_LOSS_WEIGHT * aux

  return module_example(name, description, module, batch, make_batch, ("inputs",), loss)
