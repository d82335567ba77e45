"""Golden plans: small cases whose chosen mesh, specs and predicted figures must not drift.

Each case plans a built-in example and compares the result with `golden/plans.json`, key by key,
listing every difference. A change that is meant to move predictions regenerates the file:

    python tests/test_golden.py --update
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

if __name__ == "__main__":  # run as a script: the same 8 devices conftest gives the tests
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("WAPAR_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))

import optax
import pytest

import wapar_jax as wap
from wapar_jax import examples

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "plans.json")
# Figures are sums over thousands of equations: summing them in another order moves the last
# digits, nothing more.
RTOL = 1e-6
FIGURES = ("step_time", "compute_time", "comm_time", "flops", "comm_bytes", "peak_memory", "energy")


@dataclasses.dataclass(frozen=True)
class GoldenCase:
  name: str
  example: str
  profile: str
  devices: int
  strategy: str = "auto"
  batch_size: int | None = None
  seq_len: int | None = None
  objective: str = "time"
  remat: str | None = None
  microbatches: int | None = None
  memory_gib: float | None = None  # the profile's device memory replaced, to force the levers
  all_devices: bool = False


CASES = (
  GoldenCase("mlp-cpu", "mlp", "cpu", 8),
  GoldenCase("cnn-titanxp", "cnn", "titanxp-pcie", 4, batch_size=64),
  GoldenCase("plain-cpu", "plain", "cpu", 4, strategy="dp", all_devices=True),
  GoldenCase("gpt-tiny-h100", "gpt-tiny", "h100-sxm", 8, batch_size=32, seq_len=128),
  GoldenCase("gpt-tiny-tp", "gpt-tiny", "h100-sxm", 8, strategy="tp", all_devices=True),
  GoldenCase("gpt-tiny-fsdp", "gpt-tiny", "h100-sxm", 8, strategy="fsdp", all_devices=True),
  GoldenCase(
    "gpt-tiny-zero1-pcie", "gpt-tiny", "a100-40g-pcie", 8, strategy="zero1", all_devices=True
  ),
  GoldenCase("gpt-tiny-dp-tp", "gpt-tiny", "h100-sxm", 8, strategy="dp_tp", all_devices=True),
  GoldenCase("gpt-tiny-nnx-fsdp", "gpt-tiny-nnx", "h100-sxm", 8, strategy="fsdp", all_devices=True),
  GoldenCase(
    "gpt-tiny-scan-fsdp", "gpt-tiny-scan", "h100-sxm", 8, strategy="fsdp", all_devices=True
  ),
  GoldenCase(
    "gpt-tiny-2-nodes",
    "gpt-tiny",
    "h100-sxm",
    16,
    strategy="dp_tp",
    batch_size=64,
    all_devices=True,
  ),
  GoldenCase(
    "gpt-tiny-energy", "gpt-tiny", "titanxp-pcie", 4, objective="energy", batch_size=64, seq_len=128
  ),
  GoldenCase(
    "gpt-tiny-levers-forced",
    "gpt-tiny",
    "h100-sxm",
    8,
    strategy="fsdp",
    remat="layers",
    microbatches=2,
    batch_size=16,
    all_devices=True,
  ),
  GoldenCase(
    "gpt-tiny-remat-cpu",
    "gpt-tiny",
    "cpu",
    4,
    strategy="zero1",
    remat="layers",
    batch_size=16,
    all_devices=True,
  ),
  GoldenCase(
    "gpt-tiny-levers-searched",
    "gpt-tiny",
    "h100-sxm",
    4,
    batch_size=64,
    seq_len=256,
    memory_gib=0.05,
  ),
  GoldenCase(
    "gpt-tiny-remat-searched",
    "gpt-tiny-scan",
    "h100-sxm",
    2,
    batch_size=16,
    seq_len=512,
    memory_gib=0.03,
  ),
  GoldenCase("gpt2-small-h100", "gpt2-small", "h100-sxm", 8, batch_size=16, seq_len=256),
  GoldenCase("moe-tiny-tp", "moe-tiny", "h100-sxm", 8, strategy="tp", all_devices=True),
  GoldenCase("bert-tiny-v5e", "bert-tiny", "tpu-v5e", 8, batch_size=64),
  GoldenCase("t5-tiny-dp-tp", "t5-tiny", "h100-sxm", 4, strategy="dp_tp", all_devices=True),
  GoldenCase("vit-tiny-p100", "vit-tiny", "p100-nvlink", 8, batch_size=64),
  GoldenCase(
    "resnet-tiny-fsdp",
    "resnet-tiny",
    "a100-40g-pcie",
    4,
    strategy="fsdp",
    batch_size=32,
    all_devices=True,
  ),
)


def _profile(case: GoldenCase):
  profile = wap.load_profile(case.profile)
  if case.memory_gib is not None:
    profile = dataclasses.replace(profile, memory_bytes=case.memory_gib * 2**30)
  return profile


def plan_case(case: GoldenCase):
  ex = examples.get_example(case.example, batch_size=case.batch_size, seq_len=case.seq_len)
  return wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=optax.adamw(1e-3),
    devices=case.devices,
    profile=_profile(case),
    strategy=case.strategy,
    objective=case.objective,
    remat=case.remat,
    microbatches=case.microbatches,
    all_devices=case.all_devices,
    # A private in-memory cost cache: an op's per-element cost comes from the first of its
    # shapes costed, so a shared cache would make the figures depend on what ran before.
    cache=False,
  )


def _specs(flat) -> dict:
  return {
    "/".join(map(str, k)): [list(e) if isinstance(e, tuple) else e for e in spec]
    for k, spec in sorted(flat.items(), key=lambda kv: str(kv[0]))
  }


def record(plan) -> dict:
  """What a golden plan pins: the choice, every spec, and the predicted figures."""
  return {
    "mesh_shape": dict(plan.mesh_shape),
    "strategy": plan.strategy,
    "remat": plan.chosen.remat,
    "microbatches": plan.chosen.microbatches,
    "model_split": list(plan.model_split),
    "predicted": {f: getattr(plan.predicted, f) for f in FIGURES},
    "param_specs": _specs(plan.flat_param_specs),
    "opt_state_param_specs": _specs(plan.flat_opt_specs),
    "batch_specs": _specs(plan.flat_batch_specs),
  }


def differences(want, got, where: str = "") -> list[str]:
  """Every key at which `got` differs from `want`, as readable lines."""
  if isinstance(want, dict) and isinstance(got, dict):
    lines = []
    for k in sorted(set(want) | set(got), key=str):
      here = f"{where}.{k}" if where else str(k)
      if k not in got:
        lines.append(f"{here}: missing (golden {want[k]!r})")
      elif k not in want:
        lines.append(f"{here}: not in the golden file (got {got[k]!r})")
      else:
        lines += differences(want[k], got[k], here)
    return lines
  if isinstance(want, float) or isinstance(got, float):
    if not math.isclose(want, got, rel_tol=RTOL, abs_tol=1e-12):
      change = (got - want) / want if want else float("inf")
      return [f"{where}: golden {want:.6g}, got {got:.6g} ({change:+.3%})"]
    return []
  return [] if want == got else [f"{where}: golden {want!r}, got {got!r}"]


def _golden() -> dict:
  with open(GOLDEN) as f:
    return json.load(f)


# The fast tier keeps one case per family of the search; the rest run in the full suite.
_FAST = {"mlp-cpu", "plain-cpu", "gpt-tiny-h100", "gpt-tiny-dp-tp"}


@pytest.mark.parametrize(
  "case",
  [c if c.name in _FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
  ids=lambda c: c.name,
)
def test_plan_matches_golden(case):
  want = _golden().get(case.name)
  assert want is not None, f"{case.name} is not in {GOLDEN}: run python {__file__} --update"
  diff = differences(want, record(plan_case(case)))
  assert not diff, f"{case.name} drifted from its golden plan:\n  " + "\n  ".join(diff)


def test_differences_names_every_changed_key():
  want = {"a": 1.0, "b": {"c": [None, "data"], "d": 2}}
  got = {"a": 1.5, "b": {"c": [None, "model"]}, "e": 3}
  lines = differences(want, got)
  assert len(lines) == 4
  assert any(line.startswith("a: golden 1, got 1.5") for line in lines)
  assert any(line.startswith("b.d: missing") for line in lines)
  assert differences(want, want) == []


def _update() -> int:
  out = {case.name: record(plan_case(case)) for case in CASES}
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  from wapar_jax._src.files import write_text_atomic

  write_text_atomic(GOLDEN, json.dumps(out, indent=1, sort_keys=True) + "\n")
  print(f"wrote {len(out)} golden plans to {GOLDEN}")
  return 0


if __name__ == "__main__":
  if sys.argv[1:] != ["--update"]:
    sys.exit(f"usage: python {sys.argv[0]} --update")
  sys.exit(_update())
