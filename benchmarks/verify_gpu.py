"""`plan.verify(compiler="gpu")` of a bf16 GPT-2-small plan: GPU XLA's memory, collectives and
async schedule beside the plan, on a machine with one GPU (mock GPU devices, nothing runs).

    python benchmarks/verify_gpu.py [OUT_DIR]   # writes verify_gpu_bf16.{md,json}

Run by `gpu_check.sh`; on a CPU-only machine it stops with NoGpuError.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optax

import wapar_jax as wap
from wapar_jax import examples

WORKLOAD = {
  "example": "gpt2-small",
  "batch_size": 8,
  "seq_len": 1024,
  "dtype": "bfloat16",
  "optimizer": "adamw",
  "lr": 1e-4,
}


def main(argv: list[str]) -> int:
  out = Path(argv[0] if argv else Path(__file__).parent / "results")
  w = WORKLOAD
  ex = examples.get_example(
    w["example"], batch_size=w["batch_size"], seq_len=w["seq_len"], dtype=w["dtype"]
  )
  plan = wap.plan(
    ex.loss_fn, ex.params, ex.batch, optimizer=optax.adamw(w["lr"]), devices=8, profile="h100-sxm"
  )
  v = plan.verify(compiler="gpu", workload=WORKLOAD)
  table = v.table()
  print(table)
  out.mkdir(parents=True, exist_ok=True)
  (out / "verify_gpu_bf16.md").write_text(
    f'# plan.verify(compiler="gpu"): {w["example"]} {w["dtype"]}, 8 x h100-sxm\n\n```\n'
    f"{table}\n```\n"
  )
  (out / "verify_gpu_bf16.json").write_text(json.dumps(v.to_dict(), indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
