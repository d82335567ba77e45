"""The emitted step under jax.distributed: 2 local processes x 4 virtual CPU devices, gloo.

Each process runs tests/multihost_worker.py: plan "gpt-tiny" for the 8 global devices, feed its
own rows of the batch, 3 steps. The losses must equal an 8-device run in this (single) process
and agree between the processes. A missing peer or a silent coordinator must fail fast.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import wapar_jax as wap
from wapar_jax._src import emit, search, zoo

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
STEPS = 3
# Bounds every wait on a worker: a hung collective or coordinator fails the test, never hangs it.
RUN_TIMEOUT_S = 120


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(process_id: int, num_processes: int, port: int, *extra: str) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own
  return subprocess.Popen(
      [sys.executable, WORKER, "--process-id", str(process_id), "--num-processes",
       str(num_processes), "--coordinator", f"127.0.0.1:{port}", *extra],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of each; if one fails or the time runs out, kills the rest."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break  # a dead peer would leave the others blocked in a collective
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.wait(), *p.communicate()) for p in procs]


def _losses(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.startswith("{")]
  return json.loads(lines[-1])


@pytest.mark.parametrize("strategy", ["dp", "fsdp"])
def test_two_processes_match_single_process(strategy):
  port = _free_port()
  procs = [_start(i, 2, port, "--strategy", strategy, "--steps", str(STEPS)) for i in range(2)]

  # The reference runs here while the workers start: 8 devices, one process, same plan family.
  ex = zoo.get_example("gpt-tiny")
  tx = optax.adamw(1e-3)
  plan = wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=tx, devices=8, profile="h100-sxm",
                  strategy=strategy, all_devices=True)
  params = plan.init_params(ex.init_params, jax.random.key(0))
  opt_state = plan.init_opt_state(params)
  batch = plan.shard_batch(ex.make_batch(jax.random.key(1)))
  step = plan.train_step()
  expected = []
  for _ in range(STEPS):
    params, opt_state, loss = step(params, opt_state, batch)
    expected.append(float(loss))

  results = _run_all(procs, RUN_TIMEOUT_S)
  for i, (rc, out, err) in enumerate(results):
    assert rc == 0, f"process {i} exited with {rc}:\n{err[-3000:]}"
  reports = [_losses(out) for _, out, _ in results]
  assert reports[0]["losses"] == reports[1]["losses"]
  np.testing.assert_allclose(reports[0]["losses"], expected, rtol=1e-5)
  # Each worker's plan treats a process as a node: the data axis is the one that crosses.
  assert reports[0]["mesh_shape"] == {"data": 8}
  assert reports[0]["cross_node_axes"] == ["data"]


def test_missing_peer_fails_fast_with_clear_error():
  # Process 0 is the coordinator; process 1 never starts. initialize() must give up.
  t0 = time.monotonic()
  (rc, out, err), = _run_all([_start(0, 2, _free_port(), "--init-timeout", "3")], 60)
  assert rc != 0
  assert time.monotonic() - t0 < 60
  assert any(w in err for w in ("DEADLINE_EXCEEDED", "timed out", "Timed out", "Barrier")), err[-2000:]


def test_silent_coordinator_fails_fast_with_clear_error():
  # Process 1 alone, pointed at a port no coordinator listens on.
  t0 = time.monotonic()
  (rc, out, err), = _run_all([_start(1, 2, _free_port(), "--init-timeout", "3")], 60)
  assert rc != 0
  assert time.monotonic() - t0 < 60
  assert any(w in err for w in ("DEADLINE_EXCEEDED", "UNAVAILABLE", "timed out", "Timed out")), err[-2000:]


def test_hybrid_mesh_puts_slow_axes_outside():
  # 2 "nodes" of 4 devices: data crosses them, model stays inside one.
  assert emit.hybrid_shapes((4, 2), 4) == ((2, 2), (2, 1))
  assert emit.hybrid_shapes((2, 8), 4) == ((1, 4), (2, 2))
  assert emit.hybrid_shapes((3, 3), 4) is None
  devices = jax.devices()
  grid = emit._hybrid_grid((4, 2), [devices[:4], devices[4:]])
  assert {d.id for d in grid[:2].flat} == {d.id for d in devices[:4]}
  assert all(grid[i, 0].id + 1 == grid[i, 1].id for i in range(4))  # model pairs are neighbours


def test_axis_spans_keep_model_inside_a_node():
  assert search.axis_spans(2, 4, 8) == {"data": (2, 1), "model": (4, 1)}
  assert search.axis_spans(8, 2, 8) == {"data": (4, 2), "model": (2, 1)}
  assert search.axis_spans(16, 1, 8) == {"data": (8, 2), "model": (1, 1)}
  assert search.axis_spans(4, 16, 8) == {"data": (1, 4), "model": (8, 2)}
  assert search.axis_spans(8, 3, 8) == {"data": (1, 8), "model": (1, 3)}  # straddles nodes


def test_cross_node_data_axis_is_priced_two_level():
  from wapar_jax._src.cost import collective_time, hierarchical_collective_time
  # Two nodes of 8: the slow link carries 1/8 of what a flat ring over 16 would push through it.
  flat = collective_time("all-reduce", 1e9, 16, 4.5e10, 1e-5)
  two_level = hierarchical_collective_time("all-reduce", 1e9, 8, 2, 3.7e11, 5e-6, 4.5e10, 1e-5)
  assert two_level < flat / 4
  ex = zoo.get_example("gpt-tiny", batch_size=32)
  plan = wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=optax.adamw(1e-3), devices=16,
                  profile="h100-sxm", strategy="dp", all_devices=True)
  assert plan.chosen.cross_node_axes == ("data",)
  assert wap.Plan.from_json(plan.to_json()).chosen.cross_node_axes == ("data",)
