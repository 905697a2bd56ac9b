"""One V2-Lite MoE layer's routed experts at decode sizes on this CPU: the expert-by-expert path (a product per
expert matrix, SwiGLU and the weighted sum as torch ops: `moe.inference_experts`) against the one native call per
layer (`native.experts`, called directly at every count: what `QuantExperts` runs up to `quant.FUSED_MAX_TOKENS`
tokens), int8 and int4 (g64) weights.

64 experts of 2048 -> 1408 -> 2048, 6 chosen per token, fresh random routing every call, so the chosen experts'
weights come from memory as in a decode step (the layer is 0.55 GB in int8, far past the caches). bf16
activations, as the engine's quantized models run. Each figure is the median of the rounds; the two paths
alternate within a round. GB/s counts the weight bytes of the distinct experts a call touches.

    python benchmarks/moe_step.py [--threads 2] [--rounds 15] [--tokens 1,4,16,32,64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv2.kernels import native, quant
from dsv2.kernels.quant import Scheme
from dsv2.model.moe import Routing, inference_experts

E, H, I, TOP_K = 64, 2048, 1408, 6


def layer(scheme: Scheme, g: torch.Generator) -> quant.QuantExperts:
    w13, w2 = [], []
    for _ in range(E):  # one expert at a time: the fp32 stack would be 2.2 GB
        w13.append(quant.runtime_weights(quant.quantize(torch.randn(2 * I, H, generator=g) * 0.02, scheme), scheme))
        w2.append(quant.runtime_weights(quant.quantize(torch.randn(H, I, generator=g) * 0.02, scheme), scheme))
    return quant.QuantExperts(w13, w2)


def routing(tokens: int, g: torch.Generator) -> Routing:
    idx = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(tokens)])
    w = torch.rand(tokens, TOP_K, generator=g)
    return Routing(w, idx, torch.empty(0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tokens", default="1,4,16,32,64", help="comma-separated token counts")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    counts = [int(t) for t in a.tokens.split(",")]
    if not native.available():
        raise SystemExit("error: dsv2's kernels are not built here (no C++ compiler?): nothing to compare")
    print(f"{E} experts {H} -> {I} -> {H}, top-{TOP_K}, {a.threads} threads, vector width "
          f"{native.library().dsv2_vector_width()}, medians of {a.rounds} rounds")
    print("| weights | tokens | per expert ms | one call ms | speed-up | one call GB/s |")
    print("|---|---|---|---|---|---|")
    for scheme in (Scheme("int8"), Scheme("int4", 64)):
        g = torch.Generator().manual_seed(0)
        experts = layer(scheme, g)
        if experts._native is None:
            print(f"| {scheme.method} | - | (the native call needs dsv2's int4 kernels: not preferred on this build) |")
            continue
        per_expert_bytes = experts.w13[0].nbytes + experts.w2[0].nbytes
        bits, table, group_size = experts._native
        for tokens in counts:
            x = (torch.randn(tokens, H, generator=g) * 0.5).bfloat16()
            old, new, touched = [], [], []
            with torch.no_grad():
                for r in range(a.rounds + 1):
                    ro = routing(tokens, g)
                    t0 = time.perf_counter()
                    inference_experts(x, ro.indices, ro.weights, experts.w13, experts.w2, linear=quant._qmm)
                    t1 = time.perf_counter()
                    ro = routing(tokens, g)
                    t2 = time.perf_counter()
                    native.experts(bits, table, x, ro.indices, ro.weights, I, group_size)
                    t3 = time.perf_counter()
                    if r:  # the first round warms up
                        old.append(t1 - t0)
                        new.append(t3 - t2)
                        touched.append(len(set(ro.indices.flatten().tolist())) * per_expert_bytes)
            o, n = statistics.median(old) * 1e3, statistics.median(new) * 1e3
            gbs = statistics.median(touched) / (n * 1e-3) / 1e9
            print(f"| {scheme.method} | {tokens} | {o:.2f} | {n:.2f} | {o / n:.2f}x | {gbs:.1f} |")
        del experts


if __name__ == "__main__":
    main()
