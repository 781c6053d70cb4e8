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
# The split-K templates' authors' picks (benchmarks/results/decode_gemv_design.md), timed
# first at the shapes they were designed for; the budget beyond them goes to neighbours.
QD=(KS=4,RPT=1,TEAMS=2,PW=4,U=4,CS=1,XS=0 KS=8,RPT=1,TEAMS=1,PW=4,U=16,CS=1,XS=0 KS=4,RPT=2,TEAMS=2,PW=4,U=4,CS=1,XS=0
    KS=8,RPT=2,TEAMS=1,PW=4,U=16,CS=1,XS=0 KS=2,RPT=2,TEAMS=2,PW=4,U=4,CS=1,XS=0 KS=4,RPT=1,TEAMS=2,PW=8,U=4,CS=1,XS=0
    KS=4,RPT=2,TEAMS=2,PW=4,U=4,CS=1,XS=16384 KS=4,RPT=1,TEAMS=2,PW=4,U=4,CS=0,XS=0)
QG=(KS=1,RPT=2,TEAMS=4,PW=4,U=4,CS=1,XS=4096 KS=2,RPT=2,TEAMS=4,PW=4,U=2,CS=1,XS=4096 KS=4,RPT=2,TEAMS=2,PW=4,U=2,CS=1,XS=4096
    KS=1,RPT=1,TEAMS=8,PW=4,U=4,CS=1,XS=4096 KS=1,RPT=2,TEAMS=8,PW=4,U=4,CS=1,XS=4096 KS=2,RPT=4,TEAMS=2,PW=4,U=2,CS=1,XS=4096
    KS=1,RPT=2,TEAMS=4,PW=4,U=4,CS=1,XS=0 KS=2,RPT=2,TEAMS=2,PW=4,U=2,CS=1,XS=0)
GD=(KS=4,RPT=1,TEAMS=2,U=4,CS=0,ASYNC=1 KS=8,RPT=1,TEAMS=1,U=4,CS=0,ASYNC=1 KS=4,RPT=2,TEAMS=1,U=4,CS=0,ASYNC=1
    KS=4,RPT=2,TEAMS=2,U=2,CS=0,ASYNC=1 KS=4,RPT=1,TEAMS=2,U=8,CS=1,ASYNC=0 KS=8,RPT=1,TEAMS=1,U=8,CS=1,ASYNC=0
    KS=8,RPT=2,TEAMS=1,U=8,CS=1,ASYNC=0 KS=2,RPT=2,TEAMS=4,U=8,CS=1,ASYNC=0)
GG=(KS=1,RPT=2,TEAMS=4,U=4,CS=0,ASYNC=1 KS=2,RPT=2,TEAMS=2,U=4,CS=0,ASYNC=1 KS=2,RPT=1,TEAMS=4,U=4,CS=0,ASYNC=1
    KS=1,RPT=2,TEAMS=8,U=2,CS=0,ASYNC=1 KS=1,RPT=2,TEAMS=4,U=8,CS=1,ASYNC=0 KS=2,RPT=2,TEAMS=4,U=8,CS=1,ASYNC=0
    KS=1,RPT=4,TEAMS=4,U=4,CS=1,ASYNC=0 KS=4,RPT=2,TEAMS=2,U=4,CS=1,ASYNC=0)
picks() { local out=(); for v in "$@"; do out+=(--variant "$v"); done; echo "${out[@]}"; }
sweep() {  # sweep OP SECONDS ARGS...: one bounded sweep, its table kept, results packed
  local op=$1 secs=$2; shift 2
  thr=0; case $op in qgemv|gemv) thr=1;; esac
  HLH_MLX_THROUGHPUT=$thr timeout "$secs" python -m hlh_mlx sweep "$op" --backend cuda --dtype float16 --top 4 \
    --timeout 60 --format md "$@" 2>&1 | grep -v "^sweeping" | tee -a "$out/sweep-$op.md"
  tar -czf "$out/sweeps.tar.gz" variants/*/ 2>/dev/null
}
shapes() { local out=(); for s in "$@"; do out+=(--shape "$s"); done; echo "${out[@]}"; }
plan_qgemv() {
  sweep qgemv 70 --template splitk --budget 10 --shape 4096x14336x64 $(picks "${QD[@]}")
  sweep qgemv 70 --template splitk --budget 10 --shape 14336x4096x64 $(picks "${QG[@]}")
  sweep qgemv 60 --template splitk --budget 6 $(shapes 4096x4096x64 1024x4096x64 14336x4096x128 4096x14336x128) \
    $(picks "${QD[@]:0:3}" "${QG[@]:0:3}")
  sweep qgemv 50 --template warp --budget 3 $(shapes 14336x4096x64 4096x14336x64 4096x4096x64 1024x4096x64 14336x4096x128 4096x14336x128)
}
plan_gemv() {
  sweep gemv 60 --template splitk --budget 10 --shape 1x4096x14336 $(picks "${GD[@]}")
  sweep gemv 60 --template splitk --budget 10 --shape 1x14336x4096 $(picks "${GG[@]}")
  sweep gemv 40 --template splitk --budget 6 $(shapes 1x4096x4096 1x1024x4096) $(picks "${GD[@]:0:3}" "${GG[@]:0:3}")
  sweep gemv 30 --template warp --budget 2 $(shapes 1x14336x4096 1x4096x14336 1x4096x4096 1x1024x4096)
}
plan_rms_norm() { sweep rms_norm 50 --budget 4 $(shapes 1x4096 128x4096 8192x4096); }
plan_layer_norm() { sweep layer_norm 45 --budget 4 $(shapes 1x4096 128x4096 8192x4096); }
plan_softmax() { sweep softmax 40 --budget 4 $(shapes 32x32000 8192x4096); }
plan_swiglu() { sweep swiglu 50 --budget 4 $(shapes 1x14336 128x14336 8192x14336); }
plan_rope() { sweep rope 60 --budget 4 $(shapes 32x1x128x0 8x1x128x0 32x4096x128x0 32x4096x128x1); }
plan_decode_attention() { sweep decode_attention 50 --budget 4 $(shapes 32x8x4096x128 32x32x4096x128 32x8x1024x64); }
plan_matmul() { sweep matmul 80 --budget 3 $(shapes 1024x1024x1024 512x4096x4096 4096x4096x4096); }
ops=("$@"); [ ${#ops[@]} -eq 0 ] && ops=(qgemv gemv rms_norm swiglu rope decode_attention softmax layer_norm matmul)
for op in "${ops[@]}"; do "plan_$op"; done
