"""bf16 against fp32 GEMMs on this CPU, in the three layouts a linear layer's training step uses.

A layer y = x @ W.T (x: tokens x in, W: out x in, row-major as nn.Linear stores it) runs, per step:
  forward      x @ W.T     (tokens x in) @ (in x out), the weight read transposed
  grad input   g @ W       (tokens x out) @ (out x in), both row-major
  grad weight  g.T @ x     (out x tokens) @ (tokens x in), the gradient read transposed
On CPUs without bf16 matrix instructions (AVX512-BF16 / AMX) oneDNN cannot take bf16 GEMMs and torch runs them
on a generic path whose speed depends on the layout; dsv2.hardware warns there. Medians of interleaved reps.

    python benchmarks/gemm_dtype.py [--tokens 1024] [--dims 256x768,512x1536] [--reps 7] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from dsv2.hardware import bf16_gemm_is_emulated


def _cases(tokens: int, d_in: int, d_out: int, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g).to(dtype)
    w = torch.randn(d_out, d_in, generator=g).to(dtype)
    grad = torch.randn(tokens, d_out, generator=g).to(dtype)
    return {"forward x @ W.T": (x, w.T), "grad input g @ W": (grad, w), "grad weight g.T @ x": (grad.T, x)}


def _time(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dims", default="256x768,512x1536", help="in x out of the layers measured, comma-separated")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {_cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"bf16 GEMM emulated: {bf16_gemm_is_emulated('cpu')}")
    print("| layer (in x out), tokens | GEMM | fp32 ms | bf16 ms | bf16 / fp32 |")
    print("|---|---|---|---|---|")
    for dims in args.dims.split(","):
        d_in, d_out = map(int, dims.split("x"))
        fp32, bf16 = _cases(args.tokens, d_in, d_out, torch.float32), _cases(args.tokens, d_in, d_out, torch.bfloat16)
        for name in fp32:
            times: dict[str, list[float]] = {"fp32": [], "bf16": []}
            for rep in range(args.reps + 1):  # the first rep warms up and is dropped
                t32, t16 = _time(*fp32[name]), _time(*bf16[name])
                if rep:
                    times["fp32"].append(t32)
                    times["bf16"].append(t16)
            m32, m16 = (statistics.median(times[k]) * 1e3 for k in ("fp32", "bf16"))
            print(f"| {d_in} x {d_out}, {args.tokens} | {name} | {m32:.2f} | {m16:.2f} | {m16 / m32:.1f}x |")


if __name__ == "__main__":
    main()
