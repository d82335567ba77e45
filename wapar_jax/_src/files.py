"""Writing files so that a reader never sees half of one, nor JSON that is not JSON."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile

from wapar_jax.errors import NonFiniteValueError


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
