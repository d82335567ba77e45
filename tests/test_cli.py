import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json

import pytest

from wapar_jax.cli import main


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
