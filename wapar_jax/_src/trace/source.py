"""The researcher's source line of a jaxpr equation, for hot spots and warnings.

The only use of `jax._src.source_info_util` in the package: a private jax module whose API can
change between jax versions, kept here so a jax upgrade touches one function.
"""

from __future__ import annotations

import os
import re

from jax._src import source_info_util

_INSTALLED = re.compile(r"[/\\](site|dist)-packages[/\\]")
# wapar_jax itself: its built-in examples are model code even when the package is installed.
_OWN_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNKNOWN = "?"


def _is_researchers(line: str) -> bool:
  return not _INSTALLED.search(line) or line.startswith(_OWN_PACKAGE)


def source_line(eqn, outer: str = UNKNOWN) -> str:
  """The researcher's line that made `eqn`: the innermost frame outside jax and installed
  libraries (flax, optax, ...); else `outer`, the line of the call `eqn` is inside, when that is
  the researcher's; else the innermost frame outside jax, else `outer`.

  `outer` matters for jax's own jitted functions (jax.random's `bernoulli`, `jnp.where`): the
  traceback of an equation inside a jit stops at the jit, so it holds jax frames only.
  """
  first = None
  # jax excludes only its own files and the standard library; in a virtualenv, site-packages
  # lies outside the latter, so a flax layer would be named instead of the model's line.
  for f in source_info_util.user_frames(eqn.source_info.traceback):
    line = f"{f.file_name}:{f.start_line} ({f.function_name})"
    if _is_researchers(line):
      return line
    first = first or line
  if first is None or (outer != UNKNOWN and _is_researchers(outer)):
    return outer
  return first
