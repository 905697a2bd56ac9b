"""Absorbed MLA decode over the paged latent cache (dsv2.kernels.gpu.mla_decode): the torch reference against the
model's own absorbed attention, and the Triton kernel against the reference for every cache dtype, ragged
contexts, shuffled block tables whose padding points at NaN (or nowhere), and any split count. On CPU the kernel
runs under Triton's interpreter (tests.conftest), so shapes stay small; the `gpu` tests add the real sizes."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE, randomize_, small_config
from dsv2.infer.cache import FP8, PagedLatentCache
from dsv2.kernels.gpu.mla_decode import mla_decode, mla_decode_reference
from dsv2.model.mla import MLA


def _paged(lens: list[int], kv_rank: int, rope_dim: int, block_size: int, dtype: torch.dtype, seed: int,
           pad: str = "garbage") -> tuple[PagedLatentCache, torch.Tensor, torch.Tensor]:
    """A one-layer paged cache holding len(lens) sequences in shuffled blocks, and their (B, max_blocks + 2)
    block tables. Unwritten slots (the tail of each last block, a spare block) hold NaN, scales included.
    pad, for the table entries past a sequence's blocks: "garbage" mixes the NaN block, -1 and far out of range
    values (the kernel must not read them); "zeros" points them at a zeroed block, for code that reads the whole
    padded table (the model's gather path)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 1  # + the spare block the padding points at
    cache = PagedLatentCache(small_config(kv_lora_rank=kv_rank, qk_rope_head_dim=rope_dim, num_hidden_layers=1),
                             num_blocks, block_size, dtype, DEVICE)
    fill = float("nan") if pad == "garbage" else 0.0
    cache.layers[0].fill_(fill)
    if cache.scales is not None:
        cache.scales[0].fill_(fill if pad == "garbage" else 1.0)
    order = torch.randperm(num_blocks, generator=g)
    spare, free = int(order[0]), order[1:].tolist()
    width = max(need) + 2
    tables = torch.full((len(lens), width), spare, dtype=torch.long)
    for b, (n, k) in enumerate(zip(lens, need)):
        tables[b, :k] = torch.tensor(free[:k])
        free = free[k:]
        if pad == "garbage":  # entries past the end: the NaN block, out of range on both sides
            tables[b, k:] = torch.tensor([spare, -1, 10**6, spare] * width)[: width - k]
        latent = torch.randn(n, kv_rank + rope_dim, generator=g)
        latent[:, kv_rank:] *= 3  # the rotated key's range differs from the normed latent's, as in the model
        pos = torch.arange(n)
        cache.write(0, (tables[b, pos // block_size] * block_size + pos % block_size).to(DEVICE), latent.to(DEVICE))
    return cache, tables.to(DEVICE), torch.tensor(lens, device=DEVICE)


def _check(got: torch.Tensor, want: torch.Tensor, q_dtype: torch.dtype) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape and torch.isfinite(got).all()
    tol = 1e-5 if q_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("fn", [mla_decode_reference, mla_decode], ids=["reference", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, FP8], ids=["fp32", "fp8"])
def test_matches_the_models_absorbed_attention(fn, dtype: torch.dtype) -> None:
    """Through absorb_query / absorb_output, the decode equals MLA.attend_absorbed over the runner's gathered,
    masked context (dsv2.infer.runner.PagedAttention's decode path)."""
    cfg = small_config()
    attn = randomize_(MLA(cfg), seed=1).to(DEVICE)
    lens, bs = [7, 1, 16, 29], 8
    cache, tables, ctx = _paged(lens, cfg.kv_lora_rank, cfg.qk_rope_head_dim, bs, dtype, seed=2, pad="zeros")
    B, nh = len(lens), cfg.num_attention_heads
    q_nope = torch.randn(B, nh, cfg.qk_nope_head_dim, device=DEVICE)
    q_pe = torch.randn(B, nh, cfg.qk_rope_head_dim, device=DEVICE)
    with torch.no_grad():
        latent = cache.gather(0, cache.slots_of(tables), torch.float32)  # (B, S, W)
        mask = (torch.arange(latent.shape[1], device=DEVICE) < ctx[:, None])[:, None, None, :]
        want = attn.attend_absorbed(q_nope[:, None], q_pe[:, None], latent, mask)[:, 0]  # (B, nh, dv)
        q = torch.cat([attn.absorb_query(q_nope[:, None])[:, 0], q_pe], dim=-1)
        o_lat = fn(q, cache.layers[0], cache.scales[0] if cache.fp8 else None, tables, ctx, bs, cfg.kv_lora_rank,
                   attn.softmax_scale)
        got = attn.absorb_output(o_lat[:, None])[:, 0]
    _check(got, want, torch.float32)


def test_reference_is_a_dense_softmax() -> None:
    """The reference against the definition written out densely, with dequantization by hand."""
    lens, kv, rope, bs = [5, 12], 32, 8, 4
    cache, tables, ctx = _paged(lens, kv, rope, bs, FP8, seed=3)
    q = torch.randn(2, 3, kv + rope, device=DEVICE)
    got = mla_decode_reference(q, cache.layers[0], cache.scales[0], tables, ctx, bs, kv, 0.3)
    for b, n in enumerate(lens):
        rows = [int(tables[b, i // bs]) * bs + i % bs for i in range(n)]
        raw, s = cache.layers[0][rows].float(), cache.scales[0][rows]
        k = torch.cat([raw[:, :kv] * s[:, :1], raw[:, kv:] * s[:, 1:]], dim=-1)
        p = torch.exp(0.3 * q[b] @ k.T)
        _check(got[b], (p / p.sum(-1, keepdim=True)) @ k[:, :kv], torch.float32)


# (context lengths, heads, kv_rank, rope_dim, block_size, num_splits)
CASES = [
    ([1], 4, 32, 8, 16, None),  # one sequence of one token
    ([1, 4, 16, 37, 9], 6, 32, 8, 4, 3),  # ragged, exact multiples of the block size, empty splits
    ([40, 3, 32, 17, 25], 5, 48, 16, 5, 2),  # kv_rank and block size not powers of two
    ([33], 20, 48, 16, 8, None),  # two head groups, the second partial
]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (FP8, torch.float32),
          (FP8, torch.bfloat16), (torch.bfloat16, torch.float32)]  # (cache, q)


@pytest.mark.parametrize("cache_dtype,q_dtype", DTYPES, ids=["fp32", "bf16", "fp8-q32", "fp8-q16", "bf16-q32"])
@pytest.mark.parametrize("case", CASES, ids=["B1-len1", "B5-ragged", "odd-dims", "H20"])
def test_kernel_matches_reference(case, cache_dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    lens, H, kv, rope, bs, splits = case
    cache, tables, ctx = _paged(lens, kv, rope, bs, cache_dtype, seed=4)
    q = torch.randn(len(lens), H, kv + rope, device=DEVICE).to(q_dtype)
    scales = cache.scales[0] if cache.fp8 else None
    want = mla_decode_reference(q, cache.layers[0], scales, tables, ctx, bs, kv, 0.25)
    got = mla_decode(q, cache.layers[0], scales, tables.int(), ctx.int(), bs, kv, 0.25, num_splits=splits)
    _check(got, want, q_dtype)


@pytest.mark.parametrize("splits", [1, 2, 5, 33])
def test_any_split_count(splits: int) -> None:
    """However the context is cut (33 slices leave most of them empty), the merge gives the same result; q is a
    strided view (heads interleaved with another tensor) to cover non-contiguous queries."""
    lens, kv, rope, bs = [37, 2, 64], 32, 8, 8
    cache, tables, ctx = _paged(lens, kv, rope, bs, torch.float32, seed=5)
    q = torch.randn(3, 4, 2, kv + rope, device=DEVICE)[:, :, 1]
    want = mla_decode_reference(q, cache.layers[0], None, tables, ctx, bs, kv, 0.2)
    _check(mla_decode(q, cache.layers[0], None, tables, ctx, bs, kv, 0.2, num_splits=splits), want, torch.float32)


@pytest.mark.gpu
def test_launch_does_not_sync() -> None:
    lens, kv, rope, bs = [100, 3], 512, 64, 16
    cache, tables, ctx = _paged(lens, kv, rope, bs, FP8, seed=6)
    q = torch.randn(2, 16, kv + rope, device=DEVICE, dtype=torch.bfloat16)
    args = (q, cache.layers[0], cache.scales[0], tables, ctx, bs, kv, 0.1)
    mla_decode(*args)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    try:
        mla_decode(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype,q_dtype", DTYPES, ids=["fp32", "bf16", "fp8-q32", "fp8-q16", "bf16-q32"])
@pytest.mark.parametrize("H,bs", [(16, 16), (128, 64)])
def test_full_size(H: int, bs: int, cache_dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    """The official configs' latent (512 + 64), long and short contexts, the default split count."""
    lens, kv, rope = [1, 1000, 4097, 64], 512, 64
    cache, tables, ctx = _paged(lens, kv, rope, bs, cache_dtype, seed=7)
    q = torch.randn(len(lens), H, kv + rope, device=DEVICE).to(q_dtype)
    scales = cache.scales[0] if cache.fp8 else None
    want = mla_decode_reference(q, cache.layers[0], scales, tables, ctx, bs, kv, 576**-0.5)
    _check(mla_decode(q, cache.layers[0], scales, tables, ctx, bs, kv, 576**-0.5), want, q_dtype)
