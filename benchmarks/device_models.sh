#!/usr/bin/env bash
# On the lent NVIDIA GPU: `hlh_mlx tune` and `hlh_mlx validate` on full-size models built
# from published configs (random weights), through mlx-lm's own generation loop.
#   bash benchmarks/device_models.sh [MODEL:BITS ...]   (default: llama-3-8b:4)
# Needs MLX CUDA staged (../shared/device/README.md) and mlx-lm's wheels in .device-mlx/lm
# (benchmarks/stage_mlx_lm.sh), carried in the same call as .device-mlx/env. Writes
# validate JSON and the tune log to benchmarks/results/<device>/models/ and packs them and
# the sweep results into $OUT/models.tar.gz after every step, so a call cut short keeps
# what finished. Set TUNE=0 to validate only, VALIDATE=0 to tune only.
set -uo pipefail
source .device-mlx/env/activate.sh
if ! python -c "import mlx_lm" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lm-site .device-mlx/lm/*.whl >/dev/null \
    && echo "mlx-lm installed into /tmp/lm-site"
fi
export PYTHONPATH="/tmp/lm-site:$PYTHONPATH" HLH_MLX_VARIANTS="$PWD/variants" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/hlh-out}"; dev=$(python -c "from hlh_mlx import backends; print(backends.device('cuda').slug)")
res="benchmarks/results/$dev/models"; mkdir -p "$out" "$res"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
pack() { tar -czf "$out/models.tar.gz" "$res" variants/*/; }
for spec in "${@:-llama-3-8b:4}"; do
  model="${spec%%:*}"; bits="${spec##*:}"; tag="${model}-${bits}bit"
  if [ "${TUNE:-1}" = 1 ]; then
    start=$(date +%s)
    timeout "${TUNE_SECONDS:-420}" python -m hlh_mlx tune "$model" --bits "$bits" --budget "${BUDGET:-8}" \
      --backend cuda > "$res/tune_$tag.txt" 2>&1
    echo "tune $tag: exit $?, $(( $(date +%s) - start )) s" | tee -a "$res/tune_$tag.txt"
    tail -25 "$res/tune_$tag.txt"; pack
  fi
  if [ "${VALIDATE:-1}" = 1 ]; then
    timeout "${VALIDATE_SECONDS:-300}" python -m hlh_mlx validate "$model" --bits "$bits" --tokens "${TOKENS:-64}" \
      --repeats 3 --json "$res/validate_$tag.json" 2>&1 | tee "$res/validate_$tag.txt"
    pack
  fi
done
