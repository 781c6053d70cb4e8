#!/usr/bin/env bash
# On the lent NVIDIA GPU (MLX CUDA staged as ../shared/device/README.md says): check the
# runtime's launch plans, then sweep every op the LLM benchmarks use at their decode and
# prefill shapes, with timing method 4 (dependent-chain latency + host cost; throughput of
# independent calls beside it for the decode gemvs). Results land in variants/<device>/
# and are packed into $OUT/sweeps.tar.gz after every op, so a call cut short keeps what
# finished.    bash benchmarks/device_sweeps.sh [OP...]      (default: all below)
set -uo pipefail
source .device-mlx/env/activate.sh
export HLH_MLX_VARIANTS="$PWD/variants" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/hlh-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python benchmarks/runtime_check.py 2>&1 | tee "$out/runtime_check.txt" || exit 1
declare -A SHAPES=(
  [qgemv]="14336x4096x64 4096x14336x64 4096x4096x64 1024x4096x64 14336x4096x128 4096x14336x128"
  [gemv]="1x14336x4096 1x4096x14336 1x4096x4096 1x1024x4096"
  [rms_norm]="1x4096 128x4096 8192x4096"
  [layer_norm]="1x4096 128x4096 8192x4096"
  [softmax]="32x32000 8192x4096"
  [swiglu]="1x14336 128x14336 8192x14336"
  [rope]="32x1x128x0 8x1x128x0 32x4096x128x0 32x4096x128x1"
  [decode_attention]="32x8x4096x128 32x32x4096x128 32x8x1024x64"
  [matmul]="1024x1024x1024 512x4096x4096 4096x4096x4096"
)
declare -A BUDGET=([qgemv]=10 [gemv]=8 [matmul]=3)
# seconds each op's sweep may take (stored results are kept and resumed next time)
declare -A SECONDS_FOR=([qgemv]=170 [gemv]=110 [rms_norm]=60 [swiglu]=60 [rope]=70 [decode_attention]=60
                        [softmax]=50 [layer_norm]=60 [matmul]=90)
ops=("$@"); [ ${#ops[@]} -eq 0 ] && ops=(qgemv gemv rms_norm swiglu rope decode_attention softmax layer_norm matmul)
for op in "${ops[@]}"; do
  args=(); for s in ${SHAPES[$op]}; do args+=(--shape "$s"); done
  thr=0; case $op in qgemv|gemv) thr=1;; esac
  HLH_MLX_THROUGHPUT=$thr timeout "${SECONDS_FOR[$op]:-60}" python -m hlh_mlx sweep "$op" --backend cuda \
    --dtype float16 --budget "${BUDGET[$op]:-4}" --top 4 --timeout 60 --format md "${args[@]}" 2>&1 \
    | grep -v "^sweeping" | tee "$out/sweep-$op.md"
  tar -czf "$out/sweeps.tar.gz" variants/*/ 2>/dev/null
done
