#!/usr/bin/env bash
# On the lent NVIDIA GPU (MLX CUDA staged as ../shared/device/README.md says): sweep the
# matmul CUDA templates against mx.matmul and leave the results under $OUT.
#   bash benchmarks/device_matmul.sh [extra sweep options]
set -uo pipefail
source .device-mlx/env/activate.sh
# results go to the checkout's variants/ (resuming what is there) and are copied to $OUT
export HLH_MLX_VARIANTS="$PWD/variants"
export PYTHONUNBUFFERED=1
mkdir -p "$HLH_MLX_VARIANTS"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info())"
python -m hlh_mlx sweep matmul --backend cuda --dtype float16 --shape 4096x4096x4096 --shape 1024x1024x1024 \
  --format md "$@" 2>&1 | tee "${OUT:-/tmp/hlh-out}/matmul_sweep.md"
mkdir -p "${OUT:-/tmp/hlh-out}/variants"
cp -r variants/. "${OUT:-/tmp/hlh-out}/variants/"
