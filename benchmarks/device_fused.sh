#!/usr/bin/env bash
# On the lent NVIDIA GPU: the fused decoder ops of a Llama block at decode, then whole models.
#   bash benchmarks/device_fused.sh sweeps   # MLX CUDA staged (../shared/device/README.md)
#   bash benchmarks/device_fused.sh models   # and mlx-lm's wheels carried (.device-mlx/lm)
# sweeps: norm_qkv_rope, qgemv_add and norm_qgemv_swiglu at Llama-3-8B's decode shapes, the
#   templates' expected winners first (their `expect`), timed as a model calls them.
# models: hlh_mlx validate llama-3-8b 4-bit at 8 and 32 layers (mlx-lm's generation loop,
#   both sides uncompiled and compiled, tokens compared) and one decode step broken down.
# The store is /tmp/hlh-variants on the device, kept between calls of one warm machine (each
# call's copy of the working tree replaces tracked files such as variants/); after every step
# it and the results are packed into $OUT/fused.tar.gz, so a call cut short keeps what finished.
set -uo pipefail
source .device-mlx/env/activate.sh
store=/tmp/hlh-variants
[ -d "$store" ] || cp -r variants "$store"
export HLH_MLX_VARIANTS="$store" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/hlh-out}"; res=/tmp/hlh-results; mkdir -p "$out" "$res"
pack() { tar -czf "$out/fused.tar.gz" -C / "${store#/}" "${res#/}"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

sweep() {  # sweep OP SECONDS ARGS...
  local op=$1 secs=$2; shift 2
  timeout "$secs" python -m hlh_mlx sweep "$op" --backend cuda --dtype float16 --top 4 --timeout 60 \
    --format md "$@" 2>&1 | grep -v "^sweeping" | tee -a "$res/sweep-$op.md"
  pack
}
picks() { local o=(); for v in "$@"; do o+=(--variant "$v"); done; echo "${o[@]}"; }

case "${1:-}" in
  sweeps)
    timeout 150 python benchmarks/fused_probe.py --out "$res/fused_probe.json" 2>&1 | grep -v "^WARN"; pack
    # the templates' expected winners (their `expect`) and runners-up, timed first
    sweep qgemv_add 120 --template splitk --budget 4 --shape 4096x14336x64 \
      $(picks KS=8,RPT=2,TEAMS=1,PW=4,U=2,CS=1,XS=0 KS=4,RPT=2,TEAMS=1,PW=4,U=4,CS=1,XS=0)
    sweep qgemv_add 100 --template splitk --budget 3 --shape 4096x4096x64 \
      $(picks KS=2,RPT=2,TEAMS=4,PW=4,U=2,CS=1,XS=4096 KS=4,RPT=1,TEAMS=2,PW=4,U=4,CS=1,XS=0)
    sweep norm_qgemv_swiglu 120 --template splitk --budget 4 --shape 14336x4096x64 \
      $(picks KS=1,RPT=2,TEAMS=4,PW=4,U=4,XS=4096 KS=1,RPT=2,TEAMS=4,PW=4,U=4,XS=0)
    sweep norm_qkv_rope 100 --template splitk --budget 3 --shape 4096x1024x4096x64x128 \
      $(picks KS=1,RPT=1,TEAMS=4,U=4,XS=4096 KS=2,RPT=2,TEAMS=2,U=2,XS=4096)
    ;;
  models)
    if ! python -c "import mlx_lm" 2>/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lm-site .device-mlx/lm/*.whl >/dev/null
    fi
    export PYTHONPATH="/tmp/lm-site:$PYTHONPATH"
    for layers in 8 32; do
      timeout 260 python -m hlh_mlx validate llama-3-8b --bits 4 --layers "$layers" --tokens 64 --repeats 3 \
        --json "$res/validate_llama-3-8b-4bit_${layers}layers.json" 2>&1 | tail -30 | tee "$res/validate_${layers}.txt"
      pack
    done
    timeout 100 python benchmarks/decode_breakdown.py --layers 8 --out "$res/breakdown_llama8_4bit_fused.json" \
      2>&1 | tail -30
    pack
    ;;
  *) echo "usage: $0 sweeps|models" >&2; exit 2 ;;
esac
