"""What the machine does fast. Only facts that change a default or deserve a warning live here."""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def bf16_gemm_is_emulated(device: torch.device | str) -> bool:
    """True on a CPU without bf16 matrix hardware (AVX512-BF16 or AMX), where oneDNN cannot run bf16 GEMMs.

    torch then runs them through a generic path: on an AVX2-only CPU, benchmarks/gemm_dtype.py measured bf16
    GEMMs 6x to 140x slower than float32 depending on the operands' layout, so bf16 is a slow-down there, in
    inference and still more in training (backward multiplies transposed operands)."""
    return torch.device(device).type == "cpu" and not _cpu_has_bf16_gemm()


def _cpu_has_bf16_gemm() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def warn_if_bf16_is_slow(dtype: torch.dtype, device: torch.device | str, what: str, fix: str) -> None:
    if dtype == torch.bfloat16 and bf16_gemm_is_emulated(device):
        warnings.warn(f"{what} in bfloat16 on a CPU without bf16 matrix instructions (AVX512-BF16/AMX): its GEMMs "
                      f"run in software, 6-140x slower than float32 on such CPUs; {fix}", stacklevel=3)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (mallopt: no mmap'd chunks, trim only past
    1 GiB free). Returns whether it applied: on Linux with glibc, unless DSV2_MALLOC=default.

    glibc gives every allocation over its mmap threshold (32 MiB at most) fresh pages and unmaps them on free,
    so a training step page-faults its large tensors (logits, their gradients, stacked expert gradients, the
    optimizer's temporaries) back in on every step. Measured on a 2-core CPU (BENCHMARKS.md): the tiny recipe
    trains 15% more tokens per second. The process's memory then stays near its peak, which suits a training run; the
    training commands call this, a library import does not. Not every large allocation is served from freed
    memory: torch asks for 64-byte-aligned blocks, which need a little more than a freed block of the same size
    holds, so when a small live allocation sits right after the freed block, the heap grows instead (seen for one
    repeated 64 MiB tensor in about one process in five)."""
    if os.environ.get("DSV2_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc malloc_trim(0)); whether it ran (Linux with glibc).

    An engine's steps allocate tensors of ever-changing sizes (batch rows, chunk lengths, logits), and glibc
    keeps the holes they leave in its heap: a server's resident memory then creeps up for minutes under steady
    load without a live byte more (benchmarks/soak.py: +17% over five minutes on dsv2-tiny; with a trim every
    10 s it stays flat, BENCHMARKS.md). A trim walks the heap, so the engine loop calls it seldom."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim(0)
    return True


def check_device(device: torch.device | str) -> torch.device:
    """A device dsv2 can run on, or a ValueError that says why not (unknown name, no CUDA here)."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} (e.g. 'cpu', 'cuda', 'cuda:1')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: "
                         + ("no CUDA device is visible" if torch.backends.cuda.is_built() else
                            f"this torch build ({torch.__version__}) has no CUDA support"))
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; dsv2 runs on 'cpu' and 'cuda'")
    return dev
