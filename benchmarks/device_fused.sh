#!/usr/bin/env bash
# On the lent NVIDIA GPU: the fused decoder ops of a Llama block at decode, then whole models.
#   bash benchmarks/device_fused.sh sweeps   # MLX CUDA staged (../shared/device/README.md)
#   bash benchmarks/device_fused.sh models   # and mlx-lm's wheels carried (.device-mlx/lm)
#   bash benchmarks/device_fused.sh host     # one call's host cost: source length, dispatch, 33 calls
#   bash benchmarks/device_fused.sh profile  # a decode step's build time by function, 32-layer validate
#   bash benchmarks/device_fused.sh method6  # the model's decode calls re-timed (host cost with encoding), validate
#   bash benchmarks/device_fused.sh short    # node costs, the fused decode ops re-timed, one validate (~4 min)
#   bash benchmarks/device_fused.sh validate # hlh_mlx validate Llama-3-8B 4-bit (32 layers), its step's nodes
#   bash benchmarks/device_fused.sh moe      # hlh_mlx validate Qwen1.5-MoE-A2.7B 4-bit (24 layers)
#   bash benchmarks/device_fused.sh pre      # norm_qkv_rope: where its GPU time goes, re-timed (method 6)
#   bash benchmarks/device_fused.sh stalls   # ncu's account of norm_qkv_rope's kernel beside a qgemv's, validate
#   bash benchmarks/device_fused.sh calls    # the decode-sized tuned calls, sides alternated (~3 min)
#   bash benchmarks/device_fused.sh scalars  # small inputs in managed vs device memory, norm_qkv_rope, validate
#   bash benchmarks/device_fused.sh rescalar # the ops that read a scalar re-timed with it device-resident, validate
#   bash benchmarks/device_fused.sh hostpaths # a patched step's host paths A/B, then the 33 calls
#   bash benchmarks/device_fused.sh loop     # the fixed-token step loop against mlx-lm's loop, validate
#   bash benchmarks/device_fused.sh again    # tuned_calls' rope cases, validate once more
#   bash benchmarks/device_fused.sh rescalar2 # rope and decode_attention re-timed, MoE determinism
#   bash benchmarks/device_fused.sh calls33  # all 33 tuned calls, sides alternated
#   bash benchmarks/device_fused.sh experts  # the MoE expert ops swept at Qwen1.5-MoE's shapes, determinism
#   bash benchmarks/device_fused.sh experts2 # Qwen1.5-MoE validated with them, its step's nodes
#   bash benchmarks/device_fused.sh final    # MoE ops re-swept, validate, scores' memory, user path, 33 calls
#   bash benchmarks/device_fused.sh bias     # norm_qkv_rope with q/k/v biases swept, Qwen1.5-MoE validated
#   bash benchmarks/device_fused.sh bias2    # Llama-3-8B and Qwen2-7B validated after it
#   bash benchmarks/device_fused.sh forced   # the three families validated with the teacher-forced logit check
#   bash benchmarks/device_fused.sh freshtune # tune Llama-3-8B from an empty store, timed (freshtune+:
#     resume it in the next call; freshvalidate: validate what it stored)
#   bash benchmarks/device_fused.sh qwen3    # qk_norm_rope checked and swept on the GPU, Qwen3-8B tuned, validated
#   bash benchmarks/device_fused.sh prefill  # where a 4-bit Llama prefill's time goes; the host table again
#   bash benchmarks/device_fused.sh qmm      # the prefill's 4-bit matmul (qmm) checked, swept, the prefill again
#   bash benchmarks/device_fused.sh qmm2     # qmm at 128/511/2048 rows, Llama validated at 512 and 2048 tokens
#   bash benchmarks/device_fused.sh gemv16   # the fp16 gemv searched at 4096x4096 and 4096x14336
# sweeps: norm_qkv_rope and norm_qgemv_swiglu at Llama-3-8B's decode shapes, the templates'
#   expected winners first (their `expect`), timed as a model calls them.
# models: hlh_mlx validate llama-3-8b 4-bit at 8 and 32 layers (mlx-lm's generation loop,
#   both sides uncompiled and compiled, tokens compared) and one decode step broken down.
# The store is /tmp/hlh-variants on the device, kept between calls of one warm machine (each
# call's copy of the working tree replaces tracked files such as variants/); after every step
# it and the results are packed into $OUT/fused.tar.gz, so a call cut short keeps what finished.
set -uo pipefail
source .device-mlx/env/activate.sh
store=/tmp/hlh-variants
# a machine may keep /tmp from an earlier session: the checkout's records the store there
# lacks are appended to it (written later than that store's: selection reads the newest
# record per variant last), so it never stands in for them
python3 - "$store" <<'PY'
import pathlib, sys
store = pathlib.Path(sys.argv[1])
for src in pathlib.Path("variants").rglob("*.jsonl"):
    dst = store / src.relative_to("variants")
    dst.parent.mkdir(parents=True, exist_ok=True)
    have = dst.read_text().splitlines() if dst.exists() else []
    seen = set(have)
    new = [line for line in src.read_text().splitlines() if line not in seen]
    if new:
        dst.write_text("\n".join(have + new) + "\n")
PY
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
with_lm() {  # mlx-lm from the carried wheels, once per warm machine: .device-mlx/lm, or
  # its halves lm1 (carried with MLX's first half) and lm2 (with the second: the
  # transformers wheel), each call then under 64 MiB with the tree as the tool counts it (disk
  # blocks, not bytes); hf_xet and sentencepiece left out (no downloads, no tokenizer models
  # on the device); made here by
  #   mkdir -p .device-mlx/lm1 .device-mlx/lm2 .device-mlx/lm3; ln .device-mlx/lm/transformers-*.whl .device-mlx/lm2/
  #   ln .device-mlx/lm/{tokenizers,pydantic_core,pygments}-*.whl .device-mlx/lm3/ (carried alone: a call
  #   holds the tree, MLX's half and lm1 only without them)
  #   for f in .device-mlx/lm/*.whl; do case "${f##*/}" in transformers-*|hf_xet-*|sentencepiece-*) ;;
  #     *) ln "$f" .device-mlx/lm1/;; esac; done
  export PYTHONPATH="/tmp/lm-site:$PYTHONPATH"
  for d in .device-mlx/lm .device-mlx/lm1 .device-mlx/lm2 .device-mlx/lm3; do
    [ -d "$d" ] && [ ! -f "/tmp/lm-site/.from-${d##*/}" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lm-site "$d"/*.whl >/dev/null \
      && touch "/tmp/lm-site/.from-${d##*/}"
  done
  python -c "import mlx_lm.generate" || echo "mlx-lm does not import: carry .device-mlx/lm (or lm1, then lm2)"
}
timed_tune() {  # timed_tune SECONDS FILE MODEL [ARGS]: `hlh_mlx tune MODEL --bits 4 --budget 8 ARGS`, its
  # output and its wall seconds appended to $res/FILE (a call cut by the limit resumes in the next)
  local secs=$1 file=$2 model=$3 start
  shift 3
  start=$(date +%s)
  timeout "$secs" python -m hlh_mlx tune "$model" --bits 4 --budget 8 --timeout 60 "$@" >> "$res/$file" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" >> "$res/$file"
  grep -v "Warning\|_choices\|elapsed" "$res/$file" | tail -30
}
picks() { local o=(); for v in "$@"; do o+=(--variant "$v"); done; echo "${o[@]}"; }
qkv_trig() {  # qkv_trig SECONDS: norm_qkv_rope's two leading plans, each with both sin/cos (TRIG)
  sweep norm_qkv_rope "$1" --template splitk --budget 1 --shape 4096x1024x4096x64x128 \
    $(picks KS=2,RPT=2,TEAMS=2,U=2,XS=0,TRIG=32 KS=2,RPT=2,TEAMS=2,U=2,XS=0,TRIG=64 KS=1,RPT=2,TEAMS=4,U=4,XS=0,TRIG=32 KS=1,RPT=2,TEAMS=4,U=4,XS=0,TRIG=64)
}
run_validate() {  # run_validate SECONDS FILE MODEL ARGS...: hlh_mlx validate, its summary, the JSON in $res/FILE
  local secs=$1 file=$2; shift 2
  timeout "$secs" python -m hlh_mlx validate "$@" --json "$res/$file" 2>&1 \
    | grep -v "^warning\|Warning\|_choices" | tail -14
  pack
}

case "${1:-}" in
  sweeps)
    timeout 150 python benchmarks/fused_probe.py --out "$res/fused_probe.json" 2>&1 | grep -v "^WARN"; pack
    # the templates' expected winners (their `expect`) and runners-up, timed first (qgemv_add's
    # H200 records are in variants/: sweep it with the same line if its template changes)
    sweep norm_qgemv_swiglu 130 --template splitk --budget 5 --shape 14336x4096x64 \
      $(picks KS=1,RPT=2,TEAMS=4,PW=4,U=4,XS=0 KS=1,RPT=2,TEAMS=4,PW=4,U=4,XS=4096 KS=2,RPT=2,TEAMS=2,PW=4,U=2,XS=0)
    sweep norm_qkv_rope 130 --template splitk --budget 5 --shape 4096x1024x4096x64x128 \
      $(picks KS=2,RPT=2,TEAMS=2,U=2,XS=0,TRIG=32 KS=2,RPT=2,TEAMS=2,U=2,XS=4096,TRIG=32 KS=1,RPT=2,TEAMS=4,U=4,XS=0,TRIG=32 KS=2,RPT=1,TEAMS=4,U=2,XS=0,TRIG=32)
    ;;
  models)
    with_lm
    for layers in 32 8; do
      timeout 260 python -m hlh_mlx validate llama-3-8b --bits 4 --layers "$layers" --tokens 64 --repeats 3 \
        --json "$res/validate_llama-3-8b-4bit_${layers}layers.json" 2>&1 | tail -30 | tee "$res/validate_${layers}.txt"
      pack
    done
    timeout 100 python benchmarks/decode_breakdown.py --layers 8 --out "$res/breakdown_llama8_4bit_fused.json" \
      2>&1 | tail -30
    pack
    ;;
  profile)  # where a decode step's build time goes (cProfile, 8 layers), then the 32-layer validate
    with_lm
    timeout 200 python benchmarks/decode_breakdown.py --layers 8 --steps 30 --profile 30 \
      --out "$res/breakdown_llama8_4bit_profile.json" 2>&1 | grep -v "Warning\|_choices\[key\]" | tail -120
    pack
    run_validate 330 validate_llama-3-8b-4bit_32layers_alternated.json llama-3-8b --bits 4 --layers 32 --tokens 64 --repeats 4
    ;;
  host)
    timeout 90 python benchmarks/source_size_cost.py --out "$res/source_size_cost.json" 2>&1 | grep -v '^{'; pack
    timeout 120 python benchmarks/host_overhead.py --out "$res/host_overhead.json" > "$res/host_overhead.txt" 2>&1
    head -40 "$res/host_overhead.txt"; pack
    timeout 330 python benchmarks/tuned_calls.py --out "$res/tuned_calls.json" > "$res/tuned_calls.txt" 2>&1
    tail -50 "$res/tuned_calls.txt"; pack
    ;;
  method6)  # the model's decode calls re-timed with the host cost including MLX's encoding (timing
    # method 6): each shape's stored winner and the built-in, then the 32-layer validate
    sweep qgemv 60 --template splitk --budget 1 --shape 4096x4096x64 $(picks CS=1,KS=2,PW=4,RPT=2,TEAMS=4,U=2,XS=4096)
    sweep qgemv 60 --template splitk --budget 1 --shape 14336x4096x64 $(picks CS=0,KS=1,PW=4,RPT=2,TEAMS=4,U=4,XS=4096)
    sweep qgemv 60 --template splitk --budget 1 --shape 4096x14336x64 $(picks CS=0,KS=8,PW=4,RPT=2,TEAMS=1,U=4,XS=0)
    sweep qgemv 60 --template warp --budget 1 --shape 128256x4096x64 $(picks PW=4,RPW=2,STATIC_K=1,UNROLL=1,WARPS=8)
    sweep qgemv_add 60 --template splitk --budget 1 --shape 4096x4096x64 $(picks CS=1,KS=1,PW=4,RPT=2,TEAMS=4,U=2,XS=4096)
    sweep qgemv_add 60 --template splitk --budget 1 --shape 4096x14336x64 $(picks CS=1,KS=4,PW=4,RPT=2,TEAMS=1,U=2,XS=0)
    sweep norm_qgemv_swiglu 60 --template splitk --budget 1 --shape 14336x4096x64 $(picks KS=2,PW=4,RPT=2,TEAMS=2,U=2,XS=0)
    sweep qgemv_swiglu 60 --template splitk --budget 1 --shape 14336x4096x64 $(picks CS=1,KS=1,PW=4,RPT=2,TEAMS=4,U=4,XS=0)
    # its records are method 5, whose host cost left out the encoding of the nine nodes its
    # built-in composition makes (one for the kernel): the comparison that may flip
    qkv_trig 60
    with_lm
    run_validate 300 validate_llama-3-8b-4bit_32layers_method6.json llama-3-8b --bits 4 --layers 32 --tokens 64 --repeats 3
    ;;
  short)  # what a short device budget buys: node costs, the fused decode ops re-timed (method 6), one validate
    timeout 60 python -c "import json,sys; sys.path.insert(0,'benchmarks'); import decode_breakdown as d; \
r=d.node_cost(); print(json.dumps(r, indent=1)); open('$res/node_cost.json','w').write(json.dumps(r, indent=1))"
    pack
    sweep qgemv 40 --template splitk --budget 1 --shape 4096x4096x64 $(picks CS=1,KS=2,PW=4,RPT=2,TEAMS=4,U=2,XS=4096)
    sweep qgemv_add 40 --template splitk --budget 1 --shape 4096x4096x64 $(picks CS=1,KS=1,PW=4,RPT=2,TEAMS=4,U=2,XS=4096)
    sweep qgemv_add 40 --template splitk --budget 1 --shape 4096x14336x64 $(picks CS=1,KS=4,PW=4,RPT=2,TEAMS=1,U=2,XS=0)
    sweep norm_qgemv_swiglu 40 --template splitk --budget 1 --shape 14336x4096x64 $(picks KS=2,PW=4,RPT=2,TEAMS=2,U=2,XS=0)
    with_lm
    run_validate 150 validate_llama-3-8b-4bit_32layers_method6.json llama-3-8b --bits 4 --layers 32 --tokens 48 --repeats 2
    ;;
  pre)  # the pre half: where norm_qkv_rope's GPU time goes (rope_tail_probe.py, and ncu), its
    # winners re-timed under method 6 (which may make the pre half one fused call); ~6 minutes
    timeout 120 python benchmarks/rope_tail_probe.py --out "$res/rope_tail_probe.json" 2>&1 | grep "^{"
    pack
    if command -v ncu >/dev/null; then  # the kernels' own durations (hardware counters, where readable)
      timeout 150 ncu --clock-control none -k regex:norm_qkv --metrics gpu__time_duration.sum --csv --page raw \
        python benchmarks/rope_tail_probe.py --profiler --calls 5 >"$res/rope_tail_ncu.csv" 2>"$res/rope_tail_ncu.err"
      python benchmarks/ncu_durations.py "$res/rope_tail_ncu.csv" --out "$res/rope_tail_ncu.json" \
        || tail -5 "$res/rope_tail_ncu.err"
      pack
    fi
    qkv_trig 90
    with_lm  # installed now (while carried) for a later call's validate
    ;;
  stalls)  # why norm_qkv_rope's kernel takes ~40 us (ncu: 14 MB, a 4096x4096 qgemv of 9 MB ~7 us):
    # ncu's speed-of-light, memory, occupancy and warp-stall sections of one launch of each, then validate
    timeout 100 ncu --clock-control none -k "regex:norm_qkv_rope_splitk_66564bd7ca3f|qgemv_splitk" --launch-count 2 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats \
      python benchmarks/rope_tail_probe.py --profiler --calls 1 >"$res/ncu_stalls.txt" 2>&1
    grep -v "^{" "$res/ncu_stalls.txt" | grep -E "custom_kernel|Duration|Throughput|Stall|Warp Cycles|Achieved|Theoretical|Registers|Waves|Eligible|Issued|Block Limit|L2 Hit|L1/TEX Hit|Mem Busy|Max Bandwidth" | cut -c1-150 | head -80
    pack
    with_lm
    run_validate 380 validate_llama-3-8b-4bit_32layers_pre.json llama-3-8b --bits 4 --layers 32 --tokens 64 --repeats 3
    ;;
  scalars)  # eps and offset read from managed memory across the bus, or from device memory
    # (scalar_inputs_probe.py); norm_qkv_rope re-timed with its inputs where the runtime puts
    # them (hlh_mlx.ops.spec.constant), then the 32-layer validate; ~8 minutes
    timeout 120 python benchmarks/scalar_inputs_probe.py --out "$res/scalar_inputs_probe.json" 2>&1 | grep -v "Warning"
    pack
    sweep norm_qkv_rope 90 --template splitk --budget 1 --shape 4096x1024x4096x64x128 \
      $(picks KS=2,RPT=1,TEAMS=2,U=2,XS=0,TRIG=32 KS=1,RPT=2,TEAMS=4,U=4,XS=0,TRIG=64 KS=2,RPT=1,TEAMS=4,U=2,XS=4096,TRIG=32)
    with_lm
    run_validate 300 validate_llama-3-8b-4bit_32layers_scalars.json llama-3-8b --bits 4 --layers 32 --tokens 64 --repeats 3
    ;;
  rescalar)  # the ops that read a scalar (eps, offset) re-timed with it device-resident as the
    # runtime now passes it (their stored times paid a read across the bus), then validate; ~9 min
    sweep norm_qkv_rope 100 --template splitk --budget 24 --force --shape 4096x1024x4096x64x128 \
      $(picks KS=2,RPT=1,TEAMS=2,U=2,XS=0,TRIG=32 KS=2,RPT=1,TEAMS=4,U=2,XS=0,TRIG=32 KS=1,RPT=2,TEAMS=4,U=4,XS=0,TRIG=64)
    sweep norm_qgemv_swiglu 100 --template splitk --budget 16 --force --shape 14336x4096x64 \
      $(picks KS=2,PW=4,RPT=2,TEAMS=2,U=2,XS=0 KS=1,PW=4,RPT=2,TEAMS=4,U=4,XS=0 KS=1,PW=4,RPT=2,TEAMS=4,U=4,XS=4096)
    sweep rms_norm 60 --template rows --budget 12 --force --shape 1x4096
    sweep add_rms_norm 60 --template rows --budget 12 --force --shape 1x4096
    with_lm
    run_validate 300 validate_llama-3-8b-4bit_32layers_rescalar.json llama-3-8b --bits 4 --layers 32 --tokens 64 --repeats 3
    ;;
  hostpaths)  # a patched step's host paths A/B (host_paths_ab.py, 32 layers), then the 33 calls; ~8 min
    with_lm
    timeout 240 python benchmarks/host_paths_ab.py --layers 32 --steps 40 --rounds 3 --out "$res/host_paths_ab_32.json" \
      2>&1 | grep -v "Warning\|_choices" | tail -9
    pack
    timeout 240 python benchmarks/tuned_calls.py --only rms_norm --only rope --only qgemv --only swiglu \
      --out "$res/tuned_calls_alternated.json" > "$res/tuned_calls_alternated.txt" 2>&1
    grep -v "Warning\|_choices" "$res/tuned_calls_alternated.txt" | tail -40; pack
    ;;
  loop)  # the patched step's fixed-token loop against mlx-lm's generation loop (host_paths_ab.py
    # --loop), then the 32-layer validate; ~8 min
    with_lm
    timeout 200 python benchmarks/host_paths_ab.py --layers 32 --steps 40 --rounds 3 --config as_is --loop \
      --out "$res/host_paths_loop_32.json" 2>&1 | grep -v "Warning\|_choices" | tail -6
    pack
    run_validate 330 validate_llama-3-8b-4bit_32layers_final.json llama-3-8b --bits 4 --layers 32 --tokens 64 --repeats 3
    ;;
  again)  # the rope cases of tuned_calls.py, then the 32-layer validate once more; ~4 min
    timeout 120 python benchmarks/tuned_calls.py --only rope --out "$res/tuned_calls_rope.json" > "$res/tuned_calls_rope.txt" 2>&1
    grep -v "Warning\|_choices" "$res/tuned_calls_rope.txt" | tail -14; pack
    with_lm
    run_validate 200 validate_llama-3-8b-4bit_32layers_final2.json llama-3-8b --bits 4 --layers 32 --tokens 64 --repeats 3
    ;;
  rescalar2)  # rope and decode_attention re-timed with their scalars device-resident (their
    # stored times paid reads across the bus), then the MoE determinism probe; ~7 min.
    # `calls33` then times all 33 tuned calls, sides alternated
    for shape in 32x1x128x0 8x1x128x0 32x4096x128x0; do
      sweep rope 50 --budget 8 --force --shape "$shape"
    done
    for shape in 32x8x4096x128 32x8x1024x64; do
      sweep decode_attention 60 --budget 8 --force --shape "$shape"
    done
    with_lm
    timeout 170 python benchmarks/moe_determinism.py --layers 24 --prompt-tokens 512 --tokens 32 --out "$res/moe_determinism.json" 2>&1 \
      | grep -v "Warning\|_choices" | tail -14
    pack
    ;;
  calls33)  # all 33 tuned calls of tuned_calls.py, sides alternated; ~6 min
    timeout 400 python benchmarks/tuned_calls.py --out "$res/tuned_calls_all.json" > "$res/tuned_calls_all.txt" 2>&1
    grep -v "Warning\|_choices" "$res/tuned_calls_all.txt" | tail -50; pack
    ;;
  calls)  # the decode-sized cases of tuned_calls.py, each side measured twice in alternating order
    timeout 240 python benchmarks/tuned_calls.py --only rms_norm --only rope --only qgemv --only swiglu \
      --out "$res/tuned_calls_alternated.json" > "$res/tuned_calls_alternated.txt" 2>&1
    grep -v "Warning\|_choices" "$res/tuned_calls_alternated.txt" | tail -32; pack
    ;;
  validate)  # the 32-layer validate, then one step's nodes and host time (decode_graph.py)
    with_lm
    run_validate 400 validate_llama-3-8b-4bit_32layers.json llama-3-8b --bits 4 --layers 32 --tokens 64 --repeats 4
    timeout 150 python benchmarks/decode_graph.py --layers 32 --steps 20 --out "$res/decode_graph_32.json" \
      2>&1 | grep -v "Warning\|_choices" | tail -8
    pack
    ;;
  moe)
    with_lm
    run_validate 300 validate_qwen1.5-moe-4bit.json qwen1.5-moe-a2.7b --bits 4 --tokens 64 --repeats 3
    ;;
  experts)  # the MoE routing and expert ops (hlh_mlx.moe) checked and timed on the GPU at Qwen1.5-MoE's decode
    # shapes (4 of 60 experts, G=64), then whether the unpatched model repeats its own tokens (and
    # where two runs part); ~7 min. `experts2` then runs the 24-layer validate and one step's nodes
    sweep moe_qgemv_swiglu 130 --budget 12 --shape 4x60x1408x2048x64
    sweep moe_qgemv_combine 130 --budget 12 --shape 4x60x2048x1408x64
    sweep moe_route 50 --budget 4 --shape 60x4x0x0
    with_lm
    timeout 110 python benchmarks/moe_determinism.py --layers 24 --prompt-tokens 512 --tokens 32 --out "$res/moe_determinism.json" 2>&1 \
      | grep -v "Warning\|_choices" | tail -14
    pack
    ;;
  experts2)  # Qwen1.5-MoE 4-bit validated with the expert ops in the store, one step's nodes; ~6 min
    with_lm
    run_validate 330 validate_qwen1.5-moe-4bit_experts.json qwen1.5-moe-a2.7b --bits 4 --tokens 64 --repeats 3
    timeout 100 python benchmarks/decode_graph.py --model qwen1.5-moe-a2.7b --layers 24 --steps 20 \
      --out "$res/decode_graph_moe24.json" 2>&1 | grep -v "Warning\|_choices" | tail -8
    pack
    ;;
  final)  # after moe_route's scores became float32 and an op no variant serves went direct:
    # the two changed MoE ops re-swept, the MoE validate, where the combine kernel's scores live,
    # the user's path against the sweep's, then all 33 tuned calls; ~8 min
    sweep moe_qgemv_combine 100 --budget 8 --shape 4x60x2048x1408x64
    sweep moe_route 60 --budget 3 --shape 60x4x0x0
    with_lm
    run_validate 160 validate_qwen1.5-moe-4bit_final.json qwen1.5-moe-a2.7b --bits 4 --tokens 64 --repeats 3
    timeout 40 python benchmarks/scalar_inputs_probe.py --moe --out "$res/scalar_inputs_moe.json" 2>&1 \
      | grep -v "Warning\|_choices" | tail -8
    pack
    timeout 120 python benchmarks/user_path_probe.py --out "$res/user_path_probe.json" 2>&1 \
      | grep -v "Warning\|_choices" | tail -36
    pack
    timeout 150 python benchmarks/tuned_calls.py --out "$res/tuned_calls_final.json" > "$res/tuned_calls_final.txt" 2>&1
    grep -v "Warning\|_choices" "$res/tuned_calls_final.txt" | tail -50; pack
    ;;
  bias)  # norm_qkv_rope takes the q/k/v projections' biases (its B dimension; a new source, so its
    # records are re-made): swept at Llama-3-8B's shape (B=0) and Qwen1.5-MoE's (B=1), then
    # Qwen1.5-MoE validated with its attention input as that one call; ~7 min
    sweep norm_qkv_rope 120 --template splitk --budget 6 --shape 4096x1024x4096x64x128x0 \
      $(picks KS=1,RPT=1,TEAMS=4,U=2,XS=4096,TRIG=32 KS=1,RPT=1,TEAMS=4,U=2,XS=4096,TRIG=64 KS=1,RPT=2,TEAMS=4,U=4,XS=0,TRIG=32)
    sweep norm_qkv_rope 120 --template splitk --budget 6 --shape 2048x2048x2048x64x128x1 \
      $(picks KS=1,RPT=1,TEAMS=4,U=2,XS=2048,TRIG=32 KS=2,RPT=1,TEAMS=4,U=2,XS=2048,TRIG=32 KS=1,RPT=1,TEAMS=4,U=2,XS=0,TRIG=32)
    with_lm
    run_validate 200 validate_qwen1.5-moe-4bit_bias.json qwen1.5-moe-a2.7b --bits 4 --tokens 64 --repeats 3
    timeout 80 python benchmarks/decode_graph.py --model qwen1.5-moe-a2.7b --layers 24 --steps 20 \
      --out "$res/decode_graph_moe24_bias.json" 2>&1 | grep -v "Warning\|_choices" | tail -8
    pack
    ;;
  bias2)  # after `bias`: Llama-3-8B (its pre half re-swept) and Qwen2-7B (q/k/v biases) validated; ~9 min
    with_lm
    run_validate 250 validate_llama-3-8b-4bit_bias.json llama-3-8b --bits 4 --tokens 64 --repeats 3
    sweep norm_qkv_rope 90 --template splitk --budget 4 --shape 3584x512x3584x64x128x1 \
      $(picks KS=1,RPT=1,TEAMS=4,U=2,XS=4096,TRIG=32 KS=1,RPT=2,TEAMS=4,U=4,XS=0,TRIG=32)
    run_validate 220 validate_qwen2-7b-4bit_bias.json qwen2-7b --bits 4 --tokens 64 --repeats 3
    ;;
  forced)  # validate now also feeds both sides the unpatched tokens and compares logits (a parting of
    # greedy tokens told apart as a near tie or a wrong kernel): the three families again; ~8 min
    with_lm
    run_validate 200 validate_qwen2-7b-4bit_forced.json qwen2-7b --bits 4 --tokens 64 --repeats 3
    run_validate 200 validate_qwen1.5-moe-4bit_forced.json qwen1.5-moe-a2.7b --bits 4 --tokens 64 --repeats 3
    run_validate 180 validate_llama-3-8b-4bit_forced.json llama-3-8b --bits 4 --tokens 64 --repeats 3
    ;;
  traced)  # the host cost of a call through an op's compiled function (runtime's traced path),
    # then the 33 tuned calls with it; ~8 min, no mlx-lm needed
    timeout 150 python benchmarks/host_overhead.py --out "$res/host_overhead_traced.json" \
      > "$res/host_overhead_traced.txt" 2>&1
    grep -v "^ *\"\|^[{}]" "$res/host_overhead_traced.txt" | head -60; pack
    timeout 390 python benchmarks/tuned_calls.py --out "$res/tuned_calls_traced.json" > "$res/tuned_calls_traced.txt" 2>&1
    grep -v "Warning\|_choices" "$res/tuned_calls_traced.txt" | tail -45; pack
    ;;
  moetune)  # hlh_mlx tune on Qwen1.5-MoE-A2.7B 4-bit (the store as shipped), timed; resumes when run again
    with_lm
    timed_tune "${TUNE_SECONDS:-420}" tune_moe.txt qwen1.5-moe-a2.7b; pack
    ;;
  qwen2det)  # where two identical greedy runs of Qwen2-7B 4-bit part (they did at 56-59 of 64),
    # unpatched and patched: the first position, layer and part (MLP, attention/cache, head)
    with_lm
    for side in "" --patched; do
      timeout 280 python benchmarks/moe_determinism.py --model qwen2-7b --layers 28 --prompt-tokens 512 \
        --tokens 64 $side --out "$res/determinism_qwen2${side:+_patched}.json" 2>&1 | grep -v "Warning" | tail -12
      pack
    done
    ;;
  freshtune|freshtune+)  # a fresh device: an empty store (freshtune; freshtune+ resumes it in the next
    # call: the call limit is 10 min), `hlh_mlx tune llama-3-8b` timed from the command on; each
    # call's seconds go to tune_llama_fresh.txt, whose sum is the time to a tuned model
    with_lm
    fresh=/tmp/hlh-fresh
    [ "$1" = freshtune ] && { rm -rf "$fresh"; : > "$res/tune_llama_fresh.txt"; }
    mkdir -p "$fresh"
    export HLH_MLX_VARIANTS="$fresh" HLH_MLX_SHIPPED=0  # the checkout's variants/ count as shipped: left out
    echo "== $1 $(date -u +%FT%TZ)" >> "$res/tune_llama_fresh.txt"
    timed_tune "${TUNE_SECONDS:-530}" tune_llama_fresh.txt llama-3-8b
    rm -rf "$res/fresh-store"; mkdir -p "$res/fresh-store"; cp -r "$fresh"/. "$res/fresh-store/"; pack
    ;;
  qwen3)  # Qwen3's attention input as norm_qkv_rope + qk_norm_rope: qk_norm_rope's CUDA template
    # checked on the GPU (every variant, edge shapes, twice for identical bits), swept at
    # Qwen3-8B's decode shape, then `tune qwen3-8b` (its other calls) and validate; ~9 min
    with_lm
    timeout 100 python -m hlh_mlx check qk_norm_rope --backend cuda 2>&1 | tail -4 | tee "$res/check_qk_norm_rope.txt"
    sweep qk_norm_rope 80 --template heads --budget 6 --shape 4096x1024x128 $(picks WPB=2,VP=2,TRIG=32 WPB=4,VP=2,TRIG=32)
    timed_tune 170 tune_qwen3.txt qwen3-8b; pack
    run_validate 220 validate_qwen3-8b-4bit.json qwen3-8b --bits 4 --tokens 64 --repeats 2
    ;;
  mixtral)  # Mixtral's blocks (routing by mlx-lm's ops, experts and attention fused), 8 of its
    # 32 layers: tune its calls (the expert ops at 8 experts, 14336x4096), then validate; ~9 min
    with_lm
    timed_tune 240 tune_mixtral.txt mixtral-8x7b --layers 8; pack
    run_validate 240 validate_mixtral-8x7b-4bit_8layers.json mixtral-8x7b --bits 4 --layers 8 --tokens 64 --repeats 2
    ;;
  prefill)  # where Llama-3-8B 4-bit's prefill (512) goes: the whole prefill unpatched and patched,
    # each op family of a layer alone in a chain x 32; then the host table again; ~5 min
    with_lm
    timeout 200 python benchmarks/prefill_breakdown.py --model llama-3-8b --bits 4 \
      --out "$res/prefill_breakdown_llama.json" 2>&1 | grep -v "Warning" | tail -12; pack
    timeout 120 python benchmarks/host_overhead.py --out "$res/host_overhead_dec05.json" \
      > "$res/host_overhead_dec05.txt" 2>&1
    grep -v "^ *\"\|^[{}]" "$res/host_overhead_dec05.txt" | head -60; pack
    ;;
  qmm)  # the prefill's 4-bit matmul as a dequantizing kernel + MLX's matmul: checked on the GPU,
    # swept at Llama-3-8B's four projection shapes at 511 rows, then the prefill unpatched vs
    # patched (prefill_breakdown.py); ~7 min
    with_lm
    timeout 90 python -m hlh_mlx check qmm --backend cuda --dtype float16 2>&1 | tail -3 | tee "$res/check_qmm.txt"
    sweep qmm 240 --budget 12
    timeout 220 python benchmarks/prefill_breakdown.py --model llama-3-8b --bits 4 \
      --out "$res/prefill_breakdown_qmm.json" 2>&1 | grep -v "Warning" | tail -12; pack
    ;;
  qmm2)  # qmm's q/o shape again (its built-in timed out compiling in the first sweep), qmm at
    # 128 and 2048 rows (what a short prompt and a long prompt's 2048-token chunks run), then
    # Llama-3-8B validated with a 512- and a 2048-token prompt, and its prefill broken down; ~9 min
    with_lm
    sweep qmm 70 --retime --budget 6 --shape 511x4096x4096x64
    sweep qmm 200 --budget 4 --shape 128x4096x4096x64 --shape 128x1024x4096x64 --shape 128x14336x4096x64 \
      --shape 128x4096x14336x64 --shape 2048x4096x4096x64 --shape 2048x1024x4096x64 --shape 2048x14336x4096x64 \
      --shape 2048x4096x14336x64
    run_validate 100 validate_llama_qmm_512.json llama-3-8b --bits 4 --tokens 32 --repeats 3
    run_validate 120 validate_llama_qmm_2048.json llama-3-8b --bits 4 --tokens 32 --repeats 3 --prompt-tokens 2048
    timeout 150 python benchmarks/prefill_breakdown.py --model llama-3-8b --bits 4 \
      --out "$res/prefill_breakdown_qmm2.json" 2>&1 | grep -v "Warning" | head -2; pack
    ;;
  gemv16)  # the fp16 gemv (decode's unquantized projections) searched at 4096x4096 and 4096x14336,
    # the two shapes where the copy rate leaves room for 1.3x in a chain; the template's expected
    # winners first; ~6 min
    sweep gemv 330 --template splitk --budget 20 --shape 1x4096x4096 --shape 1x4096x14336 \
      $(picks KS=4,RPT=1,TEAMS=2,U=4,CS=0,ASYNC=1 KS=8,RPT=1,TEAMS=1,U=4,CS=0,ASYNC=1 KS=4,RPT=2,TEAMS=2,U=8,CS=1,ASYNC=0)
    ;;
  freshvalidate)  # the model as the fresh tune left it: validated with that store and nothing else
    with_lm
    export HLH_MLX_VARIANTS=/tmp/hlh-fresh HLH_MLX_SHIPPED=0
    run_validate 500 validate_llama-3-8b-4bit_fresh.json llama-3-8b --bits 4 --tokens 64 --repeats 3
    ;;
  *) echo "usage: $0 sweeps|models|host|profile|method6|short|validate|moe|experts|pre|stalls|calls|scalars|rescalar|hostpaths|loop|again|rescalar2|calls33|experts2|final|bias|bias2|forced|freshtune|freshtune+|freshvalidate|traced|moetune|qwen2det|qwen3|mixtral|prefill|qmm|qmm2|gemv16" >&2; exit 2 ;;
esac
