"""The bf16 warning: raised where bf16 GEMMs would run in software, and only there."""

from __future__ import annotations

import warnings

import pytest
import torch

from dsv2 import Transformer
from dsv2 import hardware
from dsv2.infer import LLM
from tests.conftest import small_config


@pytest.mark.parametrize("native", [False, True])
def test_engine_warns_for_bf16_only_without_bf16_gemm(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_cpu_has_bf16_gemm", lambda: native)
    model = Transformer(small_config()).eval()
    with warnings.catch_warnings(record=True) as fp32_warnings:
        warnings.simplefilter("always")
        LLM(model, max_cache_tokens=64)
    assert not [w for w in fp32_warnings if "bfloat16" in str(w.message)]
    with warnings.catch_warnings(record=True) as bf16_warnings:
        warnings.simplefilter("always")
        LLM(model.to(torch.bfloat16), max_cache_tokens=64)
    messages = [str(w.message) for w in bf16_warnings if "bfloat16" in str(w.message)]
    assert len(messages) == (0 if native else 1)
    if messages:
        assert 'dtype="float32"' in messages[0]


def test_only_cpus_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_cpu_has_bf16_gemm", lambda: False)
    assert hardware.bf16_gemm_is_emulated("cpu")
    assert not hardware.bf16_gemm_is_emulated("cuda")
    assert not hardware.bf16_gemm_is_emulated("meta")
