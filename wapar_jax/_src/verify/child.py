"""The verify child process: `python -m wapar_jax._src.verify.child PARENT_PID`.

Started by `verify` with enough virtual CPU devices for the plan's mesh, or, for
`compiler="gpu"`, on a machine with a GPU that it presents as the plan's number of mock GPU
devices (`mock_num_gpu_processes`, set before jax starts its backends). It reads the plan,
profile and workload (a built-in example's name, or a cloudpickle of the user's loss,
optimizer and trees) as JSON from stdin, compiles the step and writes the `Verification` as
JSON, the last line of stdout. It dies with its parent: a compile nobody waits for is only lost
work. Nothing imports this module, so it may import `Plan` without a cycle.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

import jax

from wapar_jax import examples
from wapar_jax._src import optimizers
from wapar_jax._src.plan import Plan
from wapar_jax._src.profiles import DeviceProfile
from wapar_jax._src.verify.run import compile_and_analyse

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main(argv: Sequence[str]) -> int:
  """Compiles and analyses the request on stdin, writing the `Verification` to stdout;
  `argv[0]` is the pid of the parent that waits for it."""
  started = time.perf_counter()
  _die_with_parent(int(argv[0]))
  result_out = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # what the user's code prints goes to stderr, so stdout carries the result only
  request = json.load(sys.stdin)
  plan = Plan.from_json(json.dumps(request["plan"]))
  gpu = request.get("compiler") == "gpu"
  if gpu:  # before anything asks jax for a device, which starts the backends
    jax.config.update("mock_num_gpu_processes", plan.num_devices)
  profile = DeviceProfile.from_dict(request["profile"])
  if "workload" in request:
    w = request["workload"]
    ex = examples.get_example(
      w["example"], batch_size=w.get("batch_size"), seq_len=w.get("seq_len"), dtype=w.get("dtype")
    )
    loss_fn, params, batch, model_state = ex.loss_fn, ex.params, ex.batch, None
    optimizer = optimizers.by_name(w.get("optimizer", "adamw"), float(w.get("lr", 1e-3)))
  else:
    import cloudpickle  # optional: only a request holding pickled functions needs it

    loss_fn, optimizer, params, batch, model_state = cloudpickle.loads(
      bytes.fromhex(request["pickled"])
    )
  devices = (jax.devices() if gpu else jax.devices("cpu"))[: plan.num_devices]
  result = compile_and_analyse(
    plan,
    devices,
    profile,
    started,
    loss_fn,
    optimizer,
    params,
    batch,
    child_process=True,
    model_state=model_state,
  )
  with result_out:
    result_out.write(json.dumps(result.to_dict()) + "\n")
  return 0


def _die_with_parent(parent: int) -> None:
  """Has the kernel kill this process when `parent` dies (Linux), or else a thread that polls
  for it; either way a parent already gone before this call ends the process now."""
  if not _parent_death_signal(signal.SIGKILL):
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
  if os.getppid() != parent:
    os._exit(1)


def _parent_death_signal(sig: int) -> bool:
  """Asks for `sig` when the parent exits (prctl PR_SET_PDEATHSIG); False where unavailable."""
  if not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(None, use_errno=True)
  return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


def _exit_when_orphaned(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(0.5)
  os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
