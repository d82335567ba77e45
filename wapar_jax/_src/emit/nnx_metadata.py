"""The plan onto an NNX model as sharding metadata, where flax's own tools read it
(`nnx.get_partition_spec`, `nnx.get_named_sharding`)."""

from __future__ import annotations

from flax import nnx
from jax.sharding import PartitionSpec as P

# flax 0.12 reads a Variable's sharding from "out_sharding" ("sharding" and "sharding_names" are
# deprecated spellings it renames on construction).
SHARDING_METADATA = "out_sharding"


def annotate(model: nnx.Module, specs) -> nnx.Module:
  """Sets each `nnx.Param`'s sharding metadata to its spec in `specs` (shaped like
  `nnx.state(model, nnx.Param)`), in place; returns the model."""
  flat = dict(nnx.to_flat_state(specs))
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      spec = flat[tuple(path)]
      spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
      node.set_metadata(**{SHARDING_METADATA: tuple(P(*spec))})
  return model
