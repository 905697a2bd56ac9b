"""fp32 matrix products: torch's default CPU path (F.linear, MKL on x86) against oneDNN (dsv2.kernels.onednn).

The projection shapes of benchmarks/forward.py's ~100M model. Training: forward, input gradient and weight
gradient of a 1,024-token micro-batch (4 x 256), F.linear against dsv2's oneDNN linear on the same dense
weights. Decode: 1 and 32 rows (and ~4 rows per routed expert for 32 sequences), F.linear on the engine's
column-major weights (its layout without oneDNN) against oneDNN with the weights packed once. Medians of
--reps calls after warm-up; the ratio is F.linear time / oneDNN time.

    python benchmarks/gemm_library.py [--reps 30] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv2.kernels import onednn

# (name, in, out) of benchmarks/forward.py's model: hidden 512, q_lora 256, kv_lora 128, 8 heads of 64+32 / 64,
# experts 256 wide, dense MLP 1536 wide, vocabulary 32,000.
SHAPES = [("wqkv_a", 512, 256 + 128 + 32), ("wq_b", 256, 8 * 96), ("wo", 512, 512), ("expert w13", 512, 512),
          ("expert w2", 256, 512), ("dense w13", 512, 3072), ("lm_head", 512, 32000)]


def median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def training_rows(reps: int, tokens: int = 1024) -> None:
    print(f"\n## training products, {tokens} rows, dense weights\n")
    print("| layer (in x out) | product | F.linear ms | oneDNN ms | ratio |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, k, n in SHAPES:
        x, w, grad = torch.randn(tokens, k, generator=g), torch.randn(n, k, generator=g), torch.randn(tokens, n,
                                                                                                   generator=g)
        cases = [("forward x @ W.T", lambda: F.linear(x, w), lambda: onednn.mm(x, w)),
                 ("grad input g @ W", lambda: grad @ w, lambda: onednn.mm(grad, w.t())),
                 ("grad weight g.T @ x", lambda: grad.t() @ x, lambda: onednn.mm(grad.t(), x.t()))]
        for what, ref, ours in cases:
            a, b = median_ms(ref, reps), median_ms(ours, reps)
            print(f"| {name} ({k} x {n}) | {what} | {a:.3f} | {b:.3f} | {a / b:.2f}x |", flush=True)


def decode_rows(reps: int) -> None:
    print("\n## decode products: F.linear on column-major weights vs oneDNN on packed weights\n")
    print("| layer (in x out) | rows | F.linear ms | oneDNN packed ms | ratio |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for name, k, n in SHAPES:
        w = torch.randn(n, k, generator=g)
        col_major, packed = w.t().contiguous().t(), onednn.pack(w)
        for rows in (1, 4, 32) if name.startswith("expert") else (1, 32):
            x = torch.randn(rows, k, generator=g)
            a, b = median_ms(lambda: F.linear(x, col_major), reps), median_ms(lambda: onednn.mm(x, packed), reps)
            print(f"| {name} ({k} x {n}) | {rows} | {a:.3f} | {b:.3f} | {a / b:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not onednn.available():
        raise SystemExit("error: oneDNN products need an x86 CPU with torch's oneDNN")
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    print(f"# fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, {model} ({platform.machine()}), "
          f"medians of {args.reps}")
    with torch.inference_mode():
        training_rows(args.reps)
        decode_rows(args.reps)


if __name__ == "__main__":
    main()
