"""Device count x mesh shape x dimension-class assignment x state storage -> ranked candidates.

`space` lays the traced step out as arrays, `aggregate` sums them for one set of model-split
groups, `pricing` prices one (dp, tp, storage) point from those sums, `sweep` enumerates every
point, and `specs` turns the chosen one into PartitionSpecs. The batch class is always split on
the data axis.
"""

from __future__ import annotations

from wapar_jax._src.search.aggregates import aggregate as aggregate
from wapar_jax._src.search.candidate import DATA as DATA
from wapar_jax._src.search.candidate import DEFAULT_MEMORY_HEADROOM as DEFAULT_MEMORY_HEADROOM
from wapar_jax._src.search.candidate import MODEL as MODEL
from wapar_jax._src.search.candidate import OBJECTIVES as OBJECTIVES
from wapar_jax._src.search.candidate import SEQUENCE_PARALLEL as SEQUENCE_PARALLEL
from wapar_jax._src.search.candidate import STRATEGIES as STRATEGIES
from wapar_jax._src.search.candidate import Candidate as Candidate
from wapar_jax._src.search.candidate import rank_key as rank_key
from wapar_jax._src.search.candidate import rank_value as rank_value
from wapar_jax._src.search.pricing import price as price
from wapar_jax._src.search.space import SearchSpace as SearchSpace
from wapar_jax._src.search.space import build_space as build_space
from wapar_jax._src.search.specs import specs_for as specs_for
from wapar_jax._src.search.sweep import Searched as Searched
from wapar_jax._src.search.sweep import batch_size_of as batch_size_of
from wapar_jax._src.search.sweep import search as search
from wapar_jax._src.search.sweep import search_until as search_until
from wapar_jax._src.search.sweep import sweep_size as sweep_size
