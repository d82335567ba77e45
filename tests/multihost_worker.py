"""One process of the multi-host test: `python tests/multihost_worker.py --process-id I ...`.

Not a test module (pytest does not collect it): tests/test_multihost.py starts one of these per
process. Each joins the job with `jax.distributed.initialize`, plans the built-in "gpt-tiny" for
the global devices (once per strategy asked for), initialises the parameters sharded, feeds its
own rows of the global batch with `plan.shard_batch` and runs a few steps. It prints one JSON
line: per strategy, the losses, the mesh shape and the axes that cross processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--coordinator", required=True, help="host:port of process 0")
  parser.add_argument("--local-devices", type=int, default=4)
  parser.add_argument("--strategies", default="dp", help="comma-separated plan families")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument(
    "--init-timeout",
    type=int,
    default=60,
    help="seconds jax.distributed.initialize waits for the other processes",
  )
  parser.add_argument(
    "--heartbeat-timeout",
    type=int,
    help="seconds without a heartbeat after which a process counts as dead "
    "(default: the init timeout, at least 10)",
  )
  args = parser.parse_args(argv)
  heartbeat = args.heartbeat_timeout or max(10, args.init_timeout)

  # Virtual CPU devices must be requested before jax starts; kernels compiled unoptimised, as
  # in the test process (tests/conftest.py).
  os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={args.local_devices} "
    "--xla_backend_optimization_level=0"
  )
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # A failed join aborts inside the runtime (DEADLINE_EXCEEDED); this line says what was tried.
  print(
    f"process {args.process_id}/{args.num_processes}: joining the job at {args.coordinator}, "
    f"waiting at most {args.init_timeout} s",
    file=sys.stderr,
    flush=True,
  )
  jax.distributed.initialize(
    coordinator_address=args.coordinator,
    num_processes=args.num_processes,
    process_id=args.process_id,
    initialization_timeout=args.init_timeout,
    heartbeat_timeout_seconds=heartbeat,
  )

  import dataclasses

  import optax

  import wapar_jax as wap
  from wapar_jax import examples

  ex = examples.get_example("gpt-tiny")
  tx = optax.adamw(1e-3)
  # Each process is one "node" of the plan, so the data axis is the one that crosses processes.
  profile = dataclasses.replace(
    wap.load_profile("h100-sxm"), name="h100-4-per-node", devices_per_node=jax.local_device_count()
  )
  # Every process builds the same global batch and keeps its own contiguous block of rows.
  full = ex.make_batch(jax.random.key(1))
  rows = jax.tree.leaves(full)[0].shape[0] // jax.process_count()
  lo = jax.process_index() * rows
  local = jax.tree.map(lambda x: x[lo : lo + rows], full)
  report = {"process": jax.process_index()}
  for strategy in args.strategies.split(","):
    plan = wap.plan(
      ex.loss_fn,
      ex.params,
      ex.batch,
      optimizer=tx,
      devices=jax.device_count(),
      profile=profile,
      strategy=strategy,
      all_devices=True,
    )
    params = plan.init_params(ex.init_params, jax.random.key(0))
    opt_state = plan.init_opt_state(params)
    batch = plan.shard_batch(local)
    step = plan.train_step()
    losses = []
    for i in range(args.steps):
      params, opt_state, loss = step(params, opt_state, batch)
      losses.append(float(loss))
      print(f"{strategy} step {i} done", flush=True)  # a test kills a peer mid-training
    report[strategy] = {
      "losses": losses,
      "mesh_shape": dict(plan.mesh_shape),
      "cross_node_axes": list(plan.chosen.cross_node_axes),
    }
  print(json.dumps(report), flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
