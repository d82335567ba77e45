import json
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from wapar_jax._src import profiles
from wapar_jax._src.profiles import DeviceProfile, LinkTier
from wapar_jax.errors import InvalidProfileError, UnknownProfileError, WaparError

BUILTINS = (
  "a100-40g-pcie",
  "a100-80g-sxm",
  "cpu",
  "h100-sxm",
  "h200",
  "p100-nvlink",
  "titanxp-pcie",
  "tpu-v4",
  "tpu-v5e",
  "v100-sxm2",
)
TENSOR_CORES = (
  "a100-40g-pcie",
  "a100-80g-sxm",
  "h100-sxm",
  "h200",
  "v100-sxm2",
  "tpu-v4",
  "tpu-v5e",
)


def _valid() -> dict:
  return profiles.load_profile("h100-sxm").to_dict()


def test_list_profiles_is_sorted_and_complete():
  assert profiles.list_profiles() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_and_round_trips(name):
  p = profiles.load_profile(name)
  assert p.name == name
  assert p.sources and all(s.strip() for s in p.sources)
  back = DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict())))
  assert back == p
  assert hash(back) == hash(p)
  assert profiles.load_profile(p) is p


@pytest.mark.parametrize("name", TENSOR_CORES)
def test_low_precision_at_least_float32_with_tensor_cores(name):
  p = profiles.load_profile(name)
  assert p.flops_per_second("bfloat16") >= p.flops_per_second("float32")
  assert p.flops_per_second("float16") >= p.flops_per_second("float32")


@pytest.mark.parametrize("name", BUILTINS)
def test_crossing_nodes_is_no_faster(name):
  p = profiles.load_profile(name)
  assert p.devices_per_node > 1
  assert p.link(crosses_nodes=False) is p.intra_node
  assert p.link(crosses_nodes=True) is p.inter_node
  assert p.inter_node.bandwidth <= p.intra_node.bandwidth
  assert p.inter_node.latency >= p.intra_node.latency


def test_profile_is_frozen():
  p = profiles.load_profile("h100-sxm")
  with pytest.raises(AttributeError):
    p.memory_bytes = 1
  with pytest.raises(TypeError):
    p.peak_flops["float32"] = 1.0


def test_unknown_name_lists_builtins():
  with pytest.raises(UnknownProfileError) as info:
    profiles.load_profile("xyz")
  message = str(info.value)
  assert all(name in message for name in BUILTINS)
  assert ".json" in message
  assert message.endswith("Got 'xyz'.")
  assert isinstance(info.value, WaparError)


def test_missing_and_unknown_fields_are_all_named():
  data = _valid()
  del data["memory_bytes"], data["kind"]
  data["colour"] = "green"
  with pytest.raises(InvalidProfileError) as info:
    DeviceProfile.from_dict(data)
  message = str(info.value)
  for field in ("memory_bytes", "kind", "colour"):
    assert field in message


def test_every_bad_value_is_named():
  data = _valid()
  data.update(
    memory_bandwidth=-1.0,
    devices_per_node=0,
    compute_efficiency=1.5,
    memory_efficiency=0.0,
    sources=[],
    kind="fpga",
    power_busy_watts="hot",
    peak_flops={"float32": 1e12, "f4": 2.0},
    intra_node={"bandwidth": 0.0, "latency": 1e-6},
    inter_node={"bandwidth": 1e9},
  )
  with pytest.raises(InvalidProfileError) as info:
    DeviceProfile.from_dict(data)
  message = str(info.value)
  for expected in (
    "memory_bandwidth: must be a positive number",
    "devices_per_node",
    "compute_efficiency: must be a number in (0, 1]",
    "memory_efficiency",
    "sources",
    "kind: must be one of 'gpu', 'tpu', 'cpu'",
    "power_busy_watts",
    "peak_flops.bfloat16: missing",
    "'f4'",
    "intra_node.bandwidth",
    "inter_node.latency: missing",
  ):
    assert expected in message
  assert "Got -1.0." in message


def test_direct_construction_validates():
  data = _valid()
  data["intra_node"] = LinkTier(**data["intra_node"])
  data["inter_node"] = LinkTier(**data["inter_node"])
  data["memory_efficiency"] = 2.0
  with pytest.raises(InvalidProfileError, match="memory_efficiency"):
    DeviceProfile(**data)


def test_not_a_dict():
  with pytest.raises(InvalidProfileError, match="Got list"):
    DeviceProfile.from_dict([1, 2])


def test_load_from_json_path(tmp_path):
  data = _valid()
  data["name"] = "my-gpu"
  path = tmp_path / "my-gpu.json"
  path.write_text(json.dumps(data))
  for arg in (path, str(path)):
    p = profiles.load_profile(arg)
    assert p.name == "my-gpu"
    assert p.memory_bytes == data["memory_bytes"]


def test_missing_file_is_unknown(tmp_path):
  path = str(tmp_path / "absent.json")
  with pytest.raises(UnknownProfileError, match="absent.json"):
    profiles.load_profile(path)


def test_invalid_json_file(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('{"name": "broken",')
  with pytest.raises(InvalidProfileError, match="not valid JSON"):
    profiles.load_profile(path)


def test_invalid_profile_file_names_the_file(tmp_path):
  data = _valid()
  data["memory_bytes"] = 0
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(data))
  with pytest.raises(InvalidProfileError, match=r"bad\.json.*\n.*memory_bytes"):
    profiles.load_profile(path)


def test_save_profile_is_atomic_and_round_trips(tmp_path, monkeypatch):
  replaced = []
  real_replace = os.replace

  def spy(src, dst):
    replaced.append((src, dst))
    assert os.path.dirname(src) == str(tmp_path)  # same directory: os.replace is atomic
    real_replace(src, dst)

  monkeypatch.setattr(profiles.os, "replace", spy)
  path = tmp_path / "saved.json"
  profiles.save_profile("tpu-v5e", path)
  assert replaced and replaced[0][1] == str(path)
  assert sorted(os.listdir(tmp_path)) == ["saved.json"]
  assert profiles.load_profile(path) == profiles.load_profile("tpu-v5e")


def test_saved_files_get_the_usual_mode(tmp_path):
  umask = os.umask(0o022)
  try:
    new = tmp_path / "new.json"
    profiles.save_profile("cpu", new)
    assert stat.S_IMODE(new.stat().st_mode) == 0o644  # as open() makes it, not mkstemp's 0600
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    kept.chmod(0o640)
    profiles.save_profile("cpu", kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640  # a replaced file keeps its mode
  finally:
    os.umask(umask)


def test_save_profile_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
  def fail(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(profiles.os, "replace", fail)
  with pytest.raises(OSError):
    profiles.save_profile("cpu", tmp_path / "x.json")
  assert os.listdir(tmp_path) == []


def test_flops_per_second_fallbacks():
  h100 = profiles.load_profile("h100-sxm")
  assert h100.flops_per_second(jnp.float16) == h100.peak_flops["bfloat16"]
  assert h100.flops_per_second("bfloat16") == h100.peak_flops["bfloat16"]
  assert h100.flops_per_second(jnp.bfloat16) == h100.peak_flops["bfloat16"]
  assert h100.flops_per_second(np.dtype("float32")) == h100.peak_flops["float32"]
  assert h100.flops_per_second(np.int8) == h100.peak_flops["float32"]
  assert h100.flops_per_second("not-a-dtype") == h100.peak_flops["float32"]
  v100 = profiles.load_profile("v100-sxm2")
  assert (
    v100.flops_per_second(jnp.float16) == v100.peak_flops["float16"] > v100.peak_flops["bfloat16"]
  )
