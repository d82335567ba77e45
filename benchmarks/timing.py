"""Predicted vs measured single-device step time, against a profile calibrated on this machine.

For each (model, batch) point the planner's `plan.predicted.step_time` for one device is
compared with the wall time of the jitted single-device train step (AdamW, parameters and
optimizer state donated, compiled and warmed first). The measured time is the minimum over
repeated runs, because other processes may share the machine and can only add time. Writes
benchmarks/results/timing_<platform>.{json,md}.

    python benchmarks/timing.py --calibrate              # calibrate, then compare
    python benchmarks/timing.py --profile my-machine.json
    python benchmarks/timing.py --calibrate --datasheet h200   # the built-in profile too

With `--datasheet NAME` each point is also predicted with that built-in (datasheet) profile,
against the same measurement: how far planning with no calibration is off on this machine.

Targets: median absolute relative error <= 25%, Spearman rank correlation >= 0.9.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import calibrate as calibrate_lib
from wapar_jax._src import step as step_lib

RESULTS = Path(__file__).parent / "results"
TARGETS = {"median_abs_error": 0.25, "spearman": 0.9}
# (model, batch size, sequence length or None). CPU points each take well under 5 s a step on
# two cores; GPU points are larger (a few ms to ~100 ms on an H100) and run in bfloat16.
POINTS = {
  "cpu": [
    ("plain", 16, None),
    ("mlp", 32, None),
    ("mlp", 512, None),
    ("cnn", 16, None),
    ("cnn", 128, None),
    ("gpt-tiny", 8, None),
    ("gpt-tiny", 64, 128),
    ("gpt-tiny-scan", 8, None),
    ("gpt-tiny-nnx", 32, None),
    ("gpt2-small", 1, 64),
    ("gpt2-small", 2, 128),
    ("alexnet", 2, None),
    ("alexnet", 8, None),
    ("vgg16", 1, None),
  ],
  "gpu": [
    ("mlp", 512, None),
    ("cnn", 256, None),
    ("gpt-tiny", 64, 128),
    ("gpt-tiny-scan", 64, 128),
    ("gpt-tiny-nnx", 64, 128),
    ("gpt2-small", 4, 256),
    ("gpt2-small", 8, 1024),
    ("gpt2-medium", 8, 1024),
    ("gpt2-large", 4, 1024),
    ("alexnet", 64, None),
    ("alexnet", 256, None),
    ("vgg16", 32, None),
    ("vgg16", 64, None),
  ],
}
DTYPE = {"cpu": "float32", "gpu": "bfloat16", "tpu": "bfloat16"}
# Repeats per point: at least MIN_REPEATS, then more while the point has used under BUDGET_S.
MIN_REPEATS, MAX_REPEATS, BUDGET_S = 5, 30, 6.0


def measure_step(ex, optimizer) -> tuple[float, int]:
  """(minimum seconds of one warm step, repeats) of the jitted single-device train step."""
  step = jax.jit(step_lib.make_train_step(ex.loss_fn, optimizer), donate_argnums=(0, 1))
  params = ex.init_params(jax.random.key(0))
  opt_state = optimizer.init(params)
  batch = ex.make_batch(jax.random.key(1))
  params, opt_state, loss = step(params, opt_state, batch)  # compile
  jax.block_until_ready(loss)
  times = []
  start = time.perf_counter()
  while len(times) < MAX_REPEATS and (
    len(times) < MIN_REPEATS or time.perf_counter() - start < BUDGET_S
  ):
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready((params, opt_state, loss))
    times.append(time.perf_counter() - t0)
  return min(times), len(times)


def spearman(a, b) -> float:
  """Spearman rank correlation (average ranks for ties), as scipy.stats.spearmanr computes it."""

  def ranks(x):
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # ties share their mean rank
      tied = x == value
      r[tied] = r[tied].mean()
    return r

  return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def _predicted_step(ex, optimizer, profile):
  plan = wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=optimizer, devices=1, profile=profile)
  return plan.predicted.step_time, plan.predicted.flops


def run(profile, points, dtype, datasheet=None, max_seconds=None):
  optimizer = optax.adamw(1e-3)
  rows = []
  started = time.perf_counter()
  for name, batch_size, seq_len in points:
    if max_seconds is not None and time.perf_counter() - started > max_seconds:
      print(
        f"--max-seconds {max_seconds:.0f} spent: {name} b{batch_size} and later points "
        "not measured",
        flush=True,
      )
      break
    ex = examples.get_example(name, batch_size=batch_size, seq_len=seq_len, dtype=dtype)
    predicted, flops = _predicted_step(ex, optimizer, profile)
    measured, repeats = measure_step(ex, optimizer)
    row = {
      "model": name,
      "batch": batch_size,
      "seq_len": seq_len,
      "dtype": dtype,
      "predicted_ms": predicted * 1e3,
      "measured_ms": measured * 1e3,
      "error": predicted / measured - 1,
      "repeats": repeats,
      "gflop": flops / 1e9,
    }
    line = (
      f"{name:14s} b{batch_size:<4d} t{seq_len or '-':<5} predicted "
      f"{predicted * 1e3:9.2f} ms  measured {measured * 1e3:9.2f} ms  "
      f"error {row['error']:+.0%}"
    )
    if datasheet is not None:
      sheet, _ = _predicted_step(ex, optimizer, datasheet)
      row.update(datasheet_predicted_ms=sheet * 1e3, datasheet_error=sheet / measured - 1)
      line += f"  ({datasheet.name}: {row['datasheet_error']:+.0%})"
    rows.append(row)
    print(line, flush=True)
  return rows


def _accuracy(rows, predicted_key: str, error_key: str) -> dict:
  return {
    "median_abs_error": float(np.median(np.abs([r[error_key] for r in rows]))),
    "spearman": spearman([r[predicted_key] for r in rows], [r["measured_ms"] for r in rows]),
  }


def write(rows, profile, platform_name, calibration_seconds, datasheet=None):
  summary = {**_accuracy(rows, "predicted_ms", "error"), "points": len(rows)}
  summary["targets_met"] = (
    summary["median_abs_error"] <= TARGETS["median_abs_error"]
    and summary["spearman"] >= TARGETS["spearman"]
  )
  if datasheet is not None:
    summary["datasheet"] = {
      "profile": datasheet.name,
      **_accuracy(rows, "datasheet_predicted_ms", "datasheet_error"),
    }
  device = jax.devices()[0]
  meta = {
    "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    "device": (
      device.device_kind
      if device.device_kind == device.platform
      else f"{device.device_kind} ({device.platform})"
    ),
    "cpus": os.cpu_count(),
    "machine": platform.processor() or platform.machine(),
    "load_average": os.getloadavg(),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "calibration_seconds": calibration_seconds,
  }
  RESULTS.mkdir(exist_ok=True)
  stem = RESULTS / f"timing_{platform_name}"
  stem.with_suffix(".json").write_text(
    json.dumps(
      {
        "meta": meta,
        "summary": summary,
        "targets": TARGETS,
        "profile": profile.to_dict(),
        "rows": rows,
      },
      indent=1,
    )
    + "\n"
  )
  load = ", ".join(f"{x:.2f}" for x in meta["load_average"])
  lines = [
    f"# Predicted vs measured single-device step time ({platform_name})",
    "",
    f"{meta['device']}, {meta['cpus']} CPUs, jax {meta['jax']}, {meta['date']}, load average "
    f"{load} (1, 5, 15 min). Profile `{profile.name}` calibrated on this machine "
    f"(peak float32 {profile.flops_per_second('float32') / 1e9:.1f} GFLOP/s, bfloat16 "
    f"{profile.flops_per_second('bfloat16') / 1e9:.1f} GFLOP/s, memory "
    f"{profile.memory_bandwidth / 1e9:.2f} GB/s, kernel overhead "
    f"{profile.kernel_overhead * 1e6:.2f} us). Measured: minimum over repeats of the warm, "
    f"jitted AdamW step. Error = predicted / measured - 1.",
    "",
    "| model | batch | seq | dtype | GFLOP | predicted ms | measured ms | error |"
    + (f" `{datasheet.name}` ms | error |" if datasheet else ""),
    "|---|---|---|---|---|---|---|---|" + ("---|---|" if datasheet else ""),
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['batch']} | {r['seq_len'] or '-'} | {r['dtype']} | "
      f"{r['gflop']:.3g} | {r['predicted_ms']:.3g} | {r['measured_ms']:.3g} | "
      f"{r['error']:+.0%} |"
      + (f" {r['datasheet_predicted_ms']:.3g} | {r['datasheet_error']:+.0%} |" if datasheet else "")
    )
  lines += [
    "",
    f"Median absolute error {summary['median_abs_error']:.1%} (target <= "
    f"{TARGETS['median_abs_error']:.0%}), Spearman {summary['spearman']:.3f} (target >= "
    f"{TARGETS['spearman']}), {len(rows)} points: targets "
    f"{'met' if summary['targets_met'] else 'NOT met'}.",
    "",
  ]
  if datasheet is not None:
    d = summary["datasheet"]
    lines += [
      f"With the built-in datasheet profile `{datasheet.name}` instead (no calibration): "
      f"median absolute error {d['median_abs_error']:.1%}, Spearman "
      f"{d['spearman']:.3f}.",
      "",
    ]
  stem.with_suffix(".md").write_text("\n".join(lines))
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument(
    "--calibrate",
    action="store_true",
    help="calibrate jax.devices()[0] first (profile saved next to the results)",
  )
  what.add_argument("--profile", help="a calibrated profile (name or .json file)")
  parser.add_argument("--datasheet", help="a built-in profile to predict with as well")
  parser.add_argument("--only", nargs="*", help="model names to keep (default: all points)")
  parser.add_argument(
    "--max-seconds",
    type=float,
    help="start no new point after this many seconds (results still written)",
  )
  args = parser.parse_args(argv)
  platform_name = jax.devices()[0].platform
  calibration_seconds = None
  if args.calibrate:
    t0 = time.perf_counter()
    RESULTS.mkdir(exist_ok=True)
    profile = calibrate_lib.calibrate(RESULTS / f"calibrated_{platform_name}.json")
    calibration_seconds = time.perf_counter() - t0
    print(f"calibrated in {calibration_seconds:.1f} s", flush=True)
  else:
    profile = wap.load_profile(args.profile)
  points = POINTS.get(platform_name, POINTS["gpu"])
  if args.only:
    points = [p for p in points if p[0] in args.only]
  datasheet = wap.load_profile(args.datasheet) if args.datasheet else None
  rows = run(profile, points, DTYPE.get(platform_name, "bfloat16"), datasheet, args.max_seconds)
  summary = write(rows, profile, platform_name, calibration_seconds, datasheet)
  print(
    f"median |error| {summary['median_abs_error']:.1%}, Spearman {summary['spearman']:.3f}: "
    f"targets {'met' if summary['targets_met'] else 'NOT met'}"
  )
  return 0 if summary["targets_met"] else 1


if __name__ == "__main__":
  sys.exit(main())
