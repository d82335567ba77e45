"""Bounded planning work: the sweep is built from divisors, never by scanning device counts, a
stated time bound (`max_seconds`) keeps the best plan so far, and large problems are warned of."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json
import math
import time
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.compilers import XLA_GPU
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.planner import notices
from wapar_jax._src.search import space as space_lib
from wapar_jax._src.search import sweep
from wapar_jax._src.step import make_train_step
from wapar_jax._src.trace import trace_train_step
from wapar_jax._src.tree import leaf_paths, path_str
from wapar_jax.errors import InvalidArgumentError

TX = optax.adamw(1e-3)


@pytest.fixture(scope="module")
def gpt_tiny():
  return examples.get_example("gpt-tiny", batch_size=96)


@pytest.fixture(scope="module")
def tiny_space(gpt_tiny):
  traced, _ = trace_train_step(gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, TX)
  paths = [path_str(k) for k in leaf_paths(gpt_tiny.params)]
  costs = step_costs(traced, CostCache(persist=False))
  return space_lib.build_space(traced, costs, paths, rules=XLA_GPU)


def _old_counts(max_devices, all_devices):
  """The sweep as it was: every count up to 64, multiples of 8, powers of two, the maximum."""
  if all_devices:
    return [max_devices]
  counts = set(range(1, min(max_devices, 64) + 1))
  counts.update(range(8, max_devices + 1, 8))
  counts.update(2**k for k in range(int(math.log2(max_devices)) + 1))
  counts.add(max_devices)
  return sorted(counts)


def test_divisors_are_every_divisor_in_order():
  for n in (1, 2, 12, 97, 360, 1024, 50304, 10**6):
    assert sweep.divisors(n) == [k for k in range(1, n + 1) if n % k == 0]


@pytest.mark.parametrize("max_devices", [1, 7, 8, 63, 64, 100, 1000, 1024])
def test_the_sweep_keeps_every_count_it_had_up_to_1024_devices(max_devices):
  for all_devices in (False, True):
    kept = [d for d in range(1, max_devices + 1) if sweep.in_sweep(d, max_devices, all_devices)]
    assert kept == _old_counts(max_devices, all_devices)


def test_above_1024_devices_the_sweep_keeps_four_counts_per_doubling():
  kept = [d for d in range(1025, 2**20 + 1) if sweep.in_sweep(d, 2**20, False)]
  assert kept[:8] == [1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096]
  assert len(kept) == 4 * 10
  assert max(b / a for a, b in zip(kept, kept[1:])) <= 1.25
  assert sweep.in_sweep(10**6, 10**6, False)  # the count offered is always a candidate


@pytest.mark.parametrize("max_devices", [8, 48, 96, 1024])
def test_sweep_points_are_the_device_count_by_divisor_scan_it_replaces(tiny_space, max_devices):
  # The (count, model degree) pairs the old loop priced: a model degree dividing the count,
  # a data degree dividing the batch, and some group the model axis can split.
  space = tiny_space
  old = {
    (d, tp)
    for d in _old_counts(max_devices, False)
    for tp in range(1, d + 1)
    if d % tp == 0
    and space.batch_size % (d // tp) == 0
    and (tp == 1 or space_lib.group_sets(space, tp))
  }
  points = sweep.sweep_points(space, max_devices, False)
  assert {(d, tp) for d, degrees in points for tp in degrees} == old
  powers = [d for d, _ in points if d & (d - 1) == 0]
  assert [d for d, _ in points[: len(powers)]] == powers  # the coarse curve first


@pytest.mark.slow
def test_planning_a_million_devices_answers_in_seconds(gpt_tiny):
  # Before: every count's divisors by scanning 1..d, 125,000 counts: over 10 minutes.
  # Counted, not timed (timings under load are noise): the work is the device counts priced,
  # which must not grow with the devices offered. benchmarks/plan_speed.py times it.
  plan = wap.plan(
    gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, optimizer=TX, devices=10**6, cache=False
  )
  small = wap.plan(
    gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, optimizer=TX, devices=1024, cache=False
  )
  assert plan.chosen == small.chosen  # batch 96 splits no further than 1024 devices reach
  assert plan.stats["device_counts_in_sweep"] < 100
  assert plan.stats["candidates_evaluated"] < 2 * small.stats["candidates_evaluated"]


def test_a_past_deadline_prices_until_one_candidate_fits(tiny_space):
  profile = wap.load_profile("h100-sxm")
  full = sweep.search_until(tiny_space, profile, 1024)
  cut = sweep.search_until(tiny_space, profile, 1024, deadline=time.perf_counter() - 1)
  assert not full.cut_short and full.counts_priced == full.counts
  assert cut.cut_short and cut.counts_priced == 1  # one device fits gpt-tiny
  assert cut.counts == full.counts
  assert all(c in full.ranked for c in cut.ranked)


def test_max_seconds_returns_the_best_plan_so_far_and_says_how_much_ran(gpt_tiny):
  args = (gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch)
  with pytest.warns(UserWarning, match=r"cut short by max_seconds=1e-06 .* priced 1 of \d+"):
    plan = wap.plan(*args, optimizer=TX, devices=1024, max_seconds=1e-6)
  assert plan.stats["device_counts_priced"] < plan.stats["device_counts_in_sweep"]
  assert plan.chosen.fits
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # in time: no warning
    full = wap.plan(*args, optimizer=TX, devices=1024, max_seconds=600)
  assert full.stats["device_counts_priced"] == full.stats["device_counts_in_sweep"]
  assert full.chosen.step_time <= plan.chosen.step_time


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "10", True])
def test_max_seconds_must_be_a_positive_number(gpt_tiny, bad):
  with pytest.raises(InvalidArgumentError, match="max_seconds must be a positive number"):
    wap.plan(
      gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, optimizer=TX, devices=8, max_seconds=bad
    )


def test_large_problems_are_warned_of_before_the_long_part(gpt_tiny, monkeypatch):
  monkeypatch.setattr(notices, "LARGE_PARAM_LEAVES", 10)
  monkeypatch.setattr(notices, "LARGE_SEARCH_CANDIDATES", 10)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    wap.plan(gpt_tiny.loss_fn, gpt_tiny.params, gpt_tiny.batch, optimizer=TX, devices=64)
  messages = [str(w.message) for w in caught]
  assert any("leaves: JAX traces the loss" in m for m in messages)
  assert any("prices about" in m and "max_seconds" in m for m in messages)


@pytest.mark.slow
def test_many_tiny_parameters_plan_about_as_fast_as_jax_traces_their_step():
  # 1,000 float32[4] leaves summed into a loss: 27,000 equations. Before: 2.4x the time jax
  # takes to trace the plain step (the gradient rebound equation by equation, full garbage
  # collections over every equation, per-op text and numpy indexing); now 1.3x.
  params = {f"p{i:04d}": jax.ShapeDtypeStruct((4,), jnp.float32) for i in range(1000)}
  batch = {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
  loss_fn = lambda p, b: sum(jnp.sum(b["x"] * v) for v in p.values())
  t0 = time.perf_counter()
  state = jax.eval_shape(TX.init, params)
  jax.make_jaxpr(make_train_step(loss_fn, TX))(params, state, batch)
  jax_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  # stages=1: the repeated blocks of the sum look like a layer stack, and the pipeline search
  # would trace the step a second time (per-layer remat) before finding that none can be cut.
  wap.plan(loss_fn, params, batch, optimizer=TX, devices=8, cache=False, stages=1)
  # Alone it is 1.3x; beside another test worker on two cores it has reached 1.9x. 2.2x still
  # fails the old 2.4x.
  assert time.perf_counter() - t0 < 2.2 * jax_seconds


def test_the_cli_passes_max_seconds_through(capsys):
  from wapar_jax.cli import main

  with pytest.warns(UserWarning, match="cut short by max_seconds"):
    code = main(["plan", "gpt-tiny", "--devices", "1024", "--max-seconds", "1e-6", "--json"])
  assert code == 0
  stats = json.loads(capsys.readouterr().out)["stats"]
  assert stats["device_counts_priced"] < stats["device_counts_in_sweep"]
