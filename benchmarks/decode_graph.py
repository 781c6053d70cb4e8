"""What one decode step asks MLX to evaluate: its graph's nodes by primitive, unpatched and
patched, and the host time per step with the patched blocks' halves compiled (as `patch`
leaves them) and run as plain calls, to tell which costs the host more.

    python benchmarks/decode_graph.py [--model llama-3-8b] [--bits 4] [--layers 8] [--steps 30] [--out F [--force]]

Also the host time per node of chains of single ops (decode_breakdown.node_cost: built-in,
custom kernels with short and long sources and with 8 inputs, built-in and tuned 4-bit gemv).
Nodes are counted from `mx.export_to_dot` of one step's unevaluated outputs (a compiled
half shows as the nodes its trace replays). Host time: decode_breakdown.step_breakdown.
Writes: a table to stdout; the JSON to F only when --out F is given (an existing F is
refused before anything runs, unless --force).
"""

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_breakdown import node_cost, step_breakdown, warm_decode  # noqa: E402

from hlh_mlx import blocks, models, patching, paths, validate  # noqa: E402


def step_nodes(model, prompt_len: int = 16) -> dict:
    """{primitive: count} of the graph one decode step builds (after a warm-up)."""
    cache, tok = warm_decode(model, prompt_len, steps=3)
    out = model(tok, cache=cache)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "step.dot")
        mx.export_to_dot(path, out)
        text = open(path).read()
    mx.eval(out)
    # primitive nodes are drawn as rectangles labelled with the primitive's name
    names = re.findall(r"label ?= ?\"([^\"]+)\", shape=rectangle", text)
    counts = collections.Counter(n.split(" ")[0] for n in names)
    return dict(counts.most_common())


def uncompiled_halves(model) -> None:
    """Each patched block's decode halves run as plain calls from now on (same functions)."""
    for b in validate.decoder_blocks(model):
        if isinstance(b, blocks.DecoderBlock):
            steps = b._steps

            def plain(x, _steps=steps):
                pre, post = _steps(x)
                return pre.plain, post.plain
            object.__setattr__(b, "_steps", plain)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    model, _ = models.load(a.model, bits=a.bits, layers=a.layers)
    res = {"mlx": mx.__version__, "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"),
           "model": a.model, "bits": a.bits, "layers": a.layers}
    res["node_cost"] = node_cost()
    for name, c in res["node_cost"].items():
        print(f"node {name:14s} " + ", ".join(f"{k} {v:.2f}" for k, v in c.items()))
    res["nodes_unpatched"] = step_nodes(model)
    res["host_unpatched"] = step_breakdown(model, a.steps)
    patching.patch(model)
    res["nodes_patched"] = step_nodes(model)
    res["host_patched_compiled_halves"] = step_breakdown(model, a.steps)
    uncompiled_halves(model)
    res["nodes_patched_plain_halves"] = step_nodes(model)
    res["host_patched_plain_halves"] = step_breakdown(model, a.steps)
    for k in ("nodes_unpatched", "nodes_patched", "nodes_patched_plain_halves"):
        print(f"{k}: {sum(res[k].values())} nodes: {res[k]}")
    for k in ("host_unpatched", "host_patched_compiled_halves", "host_patched_plain_halves"):
        print(f"{k}: " + ", ".join(f"{n} {v:.0f}" for n, v in res[k].items()))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
