"""Per-layer remat and gradient accumulation: same numbers, less memory, chosen when needed."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses

import jax
import numpy as np
import optax
import pytest

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.planner import levers
from wapar_jax._src.search import DEFAULT_MEMORY_HEADROOM, Candidate
from wapar_jax._src.step import loss_and_grads, make_train_step, repeated_blocks

TX = optax.adamw(1e-3)


@pytest.mark.parametrize(
  "name, remat, microbatches",
  [
    pytest.param("gpt-tiny", "layers", 1, marks=pytest.mark.slow),
    # Each lever once more, each on another way of writing the layers.
    pytest.param("gpt-tiny-scan", "layers_dots", 2, marks=pytest.mark.slow),
    pytest.param("gpt-tiny-nnx", "none", 4, marks=pytest.mark.slow),
  ],
)
def test_levers_keep_loss_and_gradients(name, remat, microbatches):
  ex = examples.get_example(name)
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  loss, grads = jax.jit(loss_and_grads(ex.loss_fn))(params, batch)
  loss2, grads2 = jax.jit(loss_and_grads(ex.loss_fn, remat=remat, microbatches=microbatches))(
    params, batch
  )
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-5)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
  for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale)


def test_layers_of_a_python_loop_are_found_without_names():
  ex = examples.get_example("gpt2-small", seq_len=64)
  eqns = jax.make_jaxpr(ex.loss_fn)(ex.params, ex.batch).jaxpr.eqns
  blocks = repeated_blocks(eqns)
  assert len(blocks) == 12  # one per transformer block
  assert len({end - start for start, end in blocks}) == 1


@pytest.mark.slow
def test_emitted_step_with_levers_matches_single_device():
  ex = examples.get_example("gpt-tiny", batch_size=16)
  params = ex.init_params(jax.random.key(0))
  batch = ex.make_batch(jax.random.key(1))
  ref_step = jax.jit(make_train_step(ex.loss_fn, TX))
  p, o, ref = params, TX.init(params), []
  for _ in range(3):
    p, o, loss = ref_step(p, o, batch)
    ref.append(float(loss))
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=8,
    profile="cpu",
    strategy="fsdp",
    all_devices=True,
    remat="layers",
    microbatches=2,
  )
  assert (plan.chosen.remat, plan.chosen.microbatches) == ("layers", 2)
  step = plan.train_step()
  p = plan.shard(params)
  o = plan.init_opt_state(p)
  b = plan.shard_batch(batch)
  losses = []
  for _ in range(3):
    p, o, loss = step(p, o, b)
    losses.append(float(loss))
  np.testing.assert_allclose(losses, ref, rtol=1e-4)


def _compiled_peak(plan):
  # The plan may carry a made-up profile; memory does not depend on the one verify prices with.
  devices = jax.devices()[: plan.num_devices]
  return plan.verify(devices=devices, profile="cpu").compiled.peak_memory


@pytest.mark.slow
def test_planner_accumulates_when_memory_forces_it():
  ex = examples.get_example("gpt-tiny", batch_size=64)
  cpu = wap.load_profile("cpu")
  roomy = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=4,
    profile=cpu,
    strategy="dp",
    all_devices=True,
  )
  assert roomy.chosen.microbatches == 1 and roomy.memory_decision == ""
  # A device with 75% of what the plain data-parallel step needs.
  budget = 0.75 * roomy.predicted.peak_memory
  tight = dataclasses.replace(
    cpu, name="tight", memory_bytes=budget / (1 - DEFAULT_MEMORY_HEADROOM)
  )
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=TX,
    devices=4,
    profile=tight,
    strategy="dp",
    all_devices=True,
  )
  assert plan.chosen.microbatches > 1 or plan.chosen.remat != "none"
  assert plan.predicted.peak_memory <= budget
  assert "memory decided this plan" in plan.memory_decision
  assert "activations" in plan.memory_decision
  assert plan.memory_decision in plan.explain()
  assert _compiled_peak(plan) < _compiled_peak(roomy)


def test_bad_lever_arguments_are_named_errors():
  ex = examples.get_example("mlp")
  with pytest.raises(wap.errors.InvalidArgumentError, match="remat must be one of"):
    wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=TX, remat="everything")
  with pytest.raises(wap.errors.InvalidArgumentError, match="microbatches must be a positive int"):
    wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=TX, microbatches=0)


@pytest.mark.slow
def test_remat_is_verified_by_the_compiled_memory():
  # Compiled as the target compiles it, the recomputed forward survives: more FLOPs, less memory.
  ex = examples.get_example("gpt-tiny", batch_size=64)
  verified = {}
  for remat in ("none", "layers"):
    plan = wap.plan(
      ex.loss_fn,
      ex.params,
      ex.batch,
      optimizer=TX,
      devices=4,
      profile="cpu",
      strategy="dp",
      all_devices=True,
      remat=remat,
      microbatches=1,
    )
    verified[remat] = plan.verify(devices=jax.devices()[:4])
  plain, remat = verified["none"].compiled, verified["layers"].compiled
  assert remat.flops > 1.1 * plain.flops
  assert remat.peak_memory < 0.9 * plain.peak_memory
  assert abs(verified["layers"].errors["peak_memory"]) < 0.15


def test_a_gpu_profile_fits_a_rematerialised_plan_to_the_larger_compiler_peak():
  # GPU XLA reorders a rematerialised backward pass (recomputations early, weight-gradient
  # matmuls late) and kept more than XLA:CPU in every remat plan compiled for a GPU.
  ex = examples.get_example("gpt-tiny", batch_size=64)
  forced = dict(optimizer=TX, devices=4, strategy="dp", all_devices=True, microbatches=1)
  for remat in ("none", "layers"):
    gpu = wap.plan(
      ex.loss_fn, ex.params, ex.batch, profile="h100-sxm", remat=remat, **forced
    ).predicted
    cpu = wap.plan(
      ex.loss_fn,
      ex.params,
      ex.batch,
      profile="h100-sxm",
      remat=remat,
      memory_rules="xla:cpu",
      **forced,
    ).predicted
    if remat == "none":
      assert gpu.peak_memory < cpu.peak_memory
    else:
      assert gpu.peak_memory == cpu.peak_memory


def _memory(param, opt, act):
  return Candidate(
    8,
    8,
    1,
    (),
    "fsdp",
    "fsdp",
    1.0,
    1.0,
    0.0,
    1.0,
    0.0,
    param + opt + act,
    0.0,
    False,
    param,
    opt,
    act,
  )


def test_a_lever_is_ruled_out_only_by_a_policy_keeping_no_more_and_fewer_micro_batches():
  # 10 of parameters and state and 80 of activations on the best point: 4 micro-batches could
  # bring that to 10 + 20, 8 to 10 + 10.
  searched = {
    ("none", 1): [_memory(4, 6, 80), _memory(2, 4, 200)],
    ("layers", 1): [_memory(4, 6, 20)],
  }
  assert levers.cannot_fit(("none", 4), {("none", 1): searched[("none", 1)]}, budget=25)
  assert not levers.cannot_fit(("none", 8), {("none", 1): searched[("none", 1)]}, budget=25)
  # Per-layer remat bounds every policy: with 2 micro-batches it would need 10 + 10.
  assert levers.cannot_fit(("layers_dots", 1), searched, budget=25)
  assert not levers.cannot_fit(("layers_dots", 2), searched, budget=25)
  # Nothing bounds a policy from one that keeps more, nor from more micro-batches.
  assert not levers.cannot_fit(("layers", 1), {("none", 1): searched[("none", 1)]}, budget=25)
  assert not levers.cannot_fit(("none", 2), {("none", 4): [_memory(4, 6, 80)]}, budget=25)


@pytest.mark.slow
def test_levers_sure_to_fit_nowhere_are_not_traced_and_the_plan_is_the_same(monkeypatch):
  # A device that holds the data-parallel step only with per-layer remat and 8 micro-batches:
  # accumulation alone, or remat with fewer micro-batches, cannot fit at any mesh.
  ex = examples.get_example("gpt-tiny", batch_size=64, seq_len=64)
  cpu = wap.load_profile("cpu")
  kwargs = dict(optimizer=TX, devices=2, strategy="dp", all_devices=True)
  roomy = wap.plan(
    ex.loss_fn, ex.params, ex.batch, profile=cpu, remat="layers", microbatches=8, **kwargs
  )
  tight = dataclasses.replace(
    cpu,
    name="tight",
    memory_bytes=1.02 * roomy.predicted.peak_memory / (1 - DEFAULT_MEMORY_HEADROOM),
  )
  pruned = wap.plan(ex.loss_fn, ex.params, ex.batch, profile=tight, **kwargs)
  monkeypatch.setattr(levers, "cannot_fit", lambda *args: False)
  every = wap.plan(ex.loss_fn, ex.params, ex.batch, profile=tight, **kwargs)
  assert pruned.stats["variants_ruled_out"] > 0 and every.stats["variants_ruled_out"] == 0
  assert pruned.stats["variants_searched"] < every.stats["variants_searched"]
  assert pruned.chosen == every.chosen and pruned.param_specs == every.param_specs
  assert (pruned.chosen.remat, pruned.chosen.microbatches) != ("none", 1)
