"""The notebooks in notebooks/ run top to bottom on 8 virtual CPU devices.

Dependency-free: the code cells are read with the json module and run as one script in a fresh
process (XLA_FLAGS must be set before jax starts, and this test process already started it).
"""

import json
import os
import subprocess
import sys
import time

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NAMES = ("quickstart", "replace_rules", "how_many_devices", "own_loop")
# All notebooks together must stay under 90 s in CI; each gets a share with slack.
TIMEOUT_S = 60


def notebook_script(path: str) -> str:
  with open(path) as f:
    nb = json.load(f)
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  # A bare last expression displays in Jupyter; here it is just evaluated.
  return "\n\n".join(cells) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
  path = os.path.join(NOTEBOOKS, f"{name}.ipynb")
  script = tmp_path / f"{name}.py"
  script.write_text(notebook_script(path))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", MPLBACKEND="Agg")
  start = time.perf_counter()
  result = subprocess.run(
    [sys.executable, str(script)],
    cwd=NOTEBOOKS,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  elapsed = time.perf_counter() - start
  assert result.returncode == 0, f"{name} failed after {elapsed:.1f} s:\n{result.stderr[-4000:]}"
