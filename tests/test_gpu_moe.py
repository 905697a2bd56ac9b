"""The routed experts as a grouped GEMM (dsv2.kernels.gpu.moe): the expert-sorted, block-padded layout on its own
invariants, and fused_moe against the model's inference_experts and forward_loop for one token, a batch, and a
routing that leaves experts empty and piles most rows on one, in fp32 and bf16, with H and I off the tiles. On CPU
the kernels run under Triton's interpreter (tests.conftest), so shapes stay small; the `gpu` tests add V2-Lite's
sizes and check that nothing synchronizes with the host."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE
from dsv2.kernels.gpu.moe import align_by_expert, fused_moe, max_padded_rows
from dsv2.model.moe import Experts, Routing, inference_experts

E, K = 8, 3


def _routing(kind: str, T: int, n_experts: int = E, top_k: int = K, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, K) distinct expert ids per token and fp32 weights. "skewed": expert 5 in every token, the other slots
    among experts 1, 2 and 6, so experts 0, 3, 4 and 7 get nothing."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        indices = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(T)])
    else:
        others = torch.tensor([1, 2, 6])
        indices = torch.stack([torch.cat([torch.tensor([5]), others[torch.randperm(3, generator=g)[:top_k - 1]]])
                               for _ in range(T)])
    weights = torch.rand(T, top_k, generator=g)
    return indices.to(DEVICE), weights.to(DEVICE)


def _experts(H: int, inter: int, dtype: torch.dtype, seed: int = 1) -> Experts:
    g = torch.Generator().manual_seed(seed)
    ex = Experts(E, H, inter)
    with torch.no_grad():
        ex.w13.copy_(0.2 * torch.randn(ex.w13.shape, generator=g))
        ex.w2.copy_(0.2 * torch.randn(ex.w2.shape, generator=g))
    return ex.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("block_m", [4, 16])
@pytest.mark.parametrize("kind,T", [("random", 1), ("random", 37), ("skewed", 37)])
def test_align_by_expert_layout(kind: str, T: int, block_m: int) -> None:
    indices, _ = _routing(kind, T)
    sorted_ids, block_expert, num_padded = align_by_expert(indices, E, block_m)
    n = T * K
    rows = max_padded_rows(n, E, block_m)
    assert sorted_ids.shape == (rows,) and block_expert.shape == (rows // block_m,)
    assert sorted_ids.dtype == block_expert.dtype == num_padded.dtype == torch.int32
    ids, blocks, flat = sorted_ids.cpu(), block_expert.cpu().tolist(), indices.flatten().cpu()
    real = ids[ids < n]
    assert ((ids < n) | (ids == n)).all()  # everything else is the sentinel T*K
    assert torch.equal(real.sort().values, torch.arange(n, dtype=torch.int32))  # each assignment exactly once
    counts = torch.bincount(flat, minlength=E).tolist()
    want_padded = sum(-(-c // block_m) * block_m for c in counts)
    assert num_padded.tolist() == [want_padded]
    n_blocks = want_padded // block_m
    assert blocks[n_blocks:] == [-1] * (len(blocks) - n_blocks) and (ids[want_padded:] == n).all()
    # Blocks in ascending expert order, ceil(count / block_m) of them per expert, none for an empty one.
    assert blocks[:n_blocks] == [e for e, c in enumerate(counts) for _ in range(-(-c // block_m))]
    if kind == "skewed":
        assert {0, 3, 4, 7}.isdisjoint(blocks)
    for e in range(E):  # each expert's run: its ids ascending (a stable sort), then only sentinels
        run = ids[sum(-(-c // block_m) * block_m for c in counts[:e]):][: -(-counts[e] // block_m) * block_m]
        assert torch.equal(run[: counts[e]], (flat == e).nonzero().squeeze(1).to(torch.int32))
        assert (run[counts[e]:] == n).all()


def test_align_by_expert_needs_no_values() -> None:
    """Every output shape follows from the input's shape: on meta tensors, which hold no data, any op that read
    values back to the host (.item(), nonzero, a bincount sizing itself) would fail."""
    sorted_ids, block_expert, num_padded = align_by_expert(torch.empty(37, K, dtype=torch.long, device="meta"),
                                                           E, 16)
    assert sorted_ids.shape == (max_padded_rows(37 * K, E, 16),) == (37 * K + E * 15 - 7,)
    assert block_expert.shape == (sorted_ids.shape[0] // 16,) and num_padded.shape == (1,)
    # One token: its K experts bound the padding, not all E.
    assert align_by_expert(torch.empty(1, K, dtype=torch.long, device="meta"), 64, 16)[0].shape == (K * 16,)


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape and torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # bf16 rounds the intermediates at different points: relative to the output's scale
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,T", [("random", 1), ("random", 37), ("skewed", 37)])
def test_fused_moe_matches_the_model(kind: str, T: int, dtype: torch.dtype) -> None:
    """H = 40 and I = 24 against tiles of 16: both the K loop's and the N edge's masks are exercised."""
    H, inter = 40, 24
    ex = _experts(H, inter, dtype)
    indices, weights = _routing(kind, T)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        got = fused_moe(x, indices, weights, ex.w13, ex.w2, block_m=16, block_n=16, block_k=16)
        want = inference_experts(x, indices, weights, ex.w13, ex.w2)
        loop = ex.forward_loop(x, Routing(weights, indices, torch.zeros(T, E, device=DEVICE)))
    _check(got, want, dtype)
    _check(got, loop, dtype)


@pytest.mark.parametrize("tiles", [dict(block_m=32, block_n=32, block_k=16, group_m=3),
                                   dict(block_m=16, block_n=16, block_k=32, group_m=1), dict()],
                         ids=["m32-group3", "k32-group1", "defaults"])
def test_fused_moe_tiles(tiles: dict) -> None:
    """Other tiles and L2 groupings give the same sums (group 3 leaves a ragged last group of row blocks), and so
    do the defaults, whose tiles are wider than H = 48 and I = 20 altogether."""
    H, inter, T = 48, 20, 29
    ex = _experts(H, inter, torch.float32, seed=3)
    indices, weights = _routing("skewed", T, seed=4)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        got = fused_moe(x, indices, weights, ex.w13, ex.w2, **tiles)
        want = inference_experts(x, indices, weights, ex.w13, ex.w2)
    _check(got, want, torch.float32)


def test_fused_moe_rejects_bad_input() -> None:
    ex = _experts(32, 16, torch.float32)
    indices, weights = _routing("random", 2)
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        fused_moe(x.bfloat16(), indices, weights, ex.w13, ex.w2)
    with pytest.raises(ValueError, match="shapes"):
        fused_moe(x[:, :16], indices, weights, ex.w13, ex.w2)
    with pytest.raises(ValueError, match="power of two"):
        fused_moe(x, indices, weights, ex.w13, ex.w2, block_n=24)
    assert fused_moe(x[:0], indices[:0], weights[:0], ex.w13, ex.w2).shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 512])
def test_fused_moe_at_v2_lite_size(T: int) -> None:
    """V2-Lite's experts (H 2048, I 1408, E 64, K 6) in bf16 with the default tiles, with no host sync."""
    H, inter, n_experts, top_k = 2048, 1408, 64, 6
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w13 = (0.02 * torch.randn(n_experts, 2 * inter, H, generator=g, device=DEVICE)).bfloat16()
    w2 = (0.02 * torch.randn(n_experts, H, inter, generator=g, device=DEVICE)).bfloat16()
    x = torch.randn(T, H, generator=g, device=DEVICE).bfloat16()
    weights, indices = torch.rand(T, n_experts, generator=g, device=DEVICE).topk(top_k, dim=-1)
    fused_moe(x, indices, weights, w13, w2)  # compile outside the check: the first launch may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    try:
        got = fused_moe(x, indices, weights, w13, w2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = inference_experts(x, indices, weights, w13, w2)
    _check(got, want, torch.bfloat16)
