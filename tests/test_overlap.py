"""The overlap model: windows of independent compute, exposure, and where plans report it."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses
import json

import numpy as np
import optax
import pytest

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.cost.overlap import exposed, windows
from wapar_jax._src.fmt import human_seconds
from wapar_jax._src.verify.collectives import collectives, target_comm_time
from wapar_jax._src.verify.hlo import multiplicities, parse_hlo
from wapar_jax._src.verify.kernels import instruction_seconds
from wapar_jax._src.verify.overlap import collective_windows, exposed_comm_time


def _prefix(seconds):
  return np.concatenate([[0.0], np.cumsum(seconds)])[:, None]


# A backward pass by hand: ops 0-1 forward (1 s each), op 2 the second layer's backward (makes
# its weight gradient), op 3 the first layer's (makes its gradient), op 4 the update reading
# both. The second layer's reduction has op 3 (1 s) to hide behind, the first's nothing.
BACKWARD = _prefix([1.0, 1.0, 1.0, 1.0, 0.5])


def test_gradient_reduction_hides_behind_the_rest_of_the_backward_pass():
  w = windows(np.array([2, 3]), np.array([4, 4]), np.array([1.0, 1.0]), BACKWARD)
  assert w.waits.tolist() == [0, 1]  # both read by the update, in the order made
  assert w.compute[:, 0].tolist() == [1.0, 0.0]
  assert w.share.tolist() == [0.5, 0.5]
  # 0.6 s each: both must finish within op 3 (1 s x 0.8), the second alone within nothing.
  assert exposed(w, 1.2, np.ones(1), 0.8) == pytest.approx(max(1.2 - 0.8, 0.6))
  # Small enough to hide but for the one made last.
  assert exposed(w, 0.2, np.ones(1), 1.0) == pytest.approx(0.1)
  assert exposed(w, 1.2, np.ones(1), 0.0) == 1.2


def test_reductions_read_at_once_stay_exposed_and_disjoint_windows_add():
  # Tensor-parallel all-reduces: each read by the next op, with one 1 s op in between.
  w = windows(np.array([0, 2]), np.array([2, 4]), np.array([1.0, 1.0]), BACKWARD)
  assert w.read_at.tolist() == [2, 4]
  assert exposed(w, 4.0, np.ones(1), 1.0) == pytest.approx(2 * (2.0 - 1.0))
  read_next = windows(np.array([0, 1]), np.array([1, 2]), np.array([1.0, 1.0]), BACKWARD)
  assert exposed(read_next, 1.0, np.ones(1), 1.0) == pytest.approx(1.0)


def test_no_window_leaves_the_class_exposed():
  w = windows(np.zeros(0), np.zeros(0), np.zeros(0), BACKWARD)
  assert exposed(w, 0.3, np.ones(1), 1.0) == 0.3


_HLO = """HloModule step, num_partitions=2

ENTRY %main (p0: f32[1048576], p1: f32[1048576]) -> (f32[1048576], f32[1048576]) {
  %p0 = f32[1048576]{0} parameter(0)
  %p1 = f32[1048576]{0} parameter(1)
  %g = f32[1048576]{0} multiply(%p0, %p0)
  %ar = f32[1048576]{0} all-reduce(%g), replica_groups={{0,1}}, to_apply=%sum
  %k1 = f32[1048576]{0} add(%p1, %p1)
  %k2 = f32[1048576]{0} add(%k1, %k1)
  %upd = f32[1048576]{0} add(%ar, %k2)
  ROOT %out = (f32[1048576]{0}, f32[1048576]{0}) tuple(%upd, %k2)
}
"""


def test_compiled_module_hides_a_reduction_behind_the_kernels_before_its_reader():
  module = parse_hlo(_HLO)
  mult = multiplicities(module)[0]
  profile = wap.load_profile("h100-sxm")
  found = collectives(_HLO, {"data": 2}, profile, module, mult)
  placed = collective_windows(module, module.entry)
  made, read, _, update = placed["ar"]
  assert (made.tolist(), read.tolist()) == ([2], [6])  # after %g, read by %upd
  assert not update.any()  # %upd reads no step argument
  kernel = instruction_seconds(module, module.entry, profile)
  window = kernel[4] + kernel[5]  # %k1, %k2: independent of the all-reduce
  comm = target_comm_time(found, profile)
  want = max(comm - profile.overlap_efficiency * window, 0.0)
  assert exposed_comm_time(module, mult, found, profile) == pytest.approx(want)
  assert 0 < want < comm
  cpu = dataclasses.replace(profile, overlap_efficiency=0.0)
  assert exposed_comm_time(module, mult, found, cpu) == pytest.approx(comm)


@pytest.fixture(scope="module")
def dp_plan():
  ex = examples.get_example("gpt-tiny", batch_size=64, seq_len=256)
  return wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=optax.adamw(1e-3),
    devices=8,
    profile="a100-40g-pcie",
    strategy="dp",
    all_devices=True,
    cache=False,
  )


def test_the_exposed_communication_is_reported_beside_the_ranked_step(dp_plan):
  c = dp_plan.chosen
  assert 0 < c.exposed_comm_time < c.comm_time  # gradients hide behind the backward pass
  assert c.step_time == pytest.approx(c.compute_time + c.comm_time)  # `step_seconds`
  assert dp_plan.predicted.exposed_comm_time == c.exposed_comm_time


def test_explain_reports_the_exposed_communication(dp_plan):
  p = dp_plan.predicted
  text = dp_plan.explain()
  assert f"leaving {human_seconds(p.exposed_comm_time)} exposed" in text
  assert f"{human_seconds(p.comm_time - p.exposed_comm_time)} of the collectives" in text
  assert "exposed" in dp_plan.summary()


def test_plan_file_round_trip_and_files_from_before_the_overlap_model(dp_plan):
  loaded = wap.Plan.from_json(dp_plan.to_json())
  assert loaded.chosen.exposed_comm_time == dp_plan.chosen.exposed_comm_time
  assert loaded.predicted.exposed_comm_time == dp_plan.predicted.exposed_comm_time
  old = json.loads(dp_plan.to_json())
  for c in [old["chosen"], old["predicted"], *old["candidates"]]:
    c.pop("exposed_comm_time")
  before = wap.Plan.from_json(json.dumps(old))
  assert before.chosen.exposed_comm_time is None
  assert before.chosen.exposed_comm == before.chosen.comm_time
  assert before.predicted.exposed_comm == before.predicted.comm_time


def test_a_long_window_in_the_stream_does_not_merge_the_stalls_of_the_others():
  # A collective made at the top and read at the end (a loss sum) shares the stream with two
  # reductions each read at once: each of those still stalls the compute, one after the other.
  ops = _prefix([1.0] * 6)
  w = windows(np.array([0, 1, 3]), np.array([5, 2, 4]), np.array([0.2, 1.0, 1.0]), ops)
  assert exposed(w, 1.1, np.ones(1), 1.0) == pytest.approx(1.0)


def test_the_input_gradient_of_a_split_matmul_is_reduced_before_the_weight_gradient_runs():
  # jax emits dW = dot(dy, x) before dx = dot(dy, W); XLA issues dx's reduction first and
  # runs dW while it is in flight, so the planner's order moves the reduction's chain up.
  from types import SimpleNamespace

  from wapar_jax._src.search.overlap import hoisted_positions

  def op(i, primitive, ins, outs):
    return SimpleNamespace(index=i, primitive=primitive, in_vars=ins, out_vars=outs)

  # vars: 0 dy, 1 x, 2 W, 3 dW, 4 dx partial, 5 dx scaled, 6 the next op's result
  ops = (
    op(0, "dot_general", (0, 1), (3,)),
    op(1, "dot_general", (0, 2), (4,)),
    op(2, "mul", (4,), (5,)),
    op(3, "add", (5, 3), (6,)),
  )
  traced = SimpleNamespace(ops=ops, num_vars=7, def_pos=np.array([-1, -1, -1, 0, 1, 2, 3]))
  makes = np.array([False, True, False, False])
  sinks = np.array([False, False, True, False])  # the partial is reduced after the scaling
  assert hoisted_positions(traced, makes, sinks).tolist() == [2, 0, 1, 3]
  assert hoisted_positions(traced, makes & False, sinks & False).tolist() == [0, 1, 2, 3]


_READERS = """HloModule step, num_partitions=2

ENTRY %main (w: f32[1048576], s: f32[1024], x: f32[1048576]) -> (f32[1048576], f32[1048576]) {
  %w = f32[1048576]{0} parameter(0)
  %s = f32[1024]{0} parameter(1)
  %x = f32[1048576]{0} parameter(2)
  %g = f32[1048576]{0} multiply(%x, %x)
  %grad = f32[1048576]{0} all-reduce(%g), replica_groups={{0,1}}, to_apply=%sum
  %act = f32[1048576]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%sum
  %new_w = f32[1048576]{0} add(%w, %grad)
  %sb = f32[1048576]{0} broadcast(%s), dimensions={}
  %normed = f32[1048576]{0} fusion(%act, %s), kind=kLoop, calls=%norm
  ROOT %out = (f32[1048576]{0}, f32[1048576]{0}) tuple(%new_w, %normed)
}
"""


def test_a_reduction_read_beside_a_parameter_of_its_size_is_a_weight_gradient():
  # A norm's backward reads its scale beside the activation gradient: that is not an update.
  placed = collective_windows(parse_hlo(_READERS), "main")
  assert placed["grad"][3].tolist() == [True]
  assert placed["act"][3].tolist() == [False]
