"""Built-in model zoo: named single-device workloads for the CLI, the tests and the benchmarks.

Each example is a pure ``loss_fn(params, batch) -> float32 scalar`` with no sharding annotations,
plus *abstract* params and batch (pytrees of ``jax.ShapeDtypeStruct``, built with ``eval_shape`` so
even the 7B model costs no memory), and ``init_params`` / ``make_batch`` for when real arrays are
wanted.

Batch formats:

* ``mlp``, ``cnn``, ``alexnet``, ``vgg16``: ``{"x": float [B, ...], "y": int32 [B]}``, class
  labels, softmax cross-entropy.
* ``plain``: ``{"x": float [B, 32], "y": float32 [B, 8]}`` (regression targets, MSE loss).
* ``gpt-*``: ``{"inputs": int32 [B, T], "targets": int32 [B, T]}``; ``targets`` is ``inputs``
  shifted left by one token. Two leaves of equal shape rather than one ``[B, T + 1]`` token array,
  so the sequence dimension is never sliced inside the loss.

The leading dimension of every batch leaf is the batch dimension. ``dtype`` sets the parameter
and compute dtype; logits are cast to float32 before the loss, so the loss is always float32.

Examples:
  >>> from wapar_jax._src import zoo
  >>> ex = zoo.get_example("gpt-tiny")
  >>> ex.batch["inputs"].shape
  (8, 32)
  >>> loss = ex.loss_fn(ex.init_params(jax.random.key(0)), ex.make_batch(jax.random.key(1)))
"""

import dataclasses
import functools
import math
from typing import Any, Callable

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from wapar_jax._src import errors


@dataclasses.dataclass(frozen=True)
class Example:
  """A named single-device workload.

  Attributes:
    name: the zoo name, e.g. ``"gpt2-small"``.
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


def _abstract(tree):
  # eval_shape results may carry a single-device sharding, which breaks lowering for a mesh
  # (see DESIGN.md, known traps); keep shape and dtype only.
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _eval_params(init_params):
  return _abstract(jax.eval_shape(init_params, jax.random.key(0)))


def _class_loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def _classification_batch(batch_size, input_shape, num_classes, dtype):
  """Abstract batch and its ``make_batch`` for ``{"x": [B, *input_shape], "y": int32 [B]}``."""
  shape = (batch_size, *input_shape)
  batch = {"x": jax.ShapeDtypeStruct(shape, dtype),
           "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def make_batch(key):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, shape, dtype),
            "y": jax.random.randint(ky, (batch_size,), 0, num_classes, jnp.int32)}

  return batch, make_batch


def _linen_example(name, description, module, batch, make_batch, input_key, label_key):
  """Wraps a linen module whose output is logits into an Example with a cross-entropy loss."""
  x = batch[input_key]
  dummy = jnp.zeros((1, *x.shape[1:]), x.dtype)  # init needs shapes only; batch 1 is cheapest.

  @jax.jit
  def init_params(key):
    return module.init(key, dummy)["params"]

  def loss_fn(params, batch):
    return _class_loss(module.apply({"params": params}, batch[input_key]), batch[label_key])

  return Example(name, description, loss_fn, _eval_params(init_params), batch, init_params,
                 make_batch)


# ---------------------------------------------------------------------------------------------
# Small classifiers.


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


def _mlp(name, description, batch_size, dtype):
  batch, make_batch = _classification_batch(batch_size, (64,), 10, dtype)
  return _linen_example(name, description, _MLP(256, 10, dtype), batch, make_batch, "x", "y")


def _cnn(name, description, batch_size, dtype):
  batch, make_batch = _classification_batch(batch_size, (32, 32, 3), 10, dtype)
  return _linen_example(name, description, _CNN(10, dtype), batch, make_batch, "x", "y")


def _plain(name, description, batch_size, dtype):
  """A 2-layer tanh MLP regression written with jnp only: no flax, params a dict of arrays."""
  n_in, n_hidden, n_out = 32, 64, 8

  @jax.jit
  def init_params(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (n_in, n_hidden), dtype) / math.sqrt(n_in),
            "b1": jnp.zeros((n_hidden,), dtype),
            "w2": jax.random.normal(k2, (n_hidden, n_out), dtype) / math.sqrt(n_hidden),
            "b2": jnp.zeros((n_out,), dtype)}

  def loss_fn(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    pred = (hidden @ params["w2"] + params["b2"]).astype(jnp.float32)
    return jnp.mean((pred - batch["y"]) ** 2)

  batch = {"x": jax.ShapeDtypeStruct((batch_size, n_in), dtype),
           "y": jax.ShapeDtypeStruct((batch_size, n_out), jnp.float32)}

  def make_batch(key):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (batch_size, n_in), dtype),
            "y": jax.random.normal(ky, (batch_size, n_out), jnp.float32)}

  return Example(name, description, loss_fn, _eval_params(init_params), batch, init_params,
                 make_batch)


# ---------------------------------------------------------------------------------------------
# ImageNet CNNs of the WAP paper (no dropout, no batch norm).


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


_VGG16_LAYERS = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool",
                 512, 512, 512, "pool", 512, 512, 512, "pool")


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


def _imagenet(module_cls):
  def build(name, description, batch_size, dtype):
    batch, make_batch = _classification_batch(batch_size, (224, 224, 3), 1000, dtype)
    return _linen_example(name, description, module_cls(1000, dtype), batch, make_batch, "x", "y")
  return build


# ---------------------------------------------------------------------------------------------
# GPT-2-style decoder: one implementation in linen (optionally nn.scan over layers), one in nnx.


@dataclasses.dataclass(frozen=True)
class _GPTConfig:
  n_layer: int
  d_model: int
  n_head: int
  vocab: int
  max_len: int  # rows of the learned position table; sequences may be shorter.
  dtype: Any = jnp.float32


_normal = nn.initializers.normal(0.02)  # GPT-2's initialiser for weights and embeddings.
_LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon.


def _causal_attention(q, k, v):
  """Causal softmax attention; q, k, v are ``[B, T, H, Dh]``, returns ``[B, T, H * Dh]``."""
  b, t, h, dh = q.shape
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (dh ** -0.5)
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # built from iota, no T x T constant
  scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, h * dh)


class _Block(nn.Module):
  """Pre-LayerNorm transformer block: causal multi-head attention, then a 4x GELU MLP."""
  cfg: _GPTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, t, d = x.shape
    heads = (cfg.n_head, d // cfg.n_head)
    dense = functools.partial(nn.Dense, kernel_init=_normal, dtype=cfg.dtype, param_dtype=cfg.dtype)
    norm = functools.partial(nn.LayerNorm, epsilon=_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype)

    y = norm(name="ln_1")(x)
    q, k, v = (dense(d, name=n)(y).reshape(b, t, *heads) for n in ("query", "key", "value"))
    x = x + dense(d, name="attn_out")(_causal_attention(q, k, v))

    y = norm(name="ln_2")(x)
    y = jax.nn.gelu(dense(4 * d, name="mlp_in")(y))
    return x + dense(d, name="mlp_out")(y)


class _ScanBlock(nn.Module):
  """``_Block`` with the ``(carry) -> (carry, ys)`` signature that ``nn.scan`` wants."""
  cfg: _GPTConfig

  @nn.compact
  def __call__(self, x):
    return _Block(self.cfg, name="block")(x), None


class _GPT(nn.Module):
  """GPT-2: token + learned position embedding, blocks, final LayerNorm, tied output projection."""
  cfg: _GPTConfig
  scan_layers: bool = False

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    embed = functools.partial(nn.Embed, embedding_init=_normal, dtype=cfg.dtype,
                              param_dtype=cfg.dtype)
    wte = embed(cfg.vocab, cfg.d_model, name="wte")
    x = wte(tokens) + embed(cfg.max_len, cfg.d_model, name="wpe")(jnp.arange(tokens.shape[1]))
    if self.scan_layers:
      blocks = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=cfg.n_layer)
      x, _ = blocks(cfg, name="blocks")(x)
    else:
      for i in range(cfg.n_layer):
        x = _Block(cfg, name=f"block_{i}")(x)
    x = nn.LayerNorm(epsilon=_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype, name="ln_f")(x)
    return wte.attend(x)


class _NnxBlock(nnx.Module):
  """``_Block`` in flax.nnx."""

  def __init__(self, cfg, *, rngs):
    d = cfg.d_model
    self.n_head = cfg.n_head
    linear = functools.partial(nnx.Linear, kernel_init=_normal, dtype=cfg.dtype,
                               param_dtype=cfg.dtype, rngs=rngs)
    norm = functools.partial(nnx.LayerNorm, d, epsilon=_LN_EPS, dtype=cfg.dtype,
                             param_dtype=cfg.dtype, rngs=rngs)
    self.ln_1, self.ln_2 = norm(), norm()
    self.query, self.key, self.value = linear(d, d), linear(d, d), linear(d, d)
    self.attn_out = linear(d, d)
    self.mlp_in, self.mlp_out = linear(d, 4 * d), linear(4 * d, d)

  def __call__(self, x):
    b, t, d = x.shape
    heads = (self.n_head, d // self.n_head)
    y = self.ln_1(x)
    q, k, v = (proj(y).reshape(b, t, *heads) for proj in (self.query, self.key, self.value))
    x = x + self.attn_out(_causal_attention(q, k, v))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln_2(x))))


class _NnxGPT(nnx.Module):
  """``_GPT`` in flax.nnx."""

  def __init__(self, cfg, *, rngs):
    embed = functools.partial(nnx.Embed, embedding_init=_normal, dtype=cfg.dtype,
                              param_dtype=cfg.dtype, rngs=rngs)
    self.wte = embed(cfg.vocab, cfg.d_model)
    self.wpe = embed(cfg.max_len, cfg.d_model)
    self.blocks = nnx.List([_NnxBlock(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=_LN_EPS, dtype=cfg.dtype,
                              param_dtype=cfg.dtype, rngs=rngs)

  def __call__(self, tokens):
    x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.wte.attend(self.ln_f(x))


def _token_batch(batch_size, seq_len, vocab):
  shape = (batch_size, seq_len)
  batch = {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
           "targets": jax.ShapeDtypeStruct(shape, jnp.int32)}

  def make_batch(key):
    tokens = jax.random.randint(key, (batch_size, seq_len + 1), 0, vocab, jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  return batch, make_batch


def _gpt_linen(name, description, cfg, batch_size, seq_len, scan_layers=False):
  batch, make_batch = _token_batch(batch_size, seq_len, cfg.vocab)
  return _linen_example(name, description, _GPT(cfg, scan_layers), batch, make_batch,
                        "inputs", "targets")


def _gpt_nnx(name, description, cfg, batch_size, seq_len):
  batch, make_batch = _token_batch(batch_size, seq_len, cfg.vocab)
  abstract_model = nnx.eval_shape(lambda: _NnxGPT(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):  # Only nnx.Param state is planned; anything else would be lost.
    raise RuntimeError(f"_NnxGPT holds non-Param state: {rest}")

  @jax.jit
  def init_params(key):
    return nnx.split(_NnxGPT(cfg, rngs=nnx.Rngs(key)), nnx.Param, ...)[1]

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params, rest)
    return _class_loss(model(batch["inputs"]), batch["targets"])

  return Example(name, description, loss_fn, _abstract(abstract_params), batch, init_params,
                 make_batch)


# ---------------------------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class _Entry:
  description: str
  batch_size: int
  seq_len: int | None  # None: the example has no sequence dimension.
  build: Callable  # build(name, description, batch_size, seq_len, dtype) -> Example


def _gpt_entry(description, n_layer, d_model, n_head, vocab, seq_len, batch_size, kind="linen"):
  def build(name, desc, b, t, dtype):
    # The position table keeps its default size when a shorter sequence is asked for, so the
    # parameter count of e.g. gpt2-small stays 124M whatever seq_len is planned.
    cfg = _GPTConfig(n_layer, d_model, n_head, vocab, max(seq_len, t), dtype)
    if kind == "nnx":
      return _gpt_nnx(name, desc, cfg, b, t)
    return _gpt_linen(name, desc, cfg, b, t, scan_layers=(kind == "scan"))
  return _Entry(description, batch_size, seq_len, build)


def _fixed_entry(description, batch_size, build):
  """An example without a sequence dimension; ``build(name, description, batch_size, dtype)``."""
  return _Entry(description, batch_size, None,
                lambda name, desc, b, t, dtype: build(name, desc, b, dtype))


_TINY = dict(n_layer=2, d_model=64, n_head=4, vocab=256, seq_len=32, batch_size=8)

_EXAMPLES = {
    "mlp": _fixed_entry("3-layer linen MLP classifier, 64 -> 256 -> 256 -> 10", 32, _mlp),
    "cnn": _fixed_entry("small linen CNN, 2 conv + max-pool + dense, 32x32x3 -> 10", 16, _cnn),
    "plain": _fixed_entry("2-layer tanh MLP regression in plain jnp (no flax), MSE", 16, _plain),
    "gpt-tiny": _gpt_entry("GPT-2-style decoder (linen), 2 layers, d 64", **_TINY),
    "gpt-tiny-nnx": _gpt_entry("gpt-tiny written with flax.nnx", **_TINY, kind="nnx"),
    "gpt-tiny-scan": _gpt_entry("gpt-tiny with nn.scan over layers", **_TINY, kind="scan"),
    "gpt2-small": _gpt_entry("GPT-2 small, 124M", 12, 768, 12, 50257, 1024, 8),
    "gpt2-medium": _gpt_entry("GPT-2 medium, 355M", 24, 1024, 16, 50257, 1024, 8),
    "gpt2-large": _gpt_entry("GPT-2 large, 774M", 36, 1280, 20, 50257, 1024, 8),
    "gpt2-xl": _gpt_entry("GPT-2 XL, 1.5B", 48, 1600, 25, 50257, 1024, 8),
    "gpt-1.3b": _gpt_entry("GPT 1.3B: 24 layers, d 2048", 24, 2048, 16, 50257, 1024, 8),
    "gpt-7b": _gpt_entry("GPT 6.6B: 32 layers, d 4096, vocab 32000", 32, 4096, 32, 32000, 2048,
                         8),
    "alexnet": _fixed_entry("AlexNet (torchvision layout), ImageNet 224x224x3 -> 1000", 32,
                            _imagenet(_AlexNet)),
    "vgg16": _fixed_entry("VGG-16, ImageNet 224x224x3 -> 1000", 32, _imagenet(_VGG16)),
}


def list_examples() -> tuple[str, ...]:
  """Names accepted by ``get_example``, in a stable order (small to large within a family)."""
  return tuple(_EXAMPLES)


def _check_positive(name, value):
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise errors.InvalidArgumentError(f"{name} must be a positive integer. Got {value!r}.")


def get_example(name: str, *, batch_size: int | None = None, seq_len: int | None = None,
                dtype: str | None = None) -> Example:
  """Builds a zoo example with abstract params and batch.

  Args:
    name: one of ``list_examples()``.
    batch_size: overrides the example's default batch size.
    seq_len: overrides the sequence length; only for ``gpt-*`` examples.
    dtype: parameter and compute dtype, e.g. ``"bfloat16"``; default float32. The loss is
      float32 either way.

  Returns:
    An ``Example``; building it materialises no parameters.

  Raises:
    InvalidArgumentError: unknown name, or an override of the wrong type or value.

  Examples:
    >>> ex = get_example("gpt2-small", batch_size=4, dtype="bfloat16")
    >>> ex.batch["inputs"].shape
    (4, 1024)
  """
  entry = _EXAMPLES.get(name)
  if entry is None:
    raise errors.InvalidArgumentError(
        f"Unknown example; choose one of {', '.join(_EXAMPLES)}. Got {name!r}.")
  _check_positive("batch_size", batch_size)
  _check_positive("seq_len", seq_len)
  if seq_len is not None and entry.seq_len is None:
    raise errors.InvalidArgumentError(
        f"seq_len applies only to sequence models (gpt-*); {name!r} has no sequence dimension. "
        f"Got seq_len={seq_len}.")
  try:
    compute_dtype = jnp.dtype(dtype or "float32")
  except TypeError:
    compute_dtype = None
  if compute_dtype is None or not jnp.issubdtype(compute_dtype, jnp.floating):
    raise errors.InvalidArgumentError(
        f"dtype must be a floating-point dtype name such as 'float32' or 'bfloat16'. "
        f"Got {dtype!r}.")
  return entry.build(name, entry.description, batch_size or entry.batch_size,
                     seq_len or entry.seq_len, compute_dtype)
