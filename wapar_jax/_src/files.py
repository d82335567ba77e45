"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import stat
import tempfile


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same directory, then replaces
  `path` with it; on any failure the temporary file is removed and `path` is untouched."""
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(
    dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}-", suffix=".tmp"
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


def _mode_of(path: str) -> int:
  try:
    return stat.S_IMODE(os.stat(path).st_mode)
  except FileNotFoundError:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
