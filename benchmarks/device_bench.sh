#!/usr/bin/env bash
# On the lent NVIDIA GPU, after benchmarks/device_sweeps.sh: what programs see.
# Writes: each benchmark's JSON and text and the store-made report into $HLH_BENCH_RESULTS,
# by default a fresh benchmarks/results/local/h200-<date>-<time>/ (ignored by git; a folder
# that already holds files is refused), packed with variants/*/ into $OUT/bench.tar.gz.
# It never writes over the recorded benchmarks/results/h200/: copy a run there on purpose.
set -uo pipefail
source .device-mlx/env/activate.sh
export HLH_MLX_VARIANTS="$PWD/variants" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/hlh-out}"; res="${HLH_BENCH_RESULTS:-benchmarks/results/local/h200-$(date +%Y%m%d-%H%M%S)}"
if [ -n "$(ls -A "$res" 2>/dev/null)" ]; then echo "$res already holds files: give HLH_BENCH_RESULTS a new folder" >&2; exit 2; fi
mkdir -p "$out" "$res"
python benchmarks/host_overhead.py --json "$res/host_overhead.json" > "$res/host_overhead.txt" 2>&1
python benchmarks/tuned_calls.py --json "$res/tuned_calls.json" 2>&1 | tee "$res/tuned_calls.txt"
for bits in 4 16; do
  python benchmarks/decode_tokens.py --bits $bits --layers 4 --tokens 64 --json "$res/decode_$bits.json" \
    > "$res/decode_$bits.txt" 2>&1
done
dev=$(ls variants | grep -i h200 | head -1)
python bench.py --from-store "$dev" --out "$res" > "$res/bench.txt" 2>&1
tar -czf "$out/bench.tar.gz" "$res" variants/*/
cat "$res/host_overhead.txt" | head -40; grep -h '"speedup"\|agree\|"runs"\|compiled\|pipelined' "$res"/decode_*.json | head -40
