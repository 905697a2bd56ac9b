"""The products behind dsv2.kernels.quant on this CPU: dsv2's own int8 / int4 kernels (kernels/native.py) and
torch's (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) against the dense bf16 GEMM, by rows, on V2-Lite
routed experts' gate+up projections (2816 x 2048); the cost of dequantizing (the many-row path); and how fast
weights quantize (what bounds quantize-as-it-loads).

Products run over a stack of EXPERTS distinct matrices in turn, so that, as in a decode step, every weight comes
from memory rather than the cache (one matrix multiplied again and again sits in L2/L3 and measures something
else: `--hot` does that). Each figure is the median of 9 passes after a warm-up, 2 threads. GB/s counts the
weight bytes one product streams (int8: 1 byte per weight, int4: 0.5, bf16: 2).

    python benchmarks/quant.py [--threads 2] [--build native|avx2|scalar]

`--build avx2` times the AVX2 code path of dsv2's kernels (native.BUILDS) on a CPU that has more: what decides
`native.int4_preferred` on AVX2-only machines, short of one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv2.kernels import native, quant
from dsv2.kernels.quant import Scheme

N, K = 2816, 2048
EXPERTS = 24


def ms(f: Callable[[], object], n: int = 9) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hot", action="store_true", help="multiply one matrix again and again (cache-resident)")
    ap.add_argument("--build", choices=sorted(native.BUILDS), default="native",
                    help="which code path of dsv2's kernels to time (default: this CPU's)")
    a = ap.parse_args()
    lib = native.library() if a.build == "native" else native.open_library(native.build(native.BUILDS[a.build]))
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    count = 1 if a.hot else EXPERTS
    s8, s4 = Scheme("int8"), Scheme("int4", 64)
    dense, i8, i4t, i4n = [], [], [], []
    for _ in range(count):
        w = torch.randn(N, K, generator=g) * 0.02
        dense.append(w.bfloat16())
        i8.append(quant.runtime_weights(quant.quantize(w, s8), s8))
        q4 = quant.quantize(w, s4)
        i4t.append(quant.Int4Weight(*quant.int4_layout(q4), 64))  # torch's layout and kernel
        if native.available():
            scale = q4.scale.bfloat16()  # the block layout, whatever native.int4_preferred says on this CPU
            i4n.append(quant.Int4BlockWeight(native.int4_blocks(quant.unpack_int4(q4.weight)), scale,
                                             torch.zeros_like(scale), 64))
    have = native.available()
    print(f"{N} x {K}, {count} matrices in turn, {a.threads} threads, dsv2 kernels: "
          f"{f'{a.build} build' if have else 'absent'}; "
          "ms per product (GB/s of weights)")
    print("| rows | int8 torch | int8 dsv2 | int4 g64 torch | int4 g64 dsv2 | bf16 F.linear |")
    print("|---|---|---|---|---|---|")
    cell = lambda t, b: f"{t:.3f} ({N * K * b / t / 1e6:.1f})"  # noqa: E731
    for rows in (1, 2, 4, 8, 16):
        x = torch.randn(rows, K, generator=g).bfloat16()
        per = lambda f, ws: ms(lambda: [f(w) for w in ws]) / len(ws)  # noqa: E731
        t8 = per(lambda w: w._kernel(x), i8)
        n8 = per(lambda w: native.int8_mm(x, w.q, w.scale, lib), i8) if have else float("nan")
        t4 = per(lambda w: w._kernel(x), i4t)
        n4 = per(lambda w: native.int4_mm(x, w.packed, w.scale, w.zero, 64, lib), i4n) if have else float("nan")
        tb = per(lambda w: F.linear(x, w), dense)
        print(f"| {rows} | {cell(t8, 1)} | {cell(n8, 1)} | {cell(t4, 0.5)} | {cell(n4, 0.5)} | {cell(tb, 2)} |")
    w8, w4 = i8[0], (i4n or i4t)[0]
    print(f"dequantize to bf16: int8 {ms(lambda: w8.dequantize(torch.bfloat16)):.2f} ms, "
          f"int4 {ms(lambda: w4.dequantize(torch.bfloat16)):.2f} ms")
    stack = (torch.randn(16, N, K, generator=g) * 0.02).bfloat16()
    for scheme in (Scheme("int8"), Scheme("int4", 64)):
        t0 = time.perf_counter()
        qt = quant.quantize(stack, scheme)
        t1 = time.perf_counter()
        quant.runtime_weights(qt, scheme)
        t2 = time.perf_counter()
        print(f"{scheme.method}: quantize {stack.numel() / (t1 - t0) / 1e9:.2f} G weights/s, "
              f"to the kernel's layout {stack.numel() / (t2 - t1) / 1e9:.2f} G weights/s")


if __name__ == "__main__":
    main()
