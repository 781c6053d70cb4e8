#!/usr/bin/env bash
# On the lent NVIDIA GPU (MLX CUDA staged as ../shared/device/README.md says): sweep the
# given ops' CUDA templates against the MLX built-ins; results land in the checkout's
# variants/ (resuming). Everything a run produced (each op's table and results file) is
# packed into $OUT/results-<dtype>-<first op>.tar.gz after every op: one file per
# invocation, because what a device call brings back is limited in count, and a call cut
# short keeps the ops that finished.
#   bash benchmarks/device_ops.sh softmax rms_norm swiglu
#   tar -xzf results-float16-softmax.tar.gz     # here: variants/<device>/<op>.jsonl and <op>.md
set -uo pipefail
source .device-mlx/env/activate.sh
export HLH_MLX_VARIANTS="$PWD/variants" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/hlh-out}"
run="$(mktemp -d)"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
# HLH_SWEEP_ARGS: extra sweep options (e.g. "--budget 8 --shape 8192x4096")
# HLH_DTYPE: the dtype to sweep (default float16); HLH_OP_SECONDS: each op's sweep stops
# after this long (stored results are kept and resumed next time), so the packing below
# runs before the device call's own limit
for op in "$@"; do
  timeout "${HLH_OP_SECONDS:-540}" python -m hlh_mlx sweep "$op" --backend cuda --dtype "${HLH_DTYPE:-float16}" \
    --top 5 --timeout 120 --format md ${HLH_SWEEP_ARGS:-} 2>&1 | tee "$run/$op.md"
  for f in variants/*/"$op".jsonl; do mkdir -p "$run/$(dirname "$f")"; cp "$f" "$run/$f"; done
  tar -czf "$out/results-${HLH_DTYPE:-float16}-$1.tar.gz" -C "$run" .
done
