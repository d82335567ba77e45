import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wapar_jax import errors, examples
from wapar_jax.examples import _moe, _registry

TINY = (
  "mlp",
  "cnn",
  "plain",
  "gpt-tiny",
  "gpt-tiny-nnx",
  "gpt-tiny-scan",
  "moe-tiny",
  "bert-tiny",
  "t5-tiny",
  "vit-tiny",
  "resnet-tiny",
)


def _count(params):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def _signature(tree):
  return jax.tree.structure(tree), [(x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def test_list_examples_has_every_family():
  names = examples.list_examples()
  assert set(TINY) <= set(names)
  for name in (
    "gpt2-small",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "gpt-1.3b",
    "gpt-7b",
    "alexnet",
    "vgg16",
    "resnet50",
    "bert-large",
    "vit-b16",
    "t5-base",
    "moe-gpt",
  ):
    assert name in names


@pytest.mark.parametrize("name", examples.list_examples())
def test_every_example_is_abstract(name):
  ex = examples.get_example(name)
  assert ex.name == name and ex.description
  for tree in (ex.params, ex.batch):
    leaves = jax.tree.leaves(tree)
    assert leaves and all(type(x) is jax.ShapeDtypeStruct for x in leaves)
  batch_dims = {x.shape[0] for x in jax.tree.leaves(ex.batch)}
  assert len(batch_dims) == 1


@pytest.mark.parametrize(
  "name", [n if n == "gpt-tiny" else pytest.param(n, marks=pytest.mark.slow) for n in TINY]
)
def test_tiny_examples_run(name):
  ex = examples.get_example(name)
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  assert _signature(params) == _signature(ex.params)
  assert _signature(batch) == _signature(ex.batch)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves((params, batch)))

  loss, grads = jax.jit(jax.value_and_grad(ex.loss_fn))(params, batch)
  assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(loss)
  assert _signature(grads) == _signature(ex.params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  if name.startswith(("gpt", "moe", "bert")):
    # GPT-2 / BERT initialisation (std 0.02): logits are near zero, so the loss is near
    # log(vocab) (moe-* adds 0.01 times a load-balancing loss near 1).
    assert abs(float(loss) - math.log(256)) < 0.1


@pytest.mark.parametrize("name", ("alexnet", "vgg16", "gpt2-small", "resnet50"))
def test_large_init_params_traces_to_abstract_params(name):
  ex = examples.get_example(name)
  assert _signature(jax.eval_shape(ex.init_params, jax.random.key(0))) == _signature(ex.params)
  assert _signature(jax.eval_shape(ex.make_batch, jax.random.key(0))) == _signature(ex.batch)
  loss = jax.eval_shape(ex.loss_fn, ex.params, ex.batch)
  assert loss.shape == () and loss.dtype == jnp.float32


@pytest.mark.parametrize(
  "name",
  [
    pytest.param(n, marks=pytest.mark.slow)
    # The encoder (BERT's block is ViT's too), the scan and the encoder-decoder; the MoE and
    # the unrolled GPT take the same hooks in the same places.
    for n in ("gpt-tiny-scan", "bert-tiny")
  ],
)
def test_handwritten_variant_is_the_same_model(name):
  """The MaxText-style rebuild (a hook on the residual stream, every block rematerialised) has
  the parameters, loss and gradients of the example as written."""
  plain = examples.get_example(name)
  held = []
  ex, n_head = _registry.handwritten_example(
    name,
    plain.batch["inputs" if "inputs" in plain.batch else "x"].shape[0],
    None,
    "float32",
    hold=lambda x: held.append(x.shape) or x,
    remat_blocks=True,
  )
  assert n_head == 4 and _signature(ex.params) == _signature(plain.params)
  params, batch = plain.init_params(jax.random.key(0)), plain.make_batch(jax.random.key(1))
  want = jax.jit(jax.value_and_grad(plain.loss_fn))(params, batch)
  got = jax.jit(jax.value_and_grad(ex.loss_fn))(params, batch)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
  assert held and all(len(shape) == 3 for shape in held)  # the residual stream, [B, T, D]


def test_examples_without_a_handwritten_variant():
  assert _registry.handwritten_example("resnet-tiny", 8, None, "float32", None, True) is None
  assert _registry.handwritten_example("gpt-tiny-nnx", 8, None, "float32", None, True) is None


def test_gpt_variants_have_the_same_parameter_count():
  counts = {
    name: _count(examples.get_example(name).params)
    for name in ("gpt-tiny", "gpt-tiny-nnx", "gpt-tiny-scan")
  }
  assert len(set(counts.values())) == 1, counts


def test_scan_stacks_block_params_over_layers():
  params = examples.get_example("gpt-tiny-scan").params
  assert all(x.shape[0] == 2 for x in jax.tree.leaves(params["blocks"]))


def test_model_sizes():
  assert abs(_count(examples.get_example("gpt2-small").params) / 124.44e6 - 1) < 0.01
  assert _count(examples.get_example("gpt2-small-scan").params) == _count(
    examples.get_example("gpt2-small").params
  )
  assert 6e9 < _count(examples.get_example("gpt-7b").params) < 7.5e9
  assert abs(_count(examples.get_example("vgg16").params) / 138.36e6 - 1) < 0.01
  # Published counts: torchvision's ResNet-50, Hugging Face's bert-large (without its pooler,
  # which a masked-LM loss does not use) and t5-base, timm's ViT-B/16.
  assert abs(_count(examples.get_example("resnet50").params) / 25.557e6 - 1) < 0.01
  assert abs(_count(examples.get_example("bert-large").params) / 334.09e6 - 1) < 0.01
  assert abs(_count(examples.get_example("vit-b16").params) / 86.568e6 - 1) < 0.01
  assert abs(_count(examples.get_example("t5-base").params) / 222.90e6 - 1) < 0.01
  # moe-gpt has no published twin: GPT-2 small's attention with 8 experts of 2 x 768 x 3072 each.
  d, layers, experts = 768, 12, 8
  per_layer = 4 * (d * d + d) + 4 * d + d * experts + experts * 2 * d * 4 * d
  assert (
    _count(examples.get_example("moe-gpt").params) == layers * per_layer + (50304 + 1024 + 2) * d
  )


def test_batch_norm_statistics_are_not_parameters():
  paths = [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(examples.get_example("resnet-tiny").params)
  ]
  assert not [p for p in paths if "mean" in p or "var" in p]
  assert any("scale" in p for p in paths) and any("bias" in p for p in paths)


def test_moe_experts_are_stacked():
  moe = examples.get_example("moe-gpt").params["block_0"]["moe"]
  assert moe["w_in"].shape == (8, 768, 3072) and moe["w_out"].shape == (8, 3072, 768)
  assert moe["router"].shape == (768, 8)


@pytest.mark.slow
def test_moe_dispatch_matches_per_token_experts():
  cfg = _moe.MoEConfig(1, 16, 2, 32, 8, n_experts=4, capacity_factor=2.0)
  layer = _moe.MoEMLP(cfg)
  # Capacity 1 per expert (ceil(0.125 * 2 * 8 / 4)): at most 4 of a sequence's 16 choices.
  tight = _moe.MoEMLP(dataclasses.replace(cfg, capacity_factor=0.125))
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  params = jax.jit(layer.init)(jax.random.key(1), x)["params"]

  @jax.jit
  def outputs(params, x):
    y, aux = layer.apply({"params": params}, x)
    y_tight, _ = tight.apply({"params": params}, x)
    # Each token's gate-weighted sum of its top-2 experts, with the experts' weights gathered
    # per token rather than dispatched.
    gates, chosen = jax.lax.top_k(jax.nn.softmax(x @ params["router"], axis=-1), 2)
    gates = gates / gates.sum(-1, keepdims=True)
    hidden = jax.nn.gelu(jnp.einsum("btd,btkdf->btkf", x, params["w_in"][chosen]))
    expected = jnp.einsum("btk,btkf,btkfd->btd", gates, hidden, params["w_out"][chosen])
    return y, aux, y_tight, expected

  y, aux, y_tight, expected = outputs(params, x)
  # With capacity for every token, the dense dispatch / combine einsums change nothing.
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  assert aux.shape == () and float(aux) >= 1.0 - 1e-6  # 1 exactly when routing is uniform
  # Past capacity a token is dropped: its output is zero.
  served = np.any(np.asarray(y_tight) != 0, axis=-1)
  assert 0 < served.sum() <= 2 * 4


def test_gpt_7b_builds_without_materialising_a_weight():
  ex = examples.get_example("gpt-7b")
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(ex.params))
  assert ex.batch["inputs"].shape == (8, 2048)


def test_overrides():
  ex = examples.get_example("gpt-tiny", batch_size=4, seq_len=16, dtype="bfloat16")
  assert ex.batch["inputs"].shape == (4, 16)
  assert {jnp.dtype(x.dtype) for x in jax.tree.leaves(ex.params)} == {jnp.dtype(jnp.bfloat16)}
  # A shorter sequence keeps the default position table, so the parameter count is unchanged.
  assert _count(ex.params) == _count(examples.get_example("gpt-tiny").params)
  loss = jax.jit(ex.loss_fn)(ex.init_params(jax.random.key(0)), ex.make_batch(jax.random.key(1)))
  assert loss.dtype == jnp.float32 and np.isfinite(loss)

  ex = examples.get_example("cnn", batch_size=2, dtype="bfloat16")
  assert ex.batch["x"].shape == (2, 32, 32, 3) and ex.batch["x"].dtype == jnp.bfloat16
  assert jax.eval_shape(ex.loss_fn, ex.params, ex.batch).dtype == jnp.float32


def test_unknown_name_lists_choices():
  with pytest.raises(errors.InvalidArgumentError, match=r"gpt2-small.*Got 'gpt-9000'\.$"):
    examples.get_example("gpt-9000")


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(batch_size=0),
    dict(batch_size=2.5),
    dict(seq_len=-1),
    dict(dtype="int32"),
    dict(dtype="no-such-dtype"),
  ],
)
def test_invalid_overrides(kwargs):
  with pytest.raises(errors.InvalidArgumentError, match="Got"):
    examples.get_example("gpt-tiny", **kwargs)


def test_seq_len_on_a_model_without_sequence_is_rejected():
  with pytest.raises(errors.InvalidArgumentError, match="seq_len"):
    examples.get_example("mlp", seq_len=8)
  with pytest.raises(errors.InvalidArgumentError, match=r"bert-tiny.*t5-tiny.*'vit-tiny'"):
    examples.get_example("vit-tiny", seq_len=8)


@pytest.mark.parametrize("name", ("moe-tiny", "bert-tiny", "t5-tiny"))
def test_seq_len_applies_to_every_sequence_model(name):
  ex = examples.get_example(name, batch_size=2, seq_len=16)
  shapes = {k: x.shape for k, x in ex.batch.items()}
  if name.startswith("t5"):  # the decoder gets a quarter of the encoder's length
    assert shapes == {"inputs": (2, 16), "decoder_inputs": (2, 4), "targets": (2, 4)}
  else:
    assert set(shapes.values()) == {(2, 16)}
  assert _count(ex.params) == _count(examples.get_example(name).params)
  assert jax.eval_shape(ex.loss_fn, ex.params, ex.batch).dtype == jnp.float32
