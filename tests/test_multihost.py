"""The emitted step under jax.distributed: 2 local processes x 4 virtual CPU devices, gloo.

Each process runs tests/multihost_worker.py: plan "gpt-tiny" for the 8 global devices, feed its
own rows of the batch, 3 steps. The losses must equal an 8-device run in this (single) process
and agree between the processes. A missing peer or a silent coordinator must fail fast, and a
peer killed mid-training must stop the survivor within the heartbeat timeout it was started
with (docs/multihost.md, "When a process dies").
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
import pytest

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src.emit import mesh as mesh_lib
from wapar_jax._src.search.pricing import axis_spans

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
STEPS = 3
STRATEGIES = ("dp", "fsdp")
# Bounds every wait on a worker: a hung collective or coordinator fails the test, never hangs it.
RUN_TIMEOUT_S = 120


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(process_id: int, num_processes: int, port: int, *extra: str) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own
  # Output goes to files, not pipes: nobody reads a pipe while polling, and a full one would
  # block the worker.
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
  proc = subprocess.Popen(
    [
      sys.executable,
      WORKER,
      "--process-id",
      str(process_id),
      "--num-processes",
      str(num_processes),
      "--coordinator",
      f"127.0.0.1:{port}",
      *extra,
    ],
    stdout=out,
    stderr=err,
    text=True,
    env=env,
  )
  proc.files = (out, err)
  return proc


def _run_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of each; if one fails or the time runs out, kills the rest."""
  deadline = time.monotonic() + timeout
  timed_out = False
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break  # a dead peer would leave the others blocked in a collective
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for p in procs:
    rc = p.wait()
    texts = []
    for f in p.files:
      f.seek(0)
      texts.append(f.read())
      f.close()
    if timed_out:
      texts[1] += f"\n[test] killed: the processes did not finish within {timeout:.0f} s"
    results.append((rc, *texts))
  return results


def _report(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.startswith("{")]
  return json.loads(lines[-1])


def _single_process_losses(strategy: str) -> list[float]:
  """The same plan family on this process's 8 devices: the numbers the workers must match."""
  ex = examples.get_example("gpt-tiny")
  tx = optax.adamw(1e-3)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=tx,
    devices=8,
    profile="h100-sxm",
    strategy=strategy,
    all_devices=True,
  )
  params = plan.init_params(ex.init_params, jax.random.key(0))
  opt_state = plan.init_opt_state(params)
  batch = plan.shard_batch(ex.make_batch(jax.random.key(1)))
  step = plan.train_step()
  losses = []
  for _ in range(STEPS):
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
  return losses


@pytest.mark.slow
def test_two_processes_match_single_process():
  # One launch runs both families (startup and initialize() cost more than a plan).
  port = _free_port()
  procs = [
    _start(i, 2, port, "--strategies", ",".join(STRATEGIES), "--steps", str(STEPS))
    for i in range(2)
  ]
  expected = {s: _single_process_losses(s) for s in STRATEGIES}  # while the workers start

  results = _run_all(procs, RUN_TIMEOUT_S)
  for i, (rc, _out, err) in enumerate(results):
    assert rc == 0, f"process {i} exited with {rc}:\n{err[-3000:]}"
  reports = [_report(out) for _, out, _ in results]
  for strategy in STRATEGIES:
    assert reports[0][strategy]["losses"] == reports[1][strategy]["losses"], strategy
    np.testing.assert_allclose(
      reports[0][strategy]["losses"], expected[strategy], rtol=1e-5, err_msg=strategy
    )
    # Each worker's plan treats a process as a node: the data axis is the one that crosses.
    assert reports[0][strategy]["mesh_shape"] == {"data": 8}
    assert reports[0][strategy]["cross_node_axes"] == ["data"]


@pytest.mark.slow
def test_missing_peer_or_silent_coordinator_fails_fast():
  # Process 0 (the coordinator) whose peer never starts, and, at the same time, a process 1
  # pointed at a port where no coordinator listens: initialize() must give up on both.
  t0 = time.monotonic()
  lonely_coordinator = _start(0, 2, _free_port(), "--init-timeout", "3")
  orphan = _start(1, 2, _free_port(), "--init-timeout", "3")
  results = _run_all([lonely_coordinator], 60) + _run_all([orphan], 60)
  assert time.monotonic() - t0 < 60
  for (rc, _, err), words in zip(
    results,
    [
      ("DEADLINE_EXCEEDED", "Barrier", "timed out"),
      ("DEADLINE_EXCEEDED", "UNAVAILABLE", "timed out"),
    ],
  ):
    assert rc != 0
    assert any(w in err for w in words), err[-2000:]


# A survivor's wait once a peer dies mid-training is the heartbeat timeout passed to
# jax.distributed.initialize (the coordinator declares a silent process dead after it, and the
# others abort; a dead coordinator is noticed at once). Measured: 4.9-5.7 s and 0.2 s. The
# bound adds 25 s for a loaded machine to notice, abort and reap the process.
HEARTBEAT_S = 5
SURVIVOR_EXIT_S = HEARTBEAT_S + 25


def _wait_for(path, text: str, procs, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while text not in path.read_text():
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      raise AssertionError(f"no {text!r} within {timeout:.0f} s:\n{path.read_text()[-2000:]}")
    time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0], ids=["peer", "coordinator"])
def test_a_killed_peer_stops_the_survivor_within_the_heartbeat_bound(killed, tmp_path):
  port = _free_port()
  logs = [tmp_path / f"process{i}.out" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as out, open(tmp_path / f"process{i}.err", "w") as err:
      procs.append(
        subprocess.Popen(
          [sys.executable, WORKER, "--process-id", str(i), "--num-processes", "2"]
          + ["--coordinator", f"127.0.0.1:{port}", "--steps", "100000"]
          + ["--heartbeat-timeout", str(HEARTBEAT_S)],
          stdout=out,
          stderr=err,
          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        )
      )
  try:
    for log in logs:  # both are training: steps need every process
      _wait_for(log, "dp step 2 done", procs, RUN_TIMEOUT_S)
    procs[killed].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    survivor = procs[1 - killed]
    try:
      rc = survivor.wait(timeout=SURVIVOR_EXIT_S)
    except subprocess.TimeoutExpired:
      rc = None
    waited = time.monotonic() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  err = (tmp_path / f"process{1 - killed}.err").read_text()
  assert rc is not None, f"the survivor still ran {SURVIVOR_EXIT_S} s after:\n{err[-3000:]}"
  assert rc != 0, f"exit {rc} after {waited:.1f} s:\n{err[-3000:]}"
  # The messages docs/multihost.md quotes: the coordination service's, or the collective
  # library's when the peer died in the middle of a collective.
  assert any(
    m in err for m in ("JAX distributed service detected fatal errors", "gloo::EnforceNotMet")
  ), err[-3000:]


def test_hybrid_mesh_puts_slow_axes_outside():
  # 2 "nodes" of 4 devices: data crosses them, model stays inside one.
  assert mesh_lib.hybrid_shapes((4, 2), 4) == ((2, 2), (2, 1))
  assert mesh_lib.hybrid_shapes((2, 8), 4) == ((1, 4), (2, 2))
  assert mesh_lib.hybrid_shapes((3, 3), 4) is None
  devices = jax.devices()
  grid = mesh_lib.hybrid_grid((4, 2), [devices[:4], devices[4:]])
  assert {d.id for d in grid[:2].flat} == {d.id for d in devices[:4]}
  assert all(grid[i, 0].id + 1 == grid[i, 1].id for i in range(4))  # model pairs are neighbours


def test_axis_spans_keep_model_inside_a_node():
  assert axis_spans(2, 4, 8) == {"data": (2, 1), "model": (4, 1)}
  assert axis_spans(8, 2, 8) == {"data": (4, 2), "model": (2, 1)}
  assert axis_spans(16, 1, 8) == {"data": (8, 2), "model": (1, 1)}
  assert axis_spans(4, 16, 8) == {"data": (1, 4), "model": (8, 2)}
  assert axis_spans(6, 2, 8) == {"data": (3, 2), "model": (2, 1)}  # 2 nodes x 6
  # tp=3 does not divide a node: data fills it, the model axis is the one that crosses.
  assert axis_spans(8, 3, 8) == {"data": (8, 1), "model": (1, 3)}
  assert axis_spans(13, 1, 8) == {"data": (1, 13), "model": (1, 1)}  # no even layout
  # The search prices the layout emit builds.
  for dp, tp, per_node in [(8, 2, 8), (4, 16, 8), (8, 3, 8), (6, 2, 8), (64, 4, 256)]:
    nodes = -(-dp * tp // per_node)
    ici, dcn = mesh_lib.hybrid_shapes((dp, tp), dp * tp // nodes)
    spans = axis_spans(dp, tp, per_node)
    assert (spans["data"], spans["model"]) == ((ici[0], dcn[0]), (ici[1], dcn[1]))


def test_cross_node_data_axis_is_priced_two_level():
  from wapar_jax._src.cost.collectives import collective_time, hierarchical_collective_time

  # Two nodes of 8: the slow link carries 1/8 of what a flat ring over 16 would push through it.
  flat = collective_time("all-reduce", 1e9, 16, 4.5e10, 1e-5)
  two_level = hierarchical_collective_time("all-reduce", 1e9, 8, 2, 3.7e11, 5e-6, 4.5e10, 1e-5)
  assert two_level < flat / 4
  ex = examples.get_example("gpt-tiny", batch_size=32)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=optax.adamw(1e-3),
    devices=16,
    profile="h100-sxm",
    strategy="dp",
    all_devices=True,
  )
  assert plan.chosen.cross_node_axes == ("data",)
  assert wap.Plan.from_json(plan.to_json()).chosen.cross_node_axes == ("data",)
