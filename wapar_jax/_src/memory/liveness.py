"""Live bytes per program point, split by sharding category so one pass serves every mesh.

A value's per-device size is its bytes divided by the data degree (if it carries the batch, or
is weight-shaped under ZeRO / FSDP) and by the model degree (if one of its classes is on the
model axis). The peak for a mesh is then the max over program points of a weighted sum of a few
curves.
"""

from __future__ import annotations

import numpy as np

# Category of a value along the data axis.
DATA_BATCH, DATA_WEIGHT, DATA_NONE = 0, 1, 2


def liveness_curves(def_pos, last_use, nbytes, data_cat, on_model, num_ops) -> np.ndarray:
  """Live bytes per program point, one curve per (data category, on model axis).

  Returns an array of shape [3, 2, num_ops + 1]: curves[c, m, p] is the unsharded bytes of
  variables of that category alive at op p (born at def_pos, freed after last_use).
  """
  points = num_ops + 1
  curves = np.zeros((3, 2, points + 1))
  start = np.clip(def_pos, 0, points - 1)
  stop = np.clip(last_use + 1, 0, points)
  flat = curves.reshape(6, points + 1)
  idx = data_cat * 2 + on_model.astype(np.int64)
  np.add.at(flat, (idx, start), nbytes)
  np.add.at(flat, (idx, stop), -nbytes)
  return np.cumsum(curves, axis=-1)[..., :points]


def per_device(
  curves: np.ndarray, data_div: tuple[float, float, float], model_div: float
) -> np.ndarray:
  """Live bytes per device at every program point for one mesh."""
  weights = np.array([[1.0, 1.0 / model_div]]) / np.array(data_div)[:, None]
  return np.tensordot(weights, curves, axes=([0, 1], [0, 1]))


def peak_bytes(
  curves: np.ndarray,
  data_div: tuple[float, float, float],
  model_div: float,
  extra: np.ndarray | float = 0.0,
) -> float:
  """max over program points of live bytes per device (plus `extra` per point) for one mesh."""
  return float(np.max(per_device(curves, data_div, model_div) + extra))


def bytes_at(
  curves: np.ndarray, point: int, data_div: tuple[float, float, float], model_div: float
) -> float:
  """Live bytes per device at one program point for one mesh."""
  return float(per_device(curves[..., point : point + 1], data_div, model_div)[0])
