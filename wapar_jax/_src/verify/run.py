"""Verifying a plan: lower and compile its train step for its mesh, then set it beside the plan.

`verify` compiles in this process when it has the plan's number of CPU devices, and otherwise
in a child process (`wapar_jax._src.verify.child`) started with that many virtual ones. With
`compiler="gpu"` the child presents the plan's number of mock GPU devices instead (JAX's
`mock_num_gpu_processes`: one real GPU compiles for N, NCCL mocked, nothing runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from wapar_jax._src.compilers import XLA_CPU
from wapar_jax._src.profiles import DeviceProfile, load_profile
from wapar_jax._src.search.space import FSDP_MIN_BYTES
from wapar_jax._src.step import without_ambient_mesh
from wapar_jax._src.tree import abstract
from wapar_jax._src.verify import predicted_memory
from wapar_jax._src.verify.compiled import memory_breakdown, read_compiled
from wapar_jax._src.verify.hlo import parse_hlo
from wapar_jax._src.verify.results import Figures, Verification
from wapar_jax._src.verify.schedule import async_collectives
from wapar_jax._src.verify.twin import TWIN_DTYPE, float32_twin, low_precision_dtype, twin_plan
from wapar_jax.errors import (
  InvalidArgumentError,
  NoGpuError,
  NotEnoughDevicesError,
  VerificationFailedError,
)

# Bounds a hung child process, far above what compiling a GPT-2-sized step there takes.
DEFAULT_TIMEOUT_S = 300.0
# XLA:CPU expands optimization barriers before its CSE pass, which merges a rematerialised
# forward pass back into the original one; GPU and TPU compile with the barriers in place.
# Keeping the pass off makes the CPU module rematerialise as the target does (same results).
TARGET_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}
COMPILERS = ("cpu", "gpu")


def analyse_compiled(
  compiled,
  plan,
  profile: DeviceProfile,
  compile_seconds: float,
  started: float,
  child_process: bool = False,
  predicted_peak: float | None = None,
) -> Verification:
  """Reads a compiled step (FLOPs, memory, collectives) and sets it beside the plan.

  `predicted_peak`: the plan's peak as the compiler used here compiles the step
  (`predicted_memory.peak_under`), where that differs from the plan's own figure.
  """
  step = read_compiled(compiled, plan.mesh_shape, profile)
  p = plan.predicted
  peak, notes = p.peak_memory, list(step.notes)
  if predicted_peak is not None and predicted_peak != p.peak_memory:
    peak = predicted_peak
    notes.append(
      f"peak memory predicted as XLA:CPU compiles the step: "
      f"{peak / 2**30:.2f} GiB; the plan's figure, under the buffer rules of "
      f"{plan.profile}'s compiler, is {p.peak_memory / 2**30:.2f} GiB."
    )
  predicted = Figures(
    p.flops, p.comm_bytes, p.comm_time, peak, p.compute_time, p.step_time, p.exposed_comm_time
  )
  return Verification(
    mesh_shape=dict(plan.mesh_shape),
    strategy=plan.strategy,
    profile=profile.name,
    predicted=predicted,
    compiled=step.figures,
    xla_flops=step.xla_flops,
    loop_flops_added=step.loop_flops_added,
    memory=step.memory,
    collectives=step.collectives,
    compile_seconds=compile_seconds,
    verify_seconds=time.perf_counter() - started,
    child_process=child_process,
    notes=tuple(notes),
    comm_time_as_emitted=step.comm_time_as_emitted,
  )


def compile_like_target(lowered, platform: str = "cpu"):
  """Compiles a lowered step as a GPU/TPU compiler would treat its remat (see above); GPU XLA
  compiles it as a GPU user gets it."""
  return lowered.compile(compiler_options=TARGET_COMPILER_OPTIONS if platform == "cpu" else None)


def lower_plan_step(
  plan, devices=None, loss_fn=None, optimizer=None, params=None, batch=None, model_state=None
):
  """The plan's sharded train step lowered for `devices` (default: the plan's own) on abstract
  arguments; `loss_fn` ... `model_state` as for `Plan.train_step`."""
  model_state = plan._abstract_model_state if model_state is None else model_state
  step = plan.train_step(
    devices=devices,
    loss_fn=loss_fn,
    optimizer=optimizer,
    params=params,
    batch=batch,
    model_state=model_state,
  )
  loss_fn, optimizer = plan._need(loss_fn, optimizer)
  params = plan.stored_params(plan._abstract_params if params is None else params)
  batch = abstract(plan._abstract_batch if batch is None else batch)
  opt_state = abstract(jax.eval_shape(optimizer.init, params))
  state_args = () if plan.flat_model_state_specs is None else (abstract(model_state),)
  return step.lower(params, opt_state, batch, *state_args)


def compile_and_analyse(
  plan,
  devices,
  profile: DeviceProfile,
  started: float,
  loss_fn=None,
  optimizer=None,
  params=None,
  batch=None,
  child_process: bool = False,
  model_state=None,
) -> Verification:
  """Compiles the plan's step for `devices` and reads it beside the prediction.

  On CPU devices the plan's peak is priced again under XLA:CPU's rules, and a bf16 / f16 plan
  is compiled a second time as its float32 twin (see `Verification`); on GPU devices the
  async collectives of GPU XLA's schedule are counted.
  """
  compiled, seconds = compile_plan_step(
    plan, devices, loss_fn, optimizer, params, batch, model_state
  )
  planned_dtype = low_precision_dtype(
    plan._abstract_params if params is None else params,
    plan._abstract_batch if batch is None else batch,
  )
  if devices[0].platform != "cpu":
    result = analyse_compiled(compiled, plan, profile, seconds, started, child_process)
    pairs = async_collectives(parse_hlo(compiled.as_text()))
    return dataclasses.replace(
      result,
      compiler=f"xla:{devices[0].platform}",
      planned_dtype=planned_dtype,
      async_collectives=len(pairs),
      overlapped_collectives=sum(1 for a in pairs if a.overlapped),
    )
  peak = predicted_memory.peak_under(
    plan, XLA_CPU, profile, loss_fn, optimizer, params, batch, model_state
  )
  result = analyse_compiled(
    compiled, plan, profile, seconds, started, child_process, predicted_peak=peak
  )
  if not planned_dtype:
    return result
  twin = _float32_twin_check(
    plan, devices, profile, planned_dtype, loss_fn, optimizer, params, batch, model_state
  )
  return dataclasses.replace(
    result,
    planned_dtype=planned_dtype,
    notes=result.notes + twin.pop("notes"),
    verify_seconds=time.perf_counter() - started,
    **twin,
  )


def _float32_twin_check(
  plan, devices, profile, planned_dtype, loss_fn, optimizer, params, batch, model_state
):
  """The float32 twin's compiled memory and its peak as the plan prices it under XLA:CPU's
  rules, as `Verification` fields; a twin that cannot be built leaves a note instead."""
  loss_fn, optimizer = plan._need(loss_fn, optimizer)
  params = plan._abstract_params if params is None else params
  batch = plan._abstract_batch if batch is None else batch
  with_state = plan.flat_model_state_specs is not None
  model_state = plan._abstract_model_state if model_state is None else model_state
  try:
    twin_loss, twin_args = float32_twin(
      loss_fn, (params, batch, model_state) if with_state else (params, batch)
    )
    t_params, t_batch, t_state = (*twin_args, None)[:3]
    twin = twin_plan(plan, twin_loss, t_params, t_batch, t_state)
    compiled, seconds = compile_plan_step(
      twin, devices, twin_loss, optimizer, t_params, t_batch, t_state
    )
  except Exception as e:  # the plan's own compile still stands; the note says why no twin
    return {
      "notes": (
        f"no float32 twin: {type(e).__name__}: {e}. The compiled peak memory is XLA:CPU's "
        "for a low-precision step, about twice a GPU compile's.",
      )
    }
  memory, notes = memory_breakdown(compiled)
  # The plan kept leaves whole by their bf16 size; the twin is priced with the same layout.
  scale = TWIN_DTYPE.itemsize / jnp.dtype(planned_dtype).itemsize
  peak = predicted_memory.peak_under(
    twin,
    XLA_CPU,
    profile,
    twin_loss,
    optimizer,
    t_params,
    t_batch,
    t_state,
    fsdp_min_bytes=FSDP_MIN_BYTES * scale,
  )
  if peak is None:
    notes.append(
      "the float32 twin's peak is not predicted: its traced step's dimension groups are not "
      "the plan's (or the plan is a pipeline's)."
    )
  return {
    "twin_dtype": "float32",
    "twin_memory": memory,
    "twin_predicted_peak": peak or 0.0,
    "twin_compile_seconds": seconds,
    "notes": tuple(notes),
  }


def compile_plan_step(plan, devices, loss_fn, optimizer, params, batch, model_state=None):
  """(the plan's step compiled as for its target, seconds the compile took)."""
  lowered = lower_plan_step(plan, devices, loss_fn, optimizer, params, batch, model_state)
  t0 = time.perf_counter()
  compiled = compile_like_target(lowered, devices[0].platform)
  return compiled, time.perf_counter() - t0


def _profile_of(plan, profile) -> DeviceProfile:
  if profile is None:
    return load_profile(plan.profile)
  return load_profile(profile)


@without_ambient_mesh
def verify(
  plan,
  devices: Sequence[Any] | None = None,
  *,
  profile=None,
  workload: Mapping[str, Any] | None = None,
  loss_fn=None,
  optimizer=None,
  params=None,
  batch=None,
  timeout: float = DEFAULT_TIMEOUT_S,
  compiler: str = "cpu",
) -> Verification:
  """Compiles the plan's train step for its mesh and compares with the plan.

  Args:
    plan: a `Plan`.
    devices: CPU devices to compile for (default: this process's CPU devices). With fewer than
      the plan needs, the compile runs in a child process with enough virtual devices.
    profile: the profile to price collectives with (default: the plan's own).
    workload: how a child process rebuilds the workload: `{"example": name, "batch_size": ...,
      "seq_len": ..., "dtype": ..., "optimizer": "adamw", "lr": 1e-3}` for a built-in example.
      Without it the child gets a cloudpickle of the loss, optimizer and trees.
    loss_fn, optimizer, params, batch: for a plan loaded from JSON (see `Plan.train_step`).
    timeout: seconds the child process may take.
    compiler: "cpu" compiles with XLA:CPU on virtual CPU devices (a bf16 / f16 plan's memory
      is then checked through its float32 twin); "gpu" with GPU XLA on the plan's number of
      mock GPU devices in a child process (memory, collectives and the async schedule as a
      GPU compiles them; needs one GPU). "cpu" is the default everywhere until the GPU path
      has run on a real GPU: it is checked against hand-written GPU modules only.

  Returns:
    A frozen `Verification`.

  Raises:
    InvalidArgumentError: an unknown `compiler`, or `devices` with compiler="gpu".
    NoGpuError: compiler="gpu" where jax sees no GPU.
    NotEnoughDevicesError: a child process is needed but the workload cannot be sent to it.
    VerificationFailedError: the child process failed or timed out.
  """
  started = time.perf_counter()
  device_profile = _profile_of(plan, profile)
  needed = plan.num_devices
  if compiler not in COMPILERS:
    raise InvalidArgumentError(f"compiler must be one of {COMPILERS}. Got {compiler!r}.")
  if compiler == "gpu":
    if devices is not None:
      raise InvalidArgumentError(
        "verify(compiler='gpu') compiles on mock GPU devices in a child process: pass "
        f"devices=None. Got {len(list(devices))} devices."
      )
    found = _gpus()
    if not found:
      raise NoGpuError(
        "verify(compiler='gpu') compiles with GPU XLA, which needs one GPU that jax sees (a "
        "CUDA jaxlib, JAX_PLATFORMS not limited to cpu); on a CPU-only machine use "
        f"compiler='cpu'. Got jax devices {jax.devices()}."
      )
    return _verify_in_child(
      plan, device_profile, workload, loss_fn, optimizer, params, batch, timeout, started, "gpu"
    )
  if devices is None:
    cpu = jax.devices("cpu")
    if len(cpu) >= needed:
      devices = cpu[:needed]
  else:
    devices = list(devices)
    if len(devices) < needed:
      raise NotEnoughDevicesError(
        f"verify needs {needed} devices for mesh {dict(plan.mesh_shape)}. Pass devices=None to "
        f"compile in a child process with {needed} virtual CPU devices. Got {len(devices)}."
      )
  if devices is not None:
    return compile_and_analyse(
      plan, devices, device_profile, started, loss_fn, optimizer, params, batch
    )
  return _verify_in_child(
    plan, device_profile, workload, loss_fn, optimizer, params, batch, timeout, started, "cpu"
  )


def _gpus() -> list:
  """This process's GPU devices; none where jax has no GPU backend."""
  try:
    return jax.devices("gpu")
  except RuntimeError:  # jax names no GPU backend, or it failed to start
    return []


# --- the child process: what it is sent, how it is started -----------------------------------


def _child_request(plan, profile, workload, loss_fn, optimizer, params, batch) -> dict:
  request = {"plan": json.loads(plan.to_json()), "profile": profile.to_dict()}
  if workload is not None:
    if not isinstance(workload, Mapping) or "example" not in workload:
      raise InvalidArgumentError(
        "workload must be a dict naming a built-in example, e.g. {'example': 'gpt-tiny', "
        f"'optimizer': 'adamw', 'lr': 1e-3}}. Got {workload!r}."
      )
    request["workload"] = dict(workload)
    return request
  try:
    import cloudpickle
  except ImportError:
    raise NotEnoughDevicesError(
      f"verify needs {plan.num_devices} CPU devices in this process for a user-defined loss "
      "function (a child process would need cloudpickle to receive it, and it is not "
      "installed). Run in a process started with XLA_FLAGS=--xla_force_host_platform_"
      f"device_count={plan.num_devices}, or pip install cloudpickle. Got "
      f"{_cpu_count()} CPU devices."
    ) from None
  loss_fn, optimizer = plan._need(loss_fn, optimizer)
  params = plan._abstract_params if params is None else params
  batch = plan._abstract_batch if batch is None else batch
  try:
    state = plan._abstract_model_state
    blob = cloudpickle.dumps(
      (loss_fn, optimizer, abstract(params), abstract(batch), state and abstract(state))
    )
  except Exception as e:  # whatever cloudpickle cannot serialise, the message names it
    raise NotEnoughDevicesError(
      f"verify needs {plan.num_devices} CPU devices in this process: the loss function or "
      "optimizer cannot be sent to a child process. Run in a process started with "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={plan.num_devices}. Got {e}."
    ) from e
  request["pickled"] = blob.hex()
  return request


def _cpu_count() -> int:
  return len(jax.devices("cpu"))


def _child_env(n: int, compiler: str) -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  if compiler == "gpu":
    # The child only compiles: it takes no GPU memory up front and times no kernels on a GPU
    # others may use. GPU XLA rematerialises a module larger than the compiling GPU until it
    # fits, which would check another program than the plan's: that pass is off.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["XLA_FLAGS"] = (
      f"{flags.strip()} --xla_gpu_autotune_level=0 --xla_disable_hlo_passes=rematerialization"
    ).strip()
    env.pop("JAX_PLATFORMS", None)
    return env
  env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={n}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _verify_in_child(
  plan, profile, workload, loss_fn, optimizer, params, batch, timeout, started, compiler
) -> Verification:
  request = _child_request(plan, profile, workload, loss_fn, optimizer, params, batch)
  request["compiler"] = compiler
  # The request (the pickled loss among it) goes in on stdin and the result comes back on
  # stdout, so nothing is left on disk whichever process is killed; its own session lets the
  # child be killed as a group, and it kills itself if this process dies (see child.py).
  child = subprocess.Popen(
    [sys.executable, "-m", "wapar_jax._src.verify.child", str(os.getpid())],
    env=_child_env(plan.num_devices, compiler),
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    out, err = child.communicate(json.dumps(request), timeout=timeout)
  except subprocess.TimeoutExpired:
    raise VerificationFailedError(
      f"the verify child process compiling mesh {dict(plan.mesh_shape)} did not finish in "
      f"{timeout:.0f} s; pass a larger timeout=, or verify in a process with "
      f"{plan.num_devices} CPU devices. Got a timeout after {timeout:.0f} s."
    ) from None
  finally:
    _end(child)
  lines = out.strip().splitlines()
  if child.returncode != 0 or not lines:
    tail = "\n".join(err.strip().splitlines()[-15:])
    raise VerificationFailedError(
      f"the verify child process for mesh {dict(plan.mesh_shape)} failed (exit "
      f"{child.returncode}). Its last lines:\n{tail}\nGot exit code {child.returncode}."
    )
  result = Verification.from_dict(json.loads(lines[-1]))
  return dataclasses.replace(
    result, verify_seconds=time.perf_counter() - started, child_process=True
  )


def _end(child: subprocess.Popen) -> None:
  """Kills `child`'s process group if it still runs (a timeout, an interrupt), and reaps it."""
  if child.poll() is None:
    with contextlib.suppress(ProcessLookupError):  # it exited since poll()
      os.killpg(child.pid, signal.SIGKILL)
    child.communicate()
