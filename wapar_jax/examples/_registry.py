"""The table of example names and their builders, and the lookup that validates overrides."""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from wapar_jax.errors import InvalidArgumentError
from wapar_jax.examples import _bert, _gpt, _imagenet, _moe, _resnet, _small, _t5, _vit
from wapar_jax.examples._common import Example


@dataclasses.dataclass(frozen=True)
class _Entry:
  description: str
  batch_size: int
  seq_len: int | None  # None: the example has no sequence dimension.
  # build(name, description, batch_size, seq_len, dtype, **hooks) -> Example; the hooks
  # (`hold`, `remat_blocks`) rebuild the model as a MaxText-style baseline writes it by hand
  # (benchmarks/suite.py), for entries whose `n_head` is set.
  build: Callable
  n_head: int | None = None  # the attention heads a tensor-parallel axis must divide


def _gpt_entry(description, n_layer, d_model, n_head, vocab, seq_len, batch_size, kind="linen"):
  def build(name, desc, b, t, dtype, **hooks):
    # The position table keeps its default size when a shorter sequence is asked for, so the
    # parameter count of e.g. gpt2-small stays 124M whatever seq_len is planned.
    cfg = _gpt.GPTConfig(n_layer, d_model, n_head, vocab, max(seq_len, t), dtype)
    if kind == "nnx":
      return _gpt.gpt_nnx(name, desc, cfg, b, t)
    return _gpt.gpt_linen(name, desc, cfg, b, t, scan_layers=(kind == "scan"), **hooks)

  return _Entry(description, batch_size, seq_len, build, None if kind == "nnx" else n_head)


def _bert_entry(description, n_layer, d_model, n_head, vocab, seq_len, batch_size):
  def build(name, desc, b, t, dtype, **hooks):
    cfg = _gpt.GPTConfig(n_layer, d_model, n_head, vocab, max(seq_len, t), dtype)
    return _bert.bert(name, desc, cfg, b, t, **hooks)

  return _Entry(description, batch_size, seq_len, build, n_head)


def _t5_entry(description, n_layer, d_model, n_head, d_ff, vocab, seq_len, batch_size):
  def build(name, desc, b, t, dtype, **hooks):
    cfg = _t5.T5Config(n_layer, d_model, n_head, d_ff, vocab, dtype)
    return _t5.t5(name, desc, cfg, b, t, **hooks)

  return _Entry(description, batch_size, seq_len, build, n_head)


def _moe_entry(description, n_layer, d_model, n_head, vocab, n_experts, seq_len, batch_size):
  def build(name, desc, b, t, dtype, **hooks):
    cfg = _moe.MoEConfig(n_layer, d_model, n_head, vocab, max(seq_len, t), n_experts, dtype=dtype)
    return _moe.moe(name, desc, cfg, b, t, **hooks)

  return _Entry(description, batch_size, seq_len, build, n_head)


def _fixed_entry(description, batch_size, build, n_head=None):
  """An example without a sequence dimension; ``build(name, description, batch_size, dtype)``."""
  return _Entry(
    description,
    batch_size,
    None,
    lambda name, desc, b, t, dtype, **hooks: build(name, desc, b, dtype, **hooks),
    n_head,
  )


_TINY = dict(n_layer=2, d_model=64, n_head=4, vocab=256, seq_len=32, batch_size=8)

_EXAMPLES = {
  "mlp": _fixed_entry("3-layer linen MLP classifier, 64 -> 256 -> 256 -> 10", 32, _small.mlp),
  "cnn": _fixed_entry("small linen CNN, 2 conv + max-pool + dense, 32x32x3 -> 10", 16, _small.cnn),
  "plain": _fixed_entry(
    "2-layer tanh MLP regression in plain jnp (no flax), MSE", 16, _small.plain
  ),
  "gpt-tiny": _gpt_entry("GPT-2-style decoder (linen), 2 layers, d 64", **_TINY),
  "gpt-tiny-nnx": _gpt_entry("gpt-tiny written with flax.nnx", **_TINY, kind="nnx"),
  "gpt-tiny-scan": _gpt_entry("gpt-tiny with nn.scan over layers", **_TINY, kind="scan"),
  "gpt2-small": _gpt_entry("GPT-2 small, 124M", 12, 768, 12, 50257, 1024, 8),
  "gpt2-small-scan": _gpt_entry(
    "GPT-2 small with nn.scan over its 12 layers", 12, 768, 12, 50257, 1024, 8, kind="scan"
  ),
  "gpt2-medium": _gpt_entry("GPT-2 medium, 355M", 24, 1024, 16, 50257, 1024, 8),
  "gpt2-large": _gpt_entry("GPT-2 large, 774M", 36, 1280, 20, 50257, 1024, 8),
  "gpt2-xl": _gpt_entry("GPT-2 XL, 1.5B", 48, 1600, 25, 50257, 1024, 8),
  "gpt-1.3b": _gpt_entry("GPT 1.3B: 24 layers, d 2048", 24, 2048, 16, 50257, 1024, 8),
  "gpt-7b": _gpt_entry("GPT 6.6B: 32 layers, d 4096, vocab 32000", 32, 4096, 32, 32000, 2048, 8),
  # Llama-2-70B's depth, width and vocabulary on GPT blocks (4d MLP, full attention heads), its
  # layers under nn.scan as large models are written.
  "gpt-65b-scan": _gpt_entry(
    "GPT 65B: 80 layers, d 8192, vocab 32000, nn.scan over layers",
    80,
    8192,
    64,
    32000,
    4096,
    256,
    kind="scan",
  ),
  "moe-tiny": _moe_entry(
    "mixture-of-experts decoder, 2 layers, d 64, 4 experts top-2", 2, 64, 4, 256, 4, 32, 8
  ),
  # GPT-2 small's shape, vocab padded to a multiple of 64 (as nanoGPT does), 8 experts per
  # layer: 0.52B parameters, ~0.17B active per token.
  "moe-gpt": _moe_entry(
    "mixture-of-experts GPT: 12 layers, d 768, 8 experts top-2, 0.52B",
    12,
    768,
    12,
    50304,
    8,
    1024,
    8,
  ),
  # moe-gpt with twice the experts, batch 16 (splits over 2 x 8 devices): 0.98B parameters,
  # the same ~0.17B active per token.
  "moe-gpt-16e": _moe_entry(
    "mixture-of-experts GPT: 12 layers, d 768, 16 experts top-2, 0.98B",
    12,
    768,
    12,
    50304,
    16,
    1024,
    16,
  ),
  "bert-tiny": _bert_entry("BERT-style encoder with masked-LM loss, 2 layers, d 64", **_TINY),
  "bert-large": _bert_entry(
    "BERT-large, masked-LM: 24 layers, d 1024, 335M", 24, 1024, 16, 30522, 512, 8
  ),
  "t5-tiny": _t5_entry("T5-style encoder-decoder, 2 + 2 layers, d 64", 2, 64, 4, 256, 256, 32, 8),
  "t5-base": _t5_entry(
    "T5-base (v1.0), 12 + 12 layers, d 768, 223M", 12, 768, 12, 3072, 32128, 512, 8
  ),
  "vit-tiny": _fixed_entry(
    "ViT, 2 layers, d 64, 32x32x3 in 8x8 patches -> 10",
    8,
    _vit.vit(_vit.ViTConfig(2, 64, 4, 32, 8, 10)),
    n_head=4,
  ),
  "vit-b16": _fixed_entry(
    "ViT-B/16, ImageNet 224x224x3 -> 1000, 86M",
    32,
    _vit.vit(_vit.ViTConfig(12, 768, 12, 224, 16, 1000)),
    n_head=12,
  ),
  "alexnet": _fixed_entry(
    "AlexNet (torchvision layout), ImageNet 224x224x3 -> 1000", 32, _imagenet.alexnet
  ),
  "vgg16": _fixed_entry("VGG-16, ImageNet 224x224x3 -> 1000", 32, _imagenet.vgg16),
  "resnet-tiny": _fixed_entry(
    "bottleneck ResNet, 2 stages of 1 block, width 8, 32x32x3 -> 10",
    8,
    _resnet.resnet((1, 1), 8, 32, 10),
  ),
  "resnet50": _fixed_entry(
    "ResNet-50 (v1.5, batch norm), ImageNet 224x224x3 -> 1000, 25.6M",
    32,
    _resnet.resnet((3, 4, 6, 3), 64, 224, 1000),
  ),
}


def handwritten_example(name: str, batch_size: int, seq_len: int | None, dtype, hold, remat_blocks):
  """(Example, attention heads) of a transformer example rebuilt as a MaxText-style model is
  written by hand: ``hold(x)`` applied to the residual stream at every block boundary, every
  block rematerialised when ``remat_blocks``. None for examples that have no such variant (CNNs,
  MLPs, the NNX GPTs)."""
  entry = _EXAMPLES.get(name)
  if entry is None or entry.n_head is None:
    return None
  ex = entry.build(
    name,
    entry.description,
    batch_size,
    seq_len or entry.seq_len,
    jnp.dtype(dtype),
    hold=hold,
    remat_blocks=remat_blocks,
  )
  return ex, entry.n_head


def list_examples() -> tuple[str, ...]:
  """Names accepted by ``get_example``, in a stable order (small to large within a family)."""
  return tuple(_EXAMPLES)


def _check_positive(name, value):
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise InvalidArgumentError(f"{name} must be a positive integer. Got {value!r}.")


def get_example(
  name: str, *, batch_size: int | None = None, seq_len: int | None = None, dtype: str | None = None
) -> Example:
  """Builds a named example with abstract params and batch.

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
    raise InvalidArgumentError(
      f"Unknown example; choose one of {', '.join(_EXAMPLES)}. Got {name!r}."
    )
  _check_positive("batch_size", batch_size)
  _check_positive("seq_len", seq_len)
  if seq_len is not None and entry.seq_len is None:
    sequence_models = ", ".join(n for n, e in _EXAMPLES.items() if e.seq_len is not None)
    raise InvalidArgumentError(
      f"seq_len applies only to sequence models ({sequence_models}); {name!r} has no sequence "
      f"dimension. Got seq_len={seq_len}."
    )
  try:
    compute_dtype = jnp.dtype(dtype or "float32")
  except TypeError:
    compute_dtype = None
  if compute_dtype is None or not jnp.issubdtype(compute_dtype, jnp.floating):
    raise InvalidArgumentError(
      f"dtype must be a floating-point dtype name such as 'float32' or 'bfloat16'. Got {dtype!r}."
    )
  return entry.build(
    name, entry.description, batch_size or entry.batch_size, seq_len or entry.seq_len, compute_dtype
  )
