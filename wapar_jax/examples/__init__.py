"""Built-in example models: named single-device workloads to plan, test and benchmark with.

Not imported by ``import wapar_jax``; import it on its own (it builds its models with flax and
optax).

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

Example:
  >>> import jax
  >>> import optax
  >>> import wapar_jax
  >>> from wapar_jax import examples
  >>> ex = examples.get_example("gpt2-small", batch_size=4)
  >>> ex.batch["inputs"].shape
  (4, 1024)
  >>> plan = wapar_jax.plan(ex.loss_fn, ex.params, ex.batch, optimizer=optax.adamw(1e-4),
  ...                       devices=8, profile="h100-sxm")
  >>> tiny = examples.get_example("gpt-tiny")
  >>> loss = tiny.loss_fn(tiny.init_params(jax.random.key(0)), tiny.make_batch(jax.random.key(1)))
  >>> loss.dtype
  dtype('float32')
"""

from wapar_jax.examples._common import Example as Example
from wapar_jax.examples._registry import get_example as get_example
from wapar_jax.examples._registry import list_examples as list_examples

__all__ = ["Example", "get_example", "list_examples"]
