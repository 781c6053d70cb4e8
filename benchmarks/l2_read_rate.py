"""How fast can the SMs read data that sits in the L2 cache? A kernel streams a buffer that
fits in L2 (16 MB of the H100's 50 MB) many times over with 16-byte loads, timed like the
sweep times kernels; a DRAM-sized buffer (1 GB) is read the same way for comparison.

    python benchmarks/l2_read_rate.py      # GB/s per case, JSON on the last line

Writes nothing: the results go to stdout (redirect them to keep them).

Why: a tiled matmul reads each operand tile from L2 once per block. At 4096^3, the wgmma
template's 128x256x64 tiles move 48 KB per k-tile per block, 1.6 GB in all; at its
measured 0.26 ms that is ~6.2 TB/s of L2-to-SM traffic. If that is close to what the L2
can deliver, the kernel is bound by it, and only larger tiles per SM or sharing loads
across SMs (clusters with TMA multicast, which mx.fast.cuda_kernel cannot launch) go faster.
"""

import json

import mlx.core as mx

from hlh_mlx import timing

PASSES = 64

SOURCE = f"""
const uint4* p = reinterpret_cast<const uint4*>(buf);
const size_t n = buf_shape[0] / 8;              // 16-byte pieces
const size_t stride = (size_t)gridDim.x * blockDim.x;
uint32_t acc = 0;
for (int pass = 0; pass < {PASSES}; pass++) {{
    // each pass a block reads another block's slice (nothing repeats in L1 or folds away),
    // and __ldcg caches in L2 only: the rate measured is the L2's, not L1's
    const size_t b = (blockIdx.x + (size_t)pass * 131) % gridDim.x;
    for (size_t i = b * blockDim.x + threadIdx.x; i < n; i += stride) {{
        const uint4 v = __ldcg(p + i);
        acc += (v.x ^ v.y ^ v.z ^ v.w) + pass;
    }}
}}
out[(size_t)blockIdx.x * blockDim.x + threadIdx.x] = acc;
"""


def main():
    kernel = mx.fast.cuda_kernel(name="hlh_l2_read", input_names=["buf"], output_names=["out"], source=SOURCE)
    res = {"device": mx.device_info().get("device_name", "?"), "mlx": mx.__version__}
    blocks, threads = 132 * 8, 256
    for label, mb in (("L2-resident 16 MB", 16), ("DRAM 1 GB", 1024)):
        buf = mx.random.randint(0, 1 << 15, (mb * (1 << 20) // 2,)).astype(mx.uint16)
        mx.eval(buf)

        def run(b):
            return kernel(inputs=[b], grid=(blocks * threads, 1, 1), threadgroup=(threads, 1, 1),
                          output_shapes=[(blocks * threads,)], output_dtypes=[mx.uint32])[0]

        t = timing.measure(run, [[buf]], cache_resident=True)
        gbs = PASSES * buf.nbytes / (t.median_ms * 1e-3) / 1e9
        res[label] = round(gbs, 1)
        print(f"{label}: {t.median_ms:.4f} ms for {PASSES} passes, {gbs:.0f} GB/s (spread {t.spread:.1%})")
        del buf
    print(json.dumps(res))


if __name__ == "__main__":
    main()
