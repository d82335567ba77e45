"""The researcher's source line of a jaxpr equation, for hot spots and warnings.

The only use of `jax._src.source_info_util` in the package: a private jax module whose API can
change between jax versions, kept here so a jax upgrade touches one function.
"""

from __future__ import annotations

import itertools
import os
import re

from jax._src import source_info_util

_INSTALLED = re.compile(r"[/\\](site|dist)-packages[/\\]")
# wapar_jax itself: its built-in examples are model code even when the package is installed.
_OWN_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source_line(eqn) -> str:
  """The researcher's line that made `eqn`: the innermost frame outside jax and installed
  libraries (flax, optax, ...), else the innermost outside jax."""
  frames = source_info_util.user_frames(eqn.source_info.traceback)
  first = next(frames, None)
  if first is None:
    return "?"
  # jax excludes only its own files and the standard library; in a virtualenv, site-packages
  # lies outside the latter, so a flax layer would be named instead of the model's line.
  frame = next(
    (
      f
      for f in itertools.chain([first], frames)
      if not _INSTALLED.search(f.file_name) or f.file_name.startswith(_OWN_PACKAGE)
    ),
    first,
  )
  return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
