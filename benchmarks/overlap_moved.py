"""Plans the overlap model moved, judged by compiled truth: the choice without it (the same
planner with `overlap_efficiency` 0, which prices compute + comm as before) against the choice
with it, both compiled on virtual CPU devices and priced on the case's profile with the
compiled module's own overlap (`verify.overlap`). Writes benchmarks/results/overlap_moved.md.

    XLA_FLAGS=--xla_force_host_platform_device_count=16 python benchmarks/overlap_moved.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")

import dataclasses
import sys
from pathlib import Path

import jax
import optax

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import suite  # noqa: E402
import test_golden  # noqa: E402

# The golden plans that moved, and the suite case whose plan moved.
GOLDEN = ("cnn-titanxp", "gpt-tiny-h100", "gpt2-small-h100", "vit-tiny-p100")
SUITE = ("moe-gpt@8xh100",)


def _without_overlap(profile):
  return dataclasses.replace(profile, overlap_efficiency=0.0)


def _compiled(plan, profile) -> str:
  c = plan.verify(devices=jax.devices()[: plan.num_devices], profile=profile).compiled
  ms = lambda x: f"{x * 1e3:.4g}"
  return (
    f"{plan.strategy} {dict(plan.mesh_shape)} | {ms(c.step_time)} | {ms(c.compute_time)} | "
    f"{ms(c.comm_time)} | {ms(c.exposed_comm_time)} | {ms(c.compute_time + c.comm_time)}"
  )


def golden_rows(name: str) -> list[str]:
  case = next(c for c in test_golden.CASES if c.name == name)
  profile = test_golden._profile(case)
  new = test_golden.plan_case(case)
  original = test_golden._profile
  test_golden._profile = lambda c: _without_overlap(original(c))
  try:
    old = test_golden.plan_case(case)
  finally:
    test_golden._profile = original
  return [
    f"| golden {name} | {tag} | {_compiled(p, profile)} |"
    for tag, p in (("old", old), ("new", new))
  ]


def suite_rows(name: str) -> list[str]:
  case = next(c for c in suite.CASES if c.name == name)
  setting = suite.SETTINGS[case.setting]
  profile = suite.wap.load_profile(setting.profile)
  ex, _ = suite._example(case)
  tx = optax.adamw(1e-3)
  old = suite.plan_for(ex, tx, _without_overlap(profile), "auto", setting.devices)
  new = suite.plan_for(ex, tx, profile, "auto", setting.devices)
  return [
    f"| suite {name} | {tag} | {_compiled(p, profile)} |" for tag, p in (("old", old), ("new", new))
  ]


def main() -> int:
  lines = [
    "# Plans the overlap model moved, in compiled truth",
    "",
    "*old*: the planner without overlap (overlap_efficiency 0: compute + comm); *new*: with it. "
    "Both compiled on virtual CPU devices, priced on the case's profile; compiled step = the "
    "kernels' roofline + the collectives the compiled module's dataflow leaves exposed. "
    "Milliseconds per step.",
    "",
    "| case | choice | plan | compiled step | compute | comm | exposed | compute + comm |",
    "|---|---|---|---:|---:|---:|---:|---:|",
  ]
  for name in GOLDEN:
    lines += golden_rows(name)
    print(lines[-2], lines[-1], sep="\n", flush=True)
  for name in SUITE:
    lines += suite_rows(name)
    print(lines[-2], lines[-1], sep="\n", flush=True)
  (HERE / "results" / "overlap_moved.md").write_text("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
