"""The op-cost cache: XLA's cost of each unique op by content key, in a SQLite database.

One row per key, so planners running at once add rows beside each other instead of each
rewriting one file (the last writer used to win); the WAL journal lets them read while another
writes, and a busy timeout makes writers wait their turn. Nothing read is trusted: an entry that
is not three finite, non-negative figures under the caller's ceiling is computed again, and a
file that is not a usable database is set aside with a warning. The JSON file older versions
kept is read into the database once, then removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sqlite3
import time
import warnings
from pathlib import Path

import jax

# Seconds a planner waits for another's write before going on without the cache.
BUSY_TIMEOUT_S = 30.0
_COLUMNS = "key, flops, bytes, transcendentals"
_SCHEMA = (
  "CREATE TABLE IF NOT EXISTS op_costs (key TEXT PRIMARY KEY, flops REAL NOT NULL, "
  "bytes REAL NOT NULL, transcendentals REAL NOT NULL) WITHOUT ROWID"
)
# What SQLite says of a file that is not (or no longer) a database of this shape; anything else
# (locked past the timeout, a read-only or full disk) leaves the file alone.
_UNUSABLE = frozenset({sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_ERROR})
_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def default_path() -> Path:
  """`$WAPAR_CACHE_DIR` (default `$XDG_CACHE_HOME/wapar_jax`, `~/.cache/wapar_jax`), one
  database per jax version since XLA's costs may change with it."""
  root = os.environ.get("WAPAR_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "wapar_jax"
  )
  return Path(root) / f"op_costs-jax{jax.__version__}.sqlite"


def is_cost(value, ceiling: float = math.inf) -> bool:
  """Whether `value` is (FLOPs, bytes, transcendentals): three finite numbers in [0, ceiling]."""
  return (
    isinstance(value, list | tuple)
    and len(value) == 3
    and all(
      isinstance(x, int | float)
      and not isinstance(x, bool)
      and math.isfinite(x)
      and 0 <= x <= ceiling
      for x in value
    )
  )


class CostCache:
  """Op costs by content key: those computed in this run in memory, the rest in the database
  at `path` (see the module's docstring). `persist=False` keeps everything in memory."""

  def __init__(self, path: str | os.PathLike | None = None, persist: bool = True):
    self.path = Path(path) if path is not None else default_path()
    self.persist = persist
    self.entries: dict[str, tuple[float, float, float]] = {}
    self.rejected = 0
    self._db: sqlite3.Connection | None = None

  @staticmethod
  def digest(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()

  def get(self, key: str, ceiling: float = math.inf) -> tuple[float, float, float] | None:
    """The cost of `key`, or None when it is not cached or what is cached is not a cost
    (`is_cost`, with `ceiling` the most the caller's op can plausibly cost)."""
    digest = self.digest(key)
    if digest in self.entries:
      return self.entries[digest]
    row = self._read(digest)
    if row is None:
      return None
    if not is_cost(row, ceiling):
      self.rejected += 1
      return None
    return row

  def put(self, key: str, value) -> None:
    value = tuple(float(x) for x in value)
    if is_cost(value):  # what is not a cost is used once, never stored
      self.entries[self.digest(key)] = value

  def save(self) -> None:
    """Writes this run's entries (replacing rejected rows) in one transaction, then closes."""
    if self.rejected:
      warnings.warn(
        f"{self.rejected} entries of the op-cost cache {self.path} were not costs (negative, "
        "not finite, implausibly large or malformed); they were computed again and replaced. "
        f"Got {self.rejected} bad entries.",
        stacklevel=2,
      )
      self.rejected = 0
    db = self._connection() if self.entries else None
    if db is not None:
      rows = [(k, *v) for k, v in self.entries.items()]
      try:
        with db:
          db.executemany(f"INSERT OR REPLACE INTO op_costs ({_COLUMNS}) VALUES (?, ?, ?, ?)", rows)
        self.entries.clear()
      except sqlite3.DatabaseError as e:
        self._failed(e)
    self.close()

  def close(self) -> None:
    if self._db is not None:
      self._db.close()
      self._db = None

  # --- the database -------------------------------------------------------------------------

  def _read(self, digest: str):
    db = self._connection()
    if db is None:
      return None
    try:
      return db.execute(
        "SELECT flops, bytes, transcendentals FROM op_costs WHERE key = ?", (digest,)
      ).fetchone()
    except sqlite3.DatabaseError as e:
      self._failed(e)
      return None

  def _connection(self) -> sqlite3.Connection | None:
    if self._db is None and self.persist:
      try:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect_or_set_aside(self.path)
        _import_legacy_json(self._db, self.path.with_suffix(".json"))
      except (OSError, sqlite3.DatabaseError) as e:
        self._failed(e)
    return self._db

  def _failed(self, error: Exception) -> None:
    """Goes on without the database; a file found corrupt now is set aside for the next run."""
    self.close()
    self.persist = False
    if isinstance(error, sqlite3.DatabaseError) and error.sqlite_errorcode in _UNUSABLE:
      _set_aside(self.path, error)
    else:
      warnings.warn(
        f"could not use the op-cost cache {self.path}; this run computes every op's cost. "
        f"Check that its directory is writable (or set WAPAR_CACHE_DIR). Got {error}.",
        stacklevel=3,
      )


def _connect(path: Path) -> sqlite3.Connection:
  db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
  try:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(_SCHEMA)
    db.execute(f"SELECT {_COLUMNS} FROM op_costs LIMIT 0")
  except BaseException:
    db.close()
    raise
  return db


def _connect_or_set_aside(path: Path) -> sqlite3.Connection:
  # Switching a new file to WAL takes the database's exclusive lock without waiting on the busy
  # timeout: a planner starting beside others retries, as a writer would wait.
  deadline = time.monotonic() + BUSY_TIMEOUT_S
  while True:
    try:
      return _connect(path)
    except sqlite3.DatabaseError as e:
      if e.sqlite_errorcode in _BUSY and time.monotonic() < deadline:
        time.sleep(0.02)
        continue
      if e.sqlite_errorcode not in _UNUSABLE:
        raise
      _set_aside(path, e)
      return _connect(path)


@contextlib.contextmanager
def _locked(path: Path):
  """Holds an exclusive lock beside `path`, so that one process at a time replaces it."""
  with open(f"{path}.lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _set_aside(path: Path, error: Exception) -> None:
  """Renames an unusable cache (and its journal) out of the way with a warning, unless another
  process has already replaced it with a good one."""
  with _locked(path):
    try:
      _connect(path).close()
      return  # usable now: another process set the bad one aside first
    except sqlite3.DatabaseError as e:
      if e.sqlite_errorcode not in _UNUSABLE:
        return
    aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for suffix in ("", "-wal", "-shm"):
      with contextlib.suppress(FileNotFoundError):
        os.replace(f"{path}{suffix}", f"{aside}{suffix}")
  warnings.warn(
    f"the op-cost cache {path} is not a usable database; it was moved to {aside} (delete it "
    f"when done) and a new one started, so costs are computed again, once. Got {error}.",
    stacklevel=4,
  )


def _import_legacy_json(db: sqlite3.Connection, legacy: Path) -> None:
  """Reads the `{digest: [flops, bytes, transcendentals]}` file of older versions into `db`
  (rows already there win) and removes it; a file that is not such a dict is set aside."""
  if not legacy.exists():
    return
  try:
    data = json.loads(legacy.read_text())
  except FileNotFoundError:  # another planner imported it first
    return
  except (OSError, ValueError) as e:
    data = e
  if not isinstance(data, dict):
    aside = f"{legacy}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):  # gone: another planner set it aside and warned
      os.replace(legacy, aside)
      warnings.warn(
        f"the op-cost cache {legacy} (the JSON file of an older wapar_jax) is not a dict of "
        f"costs; it was moved to {aside} (delete it when done), so costs are computed again. "
        f"Got {type(data).__name__}: {str(data)[:80]}.",
        stacklevel=4,
      )
    return
  rows = [(k, *v) for k, v in data.items() if is_cost(v)]
  with db:
    db.executemany(f"INSERT OR IGNORE INTO op_costs ({_COLUMNS}) VALUES (?, ?, ?, ?)", rows)
  legacy.unlink(missing_ok=True)
  if len(rows) < len(data):
    warnings.warn(
      f"{len(data) - len(rows)} of the {len(data)} entries of the op-cost cache {legacy} (the "
      "JSON file of an older wapar_jax) were not costs (negative, not finite or malformed); "
      f"the others were moved into {legacy.with_suffix('.sqlite')}. Got "
      f"{len(data) - len(rows)} bad entries.",
      stacklevel=4,
    )
