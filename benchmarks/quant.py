"""The products behind dsv2.kernels.quant on this CPU: int8 and int4 weight-only kernels against the dense
bf16 / fp32 GEMM, by rows, on a V2-Lite routed expert's gate+up projection (2816 x 2048); the cost of
dequantizing (the many-row path); and how fast weights quantize (what bounds quantize-as-it-loads).

Each figure is the median of 15 calls after 2 warm-ups, 2 threads. GB/s counts the weight bytes one product
streams (int8: 1 byte per weight, int4: 0.5, bf16: 2, fp32: 4).

    python benchmarks/quant.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv2.kernels import quant
from dsv2.kernels.quant import Scheme

N, K = 2816, 2048


def ms(f: Callable[[], object], n: int = 15) -> float:
    f(), f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    wb = w.bfloat16()
    i8 = quant.runtime_weights(quant.quantize(w, Scheme("int8")), Scheme("int8"))
    i4 = quant.runtime_weights(quant.quantize(w, Scheme("int4", 64)), Scheme("int4", 64))
    print(f"{N} x {K}, {a.threads} threads; ms per product (GB/s of weights)")
    print("| rows | int8 kernel | int4 kernel | bf16 F.linear | fp32 F.linear |")
    print("|---|---|---|---|---|")
    for rows in (1, 2, 4, 8, 16, 32, 64, 512):
        x = torch.randn(rows, K, generator=g).bfloat16()
        xf = x.float()
        t8 = ms(lambda: i8._kernel(x))
        t4 = ms(lambda: i4._kernel(x))
        tb = ms(lambda: F.linear(x, wb))
        tf = ms(lambda: F.linear(xf, w))
        cell = lambda t, b: f"{t:.3f} ({N * K * b / t / 1e6:.1f})"  # noqa: E731
        print(f"| {rows} | {cell(t8, 1)} | {cell(t4, 0.5)} | {cell(tb, 2)} | {cell(tf, 4)} |")
    print(f"dequantize to bf16: int8 {ms(lambda: i8.dequantize(torch.bfloat16)):.2f} ms, "
          f"int4 {ms(lambda: i4.dequantize(torch.bfloat16)):.2f} ms")
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
