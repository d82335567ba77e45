"""Differences between jax versions, in one place: each function reads one thing two ways."""

from __future__ import annotations


def analysis_dict(analysis) -> dict:
  """`cost_analysis()` as a dict: it has returned a dict, a list of one dict, or None."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return dict(analysis or {})


def scan_operand_counts(params) -> tuple[int, int]:
  """(constants, carries) among a scan's operands; the rest are the scanned inputs.

  jax 0.10 names the counts; later versions describe the operands as flat trees instead
  (and move carries the body leaves unchanged into the constants).
  """
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  consts, carry, _ = params["ft_in"].unpack()
  return len(consts), len(carry)
