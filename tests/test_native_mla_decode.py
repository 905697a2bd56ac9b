"""dsv2's CPU decode attention (dsv2.kernels.native.mla_decode, cpu/mla_decode.cpp) against the torch reference of
the paged-decode contract (dsv2.kernels.gpu.mla_decode_reference): every cache dtype, ragged contexts over
shuffled blocks whose padding points at NaN or out of range, dims and block sizes that are not whole vectors,
contexts long enough to be split over threads and merged, on each build of the kernels (conftest.native_lib: this
CPU's, AVX2, scalar); called whole from a compiled graph."""

from __future__ import annotations

import pytest
import torch

from tests.test_gpu_mla_decode import CASES, DTYPES, _check, _paged
from dsv2.infer.cache import FP8
from dsv2.kernels import native
from dsv2.kernels.gpu.mla_decode import mla_decode_reference

pytestmark = pytest.mark.skipif(not native.available(), reason="dsv2's CPU kernels are not built (no C++ compiler)")


def _cpu(cache, tables, ctx):  # noqa: ANN001, ANN202 -- _paged builds on tests.conftest.DEVICE
    scales = cache.scales[0].cpu() if cache.fp8 else None
    return cache.layers[0].cpu(), scales, tables.cpu(), ctx.cpu()


@pytest.mark.parametrize("cache_dtype,q_dtype", DTYPES, ids=["fp32", "bf16", "fp8-q32", "fp8-q16", "bf16-q32"])
@pytest.mark.parametrize("case", CASES, ids=["B1-len1", "B5-ragged", "odd-dims", "H20"])
def test_matches_reference(native_lib, case, cache_dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    lens, H, kv, rope, bs, _ = case
    layer, scales, tables, ctx = _cpu(*_paged(lens, kv, rope, bs, cache_dtype, seed=4))
    q = torch.randn(len(lens), H, kv + rope).to(q_dtype)
    want = mla_decode_reference(q, layer, scales, tables, ctx, bs, kv, 0.25)
    _check(native.mla_decode_with(native_lib, q, layer, scales, tables, ctx, bs, kv, 0.25), want, q_dtype)


@pytest.mark.parametrize("H,kv,rope", [(8, 64, 16), (16, 64, 16), (40, 32, 8), (8, 31, 6), (3, 16, 4)],
                         ids=["H8", "H16", "H40-padded", "odd-latent", "H3"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_head_layout(native_lib, H: int, kv: int, rope: int, cache_dtype: torch.dtype) -> None:
    """The kernel spreads heads over a vector's lanes 1, 2 or 4 lanes per head, in pairs of vectors padded with
    empty heads (cpu/mla_decode.cpp): each layout a build picks for these head counts and widths (an odd latent
    width allows only one lane per head), over passes of several blocks and a last one partly filled."""
    lens, bs = [70, 3, 129], 16
    layer, scales, tables, ctx = _cpu(*_paged(lens, kv, rope, bs, cache_dtype, seed=5))
    q = 2 * torch.randn(len(lens), H, kv + rope)
    want = mla_decode_reference(q, layer, scales, tables, ctx, bs, kv, (kv + rope) ** -0.5)
    _check(native.mla_decode_with(native_lib, q, layer, scales, tables, ctx, bs, kv, (kv + rope) ** -0.5), want,
           torch.float32)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, FP8], ids=["fp32", "bf16", "fp8"])
def test_long_contexts_split_and_merge(native_lib, threads: int, cache_dtype: torch.dtype) -> None:
    """Contexts of several parts (native.MLA_MIN_PART_TOKENS) beside short ones, a last block partly filled, the
    official configs' latent width (512 + 64) and a score range wide enough that the parts' maxima differ a lot."""
    lens, kv, rope, bs = [3000, 1, 700, 257], 512, 64, 16
    layer, scales, tables, ctx = _cpu(*_paged(lens, kv, rope, bs, cache_dtype, seed=8))
    q = 4 * torch.randn(len(lens), 16, kv + rope)
    want = mla_decode_reference(q, layer, scales, tables, ctx, bs, kv, 576**-0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.mla_decode_with(native_lib, q, layer, scales, tables, ctx, bs, kv, 576**-0.5)
    finally:
        torch.set_num_threads(previous)
    # sums of thousands of terms in another order than the reference's: fp32 rounding grows past _check's 1e-5
    torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)


def test_compiled_graph_calls_it_whole() -> None:
    """A torch custom op: dynamo captures it in a full graph (what the engine's compiled decode needs)."""
    lens, kv, rope, bs = [37, 5], 32, 8, 8
    layer, _, tables, ctx = _cpu(*_paged(lens, kv, rope, bs, torch.float32, seed=9))
    q = torch.randn(2, 4, kv + rope)

    def step(q: torch.Tensor) -> torch.Tensor:
        return native.mla_decode(q * 2, layer, None, tables, ctx, bs, kv, 0.2).sum(-1)

    want = mla_decode_reference(q * 2, layer, None, tables, ctx, bs, kv, 0.2).sum(-1)
    _check(torch.compile(step, backend="eager", fullgraph=True)(q), want, torch.float32)


def test_rejects_what_it_cannot_read() -> None:
    layer = torch.zeros(16, 40, dtype=torch.float16)
    args = (torch.zeros(1, 2, 40), layer, None, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long),
            16, 32, 0.1)
    with pytest.raises(ValueError, match="fp32, bf16 or fp8 e4m3 caches, not torch.float16"):
        native.mla_decode(*args)
    with pytest.raises(ValueError, match="an fp8 cache needs its scales"):
        native.mla_decode(args[0], layer.to(FP8), *args[2:])
