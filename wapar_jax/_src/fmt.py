"""Numbers and tables as people read them."""

from __future__ import annotations


def human_bytes(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def human_seconds(s: float) -> str:
  if s >= 1:
    return f"{s:.3f} s"
  if s >= 1e-3:
    return f"{s * 1e3:.2f} ms"
  return f"{s * 1e6:.1f} us"


def percent(x: float | None) -> str:
  """A relative change as a signed percentage; "n/a" when there is none."""
  return "n/a" if x is None else f"{100 * x:+.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
  """Left-aligned columns under a header and a rule of dashes."""
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
