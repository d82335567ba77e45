"""The experts of a mixture-of-experts layer, found from dimension classes (no names read).

An expert matmul (GShard's `becd,edf->becf`) batches a weight over a dim it shares with an
activation: the weight carries no batch class, the activation does, and the dot's batch dim
pairs them. That dim's class is the experts class (size E). The activation's free dim that is
not the batch is the capacity C (slots per expert and routing group), and the matmul that made
the activation (`btec,btd->becd`, the dispatch) contracted the group's tokens T, so C * E / T
is the slots per token; the router's `top_k` over the experts dim gives k, and C * E / (k * T)
the capacity factor, all read from the program.

The expert-side tensors (`expert_in`, `hidden`, `expert_out` and their cotangents) are those
with the batch, the experts class, the slots and none of the token classes: under expert
parallelism they are split on E, while the token-side ones (`x`, the dispatch / combine masks)
stay split on the batch; the layout switches by an all-to-all where one side feeds the other.
"""

from __future__ import annotations

import dataclasses
import math

from wapar_jax._src.trace.graph import TracedStep


@dataclasses.dataclass(frozen=True)
class Experts:
  """The experts classes of a traced step and what routing they show (empty: no MoE layer).

  Attributes:
    classes: the experts classes (one per MoE layer unless the layers share shapes).
    size: experts per layer E (the gcd over layers).
    capacity: slots per expert and routing group C (the gcd over layers).
    tokens: tokens per routing group T (0 where no dispatch matmul is found).
    token_classes: the classes of the group's tokens (the dispatch matmul's contraction).
    capacity_classes: the classes of the slots (C).
    top_k: experts per token, the k of the router's `top_k` over the experts (0: none found).
  """

  classes: frozenset[int] = frozenset()
  size: int = 0
  capacity: int = 0
  tokens: int = 0
  token_classes: frozenset[int] = frozenset()
  capacity_classes: frozenset[int] = frozenset()
  top_k: int = 0

  @property
  def slots_per_token(self) -> float:
    """C * E / T: the capacity factor times top-k (0 where T is unknown)."""
    return self.capacity * self.size / self.tokens if self.tokens else 0.0

  @property
  def capacity_factor(self) -> float:
    """C * E / (k * T) (0 where T or k is unknown)."""
    return self.slots_per_token / self.top_k if self.top_k else 0.0


def find_experts(traced: TracedStep) -> Experts:
  """The experts classes of `traced` (see the module doc)."""
  classes = traced.var_classes
  batch = traced.batch_classes
  has_batch = lambda v: v >= 0 and any(c in batch for c in classes[v])
  producer = {v: op for op in traced.ops for v in op.out_vars}
  found, capacities, tokens, token_classes, slot_classes = set(), [], [], set(), set()
  for op in traced.ops:
    if op.primitive != "dot_general" or len(op.in_vars) != 2 or min(op.in_vars) < 0:
      continue
    (lc, rc), (lb, rb) = op.eqn.params["dimension_numbers"]
    for act, weight, a_batch, a_contract in ((0, 1, lb, lc), (1, 0, rb, rc)):
      a, w = op.in_vars[act], op.in_vars[weight]
      if not a_batch or not has_batch(a) or has_batch(w):
        continue
      expert = {classes[a][d] for d in a_batch} - batch - traced.loop_classes
      if not expert:
        continue
      found |= expert
      free = [d for d in range(len(classes[a])) if d not in a_batch and d not in a_contract]
      slots = [d for d in free if classes[a][d] not in batch]
      slot_classes |= {classes[a][d] for d in slots}
      capacities.append(math.prod(traced.var_shape[a][d] for d in slots))
      made = producer.get(a)
      if made is not None and made.primitive == "dot_general":
        (mlc, mrc), _ = made.eqn.params["dimension_numbers"]
        lhs = made.in_vars[0]
        if lhs >= 0 and mlc:
          token_classes |= {classes[lhs][d] for d in mlc}
          tokens.append(math.prod(traced.var_shape[lhs][d] for d in mlc))
  if not found:
    return Experts()
  size = math.gcd(*(traced.class_size[c] for c in found))
  token_classes -= found | batch
  top_k = [
    op.eqn.params["k"]
    for op in traced.ops
    if op.primitive == "top_k" and op.in_vars[0] >= 0 and classes[op.in_vars[0]][-1] in found
  ]
  return Experts(
    frozenset(found),
    size,
    math.gcd(*capacities),
    math.gcd(*tokens) if tokens else 0,
    frozenset(token_classes),
    frozenset(slot_classes - found - batch),
    max(top_k, default=0),
  )


def expert_side(traced: TracedStep, experts: Experts) -> list[bool]:
  """Per variable: an expert-side tensor (the batch, an experts class and the slots, no token
  class): not the routing's per-expert statistics `[B, E]`, nor the dispatch mask."""
  classes = traced.var_classes
  batch = traced.batch_classes
  return [
    bool(set(cls) & experts.classes)
    and bool(set(cls) & batch)
    and bool(set(cls) & experts.capacity_classes)
    and not set(cls) & experts.token_classes
    for cls in classes
  ]
