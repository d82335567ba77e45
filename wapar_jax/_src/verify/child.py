"""The verify child process: `python -m wapar_jax._src.verify.child REQUEST RESULT`.

Started by `verify` with enough virtual CPU devices for the plan's mesh. It reads the plan,
profile and workload (a built-in example's name, or a cloudpickle of the user's loss,
optimizer and trees) from the REQUEST JSON, compiles the step and writes the `Verification`
as JSON to RESULT. Nothing imports this module, so it may import `Plan` without a cycle.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import jax

from wapar_jax import examples
from wapar_jax._src import optimizers
from wapar_jax._src.files import write_text_atomic
from wapar_jax._src.plan import Plan
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.verify.run import compile_and_analyse


def main(argv: Sequence[str]) -> int:
  """Compiles and analyses the request at `argv[0]`, writing the `Verification` to `argv[1]`."""
  started = time.perf_counter()
  req_path, out_path = argv
  with open(req_path) as f:
    request = json.load(f)
  plan = Plan.from_json(json.dumps(request["plan"]))
  profile = DeviceProfile.from_dict(request["profile"])
  if "workload" in request:
    w = request["workload"]
    ex = examples.get_example(
      w["example"], batch_size=w.get("batch_size"), seq_len=w.get("seq_len"), dtype=w.get("dtype")
    )
    loss_fn, params, batch = ex.loss_fn, ex.params, ex.batch
    optimizer = optimizers.by_name(w.get("optimizer", "adamw"), float(w.get("lr", 1e-3)))
  else:
    import cloudpickle  # optional: only a request holding pickled functions needs it

    loss_fn, optimizer, params, batch = cloudpickle.loads(bytes.fromhex(request["pickled"]))
  devices = jax.devices("cpu")[: plan.num_devices]
  result = compile_and_analyse(
    plan, devices, profile, started, loss_fn, optimizer, params, batch, child_process=True
  )
  write_text_atomic(out_path, json.dumps(result.to_dict()))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
