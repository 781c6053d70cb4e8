#!/usr/bin/env bash
# On the lent NVIDIA GPU: time each stored winner and the built-in again with the current
# timing method (and one more variant per shape), for the ops the LLM benchmarks use, then
# run the benchmarks (benchmarks/device_bench.sh). $OUT/retime.tar.gz holds the results.
set -uo pipefail
source .device-mlx/env/activate.sh
export HLH_MLX_VARIANTS="$PWD/variants" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/hlh-out}"; mkdir -p "$out"
python benchmarks/runtime_check.py 2>&1 | tail -2
declare -A SHAPES=(
  [qgemv]="14336x4096x64 4096x14336x64 4096x4096x64 1024x4096x64 14336x4096x128 4096x14336x128"
  [gemv]="1x14336x4096 1x4096x14336 1x4096x4096 1x1024x4096"
  [rms_norm]="1x4096 128x4096 8192x4096" [layer_norm]="1x4096 128x4096 8192x4096"
  [softmax]="32x32000 8192x4096" [swiglu]="1x14336 128x14336 8192x14336"
  [rope]="32x1x128x0 8x1x128x0 32x4096x128x0 32x4096x128x1"
  [decode_attention]="32x8x4096x128 32x32x4096x128 32x8x1024x64"
)
for op in qgemv gemv rms_norm swiglu rope softmax layer_norm decode_attention; do
  args=(); for s in ${SHAPES[$op]}; do args+=(--shape "$s"); done
  timeout 60 python -m hlh_mlx sweep "$op" --backend cuda --dtype float16 --retime --budget 1 --top 3 --timeout 60 \
    --format md "${args[@]}" > "$out/retime-$op.md" 2>&1
  tail -1 "$out/retime-$op.md"
done
tar -czf "$out/retime.tar.gz" variants/*/
