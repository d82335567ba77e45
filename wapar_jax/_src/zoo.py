"""Built-in model zoo: named single-device workloads for the CLI, the tests and the benchmarks.

Each example is a pure ``loss_fn(params, batch) -> float32 scalar`` with no sharding annotations,
plus *abstract* params and batch (pytrees of ``jax.ShapeDtypeStruct``, built with ``eval_shape`` so
even the 7B model costs no memory), and ``init_params`` / ``make_batch`` for when real arrays are
wanted.

Batch formats:

* ``mlp``, ``cnn``, ``alexnet``, ``vgg16``, ``resnet*``, ``vit-*``: ``{"x": float [B, ...],
  "y": int32 [B]}``, class labels, softmax cross-entropy. ResNet's batch norm runs in training
  mode (batch statistics); its running averages are not parameters and are not returned.
* ``plain``: ``{"x": float [B, 32], "y": float32 [B, 8]}`` (regression targets, MSE loss).
* ``gpt-*``, ``moe-*``: ``{"inputs": int32 [B, T], "targets": int32 [B, T]}``; ``targets`` is
  ``inputs`` shifted left by one token. Two leaves of equal shape rather than one ``[B, T + 1]``
  token array, so the sequence dimension is never sliced inside the loss. ``moe-*`` adds 0.01 times
  the load-balancing loss of its routers.
* ``bert-*``: ``{"inputs": int32 [B, T], "targets": int32 [B, T], "weights": float32 [B, T]}``;
  ``inputs`` has 15% of ``targets``' tokens replaced by [MASK], ``weights`` is 1 there and 0
  elsewhere; the loss is the masked-LM cross-entropy averaged over the masked tokens.
* ``t5-*``: ``{"inputs": int32 [B, T_in], "decoder_inputs": int32 [B, T_out], "targets": int32
  [B, T_out]}`` with ``T_out = T_in // 4``; ``decoder_inputs`` is ``targets`` shifted right
  behind the start token 0.

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

from wapar_jax import errors


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


def _module_example(name, description, module, batch, make_batch, input_keys, loss):
  """Wraps a linen module applied to `batch[k] for k in input_keys` into an Example whose loss
  is `loss(module outputs, batch)`."""
  # init needs shapes only; batch 1 is cheapest.
  dummies = [jnp.zeros((1, *batch[k].shape[1:]), batch[k].dtype) for k in input_keys]

  @jax.jit
  def init_params(key):
    return module.init(key, *dummies)["params"]

  def loss_fn(params, batch):
    return loss(module.apply({"params": params}, *(batch[k] for k in input_keys)), batch)

  return Example(name, description, loss_fn, _eval_params(init_params), batch, init_params,
                 make_batch)


def _linen_example(name, description, module, batch, make_batch, input_key, label_key):
  """Wraps a linen module whose output is logits into an Example with a cross-entropy loss."""
  return _module_example(name, description, module, batch, make_batch, (input_key,),
                         lambda logits, batch: _class_loss(logits, batch[label_key]))


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
# ResNet-50 (bottleneck blocks, batch norm in training mode).


# Training mode: normalise with the batch's own statistics. Momentum and epsilon are
# torchvision's (its momentum 0.1 weighs the other term). The two-pass variance, as PyTorch
# computes it, keeps sharded and single-device gradients within float32 rounding of each other;
# the one-pass E[x^2] - E[x]^2 cancels badly.
_batch_norm = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9,
                                epsilon=1e-5, use_fast_variance=False)


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
    x = nn.Conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, param_dtype=self.dtype, name="stem")(x)
    x = _batch_norm(dtype=self.dtype, param_dtype=self.dtype, name="stem_norm")(x)
    x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding="SAME")
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        x = _Bottleneck(self.width * 2 ** i, 2 if i > 0 and j == 0 else 1, self.dtype)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(x)


def _resnet(stage_sizes, width, image_size, num_classes):
  def build(name, description, batch_size, dtype):
    module = _ResNet(stage_sizes, width, num_classes, dtype)
    batch, make_batch = _classification_batch(batch_size, (image_size, image_size, 3),
                                              num_classes, dtype)
    dummy = jnp.zeros((1, image_size, image_size, 3), dtype)
    variables = _abstract(jax.eval_shape(module.init, jax.random.key(0), dummy))
    stats = variables["batch_stats"]

    @jax.jit
    def init_params(key):
      return module.init(key, dummy)["params"]

    def loss_fn(params, batch):
      # Training-mode batch norm normalises with the batch's own statistics; the running averages
      # only feed evaluation. They are not parameters, so they start at their initial values
      # here and their update is discarded: the planned step is pure in (params, batch).
      running = jax.tree_util.tree_map_with_path(
          lambda path, s: (jnp.ones if path[-1].key == "var" else jnp.zeros)(s.shape, s.dtype),
          stats)
      logits, _ = module.apply({"params": params, "batch_stats": running}, batch["x"],
                               mutable=["batch_stats"])
      return _class_loss(logits, batch["y"])

    return Example(name, description, loss_fn, variables["params"], batch, init_params,
                   make_batch)
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


def _attention(q, k, v, *, causal, bias=None, scaled=True):
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
    scores = scores * (dh ** -0.5)
  if bias is not None:
    scores = scores + bias
  if causal:  # built from iota, no T x T constant
    mask = jnp.arange(tq)[:, None] >= jnp.arange(k.shape[1])[None, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, tq, h * dh)


def _self_attention(y, n_head, dense, *, causal):
  """Multi-head self-attention of linen ``y [B, T, D]``.

  Called inside a compact method: the projections ``query``, ``key``, ``value`` and
  ``attn_out`` become submodules of the caller, so blocks that share this keep flat param trees.
  """
  b, t, d = y.shape
  heads = (n_head, d // n_head)
  q, k, v = (dense(d, name=n)(y).reshape(b, t, *heads) for n in ("query", "key", "value"))
  return dense(d, name="attn_out")(_attention(q, k, v, causal=causal))


class _Block(nn.Module):
  """Pre-LayerNorm transformer block: causal multi-head attention, then a 4x GELU MLP."""
  cfg: _GPTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d = x.shape[-1]
    dense = functools.partial(nn.Dense, kernel_init=_normal, dtype=cfg.dtype, param_dtype=cfg.dtype)
    norm = functools.partial(nn.LayerNorm, epsilon=_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype)

    x = x + _self_attention(norm(name="ln_1")(x), cfg.n_head, dense, causal=True)
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
    x = x + self.attn_out(_attention(q, k, v, causal=True))
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
# Bidirectional encoders: BERT (post-LayerNorm, masked-LM head) and ViT (pre-LayerNorm, patches).


class _EncoderBlock(nn.Module):
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
    dense = functools.partial(nn.Dense, kernel_init=self.kernel_init, dtype=self.dtype,
                              param_dtype=self.dtype)
    norm = functools.partial(nn.LayerNorm, epsilon=self.epsilon, dtype=self.dtype,
                             param_dtype=self.dtype)

    def mlp(y):
      return dense(d, name="mlp_out")(
          jax.nn.gelu(dense(self.d_ff, name="mlp_in")(y), approximate=False))

    if self.pre_norm:
      x = x + _self_attention(norm(name="ln_1")(x), self.n_head, dense, causal=False)
      return x + mlp(norm(name="ln_2")(x))
    x = norm(name="ln_1")(x + _self_attention(x, self.n_head, dense, causal=False))
    return norm(name="ln_2")(x + mlp(x))


_BERT_LN_EPS = 1e-12
_MASK_ID = 103  # BERT's [MASK] token
_MASK_RATE = 0.15  # fraction of tokens masked, as in BERT pre-training


class _BERT(nn.Module):
  """BERT encoder with its masked-LM head (dense, GELU, LayerNorm, tied decoder plus a bias).

  Segment embeddings and the pooler / next-sentence head are left out: the masked-LM loss does
  not use them (they are 0.3% of BERT-large).
  """
  cfg: _GPTConfig  # the same fields: layers, width, heads, vocabulary, position-table rows

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    embed = functools.partial(nn.Embed, embedding_init=_normal, dtype=cfg.dtype,
                              param_dtype=cfg.dtype)
    norm = functools.partial(nn.LayerNorm, epsilon=_BERT_LN_EPS, dtype=cfg.dtype,
                             param_dtype=cfg.dtype)
    wte = embed(cfg.vocab, cfg.d_model, name="wte")
    x = wte(tokens) + embed(cfg.max_len, cfg.d_model, name="wpe")(jnp.arange(tokens.shape[1]))
    x = norm(name="ln_embed")(x)
    for i in range(cfg.n_layer):
      x = _EncoderBlock(cfg.n_head, 4 * cfg.d_model, _BERT_LN_EPS, pre_norm=False,
                        kernel_init=_normal, dtype=cfg.dtype, name=f"block_{i}")(x)
    x = nn.Dense(cfg.d_model, kernel_init=_normal, dtype=cfg.dtype, param_dtype=cfg.dtype,
                 name="mlm_dense")(x)
    x = norm(name="mlm_ln")(jax.nn.gelu(x, approximate=False))
    bias = self.param("mlm_bias", nn.initializers.zeros, (cfg.vocab,), cfg.dtype)
    return wte.attend(x) + bias


def _bert(name, description, cfg, batch_size, seq_len):
  module = _BERT(cfg)
  shape = (batch_size, seq_len)
  batch = {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
           "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
           "weights": jax.ShapeDtypeStruct(shape, jnp.float32)}

  def make_batch(key):
    k_tokens, k_mask = jax.random.split(key)
    tokens = jax.random.randint(k_tokens, shape, 0, cfg.vocab, jnp.int32)
    masked = jax.random.bernoulli(k_mask, _MASK_RATE, shape)
    return {"inputs": jnp.where(masked, _MASK_ID, tokens), "targets": tokens,
            "weights": masked.astype(jnp.float32)}

  def masked_lm_loss(logits, batch):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                            batch["targets"])
    weights = batch["weights"]
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  return _module_example(name, description, module, batch, make_batch, ("inputs",),
                         masked_lm_loss)


@dataclasses.dataclass(frozen=True)
class _ViTConfig:
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
  cfg: _ViTConfig

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    b = images.shape[0]
    x = nn.Conv(cfg.d_model, (cfg.patch, cfg.patch), strides=(cfg.patch, cfg.patch),
                padding="VALID", dtype=cfg.dtype, param_dtype=cfg.dtype, name="patch_embed")(images)
    x = x.reshape(b, -1, cfg.d_model)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, cfg.d_model), cfg.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.d_model)).astype(x.dtype), x], axis=1)
    x = x + self.param("pos_embed", _normal, (1, x.shape[1], cfg.d_model), cfg.dtype)
    for i in range(cfg.n_layer):
      x = _EncoderBlock(cfg.n_head, 4 * cfg.d_model, _VIT_LN_EPS, pre_norm=True,
                        kernel_init=nn.initializers.xavier_uniform(), dtype=cfg.dtype,
                        name=f"block_{i}")(x)
    x = nn.LayerNorm(epsilon=_VIT_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype,
                     name="ln_f")(x[:, 0])
    return nn.Dense(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.dtype, name="head")(x)


def _vit(cfg_without_dtype):
  def build(name, description, batch_size, dtype):
    cfg = dataclasses.replace(cfg_without_dtype, dtype=dtype)
    batch, make_batch = _classification_batch(
        batch_size, (cfg.image_size, cfg.image_size, 3), cfg.num_classes, dtype)
    return _linen_example(name, description, _ViT(cfg), batch, make_batch, "x", "y")
  return build


# ---------------------------------------------------------------------------------------------
# T5 (v1.0): encoder-decoder, RMS norms, relative position biases, ReLU MLP, no dense biases.


@dataclasses.dataclass(frozen=True)
class _T5Config:
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
  far = max_exact + (log_ratio / math.log(max_distance / max_exact)
                     * (num_buckets - max_exact)).astype(jnp.int32)
  far = jnp.minimum(far, num_buckets - 1)
  return bucket + jnp.where(n < max_exact, n, far)


class _RelativePositionBias(nn.Module):
  """Per-head score bias ``[1, H, Tq, Tk]`` from a learned table over position buckets."""
  cfg: _T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, tq, tk):
    cfg = self.cfg
    buckets = _relative_position_bucket(jnp.arange(tk)[None, :] - jnp.arange(tq)[:, None],
                                        self.bidirectional, cfg.num_buckets, cfg.max_distance)
    table = self.param("table", nn.initializers.normal(1.0), (cfg.num_buckets, cfg.n_head),
                       cfg.dtype)
    return jnp.take(table, buckets, axis=0).transpose(2, 0, 1)[None].astype(jnp.float32)


class _T5Attention(nn.Module):
  """Multi-head attention without biases or score scaling (folded into the query init)."""
  cfg: _T5Config
  causal: bool

  @nn.compact
  def __call__(self, x, memory, bias):
    cfg = self.cfg
    d, h = cfg.d_model, cfg.n_head
    dense = functools.partial(nn.Dense, d, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.dtype)
    std = d ** -0.5
    q = dense(kernel_init=nn.initializers.normal(std * (d // h) ** -0.5), name="query")(x)
    k = dense(kernel_init=nn.initializers.normal(std), name="key")(memory)
    v = dense(kernel_init=nn.initializers.normal(std), name="value")(memory)

    def split(y):
      return y.reshape(*y.shape[:2], h, d // h)

    out = _attention(split(q), split(k), split(v), causal=self.causal, bias=bias, scaled=False)
    return dense(kernel_init=nn.initializers.normal(std), name="attn_out")(out)


class _T5Block(nn.Module):
  """Pre-RMSNorm block: self-attention, cross-attention (decoder only), ReLU MLP."""
  cfg: _T5Config
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
    y = nn.relu(dense(cfg.d_ff, kernel_init=nn.initializers.normal(cfg.d_model ** -0.5),
                      name="mlp_in")(norm(name="ln_mlp")(x)))
    return x + dense(cfg.d_model, kernel_init=nn.initializers.normal(cfg.d_ff ** -0.5),
                     name="mlp_out")(y)


class _T5Stack(nn.Module):
  """The encoder or the decoder: one position-bias table for all its layers, a final norm."""
  cfg: _T5Config
  decoder: bool

  @nn.compact
  def __call__(self, x, encoded=None):
    t = x.shape[1]
    bias = _RelativePositionBias(self.cfg, bidirectional=not self.decoder, name="rel_bias")(t, t)
    for i in range(self.cfg.n_layer):
      x = _T5Block(self.cfg, self.decoder, name=f"block_{i}")(x, bias, encoded)
    return nn.RMSNorm(epsilon=_T5_EPS, dtype=self.cfg.dtype, param_dtype=self.cfg.dtype,
                      name="ln_f")(x)


class _T5(nn.Module):
  """T5: one embedding shared by encoder, decoder and the (rescaled) output projection."""
  cfg: _T5Config

  @nn.compact
  def __call__(self, inputs, decoder_inputs):
    cfg = self.cfg
    shared = nn.Embed(cfg.vocab, cfg.d_model, embedding_init=nn.initializers.normal(1.0),
                      dtype=cfg.dtype, param_dtype=cfg.dtype, name="shared")
    encoded = _T5Stack(cfg, decoder=False, name="encoder")(shared(inputs))
    x = _T5Stack(cfg, decoder=True, name="decoder")(shared(decoder_inputs), encoded)
    return shared.attend(x * cfg.d_model ** -0.5)


def _t5(name, description, cfg, batch_size, seq_len):
  module = _T5(cfg)
  in_shape, out_shape = (batch_size, seq_len), (batch_size, _t5_target_len(seq_len))
  batch = {"inputs": jax.ShapeDtypeStruct(in_shape, jnp.int32),
           "decoder_inputs": jax.ShapeDtypeStruct(out_shape, jnp.int32),
           "targets": jax.ShapeDtypeStruct(out_shape, jnp.int32)}

  def make_batch(key):
    k_in, k_out = jax.random.split(key)
    targets = jax.random.randint(k_out, out_shape, 0, cfg.vocab, jnp.int32)
    start = jnp.zeros((batch_size, 1), jnp.int32)  # T5 starts decoding from token 0 (padding)
    return {"inputs": jax.random.randint(k_in, in_shape, 0, cfg.vocab, jnp.int32),
            "decoder_inputs": jnp.concatenate([start, targets[:, :-1]], axis=1),
            "targets": targets}

  return _module_example(name, description, module, batch, make_batch,
                         ("inputs", "decoder_inputs"),
                         lambda logits, batch: _class_loss(logits, batch["targets"]))


def _t5_target_len(seq_len):
  # Span corruption turns 512 input tokens into ~114 targets; T5 trains with 512 / 128.
  return max(seq_len // 4, 1)


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts decoder: GPT-2 blocks whose MLP is a top-k routed set of experts.


@dataclasses.dataclass(frozen=True)
class _MoEConfig:
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


class _MoEMLP(nn.Module):
  """Top-k experts with dense dispatch and combine einsums (GShard; MaxText's dense-matmul path).

  Each sequence is one routing group. An expert takes at most
  ``C = ceil(capacity_factor * top_k * T / E)`` tokens of a group; first choices of the whole
  group claim slots before second choices, and tokens past capacity are dropped (they continue
  on the residual path only). Expert weights are stacked ``[E, D, F]`` and ``[E, F, D]``.

  Returns the output and the Switch load-balancing loss, 1 when routing is uniform.
  """
  cfg: _MoEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, t, d = x.shape
    e, k = cfg.n_experts, cfg.top_k
    capacity = math.ceil(cfg.capacity_factor * k * t / e)
    router = self.param("router", _normal, (d, e), cfg.dtype)
    w_in = self.param("w_in", _normal, (e, d, 4 * d), cfg.dtype)
    w_out = self.param("w_out", _normal, (e, 4 * d, d), cfg.dtype)

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
  """``_Block`` with the MLP replaced by ``_MoEMLP``; returns ``(x, load-balancing loss)``."""
  cfg: _MoEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = functools.partial(nn.Dense, kernel_init=_normal, dtype=cfg.dtype, param_dtype=cfg.dtype)
    norm = functools.partial(nn.LayerNorm, epsilon=_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype)
    x = x + _self_attention(norm(name="ln_1")(x), cfg.n_head, dense, causal=True)
    y, aux = _MoEMLP(cfg, name="moe")(norm(name="ln_2")(x))
    return x + y, aux


class _MoEGPT(nn.Module):
  """``_GPT`` with ``_MoEBlock``s; returns logits and the mean load-balancing loss of the layers."""
  cfg: _MoEConfig

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    embed = functools.partial(nn.Embed, embedding_init=_normal, dtype=cfg.dtype,
                              param_dtype=cfg.dtype)
    wte = embed(cfg.vocab, cfg.d_model, name="wte")
    x = wte(tokens) + embed(cfg.max_len, cfg.d_model, name="wpe")(jnp.arange(tokens.shape[1]))
    aux = []
    for i in range(cfg.n_layer):
      x, layer_aux = _MoEBlock(cfg, name=f"block_{i}")(x)
      aux.append(layer_aux)
    x = nn.LayerNorm(epsilon=_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.dtype, name="ln_f")(x)
    return wte.attend(x), sum(aux) / cfg.n_layer


def _moe(name, description, cfg, batch_size, seq_len):
  module = _MoEGPT(cfg)
  batch, make_batch = _token_batch(batch_size, seq_len, cfg.vocab)

  def loss(outputs, batch):
    logits, aux = outputs
    return _class_loss(logits, batch["targets"]) + _AUX_LOSS_WEIGHT * aux

  return _module_example(name, description, module, batch, make_batch, ("inputs",), loss)


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


def _bert_entry(description, n_layer, d_model, n_head, vocab, seq_len, batch_size):
  def build(name, desc, b, t, dtype):
    return _bert(name, desc, _GPTConfig(n_layer, d_model, n_head, vocab, max(seq_len, t), dtype),
                 b, t)
  return _Entry(description, batch_size, seq_len, build)


def _t5_entry(description, n_layer, d_model, n_head, d_ff, vocab, seq_len, batch_size):
  def build(name, desc, b, t, dtype):
    return _t5(name, desc, _T5Config(n_layer, d_model, n_head, d_ff, vocab, dtype), b, t)
  return _Entry(description, batch_size, seq_len, build)


def _moe_entry(description, n_layer, d_model, n_head, vocab, n_experts, seq_len, batch_size):
  def build(name, desc, b, t, dtype):
    cfg = _MoEConfig(n_layer, d_model, n_head, vocab, max(seq_len, t), n_experts, dtype=dtype)
    return _moe(name, desc, cfg, b, t)
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
    "gpt2-small-scan": _gpt_entry("GPT-2 small with nn.scan over its 12 layers", 12, 768, 12,
                                  50257, 1024, 8, kind="scan"),
    "gpt2-medium": _gpt_entry("GPT-2 medium, 355M", 24, 1024, 16, 50257, 1024, 8),
    "gpt2-large": _gpt_entry("GPT-2 large, 774M", 36, 1280, 20, 50257, 1024, 8),
    "gpt2-xl": _gpt_entry("GPT-2 XL, 1.5B", 48, 1600, 25, 50257, 1024, 8),
    "gpt-1.3b": _gpt_entry("GPT 1.3B: 24 layers, d 2048", 24, 2048, 16, 50257, 1024, 8),
    "gpt-7b": _gpt_entry("GPT 6.6B: 32 layers, d 4096, vocab 32000", 32, 4096, 32, 32000, 2048,
                         8),
    "moe-tiny": _moe_entry("mixture-of-experts decoder, 2 layers, d 64, 4 experts top-2",
                           2, 64, 4, 256, 4, 32, 8),
    # GPT-2 small's shape, vocab padded to a multiple of 64 (as nanoGPT does), 8 experts per
    # layer: 0.52B parameters, ~0.17B active per token.
    "moe-gpt": _moe_entry("mixture-of-experts GPT: 12 layers, d 768, 8 experts top-2, 0.52B",
                          12, 768, 12, 50304, 8, 1024, 8),
    "bert-tiny": _bert_entry("BERT-style encoder with masked-LM loss, 2 layers, d 64", **_TINY),
    "bert-large": _bert_entry("BERT-large, masked-LM: 24 layers, d 1024, 335M", 24, 1024, 16,
                              30522, 512, 8),
    "t5-tiny": _t5_entry("T5-style encoder-decoder, 2 + 2 layers, d 64", 2, 64, 4, 256, 256, 32,
                         8),
    "t5-base": _t5_entry("T5-base (v1.0), 12 + 12 layers, d 768, 223M", 12, 768, 12, 3072, 32128,
                         512, 8),
    "vit-tiny": _fixed_entry("ViT, 2 layers, d 64, 32x32x3 in 8x8 patches -> 10", 8,
                             _vit(_ViTConfig(2, 64, 4, 32, 8, 10))),
    "vit-b16": _fixed_entry("ViT-B/16, ImageNet 224x224x3 -> 1000, 86M", 32,
                            _vit(_ViTConfig(12, 768, 12, 224, 16, 1000))),
    "alexnet": _fixed_entry("AlexNet (torchvision layout), ImageNet 224x224x3 -> 1000", 32,
                            _imagenet(_AlexNet)),
    "vgg16": _fixed_entry("VGG-16, ImageNet 224x224x3 -> 1000", 32, _imagenet(_VGG16)),
    "resnet-tiny": _fixed_entry("bottleneck ResNet, 2 stages of 1 block, width 8, 32x32x3 -> 10",
                                8, _resnet((1, 1), 8, 32, 10)),
    "resnet50": _fixed_entry("ResNet-50 (v1.5, batch norm), ImageNet 224x224x3 -> 1000, 25.6M",
                             32, _resnet((3, 4, 6, 3), 64, 224, 1000)),
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
    seq_len: overrides the sequence length; only for sequence models (``gpt-*``, ``moe-*``,
      ``bert-*``, ``t5-*``; for T5 the encoder's, the decoder gets a quarter of it).
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
    sequence_models = ", ".join(n for n, e in _EXAMPLES.items() if e.seq_len is not None)
    raise errors.InvalidArgumentError(
        f"seq_len applies only to sequence models ({sequence_models}); {name!r} has no sequence "
        f"dimension. Got seq_len={seq_len}.")
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
