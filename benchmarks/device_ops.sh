#!/usr/bin/env bash
# On the lent NVIDIA GPU (MLX CUDA staged as ../shared/device/README.md says): sweep the
# given ops' CUDA templates (fp16, default shapes) against the MLX built-ins; results land
# in the checkout's variants/ (resuming) and are copied to $OUT.
#   bash benchmarks/device_ops.sh softmax rms_norm swiglu
set -uo pipefail
source .device-mlx/env/activate.sh
export HLH_MLX_VARIANTS="$PWD/variants" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/hlh-out}"
mkdir -p "$out/variants"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
# HLH_SWEEP_ARGS: extra sweep options (e.g. "--budget 8 --shape 8192x4096")
# HLH_DTYPE: the dtype to sweep (default float16); HLH_OP_SECONDS: each op's sweep stops
# after this long (stored results are kept and resumed next time), so the copy below runs
# before the device call's own limit
for op in "$@"; do
  timeout "${HLH_OP_SECONDS:-540}" python -m hlh_mlx sweep "$op" --backend cuda --dtype "${HLH_DTYPE:-float16}" \
    --top 5 --timeout 120 --format md ${HLH_SWEEP_ARGS:-} 2>&1 | tee "$out/$op.md"
  # after each op (a call cut short keeps what finished); only this op's file: what a
  # call brings back is limited in count
  for f in variants/*/"$op".jsonl; do mkdir -p "$out/$(dirname "$f")"; cp "$f" "$out/$f"; done
done
