"""The ceiling of Ampere-style tensor-core instructions on this GPU: mma.sync m16n8k16
(fp16 in, fp32 accumulate) issued back to back from registers, no memory traffic, timed
like the sweep times kernels, next to mx.matmul at 4096^3.

    python benchmarks/mma_peak.py       # prints TFLOP/s, JSON on the last line

Writes nothing: the results go to stdout (redirect them to keep them).

Why: matmul/mma.cuda.j2 is built on mma.sync. On Hopper, cuBLAS uses wgmma (warpgroup
MMA from shared memory), which mma.sync cannot reach; this measures how far below the
card's matmul rate mma.sync itself stops, so a template's gap to mx.matmul can be split
into "the instruction's ceiling" and "the kernel's own losses".
"""

import json

import mlx.core as mx

from hlh_mlx import timing

CHAINS = 8     # independent accumulators per warp: enough to cover the MMA latency
ITERS = 4096   # mma.sync per chain

SOURCE = f"""
unsigned a[4], b[2];
const unsigned seed = seed_in[0];   // 0x3c003c00: (1.0, 1.0) in fp16; data, so nothing folds
#pragma unroll
for (int i = 0; i < 4; i++) a[i] = seed;
b[0] = seed; b[1] = seed;
float acc[{CHAINS}][4];
#pragma unroll
for (int c = 0; c < {CHAINS}; c++)
#pragma unroll
    for (int e = 0; e < 4; e++) acc[c][e] = 0.0f;
for (int it = 0; it < {ITERS}; it++) {{
#pragma unroll
    for (int c = 0; c < {CHAINS}; c++) {{
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{{%0, %1, %2, %3}}, {{%4, %5, %6, %7}}, {{%8, %9}}, {{%0, %1, %2, %3}};\\n"
                     : "+f"(acc[c][0]), "+f"(acc[c][1]), "+f"(acc[c][2]), "+f"(acc[c][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }}
}}
float s = 0.0f;
#pragma unroll
for (int c = 0; c < {CHAINS}; c++) s += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
out[blockIdx.x * blockDim.x + threadIdx.x] = s;
"""


def main():
    kernel = mx.fast.cuda_kernel(name="hlh_mma_peak", input_names=["seed_in"], output_names=["out"], source=SOURCE)
    seed = mx.array([0x3C003C00], dtype=mx.uint32)
    sms = 132
    out = {"device": mx.device_info().get("device_name", "?"), "mlx": mx.__version__}
    for blocks_per_sm, threads in ((1, 256), (2, 256), (4, 256), (2, 512)):
        blocks = sms * blocks_per_sm
        warps = blocks * threads // 32

        def run(s):
            return kernel(inputs=[s], grid=(blocks * threads, 1, 1), threadgroup=(threads, 1, 1),
                          output_shapes=[(blocks * threads,)], output_dtypes=[mx.float32])[0]

        t = timing.measure(run, [[seed]], cache_resident=True)
        flops = warps * CHAINS * ITERS * 2 * 16 * 8 * 16
        tf = flops / (t.median_ms * 1e-3) / 1e12
        out[f"mma.sync {blocks_per_sm}x{threads} per SM"] = round(tf, 1)
        print(f"mma.sync, {blocks_per_sm} blocks of {threads} per SM: {t.median_ms:.3f} ms, {tf:.0f} TFLOP/s")
    a = mx.random.normal((4096, 4096)).astype(mx.float16)
    b = mx.random.normal((4096, 4096)).astype(mx.float16)
    mx.eval(a, b)
    t = timing.measure(lambda x, y: x @ y, [[a, b]], cache_resident=True)
    tf = 2 * 4096 ** 3 / (t.median_ms * 1e-3) / 1e12
    out["mx.matmul 4096^3 fp16"] = round(tf, 1)
    print(f"mx.matmul 4096^3 fp16: {t.median_ms:.4f} ms, {tf:.0f} TFLOP/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
