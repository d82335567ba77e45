"""Faults around what planning keeps on disk: the op-cost cache shared by processes at once,
corrupt or poisoned cache files, NaN in a plan file, a killed save's temporary files and a
killed verify's child process."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import contextlib
import dataclasses
import json
import math
import multiprocessing
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wapar_jax as wap
from wapar_jax._src import files
from wapar_jax._src.cost.xla import CostCache, step_costs
from wapar_jax._src.trace import trace_train_step
from wapar_jax._src.verify import run as verify_run

TX = optax.sgd(0.1)
PARAMS = {
  "w": jax.ShapeDtypeStruct((32, 16), jnp.float32),
  "b": jax.ShapeDtypeStruct((16,), jnp.float32),
}
BATCH = {
  "x": jax.ShapeDtypeStruct((64, 32), jnp.float32),
  "y": jax.ShapeDtypeStruct((64, 16), jnp.float32),
}
REPO = pathlib.Path(__file__).resolve().parents[1]


def _loss(params, batch):
  pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])
  return jnp.mean((pred - batch["y"]) ** 2)


def _plan(**kwargs):
  return wap.plan(_loss, PARAMS, BATCH, optimizer=TX, devices=8, profile="cpu", **kwargs)


@pytest.fixture(scope="module")
def traced():
  return trace_train_step(_loss, PARAMS, BATCH, TX)[0]


@pytest.fixture(scope="module")
def truth(traced):
  """The step's costs computed with no cache, and the cache's entries (digest -> cost)."""
  cache = CostCache(persist=False)
  return step_costs(traced, cache), dict(cache.entries)


@pytest.fixture(scope="module")
def plan():
  return _plan(cache=False)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("WAPAR_CACHE_DIR", str(tmp_path))
  return tmp_path


def _database(directory) -> pathlib.Path:
  return pathlib.Path(directory) / f"op_costs-jax{jax.__version__}.sqlite"


def _legacy_json(directory) -> pathlib.Path:
  return pathlib.Path(directory) / f"op_costs-jax{jax.__version__}.json"


def _same_costs(a, b):
  for field in ("flops", "bytes_accessed", "transcendentals"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


@contextlib.contextmanager
def _no_cache_warnings():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    yield
  assert [str(w.message) for w in caught if "op-cost cache" in str(w.message)] == []


# --- several planners at once ----------------------------------------------------------------


def _write_entries(path, worker, rounds, per_round, barrier):
  barrier.wait()
  for r in range(rounds):
    cache = CostCache(path)
    for i in range(per_round):
      cache.put(f"worker {worker} round {r} op {i}", (float(worker), float(r), float(i)))
    cache.save()


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the children only touch sqlite
def test_three_processes_writing_one_cache_keep_every_entry(tmp_path):
  path, workers, rounds, per_round = tmp_path / "op_costs.sqlite", 3, 8, 25
  ctx = multiprocessing.get_context("fork")
  barrier = ctx.Barrier(workers)
  procs = [
    ctx.Process(target=_write_entries, args=(path, w, rounds, per_round, barrier))
    for w in range(workers)
  ]
  for p in procs:
    p.start()
  for p in procs:
    p.join(60)
  assert [p.exitcode for p in procs] == [0] * workers
  cache = CostCache(path)
  kept = [
    tuple(cache.get(f"worker {w} round {r} op {i}") or ()) == (w, r, i)
    for w in range(workers)
    for r in range(rounds)
    for i in range(per_round)
  ]
  assert sum(kept) == workers * rounds * per_round


@pytest.mark.slow
def test_three_planner_processes_keep_what_one_after_another_keep(tmp_path):
  script = (
    "import sys, optax, wapar_jax as wap\n"
    "from wapar_jax import examples\n"
    "ex = examples.get_example(sys.argv[1])\n"
    "wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=optax.adamw(1e-3), devices=8)\n"
  )
  models = ("gpt-tiny", "cnn", "mlp")

  def plan_all(directory, together):
    env = dict(os.environ, WAPAR_CACHE_DIR=str(directory), JAX_PLATFORMS="cpu")
    procs = []
    for m in models:
      procs.append(subprocess.Popen([sys.executable, "-c", script, m], env=env))
      if not together:
        procs[-1].wait()
    assert [p.wait(300) for p in procs] == [0] * len(models)
    with contextlib.closing(sqlite3.connect(_database(directory))) as db:
      return db.execute("SELECT COUNT(*) FROM op_costs").fetchone()[0]

  assert plan_all(tmp_path / "together", True) == plan_all(tmp_path / "in_turn", False)


# --- corrupt files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "content",
  [b"[1, 2, 3]", b'"hello"', b'{"5e0d2a": [1.0, 2.0, 3'],
  ids=["list", "string", "truncated"],
)
def test_a_corrupt_json_cache_is_set_aside_with_a_warning(cache_dir, traced, truth, content):
  legacy = _legacy_json(cache_dir)
  legacy.write_bytes(content)
  with pytest.warns(UserWarning, match="not a dict of costs; it was moved to"):
    costs = step_costs(traced, CostCache())
  _same_costs(costs, truth[0])
  assert not legacy.exists()
  (aside,) = cache_dir.glob(f"{legacy.name}.corrupt-*")
  assert aside.read_bytes() == content


def test_planning_works_over_a_json_cache_holding_a_list(cache_dir, plan):
  _legacy_json(cache_dir).write_text("[1, 2, 3]")
  with pytest.warns(UserWarning, match="moved to"):
    assert _plan().mesh_shape == plan.mesh_shape


def test_a_json_cache_of_an_older_version_is_moved_into_the_database(cache_dir, traced, truth):
  costs, entries = truth
  with open(_legacy_json(cache_dir), "w") as f:
    json.dump({k: list(v) for k, v in entries.items()}, f)
  with _no_cache_warnings():
    moved = step_costs(traced, CostCache())
  assert moved.lowered_ops == 0  # every cost came from the old file
  _same_costs(moved, costs)
  assert not _legacy_json(cache_dir).exists() and _database(cache_dir).exists()


def _fill_and_truncate(path, traced):
  cache = CostCache(path)
  for i in range(2000):  # pages enough that half the file holds half the keys
    cache.put(f"filler {i}", (1.0, 2.0, 3.0))
  cache.save()
  step_costs(traced, CostCache(path))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


# A string is shown through the JSON file: to SQLite it is "not a database" as a list is.
@pytest.mark.parametrize("damage", ["list", "truncated"])
def test_a_corrupt_database_is_set_aside_with_a_warning(cache_dir, traced, truth, damage):
  path = _database(cache_dir)
  if damage == "truncated":
    _fill_and_truncate(path, traced)
  else:
    path.write_text("[1, 2, 3]" if damage == "list" else '"hello"')
  with pytest.warns(UserWarning, match="is not a usable database; it was moved to"):
    costs = step_costs(traced, CostCache())
  _same_costs(costs, truth[0])
  assert len(list(cache_dir.glob(f"{path.name}.corrupt-*"))) == 1
  with _no_cache_warnings():
    step_costs(traced, CostCache())
    assert step_costs(traced, CostCache()).lowered_ops == 0  # a good database again


# --- values that are not costs ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1e3, math.nan, 1e12], ids=str)
def test_bad_values_in_a_json_cache_are_computed_again(cache_dir, traced, truth, bad):
  costs, entries = truth
  with open(_legacy_json(cache_dir), "w") as f:
    json.dump({k: [bad, bad, bad] for k in entries}, f)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a warning names the bad entries; the figures are what count
    _same_costs(step_costs(traced, CostCache()), costs)


# Above the ceiling (1e12) is shown through the JSON file: the check after reading is the same.
@pytest.mark.parametrize("bad", [-1e3, "nan"], ids=str)
def test_bad_values_in_the_database_are_computed_again_and_replaced(cache_dir, traced, truth, bad):
  costs = truth[0]
  step_costs(traced, CostCache())
  with contextlib.closing(sqlite3.connect(_database(cache_dir))) as db, db:
    db.execute("UPDATE op_costs SET flops = ?, bytes = ?, transcendentals = ?", (bad,) * 3)
  with pytest.warns(UserWarning, match="were not costs"):
    _same_costs(step_costs(traced, CostCache()), costs)
  with _no_cache_warnings():
    again = step_costs(traced, CostCache())
  assert again.lowered_ops == 0
  _same_costs(again, costs)


def test_a_negative_cache_changes_no_plan(cache_dir, truth, plan):
  clean = plan
  with open(_legacy_json(cache_dir), "w") as f:
    json.dump({k: [-1e3, -1e3, -1e3] for k in truth[1]}, f)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    poisoned = _plan()
  assert poisoned.mesh_shape == clean.mesh_shape
  assert poisoned.predicted.step_time == pytest.approx(clean.predicted.step_time, rel=1e-9)


def test_what_is_not_a_cost_is_never_stored(tmp_path):
  cache = CostCache(tmp_path / "c.sqlite")
  cache.put("nan", (math.nan, 1.0, 1.0))
  cache.put("negative", (-1.0, 1.0, 1.0))
  cache.put("good", (1.0, 2.0, 3.0))
  cache.save()
  with contextlib.closing(sqlite3.connect(tmp_path / "c.sqlite")) as db:
    assert db.execute("SELECT flops, bytes, transcendentals FROM op_costs").fetchall() == [
      (1.0, 2.0, 3.0)
    ]


# --- strict JSON -----------------------------------------------------------------------------


def test_a_plan_with_nan_is_refused_at_save_and_nothing_is_written(plan, tmp_path):
  path = tmp_path / "plan.json"
  plan.save(path)
  before = path.read_text()
  bad = dataclasses.replace(plan, predicted=dataclasses.replace(plan.predicted, step_time=math.nan))
  with pytest.raises(wap.errors.NonFiniteValueError, match=r"predicted\.step_time=nan"):
    bad.save(path)
  with pytest.raises(wap.errors.NonFiniteValueError):
    bad.save(tmp_path / "new.json")
  assert path.read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_strict_json_names_the_nested_field():
  data = {"candidates": [{"comm_time": 1.0}, {"comm_time": -math.inf}]}
  with pytest.raises(wap.errors.NonFiniteValueError, match=r"candidates\[1\]\.comm_time=-inf"):
    files.dumps_strict(data, "the plan")
  assert files.dumps_strict({"a": [1.5]}, "x") == '{"a": [1.5]}'


# --- a killed save's temporary files ---------------------------------------------------------


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", ""])
  child.wait()
  return child.pid


def test_stale_tmp_files_are_removed_by_the_next_save_and_live_ones_kept(plan, tmp_path):
  host = files._host()
  old, now = time.time() - 2 * files.STALE_TMP_SECONDS, time.time()
  names = {
    ".plan.json-k3x9q2ab.tmp": old,  # an older version's name, long untouched
    f".plan.json-{_dead_pid()}@{host}-a1b2c3d4.tmp": now,  # its writer is dead
    f".plan.json-{os.getpid()}@{host}-e5f6g7h8.tmp": now,  # a live writer (this process)
    f".plan.json-{_dead_pid()}@not{host}-i9j0k1l2.tmp": now,  # another host's: unknown yet
    ".notes.tmp": old,  # not a name of ours
  }
  for name, mtime in names.items():
    (tmp_path / name).write_text("x")
    os.utime(tmp_path / name, (mtime, mtime))
  plan.save(tmp_path / "plan.json")
  left = sorted(p.name for p in tmp_path.iterdir())
  assert left == sorted(["plan.json", ".notes.tmp", *list(names)[2:4]])


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child only writes a file
def test_a_save_killed_midway_leaves_nothing_after_the_next_save(plan, tmp_path):
  target, text = tmp_path / "plan.json", plan.to_json()
  pid = os.fork()
  if pid == 0:  # the child: stalls between writing its temporary file and renaming it
    try:
      os.replace = lambda *args: time.sleep(60)
      files.write_text_atomic(target, text)
    finally:
      os._exit(0)
  deadline = time.time() + 30
  while not list(tmp_path.glob(".plan.json-*.tmp")) and time.time() < deadline:
    time.sleep(0.01)
  os.kill(pid, signal.SIGKILL)
  os.waitpid(pid, 0)
  assert len(list(tmp_path.glob(".plan.json-*.tmp"))) == 1
  plan.save(target)
  assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
  assert wap.Plan.load(target).mesh_shape == plan.mesh_shape


# --- verify's child process ------------------------------------------------------------------


def _running(pid: int) -> bool:
  """Whether `pid` runs (a zombie waiting for its parent's wait() does not)."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return False
  return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_verify_timeout_kills_the_child_group(monkeypatch):
  started = []

  class Recorded(subprocess.Popen):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      started.append(self)

  monkeypatch.setattr(verify_run.subprocess, "Popen", Recorded)
  big = wap.plan(_loss, PARAMS, BATCH, optimizer=TX, devices=16, strategy="dp", all_devices=True)
  with pytest.raises(wap.errors.VerificationFailedError, match="did not finish"):
    big.verify(timeout=0.5)
  (child,) = started
  assert child.returncode == -signal.SIGKILL
  with pytest.raises(ProcessLookupError):
    os.killpg(child.pid, 0)


_VERIFY_PARENT = textwrap.dedent(
  """
  import os, pathlib, sys, time
  import jax, jax.numpy as jnp, optax
  import wapar_jax as wap

  def loss(params, batch):
    if os.environ.get("STALL_IN_CHILD"):  # only the verify child traces it with this set
      pathlib.Path(os.environ["STALL_IN_CHILD"]).write_text(str(os.getpid()))
      time.sleep(120)
    return jnp.mean((batch["x"] @ params["w"]) ** 2)

  params = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
  batch = {"x": jax.ShapeDtypeStruct((16, 8), jnp.float32)}
  plan = wap.plan(loss, params, batch, optimizer=optax.sgd(0.1), devices=2, profile="cpu",
                  strategy="dp", all_devices=True, cache=False)
  os.environ["STALL_IN_CHILD"] = sys.argv[1]
  plan.verify(timeout=300)
  """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_killing_the_parent_during_verify_leaves_no_child_and_no_temp_dir(tmp_path):
  tmp, marker, script = tmp_path / "tmp", tmp_path / "child.pid", tmp_path / "parent.py"
  tmp.mkdir()
  script.write_text(_VERIFY_PARENT)
  env = dict(
    os.environ,
    TMPDIR=str(tmp),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
  )
  with open(tmp_path / "parent.log", "w") as log:
    parent = subprocess.Popen([sys.executable, str(script), str(marker)], env=env, stderr=log)
  child = None
  try:
    deadline = time.time() + 120
    while not marker.exists() and parent.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    assert marker.exists(), (tmp_path / "parent.log").read_text()[-3000:]
    time.sleep(0.2)  # the pid is written whole
    child = int(marker.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while _running(child) and time.time() < deadline:
      time.sleep(0.1)
    assert not _running(child), "the verify child outlived its killed parent"
    assert list(tmp.glob("wapar-verify-*")) == []
  finally:
    if parent.poll() is None:
      parent.kill()
    if child is not None and _running(child):
      os.kill(child, signal.SIGKILL)
