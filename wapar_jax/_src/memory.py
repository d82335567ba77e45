"""Per-device memory of a candidate: arguments plus the peak of live temporaries.

Temporaries come from a linear liveness scan of the flattened step (a loop body's values appear
once, as XLA reuses their buffers every iteration). Values that XLA fuses away — outputs of
elementwise ops consumed right away — are not counted; values kept for the backward pass are.

Which elementwise values are kept depends on the compiler, so there is one rule set per compiler
(`COMPILERS`): XLA:CPU, which `plan.verify()` and the suite compile with, and GPU XLA, measured
on an H200 through mock devices (`benchmarks/gpu_memory.py`); TPU profiles use GPU XLA's rules.

The scan is split by sharding category so one pass serves every mesh: a value's per-device size
is its bytes divided by the data degree (if it carries the batch, or is weight-shaped under
ZeRO/FSDP) and by the model degree (if one of its classes is on the model axis). The peak for a
mesh is then the max over program points of a weighted sum of a few curves.

Some buffers of a compiled step stand for no variable of the step (XLA:CPU's transposed conv
operands, its max-pool gradient indices): `scratch_buffers` lists them, sharded like a variable.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Category of a temporary along the data axis.
DATA_BATCH, DATA_WEIGHT, DATA_NONE = 0, 1, 2
# Non-elementwise kernels that still fuse their elementwise producers (reduce fusions).
_FUSING_KERNELS = ("reduce_", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin")
# Readers within this many equations of a value count as its neighbours (results measured on
# the suite's 126 rows, and GPU XLA's 111, are the same for any window from 4 to 64; at 16 a
# value of gpt-tiny's per-layer remat backward that XLA:CPU keeps was taken as fused: its
# step predicted -17%, at 11 to 14 -8.9%, at 8 -0.7%; a ReLU's input read by its mask 11
# equations on is fused at 11 and up).
_LOCAL_READS = 12
# Kernels XLA runs in place on their first operand.
_IN_PLACE = frozenset({"scatter", "scatter-add", "scatter-sub", "scatter-mul", "scatter-min",
                       "scatter-max", "dynamic_update_slice"})
LAYOUT_PRIMITIVES = frozenset({"broadcast_in_dim", "reshape", "squeeze", "expand_dims",
                               "transpose", "convert_element_type", "iota", "copy", "copy_p"})
_BITCASTS = frozenset({"reshape", "squeeze", "expand_dims"})
# Elementwise ops GPU XLA does not duplicate into a second fusion (its `IsExpensive`).
_EXPENSIVE = frozenset({"div", "sqrt", "rsqrt", "cbrt", "exp", "exp2", "expm1", "log", "log1p",
                        "logistic", "pow", "atan2", "cos", "sin", "tan", "tanh", "erf", "erfc",
                        "erf_inv", "rem"})
XLA_CPU, XLA_GPU = "xla:cpu", "xla:gpu"
COMPILERS = (XLA_CPU, XLA_GPU)


# Whether a gradient all-reduce writes into its operand's buffer. XLA:CPU allocates a new
# full-size result; GPU XLA does not (H200, mock devices: VGG-16 data parallel, predicted with a
# second full-size copy of each live gradient +34%, without +15%; over 111 suite rows, within
# 15% in 103 without, 89 with).
REDUCES_IN_PLACE = {XLA_CPU: False, XLA_GPU: True}
# XLA:CPU combines independent all-reduces into one per this many operands, with no byte
# limit (its CpuAllReduceCombiner): the gradients reduce in buckets of 256, in the order they
# are made (GPT-1.3B, 390 gradients: two combined all-reduces, of 256 and 134).
CPU_COMBINE_COUNT = 256


def compiler_for(profile_kind: str) -> str:
  """The compiler whose buffer rules price a profile ("cpu", "gpu" or "tpu")."""
  return XLA_CPU if profile_kind == "cpu" else XLA_GPU


def materialised(traced, compiler: str = XLA_CPU) -> tuple[np.ndarray, np.ndarray]:
  """Which variables XLA keeps in a buffer of their own, and until when each is needed.

  Outputs of non-fusible ops (dots, reductions, gathers, ...) are. Layout ops (broadcast,
  reshape, transpose, convert) are bitcasts or fused into every consumer, so never. An
  elementwise result read by a single elementwise op or reduction is fused into it and
  recomputed there, and so is one whose readers all follow it closely (XLA duplicates a cheap
  producer into neighbouring kernels: a batch norm's output feeding both the ReLU and its
  mask). One read by a kernel that cannot fuse its producers (a dot, a convolution, a gather)
  is written out.

  The compilers differ on the rest. XLA:CPU also writes out a value that such a kernel reads
  through a transpose / copy, and any value read again much later (measured on GPT-2 / BERT /
  ViT / GPT-1.3B / ResNet-50: a LayerNorm's centred and normalised input, a GELU's tanh, the
  attention softmax, a batch norm's centred input are kept for the backward pass). GPU XLA
  recomputes those inside the backward fusions that read them, from kept inputs, unless the
  value is made by an expensive op (exp, tanh, rsqrt, divide, ...): buffers live at the compiled
  peak on an H200, gpt2-small data parallel: 98 of [4, 1024, 768] against XLA:CPU's 174.
  """
  if compiler not in COMPILERS:
    raise ValueError(f"compiler must be one of {COMPILERS}. Got {compiler!r}.")
  n = traced.num_vars
  made_by_fusible = np.zeros(n, dtype=bool)
  layout = np.zeros(n, dtype=bool)
  expensive = np.zeros(n, dtype=bool)
  read_by_kernel = np.zeros(n, dtype=bool)
  readers = np.zeros(n, dtype=np.int64)
  for op in traced.ops:
    outs = list(op.out_vars)
    made_by_fusible[outs] = op.fusible
    layout[outs] = op.primitive in LAYOUT_PRIMITIVES
    expensive[outs] = op.primitive in _EXPENSIVE
    ins = list({v for v in op.in_vars if v >= 0})
    readers[ins] += 1
    if not op.fusible and not op.primitive.startswith(_FUSING_KERNELS):
      read_by_kernel[ins] = True
  # A kernel reading a reshape (XLA:CPU: also a transpose / copy) reads its operand's buffer.
  through = LAYOUT_PRIMITIVES if compiler == XLA_CPU else _BITCASTS
  for op in reversed(traced.ops):
    if op.primitive in through and read_by_kernel[list(op.out_vars)].any():
      read_by_kernel[[v for v in op.in_vars if v >= 0]] = True
  read_again_later = (readers > 1) & (traced.last_use - traced.def_pos > _LOCAL_READS)
  if compiler == XLA_GPU:
    read_again_later &= expensive
  kept = ~layout & (~made_by_fusible | read_by_kernel | read_again_later)
  last_use = traced.last_use.copy()
  # Reads XLA:CPU serves from a buffer of its own (`scratch_buffers`) do not keep a variable
  # alive: it dies at its last other reader.
  plain_last = _last_plain_reads(traced) if compiler == XLA_CPU else {}
  for v, last in plain_last.items():
    last_use[v] = last
  # A value recomputed where it is read keeps its own inputs alive until then. So does an
  # elementwise value that dies early for such a reroute: XLA:CPU recomputes it later from its
  # inputs (ResNet-50: a block's output, read in the backward pass by the next block's
  # residual gradient, is remade from the kept convolution outputs and batch statistics).
  remade_later = np.zeros(n, dtype=bool)
  remade_later[[v for v in plain_last if made_by_fusible[v]]] = True
  needed = _needed_until(traced, kept, remade_later, last_use)
  # An expensive value read nearby and, through a cheap value recomputed from it, much later
  # is read again later too: XLA keeps it rather than recompute it there (jax >= 0.11: a
  # GELU's tanh feeds `one_minus_square`, whose only reader is in the backward pass). Cheap
  # chains are recomputed whole (ResNet-50's batch-norm outputs: keeping them is +30%).
  read_through_later = (expensive & ~kept & (readers > 1) & (needed > traced.last_use)
                        & (needed - traced.def_pos > _LOCAL_READS))
  if read_through_later.any():
    kept |= read_through_later
    needed = _needed_until(traced, kept, remade_later, last_use)
  last_use = np.where(remade_later, last_use, needed)
  _share_dying_buffers(traced, kept, last_use)
  return kept, last_use


def _needed_until(traced, kept: np.ndarray, remade_later: np.ndarray,
                  last_use: np.ndarray) -> np.ndarray:
  """Until when each variable is needed: a value recomputed where it is read (not kept, or
  remade later) keeps its own inputs alive until its last read."""
  needed = last_use.copy()
  for op in reversed(traced.ops):
    remade = [v for v in op.out_vars if not kept[v] or remade_later[v]]
    if remade:
      until = max(needed[v] for v in remade)
      for v in op.in_vars:
        if v >= 0 and needed[v] < until:
          needed[v] = until
  return needed


def _share_dying_buffers(traced, kept: np.ndarray, last_use: np.ndarray) -> None:
  """An elementwise kernel or an in-place update writes into a same-size buffer it reads last.

  XLA's buffer assignment lets such a kernel's output take over an operand buffer that dies
  there, so the two are never live together: the dying operand is freed one op earlier. The
  operand may be read through the fusion (its last use was moved here above). Measured on
  GPT-2's loss gradient: logits, their scatter-added gradient and the sum of both are two
  buffers in the compiled step, not three.
  """
  nbytes = traced.var_bytes()
  temporaries = kept & (traced.def_pos >= 0)
  dying: dict[int, list[int]] = {}
  for v in np.flatnonzero(temporaries):
    dying.setdefault(int(last_use[v]), []).append(int(v))
  for op in traced.ops:
    if not (op.fusible or op.primitive in _IN_PLACE):
      continue
    candidates = dying.get(op.index, [])
    for out in op.out_vars:
      if not kept[out]:
        continue
      for v in candidates:
        if nbytes[v] == nbytes[out] and traced.def_pos[v] < op.index:
          last_use[v] = op.index - 1
          candidates.remove(v)
          break


@dataclasses.dataclass(frozen=True)
class Scratch:
  """Buffers the compiled step has that no variable of the step stands for.

  Each is sharded like a variable of the step (`like`), with its own size, live from op `start`
  to op `stop` inclusive.
  """
  like: np.ndarray
  nbytes: np.ndarray
  start: np.ndarray
  stop: np.ndarray


def scratch_buffers(traced, compiler: str = XLA_CPU) -> Scratch:
  """XLA:CPU's buffers of its own: transposed conv operands, max-pool gradient indices, zeros.

  - XLA:CPU runs a convolution on operands laid out batch-major / feature-minor (kernels
    spatial-major, output feature minor). A conv whose dimension numbers differ (a kernel
    gradient reads the activations with batch and feature swapped) reads a transposed copy,
    made as soon as its operand is (AlexNet on 4 devices, model split: the replicated input
    images twice, [128, 224, 224, 3] and [3, 224, 224, 128], from the first op to the last).
  - It expands a max pool's gradient (`select_and_scatter_add`) into a reduce-window over the
    pool's input and one int32 iota per dim, giving the argmax's coordinates, then a scatter
    into zeros. The iotas and the zeros are made at the top of the step (they read nothing);
    the iotas die where the forward pool runs (the indices are computed right after it), the
    zeros become the gradient. VGG-16 on 4 devices, model split, batch 128: 9.4 GiB of iotas
    live at the compiled peak.
  - A gather's gradient (an embedding's, a cross-entropy's) scatter-adds into zeros; XLA:CPU
    makes the zeros at the top of the step too (GPT-1.3B, FSDP on 4 devices: the embedding's
    zero gradient, [50257, 2048], from the first op to the last layer's backward pass).
  GPU XLA fuses the iotas into the reduce-window and computes the indices just before the
  scatter; none of these were seen in its compiles.
  """
  like, nbytes, start, stop = [], [], [], []
  if compiler == XLA_CPU:
    sizes = traced.var_bytes()
    for v, conv in _transposed_conv_operands(traced):
      like.append(v)
      nbytes.append(sizes[v])
      start.append(max(int(traced.def_pos[v]), 0))
      stop.append(conv)
    pooled_at = {op.in_vars[0]: op.index for op in traced.ops
                 if op.primitive == "reduce_window_max"}
    for op in traced.ops:
      if op.primitive == "scatter-add" and _is_constant_fill(traced, op.in_vars[0]):
        out = op.out_vars[0]
        like.append(out)
        nbytes.append(sizes[out])
        start.append(0)
        stop.append(op.index - 1)
      if op.primitive != "select_and_scatter_add":
        continue
      source, operand = op.in_vars[0], op.in_vars[1]
      elements = math.prod(traced.var_shape[operand])
      rank = len(traced.var_shape[operand])
      # The indices are computed where the forward pool is (measured on AlexNet and VGG-16).
      pooled = pooled_at.get(operand, int(traced.def_pos[traced.loss_var]))
      like += [operand, operand, source]
      nbytes += [sizes[operand], 4 * rank * elements,
                 4 * rank * math.prod(traced.var_shape[source])]
      start += [0, 0, pooled]
      stop += [op.index - 1, pooled, op.index]
  return Scratch(np.asarray(like, dtype=np.int64), np.asarray(nbytes, dtype=float),
                 np.asarray(start, dtype=np.int64), np.asarray(stop, dtype=np.int64))


def _is_constant_fill(traced, v: int) -> bool:
  """Whether variable v is a broadcast of a literal (zeros for a scatter to add into)."""
  if v < 0 or traced.def_pos[v] < 0:
    return False
  op = traced.ops[traced.def_pos[v]]
  return op.primitive == "broadcast_in_dim" and all(
      u < 0 or not traced.var_shape[u] for u in op.in_vars)


def _canonical_spec(spec, is_kernel: bool) -> bool:
  rank = len(spec)
  if is_kernel:  # output feature, input feature, spatial: laid out spatial..., in, out
    return tuple(spec) == (rank - 1, rank - 2, *range(rank - 2))
  return tuple(spec) == (0, rank - 1, *range(1, rank - 1))  # batch, feature, spatial


def _transposed_conv_operands(traced) -> list[tuple[int, int]]:
  """(variable, conv op) for each conv operand XLA:CPU transposes first."""
  twins = []
  for op in traced.ops:
    if op.primitive != "conv_general_dilated":
      continue
    dn = op.eqn.params["dimension_numbers"]
    for k, (spec, is_kernel) in enumerate(((dn.lhs_spec, False), (dn.rhs_spec, True))):
      v = op.in_vars[k]
      if v >= 0 and not _canonical_spec(spec, is_kernel):
        twins.append((v, op.index))
  return twins


def _last_plain_reads(traced) -> dict[int, int]:
  """{variable: its last read} counting only reads of the variable itself, for variables the
  step makes that XLA:CPU reads elsewhere through a buffer of its own: a transposed conv
  operand, a max pool's input, whose gradient reads the argmax indices instead."""
  rerouted = set(_transposed_conv_operands(traced))
  rerouted.update((op.in_vars[1], op.index) for op in traced.ops
                  if op.primitive == "select_and_scatter_add")
  outputs = set(traced.output_vars)
  last = {v: int(traced.def_pos[v]) for v, _ in rerouted
          if traced.def_pos[v] >= 0 and v not in outputs}
  for op in traced.ops:
    for v in op.in_vars:
      if v in last and (v, op.index) not in rerouted:
        last[v] = max(last[v], op.index)
  return last


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


def per_device(curves: np.ndarray, data_div: tuple[float, float, float],
               model_div: float) -> np.ndarray:
  """Live bytes per device at every program point for one mesh."""
  weights = np.array([[1.0, 1.0 / model_div]]) / np.array(data_div)[:, None]
  return np.tensordot(weights, curves, axes=([0, 1], [0, 1]))


def peak_bytes(curves: np.ndarray, data_div: tuple[float, float, float], model_div: float,
               extra: np.ndarray | float = 0.0) -> float:
  """max over program points of live bytes per device (plus `extra` per point) for one mesh."""
  return float(np.max(per_device(curves, data_div, model_div) + extra))


def bytes_at(curves: np.ndarray, point: int, data_div: tuple[float, float, float],
             model_div: float) -> float:
  """Live bytes per device at one program point for one mesh."""
  return float(per_device(curves[..., point:point + 1], data_div, model_div)[0])
