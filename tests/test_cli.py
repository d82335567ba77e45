import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json

import optax
import pytest

import wapar_jax as wap
from wapar_jax import examples
from wapar_jax._src import bench
from wapar_jax._src.search import Candidate
from wapar_jax.cli import main

TX = optax.adamw(1e-3)


def test_plan_prints_mesh_specs_costs_and_sweep(capsys):
  assert main(["plan", "gpt-tiny", "--devices", "8", "--profile", "cpu"]) == 0
  out = capsys.readouterr().out
  for expected in ("mesh {", "predicted per step", "parameter specs", "WAP sweep", "planned in"):
    assert expected in out


def test_plan_json_and_plan_file(tmp_path, capsys):
  path = tmp_path / "plan.json"
  assert (
    main(["plan", "mlp", "--devices", "4", "--profile", "h100-sxm", "--json", "--out", str(path)])
    == 0
  )
  printed = json.loads(capsys.readouterr().out)
  assert printed == json.loads(path.read_text())
  assert printed["devices_offered"] == 4


def test_user_model_as_module_function(tmp_path, monkeypatch, capsys):
  (tmp_path / "my_workload.py").write_text(
    "import jax, jax.numpy as jnp\n"
    "def workload():\n"
    "  params = {'w': jax.ShapeDtypeStruct((128, 128), jnp.float32)}\n"
    "  batch = {'x': jax.ShapeDtypeStruct((64, 128), jnp.float32)}\n"
    "  return (lambda p, b: jnp.mean((b['x'] @ p['w']) ** 2)), params, batch\n"
  )
  monkeypatch.chdir(tmp_path)
  assert main(["plan", "my_workload:workload", "--devices", "8", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["format"] == "wapar_jax.plan"


def test_errors_are_reported_not_raised(capsys):
  assert main(["plan", "mlp", "--profile", "no-such-gpu"]) == 2
  assert "UnknownProfileError" in capsys.readouterr().err


def test_profiles_lists_the_builtins(capsys):
  assert main(["profiles"]) == 0
  out = capsys.readouterr().out
  for name in ("h100-sxm", "titanxp-pcie", "p100-nvlink", "tpu-v5e", "cpu"):
    assert name in out
  with pytest.raises(SystemExit):
    main(["--help"])


def test_calibrate_writes_a_profile_that_plans(tmp_path, capsys):
  path = tmp_path / "me.json"
  assert main(["calibrate", "--quick", "--out", str(path), "--name", "me"]) == 0
  assert "profile written to" in capsys.readouterr().out
  assert main(["plan", "mlp", "--devices", "2", "--profile", str(path), "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["profile"] == "me"


_WORKLOAD = """
import jax, jax.numpy as jnp, optax
def _parts(batch_size, dtype):
  params = {{'w': jax.ShapeDtypeStruct((128, 128), dtype)}}
  batch = {{'x': jax.ShapeDtypeStruct((batch_size, 128), dtype)}}
  return (lambda p, b: jnp.mean((b['x'] @ p['w']).astype(jnp.float32) ** 2)), params, batch
def workload({signature}):
  return {body}
"""


def _write_workload(tmp_path, monkeypatch, name, signature, body):
  (tmp_path / f"{name}.py").write_text(_WORKLOAD.format(signature=signature, body=body))
  monkeypatch.chdir(tmp_path)
  return f"{name}:workload"


def _plan_json(capsys, *argv):
  assert main(["plan", *argv, "--devices", "2", "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def test_workload_optimizer_wins_unless_a_flag_names_one(tmp_path, monkeypatch, capsys):
  # sgd without momentum keeps no state; the CLI's default adamw keeps two moments.
  spec = _write_workload(
    tmp_path, monkeypatch, "wl_opt", "", "(*_parts(64, jnp.float32), optax.sgd(0.1))"
  )
  assert _plan_json(capsys, spec)["chosen"]["opt_state_memory"] == 0
  assert _plan_json(capsys, spec, "--optimizer", "adamw")["chosen"]["opt_state_memory"] > 0
  assert main(["plan", spec, "--lr", "0.01"]) == 2
  assert "--lr sets the rate of --optimizer" in capsys.readouterr().err


def test_workload_gets_the_flags_it_takes_as_keywords(tmp_path, monkeypatch, capsys):
  spec = _write_workload(
    tmp_path,
    monkeypatch,
    "wl_kw",
    "batch_size=64, dtype='float32'",
    "_parts(batch_size, jnp.dtype(dtype))",
  )
  plan = _plan_json(capsys, spec, "--batch-size", "16", "--dtype", "bfloat16")
  assert plan["details"]["batch"][0]["shape"] == [16, 128]
  assert plan["details"]["params"][0]["dtype"] == "bfloat16"
  assert _plan_json(capsys, spec)["details"]["batch"][0]["shape"] == [64, 128]
  # A flag the function cannot take is an error naming the flag and the fix.
  assert main(["plan", spec, "--seq-len", "256"]) == 2
  err = capsys.readouterr().err
  assert "--seq-len cannot reach wl_kw:workload" in err and "seq_len=" in err


def test_workload_of_the_wrong_shape_is_an_error(tmp_path, monkeypatch, capsys):
  spec = _write_workload(tmp_path, monkeypatch, "wl_bad", "", "_parts(64, jnp.float32)[:2]")
  assert main(["plan", spec]) == 2
  assert "must return (loss_fn, params, batch)" in capsys.readouterr().err
  assert main(["plan", "wl_bad:nope"]) == 2
  assert "has no function 'nope'" in capsys.readouterr().err


def test_bench_compiles_auto_and_baselines(capsys):
  argv = ["bench", "mlp", "--devices", "4", "--profile", "cpu", "--families", "dp", "fsdp", "pp"]
  assert main([*argv, "--json"]) == 0
  rows = {r["family"]: r for r in json.loads(capsys.readouterr().out)}
  assert list(rows) == ["auto", "dp", "fsdp", "pp"]
  assert rows["auto"]["chosen"]
  for family in ("auto", "dp", "fsdp"):
    r = rows[family]
    assert r["fits"] and r["compiled_step"] > 0 and r["compiled_peak"] > 0, r
  assert rows["dp"]["devices"] == rows["fsdp"]["devices"] == 4  # baselines use every device
  assert rows["fsdp"]["strategy"] == "fsdp"
  # mlp has no stack of layers: the pp row says why instead of failing the command.
  assert rows["pp"]["devices"] is None and "no pipeline plan" in rows["pp"]["note"]


def test_bench_table_without_compiles(capsys):
  argv = ["bench", "gpt-tiny", "--devices", "8", "--profile", "h100-sxm", "--no-compile"]
  assert main([*argv, "--progress"]) == 0
  out, err = capsys.readouterr()
  assert "10/10" in err and "cost analysis" not in err  # one bar over the families, none per plan
  assert "predicted step  compiled step" in out and "auto *" in out
  assert "  hsdp: InvalidArgumentError: no 'hsdp' plan exists" in out
  assert "  ep: InvalidArgumentError: strategy 'ep' splits the experts" in out  # a dense model
  assert "compiled: the emitted step" not in out


def test_bench_rows_for_plans_that_fail():
  figures = dict.fromkeys(("step_time", "compute_time", "comm_time", "flops", "comm_bytes"), 1.0)
  closest = Candidate(
    4, 4, 1, (), "replicated", "dp", **figures, peak_memory=2e9, energy=1.0, fits=False
  )

  def make_plan(family):
    raise wap.errors.NoFeasiblePlanError("no plan fits. Use remat.", closest)

  rows = bench.bench(make_plan, None, ("auto", "dp"))
  assert [r.fits for r in rows] == [False, False]
  assert rows[0].predicted_peak == 2e9 and rows[0].mesh_shape == {"data": 4}
  assert "NoFeasiblePlanError: no plan fits" in bench.table(rows)
  # A compile that fails leaves the row's prediction and says why; the failing plan compiles once.
  calls = []

  def verify(plan):
    calls.append(plan)
    raise wap.errors.VerificationFailedError("the child process failed. Its last lines: ...")

  ex = examples.get_example("mlp")
  rows = bench.bench(
    lambda family: wap.plan(
      ex.loss_fn, ex.params, ex.batch, optimizer=TX, devices=2, strategy=family, all_devices=True
    ),
    verify,
    ("auto", "tp", "dp"),
  )
  assert [r.strategy for r in rows] == ["tp", "tp", "dp"] and len(calls) == 2
  assert [r.chosen for r in rows] == [True, True, False]
  assert all(r.predicted_step > 0 and r.compiled_step is None for r in rows)
  assert rows[0].note.startswith("not compiled: VerificationFailedError")
