"""A candidate as PartitionSpecs: every parameter (as stored), its optimizer state, the batch."""

from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec as P

from wapar_jax._src.search.candidate import DATA, FSDP, GATHERING, MODEL, Candidate
from wapar_jax._src.search.context import context_candidate_specs
from wapar_jax._src.search.experts import expert_candidate_specs
from wapar_jax._src.search.pricing import fsdp_dim, fsdp_shardable
from wapar_jax._src.search.space import SearchSpace


def specs_for(space: SearchSpace, c: Candidate) -> tuple[list[P], list[P], list[P]]:
  """PartitionSpecs of params (as stored), their optimizer state, and the batch, in the
  flattened order of the traced step's arguments."""
  if c.expert > 1:
    return expert_candidate_specs(space, c)
  if c.context > 1:
    return context_candidate_specs(space, c, specs_for(space, dataclasses.replace(c, context=1)))
  traced = space.traced
  model_classes = {cl for g in c.model_groups for cl in space.groups[g].classes}
  # Hybrid sharding splits the state over the fsdp axis only; the batch over data and fsdp.
  state_axis, split = (FSDP, c.fsdp) if c.storage == "hsdp" else (DATA, c.data)
  shardable = (
    fsdp_shardable(space, split, c.model_groups) if split > 1 else [False] * len(traced.param_vars)
  )
  param_specs, opt_specs = [], []
  for i in range(len(traced.param_vars)):
    dims = space.param_dims[i]
    entries = [None] * len(dims)
    if c.model > 1:
      for d, (cl, size) in enumerate(dims):
        if cl in model_classes and size % c.model == 0:
          entries[d] = MODEL
          break  # one mesh axis appears at most once in a spec
    tp_only = P(*entries)
    stored = list(entries)
    if shardable[i]:
      d = fsdp_dim(dims, split, [e is not None for e in entries], traced.loop_classes)
      if d is not None:
        stored[d] = state_axis
    param_specs.append(P(*stored) if c.storage in GATHERING else tp_only)
    opt_specs.append(P(*stored) if c.storage != "replicated" else tp_only)
  batch_specs = []
  for v in traced.batch_vars:
    entries = [None] * len(traced.var_shape[v])
    if c.data > 1:
      entries[0] = (DATA, FSDP) if c.storage == "hsdp" else DATA
    batch_specs.append(P(*entries))
  return param_specs, opt_specs, batch_specs
