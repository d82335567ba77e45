"""Per-device memory of a candidate: arguments plus the peak of live temporaries.

Temporaries come from a linear liveness scan of the flattened step (a loop body's values appear
once, as XLA reuses their buffers every iteration). Values that XLA fuses away — outputs of
elementwise ops consumed right away — are not counted; values kept for the backward pass are.

The scan is split by sharding category so one pass serves every mesh: a value's per-device size
is its bytes divided by the data degree (if it carries the batch, or is weight-shaped under
ZeRO/FSDP) and by the model degree (if one of its classes is on the model axis). The peak for a
mesh is then the max over program points of a weighted sum of a few curves.
"""

from __future__ import annotations

import numpy as np

# Category of a temporary along the data axis.
DATA_BATCH, DATA_WEIGHT, DATA_NONE = 0, 1, 2
# An elementwise result consumed within this many ops is fused into its consumer.
_FUSION_WINDOW = 3


def materialised(def_pos: np.ndarray, last_use: np.ndarray, fusible_def: np.ndarray) -> np.ndarray:
  """Which variables XLA keeps in a buffer of their own."""
  return ~fusible_def | (last_use - def_pos > _FUSION_WINDOW)


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


def peak_bytes(curves: np.ndarray, data_div: tuple[float, float, float], model_div: float) -> float:
  """max over program points of live bytes per device for one mesh."""
  weights = np.array([[1.0, 1.0 / model_div]]) / np.array(data_div)[:, None]
  return float(np.max(np.tensordot(weights, curves, axes=([0, 1], [0, 1]))))
