"""Writing files so that a reader never sees half of one, nor JSON that is not JSON."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import stat
import tempfile
import time

from wapar_jax.errors import NonFiniteValueError

# A temporary file's name says who writes it (`.plan.json-<pid>@<host>-<random>.tmp`), so the
# next write into its directory can tell a killed writer's leftover from a live writer's file.
_TMP_NAME = re.compile(r"^\..+?-(?:(?P<pid>\d{1,9})@(?P<host>[^@/]*)-)?[a-z0-9_]{8}\.tmp$")
# A temporary file untouched this long is a leftover whoever wrote it (older versions' names
# carry no pid, and a pid on another host cannot be checked): an atomic write takes seconds.
STALE_TMP_SECONDS = 600.0


def dumps_strict(data, what: str, **kwargs) -> str:
  """`json.dumps(data)` refusing NaN and infinities, which JSON has no words for (Python would
  write a bare `NaN` no JSON reader accepts); `what` names the document in the error.

  Raises:
    NonFiniteValueError: naming the first field that is not finite.
  """
  try:
    return json.dumps(data, allow_nan=False, **kwargs)
  except ValueError:
    field = _non_finite_field(data, "")
    if field is None:  # another ValueError (a circular reference): not ours to reword
      raise
    name, value = field
    raise NonFiniteValueError(
      f"{what} has a value that is not a finite number at {name or 'the top level'}, and is not "
      "written: JSON cannot hold it, and a figure such as a predicted time must be finite. "
      f"Find what produced it (a cost or a profile value) and plan again. Got {name}={value!r}."
    ) from None


def _non_finite_field(data, name: str) -> tuple[str, float] | None:
  if isinstance(data, float) and not math.isfinite(data):
    return name, data
  if isinstance(data, dict):
    items = ((f"{name}.{k}" if name else str(k), v) for k, v in data.items())
  elif isinstance(data, list | tuple):
    items = ((f"{name}[{i}]", v) for i, v in enumerate(data))
  else:
    return None
  for sub_name, value in items:
    found = _non_finite_field(value, sub_name)
    if found is not None:
      return found
  return None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same directory, then replaces
  `path` with it; on any failure the temporary file is removed and `path` is untouched.
  Temporary files that killed writers left in that directory are removed first."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  remove_stale_tmp_files(directory)
  fd, tmp = tempfile.mkstemp(
    dir=directory, prefix=f".{os.path.basename(path)}-{os.getpid()}@{_host()}-", suffix=".tmp"
  )
  try:
    # mkstemp makes the file private (0600); give it the mode a plain open() would, or the
    # mode of the file it replaces, so a plan shared on a cluster stays readable.
    os.fchmod(fd, _mode_of(path))
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def remove_stale_tmp_files(directory: str, now: float | None = None) -> list[str]:
  """Removes the temporary files of `write_text_atomic` in `directory` whose writer is dead
  (a pid of this host that no longer runs) or that are older than `STALE_TMP_SECONDS`; a live
  writer's file is left alone. Returns the names removed."""
  now = time.time() if now is None else now
  removed = []
  try:
    entries = list(os.scandir(directory))
  except OSError:  # a directory we cannot list has nothing we could remove either
    return removed
  for entry in entries:
    match = _TMP_NAME.match(entry.name)
    if match is None:
      continue
    try:
      if _writer_is_dead(match) or now - entry.stat().st_mtime > STALE_TMP_SECONDS:
        os.unlink(entry.path)
        removed.append(entry.name)
    except OSError:  # removed meanwhile by another writer's clean-up, or not ours to remove
      continue
  return removed


def _writer_is_dead(match: re.Match) -> bool:
  if match["pid"] is None or match["host"] != _host():
    return False
  try:
    os.kill(int(match["pid"]), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  return False


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def _mode_of(path: str) -> int:
  try:
    return stat.S_IMODE(os.stat(path).st_mode)
  except FileNotFoundError:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
