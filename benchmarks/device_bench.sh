#!/usr/bin/env bash
# On the lent NVIDIA GPU, after benchmarks/device_sweeps.sh: what programs see. Writes
# $OUT/bench.tar.gz with the JSON of each benchmark and the store-made report.
set -uo pipefail
source .device-mlx/env/activate.sh
export HLH_MLX_VARIANTS="$PWD/variants" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/hlh-out}"; res=benchmarks/results/h200; mkdir -p "$out" "$res"
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
