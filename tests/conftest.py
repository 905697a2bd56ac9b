"""Shared helpers: small configurations of the DeepSeek-V2 family, random reference models, and each build of
dsv2's CPU kernels."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels (dsv2.kernels.gpu) run on CPU tensors under Triton's interpreter. Triton reads
# this when it is first imported (tl's builtins are bound then), and importing dsv2 imports torch._dynamo, which
# imports triton: so it is set before dsv2 is imported. `import torch` alone does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv2 import ModelConfig  # noqa: E402
from dsv2.config import YarnScaling  # noqa: E402
from dsv2.kernels import native  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the kernel tests run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

YARN_0707 = YarnScaling(factor=40.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707)
YARN_1 = YarnScaling(factor=8.0, original_max_position_embeddings=320, mscale=1.0, mscale_all_dim=1.0)


def small_config(**overrides: object) -> ModelConfig:
    """V2's structure at test size: q compression, 8 experts in 4 groups, shared experts, a dense layer."""
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, n_shared_experts=2, n_routed_experts=8,
        num_experts_per_tok=3, routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        first_k_dense_replace=1, max_position_embeddings=2560, rope_scaling=YARN_0707,
        bos_token_id=0, eos_token_id=1, torch_dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> torch.nn.Module:
    """Weights large enough that routing decisions, norms and attention patterns all matter: norm
    weights around 1, everything else N(0, std). Same parameter order => same values for a given seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one intra-op thread than on two (no fork/join per op), and a second
    thread stalls badly when the other core is busy (a server subprocess in the same test, or a shared
    machine): seen as 100x slower forwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VARIANTS = native.BUILDS


def cpu_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags"))
    except OSError:
        return False


# Each code path dsv2's CPU kernels have (cpu/simd.h): the build for this CPU, AVX2 where the CPU has it, scalar.
@pytest.fixture(scope="module", params=sorted(VARIANTS))
def native_lib(request: pytest.FixtureRequest):  # noqa: ANN201 -- a ctypes.CDLL
    if request.param == "avx2" and not (cpu_has("avx2") and cpu_has("fma")):
        pytest.skip("this CPU has no AVX2")
    return native.open_library(native.build(VARIANTS[request.param]))
