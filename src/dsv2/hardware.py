"""What the machine does fast. Only facts that change a default or deserve a warning live here."""

from __future__ import annotations

import warnings

import torch


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
