"""Property: for random MLP / CNN / transformer sizes and device counts, every plan family's
emitted step gives the single-device step's numbers.

Hypothesis draws the sizes, the device count (1, 2, 4 or 8) and the seed; each family is a test
case of its own, so every family is covered whatever is drawn. Runs are reproducible
(`derandomize=True`, no example database): CI sees the same examples every time.

Hypothesis tries the simplest example first (the first choice of every list), so the lists
start with sizes that make each family do real work (weights FSDP splits, dims that split 8
ways), and the kinds and device counts start at another one per family. The fast tier draws
that one example per family, with the model kind and device count given per family so that
the five cover every kind and several counts; the slow tier draws two examples of any kind
and count per family.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from hypothesis import given, note, settings
from hypothesis import strategies as st

import wapar_jax as wap
from wapar_jax._src.step import make_train_step
from wapar_jax.examples import _gpt
from wapar_jax.examples._common import classification_batch, linen_example

FAMILIES = ("dp", "zero1", "fsdp", "tp", "dp_tp")
# dp_tp needs two devices on each axis.
DEVICES = {"dp_tp": (8, 4)}
KINDS = ("mlp", "cnn", "transformer")
# The fast tier's (model kind, device count) per family.
FAST = {
  "dp": ("cnn", 2),
  "zero1": ("transformer", 4),
  "fsdp": ("mlp", 8),
  "tp": ("transformer", 8),
  "dp_tp": ("cnn", 8),
}
# Momentum SGD: its state is split by ZeRO-1 and FSDP, and its update is linear in the
# gradients, so the updated parameters compare the gradients at rtol 1e-4 (AdamW's first update
# divides by the gradient's own size and would hide them).
TX = optax.sgd(0.05, momentum=0.9)
STEPS = 2
REPRODUCIBLE = dict(deadline=None, derandomize=True, database=None, print_blob=True)


class _MLP(nn.Module):
  widths: tuple[int, ...]
  classes: int

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = nn.gelu(nn.Dense(w)(x))
    return nn.Dense(self.classes)(x)


class _CNN(nn.Module):
  features: tuple[int, ...]
  classes: int

  @nn.compact
  def __call__(self, x):
    for f in self.features:
      x = nn.relu(nn.Conv(f, (3, 3))(x))
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


def _turned(choices: tuple, family: str) -> tuple:
  """`choices` rotated by the family's place, so that the five families' simplest examples
  differ."""
  k = FAMILIES.index(family) % len(choices)
  return choices[k:] + choices[:k]


@st.composite
def workloads(draw, family, kind=None, devices=None):
  """(example, device count, seed): a random small model of `kind` on `devices` (each drawn
  when None), with sizes that split over every device count drawn."""
  kind = kind or draw(st.sampled_from(_turned(KINDS, family)))
  devices = devices or draw(st.sampled_from(_turned(DEVICES.get(family, (8, 4, 2, 1)), family)))
  batch_size = draw(st.sampled_from((16, 8)))
  seed = draw(st.integers(0, 2**16))
  if kind == "mlp":
    # 64 x 256 and 256 x 256 weights are large enough for FSDP to split.
    widths = tuple(draw(st.lists(st.sampled_from((256, 64)), min_size=1, max_size=3)))
    batch, make_batch = classification_batch(batch_size, (64,), 10, jnp.float32)
    ex = linen_example("mlp", "", _MLP(widths, 10), batch, make_batch, "x", "y")
  elif kind == "cnn":
    features = tuple(draw(st.lists(st.sampled_from((32, 16, 8)), min_size=1, max_size=2)))
    channels = draw(st.sampled_from((3, 4)))
    batch, make_batch = classification_batch(batch_size, (8, 8, channels), 10, jnp.float32)
    ex = linen_example("cnn", "", _CNN(features, 10), batch, make_batch, "x", "y")
  else:
    seq = draw(st.sampled_from((16, 8)))
    cfg = _gpt.GPTConfig(
      n_layer=draw(st.sampled_from((1, 2))),
      d_model=draw(st.sampled_from((64, 32))),
      n_head=draw(st.sampled_from((4, 2))),
      vocab=draw(st.sampled_from((128, 64))),
      max_len=seq,
    )
    ex = _gpt.gpt_linen("gpt", "", cfg, batch_size, seq)
  return ex, devices, seed


def _check_emitted_step_matches_single_device(family, workload):
  ex, devices, seed = workload
  shapes = jax.tree.map(lambda x: tuple(x.shape), ex.params)
  note(f"{ex.name} on {devices} devices, seed {seed}, params {shapes}")  # shown on failure
  params = ex.init_params(jax.random.key(seed))
  batch = ex.make_batch(jax.random.key(seed + 1))
  ref_step = jax.jit(make_train_step(ex.loss_fn, TX))
  ref_p, ref_o, ref_losses = params, TX.init(params), []
  for _ in range(STEPS):
    ref_p, ref_o, loss = ref_step(ref_p, ref_o, batch)
    ref_losses.append(float(loss))

  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=devices,
    profile="cpu",
    strategy=family,
    all_devices=True,
  )
  assert plan.num_devices == devices
  assert plan.strategy == (family if devices > 1 else "single")
  step = plan.train_step()
  p = plan.shard(params)
  o, sharded_batch, losses = plan.init_opt_state(p), plan.shard_batch(batch), []
  for _ in range(STEPS):
    p, o, loss = step(p, o, sharded_batch)
    losses.append(float(loss))

  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
  # What the steps changed, leaf by leaf, against the scale of the largest change: entries
  # that should be exactly equal differ by float32 rounding of sums taken in another order.
  moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p, params)
  ref_moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), ref_p, params)
  scale = max(float(np.max(np.abs(m))) for m in jax.tree.leaves(ref_moved))
  for a, e in zip(jax.tree.leaves(moved), jax.tree.leaves(ref_moved)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * scale)


# The fast tier: the two families that split the most (state, then batch x model); the rest in
# the full suite.
@pytest.mark.parametrize(
  "family",
  [f if f in ("fsdp", "dp_tp") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES],
)
@settings(max_examples=1, **REPRODUCIBLE)
@given(data=st.data())
def test_emitted_step_matches_single_device(family, data):
  workload = data.draw(workloads(family, *FAST[family]), label="workload")
  _check_emitted_step_matches_single_device(family, workload)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=1, **REPRODUCIBLE)
@given(data=st.data())
def test_emitted_step_matches_single_device_on_more_workloads(family, data):
  workload = data.draw(workloads(family), label="workload")
  _check_emitted_step_matches_single_device(family, workload)
