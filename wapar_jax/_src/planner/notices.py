"""What plan() warns of: a trace that will be slow, a search that will be large, one cut short."""

from __future__ import annotations

import warnings

from wapar_jax._src import search

# Problems this large are warned about before the long part starts: parameter leaves (the trace
# is leaf by leaf) and candidates the search would price.
LARGE_PARAM_LEAVES = 5_000
LARGE_SEARCH_CANDIDATES = 100_000


def many_leaves(leaves: int) -> None:
  if leaves >= LARGE_PARAM_LEAVES:
    warnings.warn(
      f"params has {leaves} leaves: JAX traces the loss, its gradient and the optimizer update "
      "leaf by leaf, so planning takes about 2 ms a leaf here before the search starts "
      "(max_seconds bounds the search, not the trace). Stack the parameters of repeated "
      "layers (nn.scan, nnx.vmap) or concatenate small ones to plan in seconds.",
      stacklevel=3,
    )


def large_search(space, max_devices: int, all_devices: bool) -> None:
  candidates = search.sweep_size(space, max_devices, all_devices)
  if candidates >= LARGE_SEARCH_CANDIDATES:
    warnings.warn(
      f"the search for up to {max_devices} devices prices about {candidates} candidates "
      "(device counts x model degrees x model-split group sets x state storages), about a "
      "millisecond each. Pass max_seconds= to plan() (--max-seconds) to bound it.",
      stacklevel=4,
    )


def cut_short(max_seconds, elapsed: float, cut: dict, skipped: list[str]) -> None:
  """Says that max_seconds cut the search short, and how much of it ran."""
  parts = [
    f"priced {s.counts_priced} of {s.counts} device counts of the step with remat {v[0]} and "
    f"{v[1]} micro-batch(es) (powers of two first)"
    for v, s in cut.items()
  ]
  parts += [f"skipped {what}" for what in skipped]
  warnings.warn(
    f"planning was cut short by max_seconds={max_seconds} after {elapsed:.1f} s: the search "
    f"{'; '.join(parts)}. The plan is the best found so far; raise max_seconds, or leave it "
    "None, for the full search.",
    stacklevel=3,
  )
