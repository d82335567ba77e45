#!/usr/bin/env bash
# The checks that need a GPU, in one pass on a machine with one NVIDIA GPU, results in
# ${OUT:-benchmarks/results}:
#   1. timing.py: calibrate the GPU, then predicted vs measured single-device step time
#      (bfloat16), with the calibrated profile and the built-in datasheet profile.
#   2. gpu_memory.py: every suite row compiled by GPU XLA for its mesh on mock devices
#      (plans prepared on CPU with `python benchmarks/gpu_memory.py prepare`).
#   3. verify_gpu.py: plan.verify(compiler="gpu") of a bf16 GPT-2-small plan (memory,
#      collectives, async schedule), after the two above.
# Both run at once: the compiles use CPU cores 4-15 and never run kernels on the GPU (no
# autotuning), the timed steps use the GPU and cores 0-3.
#
#   bash benchmarks/gpu_check.sh     # DATASHEET=<profile> to name the built-in profile
# Optional: wheels in .whl/ (e.g. a flax matching the machine's jax) are installed first.
set -u
OUT=${OUT:-benchmarks/results}
R=benchmarks/results
SECONDS_EACH=${SECONDS_EACH:-330}
on_cores() {  # on_cores LIST command...: pinned where taskset exists and 16 cores do
  local cores=$1; shift
  if command -v taskset > /dev/null && [ "$(nproc)" -ge 16 ]; then taskset -c "$cores" "$@"
  else "$@"; fi
}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"; nproc; } > "$OUT/gpu_env.txt" 2>&1
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
case "$GPU_NAME" in  # the built-in profile to compare the calibrated one with
  *H200*) DEFAULT_SHEET=h200 ;; *A100*) DEFAULT_SHEET=a100-80g-sxm ;; *) DEFAULT_SHEET=h100-sxm ;;
esac
rm -f $R/gpu_memory_part*.jsonl $R/gpu_memory_meta*.json
( on_cores 4-15 timeout $((SECONDS_EACH + 90)) python3 benchmarks/gpu_memory.py compile \
    --workers 3 --budget-s "$SECONDS_EACH" > "$OUT/gpu_memory.log" 2>&1
  python3 benchmarks/gpu_memory.py report >> "$OUT/gpu_memory.log" 2>&1
  [ "$OUT" = "$R" ] || cp $R/gpu_memory.json $R/gpu_memory.md "$OUT/" ) &
on_cores 0-3 timeout $((SECONDS_EACH + 100)) python3 benchmarks/timing.py --calibrate \
  --datasheet "${DATASHEET:-$DEFAULT_SHEET}" --max-seconds "$SECONDS_EACH" > "$OUT/timing.log" 2>&1
[ "$OUT" = "$R" ] || cp $R/timing_gpu.json $R/timing_gpu.md $R/calibrated_gpu.json "$OUT/"
wait
on_cores 4-15 timeout 400 python3 benchmarks/verify_gpu.py "$OUT" > "$OUT/verify_gpu.log" 2>&1
tail -n 3 "$OUT/timing.log" "$OUT/gpu_memory.log" "$OUT/verify_gpu.log"
